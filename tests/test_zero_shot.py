"""zero-shot on real digits. By description embeddings (issue 16, images' default): each digit
described by its printed glyph, an encoder trained on the seen digits only recognises held-out
digits above chance, never reading an unseen label, and the glyphs decide the prediction. By
attributes (DAP, issue 7, a file with `attributes:` such as the packaged seven_segment.yaml):
the packaged descriptions are the true seven-segment codes, attribute predictors trained on the
seen digits recognise held-out digits above chance, the file is replaceable (and decides the
prediction), and bad descriptions or unseen classes give clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tl_core.checkpoints import load_state
from tl_core.config import PrepareConfig, TrainConfig
from tl_core.data import prepare
from tl_core.errors import UserError
from tl_core.evaluate import evaluate_loaded
from tl_core.models import build_from_spec
from tl_core.strategies import create_strategy
from tl_core.strategies.zero_shot import (
    DEFAULT_DESCRIPTIONS,
    GLYPHS_PER_CLASS,
    ZeroShot,
    by_embeddings,
    description_inputs,
    generalized_accuracy,
    load_descriptions,
    zero_shot_task,
)
from tl_core.train import train

DIGITS = [str(d) for d in range(10)]
# The segments each digit lights on a seven-segment display (a top, b upper right, c lower
# right, d bottom, e lower left, f upper left, g middle), written independently of the file.
LIT = {"0": "abcdef", "1": "bc", "2": "abdeg", "3": "abcdg", "4": "bcfg",
       "5": "acdfg", "6": "acdefg", "7": "abc", "8": "abcdefg", "9": "abcdfg"}
SEVEN_SEGMENT = "\n".join(["attributes: [a, b, c, d, e, f, g]", "classes:"]
                          + [f'  "{d}": [{", ".join("1" if s in LIT[d] else "0" for s in "abcdefg")}]' for d in DIGITS])


@pytest.fixture(scope="module")
def digits(module_workdir):
    data, _ = prepare(PrepareConfig(uri="sklearn:digits"))
    return data


def config(data, unseen, **options) -> TrainConfig:
    """By attributes: the packaged seven-segment file unless `attributes` names another."""
    return TrainConfig(**{"data": data.path, "strategy": "zero-shot", "unseen_classes": unseen, "epochs": 20,
                          "augment": 1, "eval_every": 0, "checkpoint_every": 0,
                          "attributes": str(DEFAULT_DESCRIPTIONS), **options})


def by_glyphs(data, unseen, **options) -> TrainConfig:
    """By description embeddings, the images' default: no descriptions file, each digit its glyph."""
    return config(data, unseen, **{"attributes": None, **options})


def load_model(ckpt):
    model = build_from_spec(ckpt["model_spec"])
    load_state(model, ckpt["model"], "the checkpoint")
    return model


@pytest.fixture(scope="module")
def trained(digits):
    return train(config(digits, ["2", "6"]))


def write(tmp_path, text: str) -> str:
    path = tmp_path / "descriptions.yaml"
    path.write_text(text)
    return str(path)


def test_packaged_signatures_are_the_seven_segment_codes():
    descriptions = load_descriptions(None)
    assert descriptions.attributes == list("abcdefg")
    for digit, lit in LIT.items():
        assert descriptions.signatures[digit] == [int(s in lit) for s in "abcdefg"], digit
    assert sum(descriptions.signatures["8"]) == 7 and descriptions.signatures["1"] == [0, 1, 1, 0, 0, 0, 0]
    assert len({tuple(s) for s in descriptions.signatures.values()}) == 10  # every digit its own code


def test_training_never_sees_the_unseen_classes(digits):
    cfg = config(digits, ["2", "6"])
    strategy = create_strategy(cfg)
    model, spec = strategy.build_model(10, [1, 28, 28], None)
    assert model.head.out_features == 7 and spec["num_classes"] == 7  # one output per attribute
    x, y = digits.split("train")
    kept_x, kept_y = strategy.train_set(model, digits.normalise(x), torch.from_numpy(y), None)
    assert set(kept_y.tolist()) == set(range(10)) - {2, 6} and len(kept_x) == len(kept_y) > 0


def test_zero_shot_recognises_held_out_digits_above_chance(digits, trained):
    accuracy = trained.checkpoint["metrics"]["test_accuracy"]
    assert accuracy > 0.7, accuracy  # chance among the 2 unseen digits: 0.5
    ev = evaluate_loaded(trained.checkpoint, digits)
    _, test_y = digits.split("test")
    assert ev.classes == ["2", "6"] and ev.confusion.shape == (2, 2)
    assert ev.confusion.sum() == ((test_y == 2) | (test_y == 6)).sum()  # only the unseen digits are scored
    assert ev.metrics["accuracy"] == pytest.approx(accuracy)
    x, y = digits.split("test")
    general = generalized_accuracy(load_model(trained.checkpoint), config(digits, ["2", "6"]), digits.normalise(x),
                                   torch.from_numpy(y), digits.classes, torch.device("cpu"))
    assert general["seen"] > 0.8  # the seen digits, by their signatures among all 10
    assert 0 <= general["unseen"] <= 1 and 0 <= general["harmonic"] <= 1


