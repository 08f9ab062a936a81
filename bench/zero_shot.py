"""Benchmark: zero-shot recognition of held-out digits, by description embeddings (each digit
described by its printed glyph, the default) and by attributes (DAP, seven-segment codes).

    .venv/bin/python bench/zero_shot.py              # writes bench/zero_shot.{json,md}
    .venv/bin/python bench/zero_shot.py --markdown   # only rewrites the .md from the .json
    .venv/bin/python bench/zero_shot.py --fonts-only # only the column from tl run's fonts backbone, merged in

Recipe: strategy `zero-shot`, small_cnn from random init, Adam lr 1e-3, batch 64, shift
augmentation 1 px, seeds 0-2; three unseen sets of 3 digits {0,3,6}, {2,5,8}, {1,4,9} (all the
digits but 7), chance 1/3. Zero-shot accuracy: among the 3 unseen digits, on their test images.
- glyphs: no descriptions file but the framing (MNIST's digits fit a 20 px box in 28 px, so
  `glyph_margin: 0.143`; sklearn's digits fill their 8 px, margin 0); the encoder trains on the
  7 seen digits' images to sit near their own digit's glyphs, the unseen digits' glyphs are
  used only to predict.
- attributes: the packaged seven_segment.yaml; plus the generalized accuracy (all 10 digits
  candidates) on the unseen and on the seen digits' test images, and per segment the accuracy
  of its predictor on the unseen digits' images (is the segment recognised on digits it was
  never trained on?).
Data: MNIST-test (7000 train / 3000 test images, 28 px, 3 epochs) and sklearn digits (8 px, 20
epochs), from ../shared/data and scikit-learn.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
SEEDS = [0, 1, 2]
SETS = [["0", "3", "6"], ["2", "5", "8"], ["1", "4", "9"]]
SEGMENTS = "abcdefg"
DATASETS = {"MNIST-test": (f"idx:{SHARED / 'mnist-test'}", 3, 0.143), "sklearn digits": ("sklearn:digits", 20, 0.0)}


def train_run(data, unseen, seed, epochs, attributes, backbone=None):
    from tl_core.config import TrainConfig
    from tl_core.train import train

    cfg = TrainConfig(data=data.path, strategy="zero-shot", unseen_classes=unseen, epochs=epochs, seed=seed,
                      augment=1, eval_every=0, checkpoint_every=0, attributes=attributes, backbone=backbone)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(cfg)
    return cfg, result, [str(w.message) for w in caught if "do not vary" in str(w.message)]


def glyph_run(data, unseen, seed, epochs, descriptions, backbone=None):
    _, result, _ = train_run(data, unseen, seed, epochs, descriptions, backbone)
    metrics = result.checkpoint["metrics"]
    return {"unseen": unseen, "seed": seed, "zero_shot_accuracy": metrics["test_accuracy"],
            "train_seconds": metrics["train_seconds"]}


def fonts_backbone(data) -> str:
    """The model `tl run` starts from by default at the dataset's shape: its default source (digits
    rendered from matplotlib's fonts, all ten) prepared and pretrained with tl run's own settings."""
    from tl_core.config import ExperimentConfig
    from tl_core.data import prepare
    from tl_core.train import train

    settings = ExperimentConfig()
    source, _ = prepare(settings.source_prepare(data.manifest["shape"]))
    return train(settings.pretrain(source.path)).checkpoint_uri


def from_fonts(data, epochs: int, framing: str) -> dict:
    """The glyph recipe as it is (same epochs, framing, seeds), its encoder starting from `fonts_backbone`."""
    backbone = fonts_backbone(data)
    runs = [glyph_run(data, u, seed, epochs, framing, backbone) for u in SETS for seed in SEEDS]
    return {"rows": per_set(runs), "mean": statistics.mean(r["zero_shot_accuracy"] for r in runs),
            "train_seconds": sum(r["train_seconds"] for r in runs)}


def pixel_run(data, unseen, descriptions):
    """The reference without any learning: each test image to the nearest glyph by the cosine of
    their raw (normalised) pixels, the same glyphs and framing as the glyph runs."""
    from tl_core.config import TrainConfig
    from tl_core.strategies.zero_shot import class_embeddings, description_inputs, similarity_logits

    cfg = TrainConfig(data=data.path, strategy="zero-shot", unseen_classes=unseen, attributes=descriptions)
    ids = [data.classes.index(c) for c in unseen]
    glyphs = description_inputs(cfg, data.classes, data.manifest["shape"])[ids]
    described = class_embeddings(glyphs.flatten(2), len(ids))
    x, y = data.split("test")
    keep = torch.isin(torch.from_numpy(y), torch.tensor(ids))
    logits = similarity_logits(data.normalise(x[keep.numpy()]).flatten(1), described)
    labels = (torch.from_numpy(y)[keep].unsqueeze(1) == torch.tensor(ids)).int().argmax(1)
    return (logits.argmax(1) == labels).float().mean().item()


def dap_run(data, unseen, seed, epochs):
    from tl_core.checkpoints import load_state
    from tl_core.models import build_from_spec
    from tl_core.strategies.zero_shot import DEFAULT_DESCRIPTIONS, attribute_logits, generalized_accuracy, zero_shot_task

    cfg, result, caught = train_run(data, unseen, seed, epochs, str(DEFAULT_DESCRIPTIONS))
    task = zero_shot_task(cfg, data.classes)
    model = build_from_spec(result.checkpoint["model_spec"])
    load_state(model, result.checkpoint["model"], "the checkpoint")
    x, y = data.split("test")
    x, y = data.normalise(x), torch.from_numpy(y)
    general = generalized_accuracy(model, cfg, x, y, data.classes, torch.device("cpu"))
    unseen_images = torch.isin(y, torch.tensor(task.unseen))
    predicted = attribute_logits(model, x[unseen_images], torch.device("cpu")) > 0
    segment_acc = (predicted == task.signatures[y[unseen_images]].bool()).float().mean(0)
    return {"unseen": unseen, "seed": seed, "zero_shot_accuracy": result.checkpoint["metrics"]["test_accuracy"],
            "generalized": general,
            "segment_accuracy_on_unseen": {s: round(v, 3) for s, v in zip(SEGMENTS, segment_acc.tolist())},
            "left_out_segments": [s for s, keep in zip(SEGMENTS, task.scored.tolist()) if not keep],
            "warnings": caught, "train_seconds": result.checkpoint["metrics"]["train_seconds"]}


def minority_side(unseen: list[str]) -> dict:
    """Per segment, how many seen digits are on its rarer side (lit or dark): a predictor
    trained on 1 or 2 digits on one side learns to recognise those digits, not the segment."""
    from tl_core.strategies.zero_shot import load_descriptions

    signatures = load_descriptions(None).signatures
    seen = [d for d in signatures if d not in unseen]
    lit = [sum(signatures[d][m] for d in seen) for m in range(len(SEGMENTS))]
    return {s: min(n, len(seen) - n) for s, n in zip(SEGMENTS, lit)}


def per_set(runs: list[dict]) -> list[dict]:
    rows = []
    for unseen in SETS:
        mine = [r for r in runs if r["unseen"] == unseen]
        rows.append({"unseen": "".join(unseen), "zero_shot": statistics.mean(r["zero_shot_accuracy"] for r in mine),
                     "per_seed": [r["zero_shot_accuracy"] for r in mine]})
    return rows


def framing_file(workdir: Path, margin: float) -> str:
    framing = workdir / f"glyphs-{margin}.yaml"  # the only description: how the dataset frames a digit
    framing.write_text(f"glyph_margin: {margin}\n")
    return str(framing)


def fonts_only() -> None:
    """Only the column from tl run's fonts backbone, merged into the saved results."""
    workdir = Path(os.environ.setdefault("TL_WORKDIR", tempfile.mkdtemp(prefix="tl-bench-zs-")))
    from tl_core.config import PrepareConfig
    from tl_core.data import prepare

    summary = json.loads((HERE / "zero_shot.json").read_text())
    previous = {name: summary[name].get("from_fonts", {}).get("train_seconds", 0.0) for name in DATASETS}
    for name, (uri, epochs, margin) in DATASETS.items():
        data, _ = prepare(PrepareConfig(uri=uri))
        summary[name]["from_fonts"] = from_fonts(data, epochs, framing_file(workdir, margin))
        summary[name]["from_fonts"]["measured"] = time.strftime("%Y-%m-%d")
        summary["train_seconds"] += summary[name]["from_fonts"]["train_seconds"] - previous.get(name, 0.0)
        print(name, json.dumps(summary[name]["from_fonts"]), flush=True)
    (HERE / "zero_shot.json").write_text(json.dumps(summary, indent=2))
    write_markdown(summary)


