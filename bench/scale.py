"""Benchmark: memory and speed of `tl prepare` and of one epoch of `tl transfer` as the data grows.

    .venv/bin/python bench/scale.py                      # 10 000, 50 000, 200 000 images
    .venv/bin/python bench/scale.py --sizes 200000       # one size; the others' rows are kept
    .venv/bin/python bench/scale.py --markdown           # only rewrite scale.md from scale.json

Writes bench/scale.json (a size measured again replaces its row) and bench/scale.md. Each size is a synthetic RGB 64 x 64 image set in
MNIST's IDX format (N train images + 2 000 test images, 10 classes, each a coloured block at a
class's place on noise), written by this script a chunk at a time into a temporary folder.
Every `tl` command runs in a fresh subprocess under /usr/bin/time, whose maximum resident set
is the peak RSS; on Ray Train the workers report their own peak (`peak_rss_mb`). images/s is
the training images over the fit's seconds (data start-up, linear-probe's features, the epoch
and the test evaluation), from the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
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


def prepared_synthetic(root: Path, n: int, seed: int, env: dict) -> tuple[dict, float, float]:
    """`tl prepare` of a synthetic set of n train images (and the TEST_IMAGES test images): its
    JSON output, peak RSS in MB and seconds. The IDX files are deleted once prepared: the shards
    are all that is read from then on."""
    source = root / f"synthetic-{n}-{seed}"
    write_idx(source, "train", n, seed=seed)
    write_idx(source, "t10k", TEST_IMAGES, seed=1)
    out = timed(["prepare", f"idx:{source}"], env)
    shutil.rmtree(source)
    return out


def fresh_workdir(prefix: str) -> tuple[Path, dict]:
    """A new temporary folder and the environment of `tl` commands working in it: nothing cached,
    no tracking server, no Ray cluster, torch's threads passive while they wait (as in the image)."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    env = {**os.environ, "TL_WORKDIR": str(root / "tl-work"), "OMP_WAIT_POLICY": "PASSIVE"}
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(name, None)
    return root, env


def saved_rows(saved: Path) -> dict:
    """The rows a bench's json already holds, by their number of images."""
    return {row["images"]: row for row in (json.loads(saved.read_text())["results"] if saved.exists() else [])}


