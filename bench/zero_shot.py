"""Benchmark: zero-shot recognition of held-out digits from their seven-segment codes (DAP).

    .venv/bin/python bench/zero_shot.py   # writes bench/zero_shot.{json,md}

Recipe: strategy `zero-shot`, small_cnn from random init, the packaged seven-segment
descriptions, Adam lr 1e-3, batch 64, shift augmentation 1 px, seeds 0-2.
- MNIST-test (7000 train / 3000 test images, 28 px), 3 epochs, three unseen sets of 3 digits
  {0,3,6}, {2,5,8}, {1,4,9} (all the digits but 7): zero-shot accuracy among the 3 unseen
  digits (chance 1/3), the generalized accuracy (all 10 digits candidates) on the unseen and
  on the seen digits' test images, and per segment the accuracy of its predictor on the
  unseen digits' images (is the segment recognised on digits it was never trained on?).
- sklearn digits (8 px), 20 epochs, leave-two-out: every pair of digits (45) held out in turn
  (chance 1/2).
Data: ../shared/data.
"""

from __future__ import annotations

import itertools
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
MNIST_SETS = [["0", "3", "6"], ["2", "5", "8"], ["1", "4", "9"]]
SEGMENTS = "abcdefg"


def run(data, unseen, seed, epochs):
    from tl_core.checkpoints import load_state
    from tl_core.config import TrainConfig
    from tl_core.models import build_from_spec
    from tl_core.strategies.zero_shot import (
        attribute_logits,
        generalized_accuracy,
        zero_shot_task,
    )
    from tl_core.train import train

    cfg = TrainConfig(data=data.path, strategy="zero-shot", unseen_classes=unseen, epochs=epochs, seed=seed,
                      augment=1, eval_every=0, checkpoint_every=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(cfg)
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
            "chance": 1 / len(unseen), "generalized": general,
            "segment_accuracy_on_unseen": {s: round(v, 3) for s, v in zip(SEGMENTS, segment_acc.tolist())},
            "left_out_segments": [s for s, keep in zip(SEGMENTS, task.scored.tolist()) if not keep],
            "warnings": [str(w.message) for w in caught if "do not vary" in str(w.message)],
            "train_seconds": result.checkpoint["metrics"]["train_seconds"]}


def minority_side(unseen: list[str]) -> dict:
    """Per segment, how many seen digits are on its rarer side (lit or dark): a predictor
    trained on 1 or 2 digits on one side learns to recognise those digits, not the segment."""
    from tl_core.strategies.zero_shot import load_descriptions

    signatures = load_descriptions(None).signatures
    seen = [d for d in signatures if d not in unseen]
    lit = [sum(signatures[d][m] for d in seen) for m in range(len(SEGMENTS))]
    return {s: min(n, len(seen) - n) for s, n in zip(SEGMENTS, lit)}