def test_the_description_file_decides_the_prediction(digits, trained, tmp_path):
    """The same model scored with a file where 2 and 6 swap signatures predicts the other digit."""
    swapped = write(tmp_path, SEVEN_SEGMENT.replace('"2"', '"x"').replace('"6"', '"2"').replace('"x"', '"6"'))
    x, y = digits.split("test")
    logits, labels, names = ZeroShot.predict(load_model(trained.checkpoint), config(digits, ["2", "6"], attributes=swapped),
                                             digits.normalise(x), torch.from_numpy(y), digits.classes, torch.device("cpu"))
    assert names == ["2", "6"]
    assert (logits.argmax(1) == labels).float().mean().item() == pytest.approx(
        1 - trained.checkpoint["metrics"]["test_accuracy"], abs=1e-6)


def test_a_custom_description_file_trains_a_head_per_attribute(digits, tmp_path):
    # The seven segments plus one more attribute: "has a closed loop".
    loops = {"0": 1, "4": 0, "6": 1, "8": 1, "9": 1}
    text = SEVEN_SEGMENT.replace("[a, b, c, d, e, f, g]", "[loop, a, b, c, d, e, f, g]")
    for d in DIGITS:
        text = text.replace(f'"{d}": [', f'"{d}": [{loops.get(d, 0)}, ')
    result = train(config(digits, ["2", "6"], attributes=write(tmp_path, text), epochs=10))
    assert result.checkpoint["model_spec"]["num_classes"] == 8
    assert result.checkpoint["metrics"]["test_accuracy"] > 0.6  # chance 0.5


@pytest.mark.parametrize("text, problem", [
    ("attributes: [a, b]\nclasses: {}", "no signature for the dataset's classes"),
    (SEVEN_SEGMENT.replace('"3": [1, 1, 1, 1, 0, 0, 1]', '"3": [1, 1, 1]'), "class '3' has the signature"),
    (SEVEN_SEGMENT.replace('"3": [1, 1, 1, 1, 0, 0, 1]', '"3": [1, 1, 1, 1, 0, 0, 2]'), "must be 0 or 1"),
    (SEVEN_SEGMENT.replace('"7": [1, 1, 1, 0, 0, 0, 0]', '"7": [0, 1, 1, 0, 0, 0, 0]'), "have the same signature"),
    ("just text", "needs an `attributes:` list"),
    ("attributes: [a, b\n", "not valid YAML"),
])
def test_bad_description_files(digits, tmp_path, text, problem):
    cfg = config(digits, ["1", "7"], attributes=write(tmp_path, text))
    with pytest.raises(UserError, match=problem):
        zero_shot_task(cfg, digits.classes)
    with pytest.raises(UserError, match=problem):  # and before any training
        train(cfg)


