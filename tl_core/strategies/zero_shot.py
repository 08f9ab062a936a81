"""`zero-shot`: recognise classes never seen with labels, from a description of each class.

Two ways to describe a class, chosen by the descriptions file (`--attributes FILE`):

**By description embeddings** (the default; a file with `glyphs:` or `descriptions:`, or none):
a class is described by something the model can embed, and an example goes to the class whose
description's embedding is nearest (cosine similarity, times SCALE as logits). The same encoder
(the model's backbone) embeds both. What describes a class:

- text: a sentence (`descriptions:`, one per class), by default the class name itself. With a
  pretrained sentence encoder (`--backbone packaged:minilm-l6`) this needs no labels at all:
  with no `--unseen-classes` every class is unseen and nothing is trained.
- images: the class's printed character, its glyph, rendered in GLYPHS_PER_CLASS of the
  fonts that `fonts:` data uses (tl_core/data/fonts.py), framed as `tl prepare` frames the
  dataset's images (its channels and size, normalised with its mean and std). By default the
  glyph is the class name ("0".."9" for digits); a class's embedding is the mean of its
  fonts' embeddings. A file may name them and frame them:

      glyphs: {"0": "O", "1": "I"}   # class name -> the one character to print (others: the name)
      glyph_margin: 0.14             # blank border, a fraction of the side (MNIST: 20 px in 28)

With some classes seen, the encoder is first trained on their labelled examples to put each
near its own class's description (cross-entropy over the seen descriptions' similarities, the
batch and the descriptions in one forward pass), so the space is learnt on the seen classes
only: the unseen classes' examples and labels are never used, only their descriptions, at
prediction.

**By attributes**, direct attribute prediction (DAP; Lampert, Nickisch & Harmeling 2009,
"Learning to Detect Unseen Object Classes by Between-Class Attribute Transfer", and TPAMI
2014; a file with `attributes:`, e.g. `seven_segment.yaml`, packaged beside this file: the
seven segments a..g of a seven-segment display that each digit lights). Every class is described
by a 0/1 signature over M attributes. Then:

- training sees only the labelled images of the *seen* classes (every class not in
  `--unseen-classes`). The model has one output per attribute (built with num_classes = M),
  and learns each attribute independently: binary cross-entropy of its M logits against the
  signature of the image's class. Random init, or the backbone of `--backbone`.
- an image of an unseen class is classified by the attribute signature it fits best: with
  p_m = sigmoid(logit_m) the predicted probability that attribute m is on, class c scores the
  log-likelihood of its signature s^c, sum_m log p(a_m = s^c_m), where p(a_m = 1) = p_m and
  p(a_m = 0) = 1 - p_m (attributes independent given the image, a uniform class prior; we
  leave out the paper's division by the attribute priors). The scores are the logits that
  `predict` returns, so a model's accuracy is its zero-shot accuracy among the unseen classes
  (chance: 1/U) and `tl evaluate` gives their confusion matrix.
- `generalized_scores` / `generalized_accuracy`: the harder generalized setting, where every
  class (seen and unseen) is a candidate for every test image.

An attribute that is constant over the seen classes (with unseen {0, 2, 6, 8}, no seen digit
lights e) cannot be learnt: its predictor only learns "always off", which says nothing about
an image. Such an attribute is left out of the scores, with a warning; if two unseen classes
then differ only in left-out attributes, that is an error (nothing could tell them apart).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from tl_core.data import load_manifest
from tl_core.errors import UserError
from tl_core.models import Classifier, predict_logits
from tl_core.strategies._registry import register_strategy
from tl_core.strategies.base import Strategy

DEFAULT_DESCRIPTIONS = Path(__file__).with_name("seven_segment.yaml")


@dataclass(frozen=True)
class ClassDescriptions:
    """A class descriptions file: attribute names, and each class's 0/1 signature over them."""

    path: str
    attributes: list[str]
    signatures: dict[str, list[int]]


def read_descriptions_file(path: str | None) -> dict | None:
    """A class descriptions file's YAML mapping (None: no file given)."""
    if not path:
        return None
    file = Path(path)
    fix = f"see {DEFAULT_DESCRIPTIONS.name} (packaged with tl_core) for the format"
    if not file.is_file():
        raise UserError(f"class descriptions file {file} does not exist: check --attributes ({fix})")
    try:
        content = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"class descriptions file {file} is not valid YAML: {err}") from None
    if not isinstance(content, dict):
        raise UserError(f"class descriptions file {file} needs an `attributes:` list and a `classes:` mapping "
                        f"(attribute signatures), `glyphs:` (images) or `descriptions:` (text) ({fix})")
    return content