def timed(args: list[str], env: dict) -> tuple[dict, float, float]:
    """Run a `tl` command with --json under /usr/bin/time: its JSON output, peak RSS in MB, wall seconds."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        start = time.perf_counter()
        out = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss.name, TL, *args, "--json"], env=env,
                             capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"tl {' '.join(args)} failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1]), int(rss.read().split()[-1]) / 1024, time.perf_counter() - start


def epoch_figures(result: dict, driver_rss_mb: float) -> dict:
    ckpt = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)
    metrics, first = ckpt["metrics"], ckpt["history"][0]
    return {
        "train_images": metrics["train_images"],
        "epoch_seconds": round(first["epoch_seconds"], 2),
        # Over the whole fit: data start-up, features (linear-probe), the epoch, the test evaluation.
        "images_per_s": round(metrics["train_images"] / metrics["train_seconds"], 1),
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
    parser.add_argument("--markdown", action="store_true", help="only rewrite scale.md from scale.json")
    args = parser.parse_args()
    if args.markdown:
        write_markdown(json.loads((HERE / "scale.json").read_text())["results"])
        return
    root, env = fresh_workdir("tl-bench-scale-")
    saved = HERE / "scale.json"
    results = saved_rows(saved)
    try:
        # One backbone for every size, so a size can be measured alone: 1 epoch on a small set of its own.
        prepared = prepared_synthetic(root, 5000, seed=5000, env=env)[0]
        backbone = timed(["pretrain", "--data", prepared["path"], "--epochs", "1"], env)[0]["checkpoint"]
        for n in args.sizes:
            prepared, prepare_rss, prepare_s = prepared_synthetic(root, n, seed=n, env=env)
            row = {"images": n, "prepare_peak_rss_mb": round(prepare_rss, 1), "prepare_seconds": round(prepare_s, 1)}
            for label, extra in RUNS:
                result, rss, _ = timed(["transfer", "--data", prepared["path"], "--backbone", backbone, "--shots", "all",
                                     "--epochs", "1", "--eval-every", "0", "--no-baseline", *extra], env)
                row[label] = epoch_figures(result, rss)
            results[n] = row
            print(json.dumps(row), flush=True)
            rows = [results[k] for k in sorted(results)]  # saved after every size: a long run keeps what it measured
            saved.write_text(json.dumps({"goals": GOALS, "results": rows}, indent=2) + "\n")
            write_markdown(rows)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def streamed_label(label: str, r: dict) -> str:
    if label.startswith("linear-probe"):  # the frozen backbone's features: a chunk at a time either way
        return "features by chunk" + (", set streamed" if r["streamed"] else "")
    return "yes" if r["streamed"] else "no (in memory)"


def epoch_speed(r: dict) -> float:
    return r["train_images"] / r["epoch_seconds"]


def write_markdown(results: list[dict]) -> None:
    lines = [
        "# Scale: data larger than memory (`bench/scale.py`)",
        "",
        "Synthetic RGB 64 x 64 images (IDX), N train + 2 000 test, 10 classes; `tl prepare` then one epoch",
        "of `tl transfer --shots all --no-baseline` from a small_cnn backbone (pretrained 1 epoch on a",
        "separate 5 000-image set). Peak RSS: /usr/bin/time of the `tl` process (on Ray Train the larger of the driver and the",
        "workers' own peaks). images/s: training images over the whole fit (start-up, features, the epoch,",
        "the test evaluation); epoch images/s: over the training epoch alone (linear-probe's epoch trains",
        "only its head on cached features). A labelled set larger than `--in-memory-mb` (2048 MB as float32, here above",
        "~43 000 images) streams from its shards. This machine: 2 cores, 24 GiB.",
        "",
        "| images | float32 size | prepare: peak RSS, s | run | streamed | images/s | epoch images/s | peak RSS | rows per worker |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results:
        gb = row["images"] * SIZE * SIZE * 3 * 4 / 1e9
        for label, _ in RUNS:
            r = row[label]
            twice = f" ({r['rows_seen_twice']} seen twice)" if r.get("rows_seen_twice") is not None else ""
            lines.append(f"| {row['images']:,} | {gb:.1f} GB | {row['prepare_peak_rss_mb']:.0f} MB, {row['prepare_seconds']:.0f} s | "
                         f"{label} | {streamed_label(label, r)} | {r['images_per_s']:.0f} | {epoch_speed(r):.0f} | {r['peak_rss_mb']:.0f} MB | "
                         f"{', '.join(str(v) for v in r['rows_per_worker']) or '-'}{twice} |")
    first, last = results[0], results[-1]
    lines += ["", f"## Against the goals ({first['images']:,} -> {last['images']:,} images)", "",
              "| | peak RSS ratio (goal <= 1.3) | largest peak RSS (goal < 3 GB) | images/s ratio (goal >= 0.9) | epoch images/s ratio |",
              "|---|---|---|---|---|"]
    lines.append(f"| tl prepare | {last['prepare_peak_rss_mb'] / first['prepare_peak_rss_mb']:.2f} | "
                 f"{max(r['prepare_peak_rss_mb'] for r in results) / 1024:.2f} GB | | |")
    for label, _ in RUNS:
        a, b = first[label], last[label]
        lines.append(f"| {label} | {b['peak_rss_mb'] / a['peak_rss_mb']:.2f} | "
                     f"{max(r[label]['peak_rss_mb'] for r in results) / 1024:.2f} GB | {b['images_per_s'] / a['images_per_s']:.2f} | {epoch_speed(b) / epoch_speed(a):.2f} |")
    lines += ["", "The epoch figure of Ray Train at 10 000 is its in-memory path, where both workers hold a whole CPU;",
              "a streaming run leaves one of this machine's two CPUs to Ray Data's read and decode tasks (see",
              "tl_core/train/ray_runner.py), which costs the epoch ~20 % here. Streamed, the epoch does not slow",
              "with size (50 000 -> 200 000 above). On more cores that one CPU is a smaller share (not measured here).",
              "These Ray Train rows were measured while Ray Data's tasks each asked for a whole CPU; they now ask",
              "for a quarter (tl_core/train/ray_data.py: TASK_CPUS), which on 2 cores changed bench/photos.md's",
              "Ray figure within its noise; the 200 000-image rows were not measured again."]
    lines += ["", "Before this change (the issue's measurements, not rerun here): `tl prepare` of 120 000 64 x 64",
              "IDX images peaked at 8.25 GB against 1.65 GB for 10 000 (4.99x), and a 10-shot `tl transfer` on it",
              "at 3.02 GB, because every split was read and normalised whole. The floor of every `tl` process",
              "here is ~1.3 GB (torch, Ray, MLflow imported)."]
    (HERE / "scale.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