def main() -> None:
    os.environ.setdefault("TL_WORKDIR", tempfile.mkdtemp(prefix="tl-bench-zs-"))
    from tl_core.config import PrepareConfig
    from tl_core.data import prepare

    started = time.perf_counter()
    mnist, _ = prepare(PrepareConfig(uri=f"idx:{SHARED / 'mnist-test'}"))
    mnist_runs = [run(mnist, unseen, seed, 3) for unseen in MNIST_SETS for seed in SEEDS]
    digits, _ = prepare(PrepareConfig(uri="sklearn:digits"))
    pair_runs = [run(digits, list(pair), seed, 20) for pair in itertools.combinations("0123456789", 2)
                 for seed in SEEDS]
    seconds = time.perf_counter() - started
    train_seconds = sum(r["train_seconds"] for r in mnist_runs + pair_runs)  # also right when checkpoints are reused

    def mean(runs, key):
        return statistics.mean(r[key] for r in runs)

    rows = []
    for unseen in MNIST_SETS:
        runs = [r for r in mnist_runs if r["unseen"] == unseen]
        rows.append({"unseen": "".join(unseen), "zero_shot": mean(runs, "zero_shot_accuracy"),
                     "per_seed": [r["zero_shot_accuracy"] for r in runs],
                     "gzsl_unseen": statistics.mean(r["generalized"]["unseen"] for r in runs),
                     "gzsl_seen": statistics.mean(r["generalized"]["seen"] for r in runs),
                     "segments": {s: statistics.mean(r["segment_accuracy_on_unseen"][s] for r in runs) for s in SEGMENTS},
                     "left_out": runs[0]["left_out_segments"], "minority": minority_side(unseen)})
    pairs = {}
    for r in pair_runs:
        pairs.setdefault("".join(r["unseen"]), []).append(r["zero_shot_accuracy"])
    pair_means = {k: statistics.mean(v) for k, v in pairs.items()}
    mnist_mean = mean(mnist_runs, "zero_shot_accuracy")
    pairs_mean = statistics.mean(pair_means.values())
    goals = {"mnist_above_chance": mnist_mean > 1 / 3 + 0.05, "sklearn_pairs_above_chance": pairs_mean > 0.5 + 0.05}
    summary = {"mnist": rows, "mnist_mean": mnist_mean, "sklearn_pairs": pair_means, "sklearn_pairs_mean": pairs_mean,
               "pairs_clearly_above_chance": sum(v >= 0.65 for v in pair_means.values()),
               "pairs_at_or_below_chance": sum(v <= 0.55 for v in pair_means.values()),
               "goals": goals, "seconds": seconds, "train_seconds": train_seconds, "runs": mnist_runs + pair_runs}
    (HERE / "zero_shot.json").write_text(json.dumps(summary, indent=2))

    lines = ["# Zero-shot digits from seven-segment codes (DAP)", "",
             ("MNIST-test, 3 unseen digits (chance 33.3 %), mean of seeds 0-2. GZSL: generalized accuracy, all 10 "
             "digits candidates. Segment columns: accuracy of each segment's predictor on the unseen digits' "
             "test images; in brackets, how many of the 7 seen digits are on the segment's rarer side (lit or "
             "dark) in training."), "",
             "| unseen | zero-shot acc | per seed | GZSL unseen | GZSL seen | " + " | ".join(SEGMENTS) + " | left out |",
             "|---|---|---|---|---|" + "---|" * len(SEGMENTS) + "---|"]
    for row in rows:
        lines.append(f"| {row['unseen']} | {row['zero_shot']:.1%} | {' / '.join(f'{a:.1%}' for a in row['per_seed'])} "
                     f"| {row['gzsl_unseen']:.1%} | {row['gzsl_seen']:.1%} | "
                     + " | ".join(f"{row['segments'][s]:.2f} ({row['minority'][s]})" for s in SEGMENTS)
                     + f" | {','.join(row['left_out']) or '-'} |")
    why = ("Why MNIST is at chance: only the top and bottom bars (a, d) and, less so, c are recognised on "
           "digits the predictors never saw. The side segments b, e, f and the middle bar g are not separate strokes "
           "in handwriting (a written 0, 3, 6 or 9 is curves, a 4 or 7 has diagonals), and with 7 seen digits a "
           "segment often has only 1 or 2 seen digits on one side (the bracketed counts), so its predictor learns to "
           "spot those digits rather than the segment (e.g. with {0,3,6} unseen, b is dark only for the seen 5, and "
           "its predictor is right on about half the unseen images; that set lands below chance). Where a segment is constant over the seen digits it cannot be "
           "learnt and is left out (column 'left out'). In the generalized setting the seen digits win almost "
           "always (GZSL unseen " + ", ".join(f"{r['gzsl_unseen']:.0%}" for r in rows) + "), the known bias of DAP. The "
           f"8 px sklearn digits do better on some pairs, yet {summary['pairs_at_or_below_chance']} of 45 pairs stay "
           "near chance.")
    ranked = sorted(pair_means.items(), key=lambda kv: -kv[1])
    lines += ["", f"MNIST mean: {mnist_mean:.1%} (chance 33.3 %).", "",
              (f"sklearn digits, leave-two-out (45 pairs x 3 seeds, chance 50 %): mean {pairs_mean:.1%}; "
               f"{summary['pairs_clearly_above_chance']} pairs >= 65 %, {summary['pairs_at_or_below_chance']} pairs <= 55 %."),
              "Best: " + ", ".join(f"{k} {v:.0%}" for k, v in ranked[:6]) + ".",
              "Worst: " + ", ".join(f"{k} {v:.0%}" for k, v in ranked[-6:]) + ".", "",
              "Goals (zero-shot accuracy vs chance, + 5 points):",
              f"- MNIST 3 unseen digits above chance: {'met' if goals['mnist_above_chance'] else 'MISSED'}",
              f"- sklearn digits pairs above chance: {'met' if goals['sklearn_pairs_above_chance'] else 'MISSED'}",
              "", why,
              "", (f"Recipe: see the script's docstring. Training time {train_seconds:.0f} s in all (this invocation "
                   f"{seconds:.0f} s; checkpoints in TL_WORKDIR are reused)."), ""]
    (HERE / "zero_shot.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