def load_descriptions(path: str | None) -> ClassDescriptions:
    """Read and check a file of attribute signatures (None: the packaged seven-segment digits)."""
    file = path or str(DEFAULT_DESCRIPTIONS)
    content = read_descriptions_file(file)
    if not isinstance(content.get("attributes"), list) or not isinstance(content.get("classes"), dict):
        raise UserError(f"class descriptions file {file} needs an `attributes:` list and a `classes:` mapping (see "
                        f"{DEFAULT_DESCRIPTIONS.name}, packaged with tl_core, for the format)")
    attributes = [str(a) for a in content["attributes"]]
    if not attributes or len(set(attributes)) != len(attributes):
        raise UserError(f"{file}: `attributes` must name at least one attribute, each once; got {attributes}")
    signatures = {}
    for name, signature in content["classes"].items():
        name = str(name)  # YAML reads an unquoted 3: as the number 3; class names are strings
        if not isinstance(signature, list) or len(signature) != len(attributes):
            raise UserError(f"{file}: class {name!r} has the signature {signature!r}; it needs one 0/1 value per "
                            f"attribute, {len(attributes)} in all ({', '.join(attributes)})")
        if any(isinstance(v, bool) or v not in (0, 1) for v in signature):
            raise UserError(f"{file}: class {name!r} has the signature {signature}; every value must be 0 or 1")
        signatures[name] = [int(v) for v in signature]
    return ClassDescriptions(file, attributes, signatures)


SCALE = 20.0  # cosine similarities (in [-1, 1]) times this are the logits: a softmax sharp enough to train on
# Glyph renders that describe an image class: this many fonts, spread over DejaVu, STIX and
# Computer Modern (a glyph in fewer fonts repeats some), their embeddings averaged. Every one goes
# through the encoder with each training batch, so few keep a step cheap.
GLYPHS_PER_CLASS = 4


def descriptions_of(cfg) -> dict | None:
    """The class descriptions a run uses: `--attributes FILE`, else the descriptions.yaml that came
    with the data (recorded in its manifest by `tl prepare`), else none."""
    if cfg.attributes:
        return read_descriptions_file(cfg.attributes)
    return load_manifest(cfg.data).get("descriptions")


def descriptions_name(cfg) -> str:
    return str(cfg.attributes) if cfg.attributes else f"the descriptions.yaml of {cfg.data}"


def is_word(name: str) -> bool:
    """A class name that says something to a text encoder: letters, no digits ("Sci/Tech", not "0" or "n0234")."""
    return sum(ch.isalpha() for ch in name) >= 2 and not any(ch.isdigit() for ch in name)


def head_from_descriptions(cfg, strategy: str, model_name: str) -> bool:
    """Whether the new head starts from the class descriptions: as --head-init says; with `auto`
    (the default), for a strategy that can (HEAD_INIT), where the data came with a
    descriptions file (sentences, or glyphs for images), or is text whose class names are words.
    Never on a photo network (it reads no glyphs) nor by attribute signatures."""
    from tl_core.config import HEAD_INIT
    from tl_core.models import INPUT_STATS

    if cfg.head_init != "auto":
        return cfg.head_init == "descriptions"
    if strategy not in HEAD_INIT:
        return False
    manifest = load_manifest(cfg.data)
    text = manifest["stored"] == "text"
    content = descriptions_of(cfg) or {}
    if (model_name in INPUT_STATS and not text) or "attributes" in content:
        return False
    return bool(content.get("descriptions" if text else "glyphs")) or (text and all(map(is_word, manifest["classes"])))


def described(cfg, key: str) -> dict[str, str]:
    """The `key:` mapping of the run's descriptions (class name -> text); {} without any or without the key."""
    found = (descriptions_of(cfg) or {}).get(key, {})
    if not isinstance(found, dict) or not all(isinstance(v, (str, int)) and str(v).strip() for v in found.values()):
        raise UserError(f"{descriptions_name(cfg)}: `{key}:` must map each class name to a text, e.g. " + (
            'World: "news about world politics"' if key == "descriptions" else '"0": "0"'))
    return {str(k): str(v).strip() for k, v in found.items()}


