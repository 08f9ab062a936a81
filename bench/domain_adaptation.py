"""Benchmark: domain adaptation MNIST-test (source) -> USPS (target): source-only vs `dann` vs `mcc`,
with no USPS labels and with 10 USPS labels per class (plus the unlabeled rest of the USPS train pool).

    .venv/bin/python bench/domain_adaptation.py [--seeds 0 1 2]   # writes bench/domain_adaptation.{json,md}
    .venv/bin/python bench/domain_adaptation.py --markdown-only   # rewrites the .md from the .json

Recipe: small_cnn at 16x16 pretrained on the MNIST test split exactly as in
`bench/label_efficiency.py` (7000 train images, 10 epochs, shift augmentation 2 px, batch 128).
Adaptation from that checkpoint (its head too: same classes), on every USPS train image (7291,
unlabeled but for the 10 shots), with the MNIST train images as the labelled source: SGD momentum
0.9, lr 0.01 annealed as in the papers, batch 64 (+ 64 source, + 64 labelled shots), 10 epochs,
adapt_weight 1, no augmentation; mcc at temperature 2.5. Accuracy on the USPS test split (2007).

Controls, so that the gain of each method's own term is visible:
- `source-only + target BN`: the pretrained model with its batch-norm statistics re-estimated on
  the USPS train images (AdaBN), which dann and mcc also do after each epoch;
- `no adaptation term`: the same training as dann/mcc with adapt_weight 0 (source CE, plus the
  labelled shots' CE when there are some, and the batch-norm re-estimation).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
SHOTS = [0, 10]
ADAPTATION = {"epochs": 10, "optimizer": "sgd", "lr": 0.01, "batch_size": 64, "augment": 0, "adapt_weight": 1.0}
VARIANTS = {
    "no adaptation term": {"strategy": "mcc", "adapt_weight": 0.0},  # mcc's loop with its term switched off
    "dann": {"strategy": "dann"},
    "mcc": {"strategy": "mcc"},
}
GOALS = {0: 0.90, 10: 0.95}


def source_only_with_target_bn(pre_ckpt: dict, target) -> float:
    """The pretrained model, batch-norm statistics re-estimated on the USPS train images."""
    from tl_core.models import build_from_spec
    from tl_core.strategies.domain_adaptation import recalibrate_batch_norm

    model = build_from_spec(pre_ckpt["model_spec"])
    model.load_state_dict(pre_ckpt["model"])
    recalibrate_batch_norm(model, target.normalise(target.split("train")[0]), torch.device("cpu"))
    model.eval()
    x, y = target.split("test")
    with torch.no_grad():
        return (model(target.normalise(x)).argmax(1) == torch.from_numpy(y)).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the .json, no training")
    args = parser.parse_args()
    if args.markdown_only:
        (HERE / "domain_adaptation.md").write_text(markdown(json.loads((HERE / "domain_adaptation.json").read_text())))
        return
    seeds = args.seeds
    os.environ["TL_WORKDIR"] = tempfile.mkdtemp(prefix="tl-bench-da-")
    from tl_core.config import PrepareConfig, TrainConfig
    from tl_core.data import prepare
    from tl_core.evaluate import evaluate_loaded
    from tl_core.train import train

    started = time.perf_counter()
    source, _ = prepare(PrepareConfig(uri=f"idx:{SHARED}/mnist-test", image_size=16))
    target, _ = prepare(PrepareConfig(uri=f"npz:{SHARED}/usps/usps_16x16.npz", image_size=16))
    pre = train(TrainConfig(data=source.path, epochs=10, augment=2, batch_size=128, eval_every=0))  # label_efficiency's
    source_only = evaluate_loaded(pre.checkpoint, target).metrics["accuracy"]
    source_only_bn = source_only_with_target_bn(pre.checkpoint, target)
    print(f"source-only {100 * source_only:.1f}  + target BN {100 * source_only_bn:.1f}", flush=True)

    results = []
    for seed in seeds:
        for shots in SHOTS:
            for name, options in VARIANTS.items():
                cfg = TrainConfig(**{"data": target.path, "source_data": source.path, "backbone": pre.checkpoint_uri,
                                     "shots": shots, "seed": seed, "eval_every": 0, "checkpoint_every": 0,
                                     **ADAPTATION, **options})
                m = train(cfg).checkpoint["metrics"]
                results.append({"variant": name, "shots": shots, "seed": seed, "accuracy": m["test_accuracy"],
                                "train_seconds": m["train_seconds"]})
                print(f"seed {seed} shots {shots:2d} {name:20s} {100 * m['test_accuracy']:.1f}  "
                      f"{m['train_seconds']:.1f}s", flush=True)

    table = []
    for shots in SHOTS:
        for name in VARIANTS:
            accs = [r["accuracy"] for r in results if r["variant"] == name and r["shots"] == shots]
            secs = [r["train_seconds"] for r in results if r["variant"] == name and r["shots"] == shots]
            table.append({"variant": name, "shots": shots, "accuracy": statistics.mean(accs),
                          "std": statistics.pstdev(accs), "min": min(accs), "seeds": len(accs),
                          "train_seconds": statistics.mean(secs)})
    report = {"source_only_usps_test": source_only, "source_only_target_bn_usps_test": source_only_bn,
              "pretrain_mnist_test_accuracy": pre.checkpoint["metrics"]["test_accuracy"], "seeds": seeds,
              "recipe": ADAPTATION, "table": table, "runs": results, "wall_s": time.perf_counter() - started}
    (HERE / "domain_adaptation.json").write_text(json.dumps(report, indent=2))
    (HERE / "domain_adaptation.md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    table, seeds = report["table"], report["seeds"]

    def row(name, shots):
        return next(r for r in table if r["variant"] == name and r["shots"] == shots)

    def cell(name, shots):
        r = row(name, shots)
        return f"{100 * r['accuracy']:.1f} ± {100 * r['std']:.1f}"

    lines = ["# Domain adaptation: MNIST-test -> USPS", "",
             ("`.venv/bin/python bench/domain_adaptation.py` (recipe in the script's docstring). Accuracy % on the USPS "
              f"test split (2007 images), mean ± std over seeds {', '.join(map(str, seeds))}."), "",
             "| model | no USPS labels | 10 USPS labels per class + the unlabeled rest |", "|---|---|---|",
             f"| source-only (pretrained on MNIST, as is) | {100 * report['source_only_usps_test']:.1f} | - |",
             f"| source-only + target BN statistics (AdaBN) | {100 * report['source_only_target_bn_usps_test']:.1f} | - |"]
    for name in VARIANTS:
        lines.append(f"| {name} | " + " | ".join(cell(name, s) for s in SHOTS) + " |")
    lines += ["", f"The source model scores {100 * report['pretrain_mnist_test_accuracy']:.1f} % on its own MNIST test "
              "split. Mean training seconds per run (2 CPU cores): " + ", ".join(
                  f"{name} {row(name, 0)['train_seconds']:.0f} / {row(name, 10)['train_seconds']:.0f}" for name in VARIANTS)
              + " (no labels / 10 labels).", "", "## Goals", ""]
    for shots, goal in GOALS.items():
        best = max((row(n, shots) for n in ("dann", "mcc")), key=lambda r: r["accuracy"])
        for name in ("dann", "mcc"):
            r = row(name, shots)
            verdict = "met" if r["accuracy"] >= goal else "MISSED"
            lines.append(f"- {name}, {shots} labels per class: {100 * r['accuracy']:.1f} % (lowest seed "
                         f"{100 * r['min']:.1f}) vs goal >= {100 * goal:.0f} %: {verdict}")
        lines.append(f"  (best at {shots} labels: {best['variant']})")
    control = {s: row("no adaptation term", s)["accuracy"] for s in SHOTS}
    bn_share = ((report["source_only_target_bn_usps_test"] - report["source_only_usps_test"])
                / (row("dann", 0)["accuracy"] - report["source_only_usps_test"]))
    lines += ["", "What each method's own term adds over the same training without it (`no adaptation term`): " + "; ".join(
        f"{name} {100 * (row(name, 0)['accuracy'] - control[0]):+.1f} points with no labels, "
        f"{100 * (row(name, 10)['accuracy'] - control[10]):+.1f} with 10 labels" for name in ("dann", "mcc"))
        + f". Re-estimating the batch-norm statistics on USPS alone takes the source model from "
        f"{100 * report['source_only_usps_test']:.1f} to {100 * report['source_only_target_bn_usps_test']:.1f} %, "
        f"{bn_share:.0%} of the way from source-only to dann."]
    lines += ["", "## Tuning (honest account)", "",
              ("The USPS test labels were used for reporting only (one first smoke run of 1 epoch printed the test accuracy, "
              "before any setting was chosen). The settings were chosen on 200 labelled images "
              "held out of the USPS *train* pool (`--val-per-class 20`, no labels, seed 0): Adam 1e-3 vs SGD 0.01, "
              "adapt_weight 0.1 / 0.3 / 1, 1-10 epochs, augmentation 0 / 1. Two changes to the method came from "
              "those runs: re-estimating batch-norm statistics on the target's train images after each epoch (the "
              "running statistics of half-source batches cost dann up to 20 points on the held-out images), and "
              "the papers' learning-rate annealing (dann oscillated without it). The 10-label setting reuses the "
              "no-label settings untouched. Those 200 held-out labels are more than the 100 of the 10-shot "
              "setting: a truly label-free run would have to pick its settings without them."), "",
              f"Whole benchmark: {report['wall_s'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
