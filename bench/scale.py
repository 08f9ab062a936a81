"""Benchmark: memory and speed of `tl prepare` and of one epoch of `tl transfer` as the data grows.

    .venv/bin/python bench/scale.py                      # 10 000, 50 000, 200 000 images
    .venv/bin/python bench/scale.py --sizes 10000 50000  # fewer

Writes bench/scale.json and bench/scale.md. Each size is a synthetic RGB 64 x 64 image set in
MNIST's IDX format (N train images + 2 000 test images, 10 classes, each a coloured block at a
class's place on noise), written by this script a chunk at a time into a temporary folder.
Every `tl` command runs in a fresh subprocess under /usr/bin/time, whose maximum resident set
is the peak RSS; on Ray Train the workers report their own peak (`peak_rss_mb`). images/s is
the training images of the epoch over the epoch's seconds (from the checkpoint's history).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
TL = str(Path(sys.executable).parent / "tl")
SIZE, CLASSES, TEST_IMAGES, CHUNK = 64, 10, 2000, 5000
GOALS = {"rss_ratio": 1.3, "rss_gb": 3.0, "speed_ratio": 0.9}


def write_idx(folder: Path, prefix: str, n: int, seed: int) -> None:
    """N x 64 x 64 x 3 uint8 images and their labels as IDX files, written a chunk at a time."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{prefix}-images-idx3-ubyte", "wb") as images, open(folder / f"{prefix}-labels-idx1-ubyte", "wb") as labels:
        images.write(bytes([0, 0, 8, 4]) + b"".join(d.to_bytes(4, "big") for d in (n, SIZE, SIZE, 3)))
        labels.write(bytes([0, 0, 8, 1]) + n.to_bytes(4, "big"))
        colours = np.random.default_rng(0).integers(60, 255, (CLASSES, 3))
        for start in range(0, n, CHUNK):
            count = min(CHUNK, n - start)
            y = rng.integers(0, CLASSES, count)
            x = rng.integers(0, 90, (count, SIZE, SIZE, 3), dtype=np.uint8)
            for i, label in enumerate(y):  # the class's block, jittered by up to 6 px
                top, left = 8 + 4 * (label % 5) + rng.integers(-6, 7), 8 + 12 * (label // 5) + rng.integers(-6, 7)
                x[i, max(top, 0) : top + 24, max(left, 0) : left + 24] = colours[label]
            images.write(x.tobytes())
            labels.write(y.astype(np.uint8).tobytes())


def timed(args: list[str], env: dict) -> tuple[dict, float]:
    """Run a `tl` command with --json under /usr/bin/time: its JSON output and peak RSS in MB."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        out = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss.name, TL, *args, "--json"], env=env,
                             capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"tl {' '.join(args)} failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout), int(rss.read().split()[-1]) / 1024


def epoch_figures(result: dict, driver_rss_mb: float) -> dict:
    ckpt = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)
    metrics, first = ckpt["metrics"], ckpt["history"][0]
    return {
        "train_images": metrics["train_images"],
        "epoch_seconds": round(first["epoch_seconds"], 2),
        "images_per_s": round(metrics["train_images"] / first["epoch_seconds"], 1),
        "peak_rss_mb": round(max(driver_rss_mb, metrics.get("peak_rss_mb", 0)), 1),
        "worker_peak_rss_mb": round(metrics.get("peak_rss_mb", 0), 1),
        "streamed": bool(metrics.get("streamed")),
        "rows_per_worker": [v for k, v in sorted(metrics.items()) if k.startswith("rows_seen_worker")],
        "rows_seen_twice": metrics.get("rows_seen_twice"),
        "test_accuracy": round(result["metrics"]["accuracy"], 4),
    }


RUNS = [  # (name, extra tl transfer arguments)
    ("linear-probe, in-process", ["--strategy", "linear-probe"]),
    ("finetune, in-process", ["--strategy", "finetune"]),
    ("finetune, Ray Train 2 workers", ["--strategy", "finetune", "--workers", "2", "--runner", "ray"]),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 200_000])
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="tl-bench-scale-"))
    env = {**os.environ, "TL_WORKDIR": str(root / "tl-work"), "OMP_WAIT_POLICY": "PASSIVE"}
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(name, None)
    results = []
    backbone = None
    try:
        for n in args.sizes:
            source = root / f"synthetic-{n}"
            write_idx(source, "train", n, seed=n)
            write_idx(source, "t10k", TEST_IMAGES, seed=1)
            prepared, prepare_rss = timed(["prepare", "--uri", f"idx:{source}"], env)
            shutil.rmtree(source)  # the prepared shards are all that is read from here on
            row = {"images": n, "prepare_peak_rss_mb": round(prepare_rss, 1), "prepare_seconds": round(prepared.get("seconds", 0), 1)}
            if backbone is None:  # one backbone for every size: 1 epoch on the first (smallest) set
                pretrained, _ = timed(["pretrain", "--data", prepared["path"], "--epochs", "1"], env)
                backbone = pretrained["checkpoint"]
            for label, extra in RUNS:
                result, rss = timed(["transfer", "--data", prepared["path"], "--backbone", backbone, "--shots", "all",
                                     "--epochs", "1", "--eval-every", "0", *extra], env)
                row[label] = epoch_figures(result, rss)
            results.append(row)
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    (HERE / "scale.json").write_text(json.dumps({"goals": GOALS, "results": results}, indent=2) + "\n")
    write_markdown(results)


def write_markdown(results: list[dict]) -> None:
    lines = [
        "# Scale: data larger than memory (`bench/scale.py`)",
        "",
        "Synthetic RGB 64 x 64 images (IDX), N train + 2 000 test, 10 classes; `tl prepare` then one epoch",
        "of `tl transfer --shots all` from a small_cnn backbone. Peak RSS: /usr/bin/time of the `tl`",
        "process (on Ray Train the larger of the driver and the workers' own peaks). This machine: 2 cores.",
        "",
        "| images | float32 size | prepare peak RSS | run | streamed | images/s | peak RSS | rows per worker |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results:
        gb = row["images"] * SIZE * SIZE * 3 * 4 / 1e9
        for label, _ in RUNS:
            r = row[label]
            lines.append(f"| {row['images']:,} | {gb:.1f} GB | {row['prepare_peak_rss_mb']:.0f} MB | {label} | "
                         f"{'yes' if r['streamed'] else 'no (in memory)'} | {r['images_per_s']:.0f} | "
                         f"{r['peak_rss_mb']:.0f} MB | {', '.join(str(v) for v in r['rows_per_worker']) or '-'} |")
    (HERE / "scale.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