def class_sentences(cfg, classes: list[str]) -> list[str]:
    """One sentence per dataset class: from the descriptions file, else the class name itself."""
    sentences = described(cfg, "descriptions")
    if not sentences:
        return list(classes)
    missing = [c for c in classes if c not in sentences]
    if missing:
        raise UserError(f"{descriptions_name(cfg)} has no description of the dataset's classes {missing}: add them under "
                        f"`descriptions:` (the dataset's classes are {classes})")
    return [sentences[c] for c in classes]


def class_glyphs(cfg, classes: list[str]) -> list[str]:
    """The printed character that describes each image class: from `glyphs:`, else its name."""
    if described(cfg, "descriptions"):
        raise UserError(f"{descriptions_name(cfg)} describes classes by sentences (`descriptions:`), which only a text model "
                        "embeds: describe an image class by its printed character under `glyphs:`, or by attributes")
    glyphs = described(cfg, "glyphs")
    chosen = [glyphs.get(c, c) for c in classes]
    long = [c for c, g in zip(classes, chosen) if len(g) != 1]
    if long:
        raise UserError(f"classes {long} have no one-character glyph: an image class is described by its printed "
                        f"character, by default its name; name one per class under `glyphs:` in a descriptions file "
                        f"(--attributes FILE), e.g. glyphs: {{{long[0]!r}: \"A\"}}, or describe them by attributes")
    return chosen