def test_missing_description_file(digits, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        zero_shot_task(config(digits, ["1", "7"], attributes=str(tmp_path / "none.yaml")), digits.classes)


@pytest.mark.parametrize("unseen, problem", [
    ([], "at least 2 unseen classes"),
    (["7"], "at least 2 unseen classes"),
    (["7", "x"], r"\['x'\] are not classes of the dataset"),
    (["7", "7"], "names a class twice"),
    (DIGITS[:9], "fewer than 2 classes"),
    (["1", "4", "7"], "differ only in attributes that do not vary"),  # a: every seen digit lights it
])
def test_bad_unseen_classes(digits, unseen, problem):
    with pytest.raises(UserError, match=problem):
        zero_shot_task(config(digits, unseen), digits.classes)


def test_an_attribute_constant_over_the_seen_classes_is_left_out_with_a_warning(digits):
    # With 0, 2, 6 and 8 unseen, no seen digit lights e (lower left) and every one lights c.
    with pytest.warns(UserWarning, match=r"c \(always 1\), e \(always 0\)"):
        task = zero_shot_task(config(digits, ["0", "2", "6", "8"]), digits.classes)
    assert task.scored.tolist() == [True, True, False, True, False, True, True]


def test_editing_the_description_file_in_place_trains_again(digits, tmp_path):
    """A run is cached by the file's content, not its name: an edited file is a new run."""
    path = write(tmp_path, SEVEN_SEGMENT)
    first = train(config(digits, ["2", "6"], attributes=path, epochs=2))
    assert train(config(digits, ["2", "6"], attributes=path, epochs=2)).reused
    write(tmp_path, SEVEN_SEGMENT.replace('"2"', '"x"').replace('"6"', '"2"').replace('"x"', '"6"'))
    edited = train(config(digits, ["2", "6"], attributes=path, epochs=2))
    assert not edited.reused and edited.checkpoint_uri != first.checkpoint_uri


# -- by description embeddings: each class described by its printed glyph ---------------------
@pytest.fixture(scope="module")
def glyph_trained(digits):
    return train(by_glyphs(digits, ["0", "3", "6"], epochs=10))


def test_images_are_described_by_glyphs_unless_the_file_gives_attributes(digits, tmp_path):
    manifest = digits.manifest
    assert by_embeddings(by_glyphs(digits, ["2", "6"]), manifest)
    assert not by_embeddings(config(digits, ["2", "6"]), manifest)  # the seven-segment file: DAP
    assert by_embeddings(by_glyphs(digits, ["2", "6"], attributes=write(tmp_path, 'glyphs: {"1": "I"}')), manifest)
    glyphs = description_inputs(by_glyphs(digits, ["2", "6"]), digits.classes, manifest["shape"])
    assert glyphs.shape[0] == 10 and glyphs.shape[2:] == (1, 8, 8) and glyphs.shape[1] == GLYPHS_PER_CLASS  # classes, fonts
    # normalised as the dataset's images are: ink bright, background at the dataset's zero level
    background = digits.normalise(torch.zeros(1, 1, 8, 8, dtype=torch.uint8).numpy()).max()
    assert glyphs.min() == pytest.approx(background.item()) and glyphs.max() > 1


@pytest.mark.slow
def test_glyphs_recognise_held_out_digits_above_chance(digits, glyph_trained):
    accuracy = glyph_trained.checkpoint["metrics"]["test_accuracy"]
    assert accuracy > 0.5, accuracy  # chance among the 3 unseen digits: 1/3
    ev = evaluate_loaded(glyph_trained.checkpoint, digits)
    _, test_y = digits.split("test")
    assert ev.classes == ["0", "3", "6"] and ev.confusion.sum() == np.isin(test_y, [0, 3, 6]).sum()
    assert ev.metrics["accuracy"] == pytest.approx(accuracy)


@pytest.mark.slow
def test_the_glyphs_decide_the_prediction(digits, glyph_trained, tmp_path):
    """The same encoder, with 0 and 3 described by each other's glyph, predicts the other digit."""
    swapped = by_glyphs(digits, ["0", "3", "6"], attributes=write(tmp_path, 'glyphs: {"0": "3", "3": "0"}'))
    x, y = digits.split("test")
    logits, labels, _ = ZeroShot.predict(load_model(glyph_trained.checkpoint), swapped, digits.normalise(x),
                                         torch.from_numpy(y), digits.classes, torch.device("cpu"))
    predicted = logits.argmax(1)
    straight, _, _ = ZeroShot.predict(load_model(glyph_trained.checkpoint), by_glyphs(digits, ["0", "3", "6"]),
                                      digits.normalise(x), torch.from_numpy(y), digits.classes, torch.device("cpu"))
    swap = torch.tensor([1, 0, 2])  # the 0 column now holds 3's glyph and the other way round
    assert torch.equal(predicted, swap[straight.argmax(1)])


def test_training_by_glyphs_never_reads_an_unseen_label(digits, monkeypatch):
    """Every batch the encoder trains on, instrumented: only seen digits' labels, and the
    descriptions in the same forward pass are the seen digits' glyphs only."""
    batches, described = [], []
    loss = ZeroShot.loss

    def recording(self, net, x, y):
        batches.append(y.clone())
        described.append(self.seen)
        return loss(self, net, x, y)

    monkeypatch.setattr(ZeroShot, "loss", recording)
    train(by_glyphs(digits, ["0", "3", "6"], epochs=1))
    trained_on = torch.cat(batches)
    assert set(trained_on.tolist()) == set(range(10)) - {0, 3, 6} and len(trained_on) > 500
    assert all(seen == [1, 2, 4, 5, 7, 8, 9] for seen in described)


@pytest.mark.parametrize("text, problem", [
    ('glyphs: {"3": "字"}', r"no font has the glyphs \['字'\]"),
    ('glyphs: {"3": "33"}', r"classes \['3'\] have no one-character glyph"),
    ('glyphs: {"3": " "}', "must map each class name to a text"),
    ("glyph_margin: 0.7", "glyph_margin is 0.7"),
    ('descriptions: {"3": "three"}', "only a text model embeds"),
])
def test_a_class_without_a_printable_glyph_is_a_clear_error(digits, tmp_path, text, problem):
    cfg = by_glyphs(digits, ["3", "7"], attributes=write(tmp_path, text))
    with pytest.raises(UserError, match=problem):
        description_inputs(cfg, digits.classes, digits.manifest["shape"])
    with pytest.raises(UserError, match=problem):  # and before any training
        train(cfg)
