"""Benchmark: the training core's overhead against a plain PyTorch loop, in-process and on Ray Train.

Same model (small_cnn), same data (MNIST test split, 7000 training images at 28x28), same batch
size and optimiser (SGD, momentum 0.9), same number of epochs. The plain loop is the seeds'
style: model, DataLoader, SGD, for-loop. Ours runs with its defaults (a per-epoch checkpoint
through ray.train.report on Ray; no per-epoch validation: eval_every=0 for all three).

    .venv/bin/python bench/training_core.py   # writes bench/training_core.json and .md
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
EPOCHS = 3
ROUNDS = 3  # plain and in-process alternate, so drifts in machine load hit both alike
BATCH = 128
LR = 0.05


def plain_loop(data, seed: int = 0) -> list[float]:
    from tl_core.models import create_model

    torch.manual_seed(seed)
    x, y = data.split("train")
    loader = DataLoader(TensorDataset(data.normalise(x), torch.from_numpy(y)), batch_size=BATCH, shuffle=True)
    model = create_model("small_cnn", num_classes=10, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    times = []
    for _ in range(EPOCHS):
        start = time.perf_counter()
        model.train()
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
        times.append(time.perf_counter() - start)
    return times


def steady(times: list[float]) -> float:
    """Median epoch time (first epochs, the warm-up, already left out)."""
    return statistics.median(times)


def main() -> None:
    os.environ["TL_WORKDIR"] = tempfile.mkdtemp(prefix="tl-bench-core-")
    from tl_core.config import PrepareConfig, TrainConfig
    from tl_core.data import prepare
    from tl_core.train import train
    from tl_core.train.ray_runner import fit_on_ray

    data, _ = prepare(PrepareConfig(uri=f"idx:{SHARED}/mnist-test"))
    cfg = TrainConfig(data=data.path, epochs=EPOCHS, batch_size=BATCH, optimizer="sgd", lr=LR, eval_every=0)

    plain, local = [], []
    for _ in range(ROUNDS):
        plain += plain_loop(data)[1:]
        local += [h["epoch_seconds"] for h in train(cfg, force=True).checkpoint["history"]][1:]

    import ray

    from tl_core.ray_cluster import init_ray

    start = time.perf_counter()
    init_ray()
    ray_init_s = time.perf_counter() - start
    results = {}
    for workers in (1, 2):
        start = time.perf_counter()
        ckpt = fit_on_ray(cfg.model_copy(update={"workers": workers, "runner": "ray"}), run_name=f"bench-{workers}w")
        wall = time.perf_counter() - start
        epochs = [h["epoch_seconds"] for h in ckpt["history"]][1:]
        inside = ckpt["metrics"]["train_seconds"]  # fit() from start to end, on the worker
        results[workers] = {"epochs": epochs, "wall_s": wall, "startup_s": wall - inside,
                            "test_accuracy": ckpt["metrics"]["test_accuracy"]}
    ray.shutdown()

    report = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__, "ray": ray.__version__},
        "setup": {"data": "MNIST test split, 7000 train images 28x28", "model": "small_cnn", "batch": BATCH,
                  "optimizer": "SGD(momentum=0.9)", "epochs": EPOCHS},
        "plain_epoch_s": steady(plain),
        "inprocess_epoch_s": steady(local),
        "inprocess_ratio": steady(local) / steady(plain),
        "ray_init_s": ray_init_s,
        "ray_1_worker_epoch_s": steady(results[1]["epochs"]),
        "ray_1_worker_ratio": steady(results[1]["epochs"]) / steady(plain),
        "ray_1_worker_startup_s": results[1]["startup_s"],
        "ray_2_workers_epoch_s": steady(results[2]["epochs"]),
        "ray_2_workers_ratio": steady(results[2]["epochs"]) / steady(plain),
        "ray_2_workers_startup_s": results[2]["startup_s"],
        "raw": {"plain": plain, "inprocess": local, "ray": results},
        "goals": {"inprocess_ratio": 1.05, "ray_ratio_after_startup": 1.10},
    }
    (HERE / "training_core.json").write_text(json.dumps(report, indent=2))
    lines = [
        "# Training core overhead vs a plain PyTorch loop",
        "",
        f"`{' '.join([Path(sys.executable).name, *sys.argv])}` on {os.cpu_count()} CPUs (torch {torch.__version__}, "
        f"ray {ray.__version__}); {report['setup']['data']}, small_cnn, batch {BATCH}, SGD, {EPOCHS} epochs; "
        f"median epoch time without each run's first epoch; plain and in-process alternate {ROUNDS} times.",
        "",
        "| path | s / epoch | ratio to plain | goal | start-up s |",
        "|---|---|---|---|---|",
        f"| plain PyTorch loop | {report['plain_epoch_s']:.2f} | 1.00 | | |",
        f"| tl in-process (`--workers 1`) | {report['inprocess_epoch_s']:.2f} | {report['inprocess_ratio']:.3f} | <= 1.05 | 0 |",
        f"| tl on Ray Train, 1 worker | {report['ray_1_worker_epoch_s']:.2f} | {report['ray_1_worker_ratio']:.3f} | <= 1.10 | "
        f"{report['ray_1_worker_startup_s']:.1f} (+ ray.init {ray_init_s:.1f}) |",
        f"| tl on Ray Train, 2 workers (DDP, gloo) | {report['ray_2_workers_epoch_s']:.2f} | {report['ray_2_workers_ratio']:.3f} | | "
        f"{report['ray_2_workers_startup_s']:.1f} |",
        "",
        "Start-up = wall time of the Ray Train run minus the time of `fit` on the worker (worker group "
        "and process-group set-up, checkpoint retrieval). Per-epoch time is measured inside `fit` and "
        "excludes the per-epoch `ray.train.report` with its checkpoint. On 2 cores Ray's own processes "
        "(GCS, raylet, the Train controller polling every 0.1 s) take CPU from the worker; two workers "
        "share the two cores the single process had, so they are not faster here.",
    ]
    (HERE / "training_core.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