def main() -> None:
    workdir = Path(os.environ.setdefault("TL_WORKDIR", tempfile.mkdtemp(prefix="tl-bench-zs-")))
    from tl_core.config import PrepareConfig
    from tl_core.data import prepare

    started = time.perf_counter()
    results, all_runs = {}, []
    for name, (uri, epochs, margin) in DATASETS.items():
        data, _ = prepare(PrepareConfig(uri=uri))
        framing = framing_file(workdir, margin)
        glyphs = [glyph_run(data, u, seed, epochs, framing) for u in SETS for seed in SEEDS]
        pixels = [pixel_run(data, u, framing) for u in SETS]
        fonts = {**from_fonts(data, epochs, framing), "measured": time.strftime("%Y-%m-%d")}
        dap = [dap_run(data, u, seed, epochs) for u in SETS for seed in SEEDS]
        all_runs += [{"data": name, "by": "glyphs", **r} for r in glyphs] + [{"data": name, "by": "attributes", **r}
                                                                            for r in dap]
        dap_rows = per_set(dap)
        for row, unseen in zip(dap_rows, SETS):
            mine = [r for r in dap if r["unseen"] == unseen]
            row.update({"gzsl_unseen": statistics.mean(r["generalized"]["unseen"] for r in mine),
                        "gzsl_seen": statistics.mean(r["generalized"]["seen"] for r in mine),
                        "segments": {s: statistics.mean(r["segment_accuracy_on_unseen"][s] for r in mine)
                                     for s in SEGMENTS},
                        "left_out": mine[0]["left_out_segments"], "minority": minority_side(unseen)})
        results[name] = {"glyphs": per_set(glyphs), "attributes": dap_rows, "epochs": epochs, "glyph_margin": margin,
                         "pixels": dict(zip(("".join(u) for u in SETS), pixels)), "pixels_mean": statistics.mean(pixels),
                         "glyphs_mean": statistics.mean(r["zero_shot_accuracy"] for r in glyphs), "from_fonts": fonts,
                         "attributes_mean": statistics.mean(r["zero_shot_accuracy"] for r in dap)}
    seconds = time.perf_counter() - started
    train_seconds = sum(r["train_seconds"] for r in all_runs)  # also right when checkpoints are reused
    train_seconds += sum(r["from_fonts"]["train_seconds"] for r in results.values())
    mnist = results["MNIST-test"]
    goals = {"mnist_glyphs_60": mnist["glyphs_mean"] >= 0.60,
             "mnist_attributes_above_chance": mnist["attributes_mean"] > 1 / 3 + 0.05}
    summary = {**results, "goals": goals, "seconds": seconds, "train_seconds": train_seconds, "runs": all_runs,
               "measured": time.strftime("%Y-%m-%d")}
    (HERE / "zero_shot.json").write_text(json.dumps(summary, indent=2))
    write_markdown(summary)


