"""Benchmark: what each Ray Train worker reads when a run streams, on a 2-node Ray cluster.

    .venv/bin/python bench/worker_shares.py

Writes bench/worker_shares.json and bench/worker_shares.md. A Ray cluster of two nodes (a head
and a second `ray start` node, 2 CPUs each, on this machine, as the pipeline tests start one),
then `tl transfer --workers 2 --in-memory-mb 0` (stream, however small) with `RAY_ADDRESS`
pointing at it, one epoch over every labelled image of the MNIST test split
(../shared/data/mnist-test: 7 000 train rows after tl's split). The run's checkpoint says how
many rows and bytes of decoded images each worker trained on, and how many rows two workers both
got; here they are set against the prepared set's size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from tests.servers import BIN, ray_cluster  # noqa: E402  (the test suite's 2-node cluster)

MNIST = HERE.parent.parent / "shared" / "data" / "mnist-test"


def tl(args: list[str], env: dict) -> dict:
    out = subprocess.run([str(BIN / "tl"), *args, "--json"], env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"tl {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--markdown", action="store_true", help="only write worker_shares.md again from its .json")
    if parser.parse_args().markdown:
        return write_markdown(json.loads((HERE / "worker_shares.json").read_text()))
    if not MNIST.is_dir():
        sys.exit(f"error: {MNIST} is missing: this bench reads ../shared/data/mnist-test")
    with tempfile.TemporaryDirectory(prefix="tl-bench-shares-") as root:
        env = {**os.environ, "TL_WORKDIR": f"{root}/tl-work", "RAY_AUTH_MODE": "disabled"}
        env.pop("MLFLOW_TRACKING_URI", None)
        prepared = tl(["prepare", f"idx:{MNIST}"], {k: v for k, v in env.items() if k != "RAY_ADDRESS"})
        manifest = json.loads(Path(prepared["path"], "manifest.json").read_text())
        train_rows = sum(manifest["counts"]["train"].values())
        c, h, w = manifest["shape"]
        with ray_cluster(nodes=2, cpus_per_node=2) as address:
            result = tl(["transfer", "--data", prepared["path"], "--strategy", "scratch", "--shots", "all",
                         "--epochs", "1", "--workers", "2", "--in-memory-mb", "0", "--eval-every", "0",
                         "--no-baseline"], {**env, "RAY_ADDRESS": address})
        metrics = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)["metrics"]
    workers = [{"rows": int(metrics[f"rows_seen_worker{r}"]), "bytes": int(metrics[f"bytes_seen_worker{r}"])}
               for r in range(int(metrics["workers"]))]
    figures = {"train_rows": train_rows, "train_bytes": train_rows * c * h * w,
               "shard_files": len(manifest["shards"]["train"]),
               "workers": workers, "rows_seen_twice": int(metrics["rows_seen_twice"]),
               "test_accuracy": round(result["metrics"]["accuracy"], 4)}
    (HERE / "worker_shares.json").write_text(json.dumps(figures, indent=2) + "\n")
    write_markdown(figures)
    print(json.dumps(figures))


def write_markdown(f: dict) -> None:
    lines = [
        "# What each Ray Train worker reads, on a 2-node cluster (`bench/worker_shares.py`)",
        "",
        "Two Ray nodes (2 CPUs each) on this machine, `RAY_ADDRESS` set, `tl transfer --workers 2",
        "--in-memory-mb 0` for one epoch over all labelled MNIST-test train rows, streamed through Ray",
        f"Data (`get_dataset_shard`). The prepared set: {f['train_rows']:,} rows, {f['train_bytes'] / 1e6:.2f} MB of",
        f"uint8 pixels, in {f['shard_files']} shard file(s).",
        "",
        "| worker | rows | bytes of images | share of the set |",
        "|---|---|---|---|",
    ]
    for rank, w in enumerate(f["workers"]):
        lines.append(f"| {rank} | {w['rows']:,} | {w['bytes']:,} | {w['bytes'] / f['train_bytes']:.3f} |")
    lines += ["", f"Rows both workers got: {f['rows_seen_twice']}. Test accuracy after the epoch: "
              f"{100 * f['test_accuracy']:.1f} %. Ray Data gives the workers equal row counts (DDP needs equal",
              "steps), so a remainder row may be left out of an epoch. Shards are read from storage once, by Ray",
              "Data's read tasks on whichever node has room, and their rows handed out to the workers: a worker",
              "receives its share, never the whole set."]
    (HERE / "worker_shares.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
