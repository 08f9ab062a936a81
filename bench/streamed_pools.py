"""Benchmark: memory of the strategies whose second set streams, as the data grows: protonet's
episodes read from the shards, and dann's source task streamed beside the target.

    .venv/bin/python bench/streamed_pools.py                  # 10 000 and 200 000 images
    .venv/bin/python bench/streamed_pools.py --sizes 200000   # one size; the other's rows are kept
    .venv/bin/python bench/streamed_pools.py --markdown       # only rewrite the .md from the .json

The synthetic RGB 64 x 64 sets of `bench/scale.py` (N train + 2 000 test images, 10 classes).
protonet: one epoch of 100 5-way 5-shot episodes with 15 queries on the N-image set, 100 test
episodes. dann: one epoch on a 5 000-image target (10 shots a class, the rest unlabeled) with
the N-image set as `--source-data`. At 10 000 images (0.5 GB as float32) both hold their set in
memory; at 200 000 (9.8 GB) they stream (`--in-memory-mb` 2048). Each `tl transfer` in a fresh
subprocess under /usr/bin/time (peak RSS). Writes bench/streamed_pools.json and .md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.scale import fresh_workdir, prepared_synthetic, saved_rows, timed  # noqa: E402

HERE = Path(__file__).resolve().parent
GOALS = {"rss_ratio": 1.3, "rss_gb": 3.0}  # issue 13's, for 10 000 -> 200 000 images
PROTONET = ["--strategy", "protonet", "--shots", "all", "--ways", "5", "--episode-shots", "5", "--episode-queries", "15",
            "--episodes-per-epoch", "100", "--eval-episodes", "100"]
DANN = ["--strategy", "dann", "--shots", "10"]


def figures(result: dict, rss_mb: float, wall_s: float) -> dict:
    ckpt = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)
    m = ckpt["metrics"]
    return {"peak_rss_mb": round(rss_mb, 1), "wall_seconds": round(wall_s, 1), "train_seconds": round(m["train_seconds"], 1),
            "epoch_seconds": round(ckpt["history"][0]["epoch_seconds"], 1),
            # protonet: its episodes streamed; dann: its source task (the 5 000-image target is held in memory)
            "streamed": bool(m.get("source_streamed" if "source_streamed" in m else "streamed")),
            "rows_seen": m.get("rows_seen_worker0"), "test_accuracy": round(m["test_accuracy"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 200_000])
    parser.add_argument("--markdown", action="store_true", help="only rewrite streamed_pools.md from its json")
    args = parser.parse_args()
    if args.markdown:
        return write_markdown(json.loads((HERE / "streamed_pools.json").read_text())["results"])
    root, env = fresh_workdir("tl-bench-pools-")
    saved = HERE / "streamed_pools.json"
    results = saved_rows(saved)
    try:
        target_path = prepared_synthetic(root, 5000, seed=5000, env=env)[0]["path"]
        for n in args.sizes:
            prepared = prepared_synthetic(root, n, seed=n, env=env)[0]["path"]
            row = {"images": n}
            row["protonet"] = figures(*timed(["transfer", "--data", prepared, "--epochs", "1", *PROTONET], env))
            row["dann"] = figures(*timed(["transfer", "--data", target_path, "--source-data", prepared, "--epochs", "1",
                                          "--no-baseline", *DANN], env))
            results[n] = row
            print(json.dumps(row), flush=True)
            rows = [results[k] for k in sorted(results)]
            saved.write_text(json.dumps({"goals": GOALS, "results": rows}, indent=2) + "\n")
            write_markdown(rows)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def write_markdown(rows: list[dict]) -> None:
    lines = ["# Streamed episodes and source tasks (`bench/streamed_pools.py`)", "",
             (__doc__ or "").split("\n\n")[2].replace("\n", " ").strip(), "",
             "| images | run | streamed (protonet: episodes; dann: the source) | peak RSS | train s | epoch s | test accuracy |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        for run in ("protonet", "dann"):
            r = row[run]
            lines.append(f"| {row['images']:,} | {run} | {'yes' if r['streamed'] else 'no (in memory)'} | "
                         f"{r['peak_rss_mb']:.0f} MB | {r['train_seconds']} | {r['epoch_seconds']} | {100 * r['test_accuracy']:.1f} % |")
    by_size = {row["images"]: row for row in rows}
    if 10_000 in by_size and 200_000 in by_size:
        lines += ["", "| run | peak RSS 200 000 / 10 000 (goal <= 1.3) | peak RSS at 200 000 (goal < 3 GB) |", "|---|---|---|"]
        for run in ("protonet", "dann"):
            small, large = by_size[10_000][run]["peak_rss_mb"], by_size[200_000][run]["peak_rss_mb"]
            lines.append(f"| {run} | {large / small:.2f} | {large / 1024:.2f} GB |")
    lines += ["", "Before this change a train split larger than `--in-memory-mb` stopped protonet and maml with "
              "\"needs its training images in memory\", and a larger source task was a seeded sample of what fits "
              "(~43 000 of these images at 2048 MB); both now stream. dann's peak at 10 000 is its in-memory fast "
              "path (target pool, source and their copies as float32); the floor of a `tl` process is ~1.3 GB."]
    (HERE / "streamed_pools.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