def write_markdown(summary: dict) -> None:
    results = {name: summary[name] for name in DATASETS}
    goals, seconds, train_seconds = summary["goals"], summary["seconds"], summary["train_seconds"]
    mnist = results["MNIST-test"]

    def pct(values):
        return " / ".join(f"{v:.1%}" for v in values)

    lines = ["# Zero-shot digits: by their printed glyphs, and by seven-segment codes (DAP)", "",
             "3 unseen digits (chance 33.3 %), never trained on; zero-shot accuracy among them on their test images, "
             "mean of seeds 0-2 (per seed in brackets).", "",
             "| data | unseen | by glyphs (default) | by attributes (DAP) | nearest glyph by pixels (no learning) "
             "| by glyphs from tl run's fonts backbone |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        for g, a, f in zip(r["glyphs"], r["attributes"], r["from_fonts"]["rows"]):
            lines.append(f"| {name} | {g['unseen']} | {g['zero_shot']:.1%} ({pct(g['per_seed'])}) "
                         f"| {a['zero_shot']:.1%} ({pct(a['per_seed'])}) | {r['pixels'][g['unseen']]:.1%} "
                         f"| {f['zero_shot']:.1%} ({pct(f['per_seed'])}) |")
        lines.append(f"| {name} | **mean** | **{r['glyphs_mean']:.1%}** | {r['attributes_mean']:.1%} "
                     f"| {r['pixels_mean']:.1%} | {r['from_fonts']['mean']:.1%} |")
    lines += ["", "Goals:",
              f"- MNIST by glyphs >= 60 %: {'met' if goals['mnist_glyphs_60'] else 'MISSED'} "
              f"({mnist['glyphs_mean']:.1%})",
              f"- MNIST by attributes above chance + 5 points: "
              f"{'met' if goals['mnist_attributes_above_chance'] else 'MISSED'} ({mnist['attributes_mean']:.1%})", "",
              "## By attributes (DAP), in detail", "",
              ("GZSL: generalized accuracy, all 10 digits candidates. Segment columns: accuracy of each segment's "
               "predictor on the unseen digits' test images; in brackets, how many of the 7 seen digits are on the "
               "segment's rarer side (lit or dark) in training."), "",
              "| data | unseen | GZSL unseen | GZSL seen | " + " | ".join(SEGMENTS) + " | left out |",
              "|---|---|---|---|" + "---|" * len(SEGMENTS) + "---|"]
    for name, r in results.items():
        for row in r["attributes"]:
            lines.append(f"| {name} | {row['unseen']} | {row['gzsl_unseen']:.1%} | {row['gzsl_seen']:.1%} | "
                         + " | ".join(f"{row['segments'][s]:.2f} ({row['minority'][s]})" for s in SEGMENTS)
                         + f" | {','.join(row['left_out']) or '-'} |")
    fonts_seconds = sum(r["from_fonts"]["train_seconds"] for r in results.values())
    lines += ["", why(results), "", from_fonts_text(results, summary.get("measured")), "", TUNING, "",
              (f"Recipe: see the script's docstring. Training time {train_seconds:.0f} s in all, the column from the "
               f"fonts backbone {fonts_seconds:.0f} s of it (the whole run's invocation {seconds:.0f} s; checkpoints "
               "in TL_WORKDIR are reused)."), ""]
    (HERE / "zero_shot.md").write_text("\n".join(lines))
    print("\n".join(lines))


def why(results: dict) -> str:
    mnist, digits = results["MNIST-test"], results["sklearn digits"]
    worst = min(mnist["glyphs"], key=lambda row: row["zero_shot"])
    return (
        "Why glyphs do better than segments: a glyph is a whole picture of the digit, and the encoder learns one "
        "mapping, handwriting to print, from all 7 seen digits at once; a segment predictor learns from the 1 to 3 "
        "seen digits on its rarer side (the bracketed counts below) and spots those digits rather than the segment. "
        "Framing matters: a rendered glyph fills its bitmap while MNIST centres a 20 px digit in 28 px, so the bench "
        "frames the glyphs with `glyph_margin: 0.143` (MNIST's documented preprocessing, not tuned). The "
        f"learnt space loses to its trivial equivalent: nearest glyph by raw pixels, no training at all, reaches {mnist['pixels_mean']:.1%} "
        f"on MNIST ({digits['pixels_mean']:.1%} on sklearn's digits) against {mnist['glyphs_mean']:.1%} "
        f"({digits['glyphs_mean']:.1%}) learnt: a small CNN trained from scratch on 7 digits learns features for those "
        "7 digits, and part of what tells the unseen ones apart is lost. The weakest set is "
        f"{worst['unseen']} "
        f"({worst['zero_shot']:.1%}): there the learnt space almost never calls a handwritten 1 a 1 (7 to 20 of the "
        "340 test 1s per seed on MNIST, the rest go to 4 or 9): the printed 1 of the fonts has a flag and a foot, a "
        "written 1 is a bare stroke, and no seen digit taught the encoder that they match. A backbone pretrained on more shapes (`--backbone`, e.g. "
        "letters rendered by `tl pretrain`) is the next thing to try.")


def from_fonts_text(results: dict, measured: str | None) -> str:
    """`measured`: the day of the other columns (None: before the bench recorded it)."""
    mnist, digits = results["MNIST-test"], results["sklearn digits"]

    def against(r):
        gain = r["from_fonts"]["mean"] - r["pixels_mean"]
        return (f"{r['from_fonts']['mean']:.1%}, {abs(100 * gain):.1f} points {'above' if gain >= 0 else 'below'} the "
                f"pixels' {r['pixels_mean']:.1%} (from random weights: {r['glyphs_mean']:.1%})")

    worst = min(mnist["from_fonts"]["rows"], key=lambda row: row["zero_shot"])

    return (
        "The last column: the same recipe (epochs, framing, seeds), its encoder starting from the model `tl run` "
        "pretrains by default instead of from random weights (`--backbone`: the small CNN trained on digits rendered "
        "from matplotlib's fonts, at the dataset's size, with tl run's settings). That model has read the printed "
        "glyphs of all ten digits, the unseen ones' descriptions included, and never a handwritten unseen digit. "
        f"From it the learnt space reaches {against(mnist)} on MNIST, and {against(digits)} on sklearn's digits. "
        f"MNIST's {worst['unseen']} is the weakest set here too ({worst['zero_shot']:.1%}). "
        + (f"Measured {mnist['from_fonts']['measured']}, after the other columns (the training core's code moved "
           "in between; those runs were not repeated)." if mnist["from_fonts"]["measured"] != measured else ""))


TUNING = (
    "How the recipe was chosen, without the unseen digits: in a validation protocol each bench set's 3 unseen "
    "digits were left out entirely, 3 of its seen digits held out as pseudo-unseen ({2,5,7} with {0,3,6} unseen, "
    "{0,3,8} with {1,4,9}), the encoder trained on the other 4, and scored on the pseudo-unseen digits of the 7000 "
    "train images (seed 0, one run each, so a few points are noise). Glyphs framed as MNIST: 65.6 % against 56.6 % "
    "unframed, with 8 fonts a class and 3 epochs; 4 fonts 70.6 % (and half the glyphs through the encoder each "
    "step), 1 epoch 63.7 %, 8 epochs 60.6 % (longer training fits the seen digits and carries over worse): 4 fonts "
    "and 3 epochs.")


if __name__ == "__main__":
    import sys

    if "--markdown" in sys.argv[1:]:
        write_markdown(json.loads((HERE / "zero_shot.json").read_text()))
    elif "--fonts-only" in sys.argv[1:]:
        fonts_only()
    else:
        main()