def glyph_margin(cfg) -> float:
    """The blank border around a printed glyph, a fraction of the image's side: frame the glyphs
    as the dataset frames its characters (MNIST: 4 px of 28, 0.14; default 0, the glyph filling
    the image as in sklearn's digits, USPS and fonts:)."""
    margin = (descriptions_of(cfg) or {}).get("glyph_margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 0.5:
        raise UserError(f"{descriptions_name(cfg)}: glyph_margin is {margin!r}; it must be a fraction of the image side in "
                        "[0, 0.5), e.g. 0.14 for MNIST (a 20 px digit in 28 px)")
    return float(margin)


def refuse_glyphs_for(model_name: str, cfg) -> None:
    """Glyphs are drawn and normalised as the dataset's own images (digits, letters); a network
    that reads photos normalised its own way (efficientnet-lite0) is no glyph reader: say so."""
    from tl_core.models import INPUT_STATS

    if model_name in INPUT_STATS and load_manifest(cfg.data)["stored"] != "text":
        raise UserError(f"{model_name} is a photo network and class descriptions of images are printed glyphs "
                        "(digits, letters): describe the classes by attributes instead (--attributes FILE with "
                        "`attributes:` signatures), or drop --head-init descriptions")


@lru_cache(maxsize=256)  # every evaluation describes the classes again: ~20 ms a glyph to render
def glyph_renders(glyph: str) -> np.ndarray:
    """The glyph alone, one render per font that has it: its pictures do not depend on the other classes."""
    from tl_core.data.fonts import render_characters

    images = render_characters(glyph, variants=1, seed=0)[0].copy()
    images.flags.writeable = False  # shared by every caller
    return images


def glyph_images(glyphs: list[str], manifest: dict, shape: list[int], margin: float = 0.0) -> torch.Tensor:
    """Each glyph printed in GLYPHS_PER_CLASS fonts, framed as `tl prepare` frames the
    dataset's images (its channels, size, mean and std): (classes, fonts, C, H, W)."""
    from tl_core.data import normalise
    from tl_core.data.fonts import font_files
    from tl_core.data.transforms import convert_channels, resize

    unprintable = sorted({g for g in glyphs if not font_files(g)})
    if unprintable:
        raise UserError(f"no font has the glyphs {unprintable}, so they cannot describe their classes: name printable "
                        "characters under `glyphs:` in a descriptions file (--attributes FILE), or describe the "
                        "classes by attributes")
    renders = {}
    for glyph in dict.fromkeys(glyphs):
        images = glyph_renders(glyph)
        if len(images) < len(font_files(glyph)):
            raise UserError(f"the glyph {glyph!r} prints nothing visible, so it cannot describe a class: name a "
                            "visible character under `glyphs:`")
        renders[glyph] = images[np.linspace(0, len(images) - 1, GLYPHS_PER_CLASS).round().astype(int)]
    per_glyph = np.stack([renders[g] for g in glyphs])  # (K, fonts, 1, 32, 32); fonts spread over the families
    side = per_glyph.shape[-1]
    pad = round((side / (1 - 2 * margin) - side) / 2)  # so the glyph spans 1 - 2 * margin of the framed side
    per_glyph = np.pad(per_glyph, [(0, 0)] * 3 + [(pad, pad)] * 2)
    framed = resize(convert_channels(per_glyph.reshape(-1, *per_glyph.shape[2:]), shape[0]), tuple(shape[1:]))
    return normalise(framed, manifest).view(len(glyphs), GLYPHS_PER_CLASS, *shape)


def by_embeddings(cfg, manifest: dict) -> bool:
    """Zero-shot by description embeddings, unless the descriptions file gives attribute
    signatures (`attributes:`, e.g. the packaged seven_segment.yaml): DAP then. Text always embeds."""
    return manifest["stored"] == "text" or "attributes" not in (read_descriptions_file(cfg.attributes) or {})


def unseen_and_seen(cfg, classes: list[str]) -> tuple[list[int], list[int]]:
    """Dataset labels of the unseen classes (default: all of them) and of the seen ones."""
    names = list(cfg.unseen_classes) or list(classes)
    unknown = [c for c in names if c not in classes]
    if unknown:
        raise UserError(f"unseen classes {unknown} are not classes of the dataset: choose from {classes}")
    if len(set(names)) != len(names) or len(names) < 2:
        raise UserError(f"--unseen-classes needs 2 or more different classes of {classes}, got {names}")
    unseen = [classes.index(c) for c in names]
    return unseen, [k for k in range(len(classes)) if k not in unseen]


def description_inputs(cfg, classes: list[str], shape: list[int]) -> torch.Tensor:
    """What the model embeds for each class's description, as it takes its inputs:
    (classes, descriptions per class, *shape); a class's embedding is the mean over its
    descriptions (one sentence for text, a few fonts' glyphs for images)."""
    manifest = load_manifest(cfg.data)
    if manifest["stored"] == "text":
        from tl_core.data.text import to_byte_rows

        return to_byte_rows(class_sentences(cfg, classes), shape[-1])[:, None]
    return glyph_images(class_glyphs(cfg, classes), manifest, shape, glyph_margin(cfg))


def class_embeddings(features: torch.Tensor, n_classes: int) -> torch.Tensor:
    """The features of n_classes x V descriptions (class-major) -> one embedding per class: the
    mean of its descriptions' unit vectors (so no one font outweighs the others)."""
    return F.normalize(features, dim=-1).view(n_classes, -1, features.shape[-1]).mean(1)


@torch.no_grad()
def description_head(model: Classifier, cfg, shape: list[int]) -> torch.Tensor:
    """Head weights that score each class by its description: SCALE x the unit embedding of the
    class's description (num_classes x features), so a head starts as the zero-shot classifier
    (`--head-init descriptions`) and few labels refine it rather than start from nothing."""
    classes = load_manifest(cfg.data)["classes"]
    inputs = description_inputs(cfg, classes, shape)
    model.eval()
    features = model.features(inputs.flatten(0, 1))
    return SCALE * F.normalize(class_embeddings(features, len(classes)), dim=-1)


def similarity_logits(features: torch.Tensor, described: torch.Tensor) -> torch.Tensor:
    return SCALE * F.normalize(features, dim=-1) @ F.normalize(described, dim=-1).T


@dataclass(frozen=True)
class ZeroShotTask:
    """The class descriptions checked against a dataset's classes and the unseen classes."""

    attributes: list[str]
    signatures: torch.Tensor  # (dataset classes, M) float 0/1, row k for dataset label k
    seen: list[int]  # dataset labels
    unseen: list[int]  # dataset labels, in the order of --unseen-classes
    scored: torch.Tensor  # (M,) bool: attributes that vary over the seen classes, so could be learnt


def zero_shot_task(cfg, classes: list[str]) -> ZeroShotTask:
    """Check `cfg.attributes` and `cfg.unseen_classes` against the dataset's `classes`."""
    descriptions = load_descriptions(cfg.attributes)
    source = descriptions.path
    missing = [c for c in classes if c not in descriptions.signatures]
    if missing:
        raise UserError(f"{source} has no signature for the dataset's classes {missing}: add them under `classes:` "
                        f"(the dataset's classes are {classes})")
    unseen_names = list(cfg.unseen_classes)
    if len(unseen_names) < 2:
        raise UserError(f"zero-shot needs at least 2 unseen classes, got {unseen_names}: pass --unseen-classes with "
                        f"two or more of {classes}, e.g. --unseen-classes {','.join(classes[-3:])}")
    unknown = [c for c in unseen_names if c not in classes]
    if unknown:
        raise UserError(f"unseen classes {unknown} are not classes of the dataset: choose from {classes}")
    if len(set(unseen_names)) != len(unseen_names):
        raise UserError(f"--unseen-classes names a class twice: {unseen_names}")
    unseen = [classes.index(c) for c in unseen_names]
    seen = [k for k in range(len(classes)) if k not in unseen]
    if len(seen) < 2:
        raise UserError(f"with unseen classes {unseen_names}, fewer than 2 classes of {classes} are left to train the "
                        "attribute predictors on: leave at least 2 classes seen")
    signatures = torch.tensor([descriptions.signatures[c] for c in classes], dtype=torch.float32)
    by_signature: dict[tuple, str] = {}
    for k in unseen:
        other = by_signature.setdefault(tuple(signatures[k].tolist()), classes[k])
        if other != classes[k]:
            raise UserError(f"unseen classes {other!r} and {classes[k]!r} have the same signature in {source}: no "
                            "attribute tells them apart; give them different signatures or leave one seen")
    seen_values = signatures[seen]
    scored = seen_values.min(0).values != seen_values.max(0).values
    if not scored.all():
        constant = [f"{a} (always {int(seen_values[0, m])})" for m, a in enumerate(descriptions.attributes)
                    if not scored[m]]
        warnings.warn(f"attributes {', '.join(constant)} do not vary over the seen classes, so cannot be learnt: they "
                      "are left out of the zero-shot scores")  # one location: said once a process
        by_scored: dict[tuple, str] = {}
        for k in unseen:
            other = by_scored.setdefault(tuple(signatures[k][scored].tolist()), classes[k])
            if other != classes[k]:
                raise UserError(f"unseen classes {other!r} and {classes[k]!r} differ only in attributes that do not "
                                f"vary over the seen classes ({', '.join(constant)}), so nothing learnt tells them "
                                "apart: choose other unseen classes")
    return ZeroShotTask(descriptions.attributes, signatures, seen, unseen, scored)


def dap_scores(attribute_logits: torch.Tensor, signatures: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """DAP: the log-likelihood of each class's signature under the predicted attributes,
    sum over scored attributes m of log p(a_m = s^c_m). attribute_logits (N, M), signatures
    (C, M) 0/1, scored (M,) bool -> scores (N, C)."""
    log_on = F.logsigmoid(attribute_logits[:, scored])  # log p_m, computed stably from the logit
    log_off = F.logsigmoid(-attribute_logits[:, scored])  # log (1 - p_m)
    s = signatures[:, scored]
    return log_on @ s.T + log_off @ (1 - s).T


def attribute_logits(model: Classifier, x: torch.Tensor, device) -> torch.Tensor:
    return predict_logits(model.to(device), x, device)


@register_strategy
class ZeroShot(Strategy):
    name = "zero-shot"
    classifies_dataset_classes = False  # it scores unseen classes by their descriptions

    def __init__(self, cfg):
        super().__init__(cfg)
        self.needs_backbone = cfg.backbone is not None
        manifest = load_manifest(cfg.data)
        self.embeds = by_embeddings(cfg, manifest)
        if self.embeds:
            self.unseen, self.seen = unseen_and_seen(cfg, manifest["classes"])
            self.described = description_inputs(cfg, manifest["classes"], manifest["shape"])
            self.needs_examples = bool(self.seen)  # every class unseen: nothing to train, no label read
        else:
            self.task = zero_shot_task(cfg, manifest["classes"])
            self.seen = self.task.seen

    def build_model(self, num_classes, shape, backbone):
        if self.embeds:  # the head is not used: classes are scored by their descriptions' embeddings
            refuse_glyphs_for(self.architecture(backbone, shape)[0], self.cfg)
            return super().build_model(num_classes, shape, backbone)
        # One output per attribute, not per class: the head predicts the signature.
        return super().build_model(len(self.task.attributes), shape, backbone)

    def trainable(self, model: Classifier) -> nn.Module:
        # By embeddings, the encoder alone trains (and DDP wraps it): net(x) are features.
        return model.backbone if self.embeds else model

    def train_set(self, model, x, y, unlabeled):
        seen = torch.isin(y, torch.tensor(self.seen, dtype=torch.long))  # the unseen classes' labels are never used
        return x[seen], y[seen]

    def loss(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.embeds:
            seen = torch.tensor(self.seen, device=y.device)
            # Examples and the seen classes' descriptions in one forward pass of the (DDP) encoder.
            features = net(torch.cat([x, self.described[self.seen].flatten(0, 1).to(x.device)]))
            logits = similarity_logits(features[: len(x)], class_embeddings(features[len(x):], len(self.seen)))
            return F.cross_entropy(logits, (y.unsqueeze(1) == seen).int().argmax(1))
        targets = self.task.signatures.to(y.device)[y]
        return F.binary_cross_entropy_with_logits(net(x), targets)

    @classmethod
    def predict(cls, model, cfg, x, y, classes, device):
        if by_embeddings(cfg, load_manifest(cfg.data)):
            return cls.predict_by_embeddings(model, cfg, x, y, classes, device)
        task = zero_shot_task(cfg, classes)
        unseen = torch.tensor(task.unseen)
        keep = torch.isin(y, unseen)
        if not keep.any():
            raise UserError(f"the evaluated images hold no image of the unseen classes "
                            f"{[classes[k] for k in task.unseen]}: evaluate on a split that has them")
        scores = dap_scores(attribute_logits(model, x[keep], device), task.signatures[unseen], task.scored)
        labels = (y[keep].unsqueeze(1) == unseen).int().argmax(1)  # dataset label -> its place among the unseen
        return scores, labels, [classes[k] for k in task.unseen]

    @classmethod
    @torch.no_grad()
    def predict_by_embeddings(cls, model, cfg, x, y, classes, device):
        unseen_idx, _ = unseen_and_seen(cfg, classes)
        unseen = torch.tensor(unseen_idx)
        keep = torch.isin(y, unseen)
        if not keep.any():
            raise UserError(f"the evaluated examples hold none of the unseen classes {[classes[k] for k in unseen_idx]}: "
                            "evaluate on a split that has them")
        model = model.to(device).eval()
        inputs = description_inputs(cfg, classes, list(x.shape[1:]))[unseen_idx].flatten(0, 1)
        described = class_embeddings(model.features(inputs.to(device)), len(unseen_idx))
        features = torch.cat([model.features(x[keep][i : i + 256].to(device)) for i in range(0, int(keep.sum()), 256)])
        labels = (y[keep].unsqueeze(1) == unseen).int().argmax(1)
        return similarity_logits(features, described).cpu(), labels, [classes[k] for k in unseen_idx]


def generalized_scores(model: Classifier, cfg, x: torch.Tensor, y: torch.Tensor, classes: list[str],
                       device) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Generalized zero-shot: every class of the dataset, seen or unseen, is a candidate for every
    image. Returns DAP scores over all classes (N, K), the labels y unchanged, and the classes.
    Classes whose signatures agree on every scored attribute tie (the first one wins)."""
    task = zero_shot_task(cfg, classes)
    return dap_scores(attribute_logits(model, x, device), task.signatures, task.scored), y, classes


def generalized_accuracy(model: Classifier, cfg, x: torch.Tensor, y: torch.Tensor, classes: list[str],
                         device) -> dict:
    """Generalized zero-shot accuracy (all classes candidates) on the images of the seen classes,
    on those of the unseen classes, and their harmonic mean (the usual summary: high only when
    both are; DAP tends to favour the seen classes, whose attributes it was trained on)."""
    scores, labels, _ = generalized_scores(model, cfg, x, y, classes, device)
    correct = (scores.argmax(1) == labels).float()
    unseen = torch.isin(labels, torch.tensor([classes.index(c) for c in cfg.unseen_classes]))
    seen_acc = correct[~unseen].mean().item() if (~unseen).any() else float("nan")
    unseen_acc = correct[unseen].mean().item() if unseen.any() else float("nan")
    harmonic = 2 * seen_acc * unseen_acc / (seen_acc + unseen_acc) if seen_acc + unseen_acc > 0 else 0.0
    return {"seen": seen_acc, "unseen": unseen_acc, "harmonic": harmonic}
