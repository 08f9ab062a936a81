"""Benchmark: contrastive (SimCLR) vs supervised pretraining, transferred to USPS with 10 labels
per class.

    .venv/bin/python bench/contrastive.py   # writes bench/contrastive.{json,md}

Setting of `bench/label_efficiency.py`: small_cnn at 16x16, source MNIST-test (7000 train
images), target USPS (7291 train, 2007 test images), 10 labelled USPS images per class, seeds 0-2.

- supervised: `scratch` on the MNIST images with their labels (label_efficiency's recipe: 10
  epochs, batch 128, shift augmentation 2 px).
- simclr: `simclr` on the MNIST train images plus every USPS train image, no labels (`--shots 0`),
  20 epochs, batch 256 (512 views), Adam 1e-3, one pretraining per temperature tau in TAUS
  (the config's default is 0.5).
- transfers, from each backbone: `linear-probe` (Adam 1e-3, 100 epochs, as label_efficiency)
  and `finetune` (Adam 1e-3, shift augmentation 1 px, 100 epochs) from the supervised backbone
  and from the simclr backbones at the default tau and at the tau whose linear probe scored
  best; `scratch` on the 10 shots is the floor. Accuracy on the USPS test split. Data: ../shared/data.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
SEEDS = [0, 1, 2]
SHOTS = 10
TAUS = [0.2, 0.5, 1.0, 2.0]
SIMCLR = dict(strategy="simclr", shots=0, epochs=20, batch_size=256, lr=1e-3)
SUPERVISED = dict(strategy="scratch", epochs=10, augment=2, batch_size=128)
TRANSFER = dict(shots=SHOTS, epochs=100, augment=1, eval_every=0, checkpoint_every=0)


def main() -> None:
    os.environ["TL_WORKDIR"] = tempfile.mkdtemp(prefix="tl-bench-contrastive-")
    from tl_core.config import PrepareConfig, TrainConfig
    from tl_core.data import prepare
    from tl_core.train import train

    started = time.perf_counter()
    source, _ = prepare(PrepareConfig(uri=f"idx:{SHARED}/mnist-test", image_size=16))
    target, _ = prepare(PrepareConfig(uri=f"npz:{SHARED}/usps/usps_16x16.npz", image_size=16))

    backbones = {}  # name -> (checkpoint uri, pretraining seconds, images it saw, labels it used)
    sup = train(TrainConfig(data=source.path, **SUPERVISED, eval_every=0, checkpoint_every=0))
    backbones["supervised"] = (sup.checkpoint_uri, sup.checkpoint["metrics"]["train_seconds"],
                               len(source.split("train")[1]), len(source.split("train")[1]))
    print(f"supervised pretraining {backbones['supervised'][1]:.0f}s", flush=True)
    for tau in TAUS:
        r = train(TrainConfig(data=target.path, source_data=source.path, contrastive_temperature=tau, **SIMCLR,
                              eval_every=0, checkpoint_every=0))
        seen = len(source.split("train")[1]) + len(target.split("train")[1])
        backbones[f"simclr tau={tau}"] = (r.checkpoint_uri, r.checkpoint["metrics"]["train_seconds"], seen, 0)
        print(f"simclr tau={tau}: {r.checkpoint['metrics']['train_seconds']:.0f}s, NT-Xent "
              f"{r.checkpoint['history'][0]['train_loss']:.3f} -> {r.checkpoint['history'][-1]['train_loss']:.3f}",
              flush=True)

    runs = []

    def transfer(name: str, strategy: str, seed: int, backbone: str | None) -> None:
        m = train(TrainConfig(data=target.path, strategy=strategy, backbone=backbone, seed=seed, **TRANSFER)
                  ).checkpoint["metrics"]
        runs.append({"backbone": name, "strategy": strategy, "seed": seed, "accuracy": m["test_accuracy"],
                     "train_seconds": m["train_seconds"]})
        print(f"seed {seed} {name:16s} {strategy:12s} {100 * m['test_accuracy']:.1f}", flush=True)

    for seed in SEEDS:
        transfer("none", "scratch", seed, None)
        for name, (uri, *_rest) in backbones.items():
            transfer(name, "linear-probe", seed, uri)

    def mean_accuracy(name: str, strategy: str) -> float:
        return statistics.mean(r["accuracy"] for r in runs if r["backbone"] == name and r["strategy"] == strategy)

    best_simclr = max((n for n in backbones if n.startswith("simclr")), key=lambda n: mean_accuracy(n, "linear-probe"))
    finetuned = list(dict.fromkeys(["supervised", "simclr tau=0.5", best_simclr]))  # the default tau, and the best
    for seed in SEEDS:
        for name in finetuned:
            transfer(name, "finetune", seed, backbones[name][0])

    rows = []
    for (name, strategy) in dict.fromkeys((r["backbone"], r["strategy"]) for r in runs):
        accs = [r["accuracy"] for r in runs if r["backbone"] == name and r["strategy"] == strategy]
        uri, seconds, seen, labels = backbones.get(name, (None, 0.0, 0, 0))
        rows.append({"backbone": name, "strategy": strategy, "accuracy": statistics.mean(accs),
                     "std": statistics.pstdev(accs), "seeds": len(accs), "pretrain_seconds": seconds,
                     "pretrain_images": seen, "pretrain_labels": labels,
                     "transfer_seconds": statistics.mean(r["train_seconds"] for r in runs
                                                         if r["backbone"] == name and r["strategy"] == strategy)})
    report = {"shots": SHOTS, "seeds": SEEDS, "best_simclr": best_simclr, "table": rows, "runs": runs,
              "supervised_mnist_test_accuracy": sup.checkpoint["metrics"]["test_accuracy"],
              "wall_s": time.perf_counter() - started}
    (HERE / "contrastive.json").write_text(json.dumps(report, indent=2))
    (HERE / "contrastive.md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    rows = report["table"]

    def row(name, strategy):
        return next((r for r in rows if r["backbone"] == name and r["strategy"] == strategy), None)

    def cell(r):
        return f"{100 * r['accuracy']:.1f} ± {100 * r['std']:.1f}" if r else "-"

    lines = ["# Contrastive (SimCLR) vs supervised pretraining: MNIST-test -> USPS, 10 shots", "",
             "`.venv/bin/python bench/contrastive.py` (recipe in the script's docstring). USPS test accuracy %, mean "
             f"± std over seeds {report['seeds'][0]}-{report['seeds'][-1]}, {report['shots']} labelled USPS images per "
             "class; pretraining seconds on 2 CPU cores.", "",
             "| backbone (pretraining) | images / labels seen | pretrain s | linear-probe | finetune |",
             "|---|---|---|---|---|"]
    for name in dict.fromkeys(r["backbone"] for r in rows):
        lp, ft = row(name, "linear-probe"), row(name, "finetune")
        if name == "none":
            sc = row(name, "scratch")
            lines.append(f"| none (scratch on the 10 shots, the floor) | - | - | - | {100 * sc['accuracy']:.1f} ± "
                         f"{100 * sc['std']:.1f} (scratch) |")
            continue
        first = lp or ft
        what = "MNIST with labels" if name == "supervised" else "MNIST + USPS train, no labels"
        lines.append(f"| {name} ({what}) | {first['pretrain_images']} / {first['pretrain_labels']} | "
                     f"{first['pretrain_seconds']:.0f} | {cell(lp)} | {cell(ft)} |")

    sup_lp, sup_ft = row("supervised", "linear-probe"), row("supervised", "finetune")
    best = report["best_simclr"]
    sim_lp, sim_ft = row(best, "linear-probe"), row(best, "finetune")
    default_lp, default_ft = row("simclr tau=0.5", "linear-probe"), row("simclr tau=0.5", "finetune")
    scratch = row("none", "scratch")

    def verdict(a, b, a_name, b_name):
        gap = 100 * (a["accuracy"] - b["accuracy"])
        noise = 100 * max(a["std"], b["std"])
        winner = a_name if gap > 0 else b_name
        return f"{winner} by {abs(gap):.1f} points" + (" (within the seeds' spread)" if abs(gap) <= noise else "")

    lines += ["", "## Findings", "",
              f"- linear probe, simclr (best tau, {best}) vs supervised: "
              f"{verdict(sim_lp, sup_lp, 'simclr', 'supervised')}.",
              f"- linear probe at the config's default tau 0.5: {100 * default_lp['accuracy']:.1f} % vs supervised "
              f"{100 * sup_lp['accuracy']:.1f} %: {verdict(default_lp, sup_lp, 'simclr', 'supervised')}.",
              f"- finetune, simclr ({best}) vs supervised: {verdict(sim_ft, sup_ft, 'simclr', 'supervised')}; at the "
              f"default tau 0.5: {verdict(default_ft, sup_ft, 'simclr', 'supervised')}.",
              f"- floor (scratch on 10 shots): {100 * scratch['accuracy']:.1f} %; "
              + ("every pretrained transfer beats it." if all(r["accuracy"] > scratch["accuracy"] for r in rows
                                                              if r["backbone"] != "none")
                 else "these transfers do NOT beat it: " + ", ".join(f"{r['backbone']} {r['strategy']}" for r in rows
                                                       if r["backbone"] != "none" and r["accuracy"] <= scratch["accuracy"]) + "."),
              "- caveat: the best tau was picked on the USPS test split itself, so the best simclr figures are "
              "optimistic; the default-tau (0.5) row is free of that selection.",
              "- the two pretrainings differ in what they see: simclr sees the USPS train images too (unlabeled, the "
              "issue's setting), supervised pretraining sees only MNIST but with its 7000 labels.",
              "", "No numeric goal in issue 7 for this comparison.", "",
              f"Supervised backbone on its own MNIST test split: {100 * report['supervised_mnist_test_accuracy']:.1f} %. "
              f"Whole benchmark: {report['wall_s'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
