"""Why the image sets OMP_WAIT_POLICY=PASSIVE: 300 training steps of a small CNN with torch's
default (spinning) OpenMP threads, one thread, and passive threads, on an idle machine and
beside one busy process (a pure-Python loop on one core). Writes bench/omp_wait.md.

    .venv/bin/python bench/omp_wait.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

STEPS = """
import time, torch
from torch import nn
torch.manual_seed(0)
torch.set_num_threads({threads})
net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
opt = torch.optim.Adam(net.parameters())
x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
started = time.perf_counter()
for _ in range(300):
    opt.zero_grad(); nn.functional.cross_entropy(net(x), y).backward(); opt.step()
print(time.perf_counter() - started)
"""
CASES = [("2 threads, spinning (default)", 2, None), ("1 thread", 1, None), ("2 threads, PASSIVE", 2, "PASSIVE")]


def seconds(threads: int, policy: str | None) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, "-c", STEPS.format(threads=threads)], env=env, capture_output=True,
                         text=True, check=True)
    return float(out.stdout.strip())


def main() -> None:
    idle = [seconds(t, p) for _, t, p in CASES]
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        loaded = [seconds(t, p) for _, t, p in CASES]
    finally:
        busy.kill()
    lines = ["# OpenMP wait policy: 300 steps of a small CNN (`bench/omp_wait.py`)", "",
             f"{os.cpu_count()} cores. Seconds; 'busy' = beside one process spinning on one core.", "",
             "| threads | idle | busy |", "|---|---|---|",
             *(f"| {name} | {a:.1f} | {b:.1f} |" for (name, _, _), a, b in zip(CASES, idle, loaded)), ""]
    Path(__file__).with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
