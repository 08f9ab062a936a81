"""Benchmark: `--head-init source` (the new head starts as the backbone's own head, where the
source was trained on the target's classes) against a random head, on the two digit pairs whose
classes are the same ten digits.

    .venv/bin/python bench/source_head.py   # writes bench/source_head.{json,md}

Pairs: MNIST-test -> USPS at 16x16 (small_cnn pretrained 10 epochs, shift 2 px, batch 128, as
bench/auto.py), and fonts digits -> scikit-learn's digits at 8x8 (`tl run`'s embedded default
pair; pretrained 10 epochs, shift 1 px). On each, linear-probe and finetune with the model's
recipe (tl_core/recipes.py) at 1, 5 and 10 labels a class, seeds 0-2, on the same labels with
either head; and the source's head as it is on the target's test split. The test split is
scored, never used to choose. TL_WORKDIR (default /tmp/tl-bench-source-head) keeps data and runs.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
SEEDS = [0, 1, 2]
SHOTS = [1, 5, 10]  # 5: the embedded default's shot count
STRATEGIES = ["linear-probe", "finetune"]
HEADS = ["random", "source"]


def pairs() -> dict[str, tuple]:
    from tl_core.config import PrepareConfig

    return {"mnist->usps": (PrepareConfig(uri=f"idx:{SHARED}/mnist-test", image_size=16),
                            PrepareConfig(uri=f"npz:{SHARED}/usps/usps_16x16.npz", image_size=16), {"augment": 2, "batch_size": 128}),
            "fonts->sklearn-digits": (PrepareConfig(uri="fonts:digits", image_size=8),
                                      PrepareConfig(uri="sklearn:digits", image_size=8), {"augment": 1})}


def main() -> None:
    os.environ.setdefault("TL_WORKDIR", "/tmp/tl-bench-source-head")
    from tl_core.auto import candidate_config, recipe_for
    from tl_core.config import TrainConfig
    from tl_core.data import prepare
    from tl_core.evaluate import evaluate_checkpoint
    from tl_core.train import train

    started = time.perf_counter()
    rows, as_is = [], {}
    for pair, (source_cfg, target_cfg, pretrain) in pairs().items():
        source, _ = prepare(source_cfg)
        target, _ = prepare(target_cfg)
        backbone = train(TrainConfig(data=source.path, epochs=10, eval_every=0, **pretrain)).checkpoint_uri
        as_is[pair] = evaluate_checkpoint(backbone, target.path).metrics["accuracy"]  # the source's classifier as it is
        for strategy in STRATEGIES:
            for shots in SHOTS:
                for head in HEADS:
                    for seed in SEEDS:
                        base = TrainConfig(strategy="auto", data=target.path, backbone=backbone, shots=shots, seed=seed,
                                           augment=1, eval_every=0)
                        cfg = candidate_config(base, strategy, recipe_for(base, None, strategy))
                        metrics = train(cfg.model_copy(update={"head_init": head})).checkpoint["metrics"]
                        rows.append({"pair": pair, "strategy": strategy, "shots": shots, "head": head, "seed": seed,
                                     "accuracy": metrics["test_accuracy"], "train_seconds": metrics["train_seconds"]})
                        print(pair, strategy, shots, head, seed, f"{metrics['test_accuracy']:.3f}", flush=True)
    result = {"rows": rows, "source_head_as_is": as_is, "seconds": time.perf_counter() - started}
    (HERE / "source_head.json").write_text(json.dumps(result, indent=1))
    (HERE / "source_head.md").write_text(report(result))
    print(report(result))


def report(result: dict) -> str:
    lines = ["# The new head started from the source's own head (`--head-init source`) or at random", "",
             "`.venv/bin/python bench/source_head.py` (recipe in its docstring). Test accuracy %, mean of seeds 0-2 "
             "(the seeds in brackets), the same labels for both heads.", "",
             "| pair | strategy | shots a class | random head | source's head | source - random |", "|---|---|---|---|---|---|"]
    rows = result["rows"]
    for pair in result["source_head_as_is"]:
        for strategy in STRATEGIES:
            for shots in SHOTS:
                cells = {}
                for head in HEADS:
                    accs = [100 * r["accuracy"] for r in rows if (r["pair"], r["strategy"], r["shots"], r["head"]) ==
                            (pair, strategy, shots, head)]
                    cells[head] = (statistics.mean(accs), " ".join(f"{a:.1f}" for a in accs))
                lines.append(f"| {pair} | {strategy} | {shots} | {cells['random'][0]:.1f} ({cells['random'][1]}) | "
                             f"{cells['source'][0]:.1f} ({cells['source'][1]}) | "
                             f"{cells['source'][0] - cells['random'][0]:+.1f} |")
    lines += ["", "The source's classifier as it is (no target label): " + "; ".join(
        f"{pair} {100 * acc:.1f} %" for pair, acc in result["source_head_as_is"].items()) + ".", "",
        "What the default (`--head-init auto`) takes from it (tl_core/strategies/base.py, `head_start`): finetune "
        "starts from the source's head wherever it fits the target's classes, the solved probe never does; with one "
        "label a class, `--strategy auto` takes finetune from that head (tl_core/auto.py, `fallback`).", "",
        f"This run: {result['seconds'] / 60:.1f} min on this machine's 2 cores (runs already in TL_WORKDIR are "
        "reused; about 1 min from an empty one)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
