"""The project's image, measured (issue 15): build times, size, `tl run` and the whole pipeline
in containers against the same on the host. Writes bench/container.md.

Needs a Docker daemon and the base image: `bash ../shared/tools/container-env.sh` here (it makes
the local stand-in for python:3.11-slim-bookworm and serves the on-disk wheels). Run alone on
the machine: everything here is CPU-bound and timed.

    .venv/bin/python bench/container.py            # everything (the cold build takes ~8 min)
    .venv/bin/python bench/container.py --no-cold  # reuse the build cache
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

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "tl-core:dev"
BASE = "tl-local/python:3.11-bookworm"
BUILD = ["docker", "build", "--network", "host", "--build-arg", f"PYTHON_IMAGE={BASE}", "-f", "k8s/Dockerfile"]


def timed(cmd: list[str], **kwargs) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{result.stderr[-3000:]}")
    return time.perf_counter() - started, result


def last_json(result: subprocess.CompletedProcess) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


def build_times(cold: bool) -> dict:
    out = {}
    if cold:
        out["cold"], _ = timed([*BUILD, "--no-cache", "-t", IMAGE, "."], cwd=ROOT)
    else:
        timed([*BUILD, "-t", IMAGE, "."], cwd=ROOT)
    # A code-only change: a copy of the build context with one line added to tl_core.
    with tempfile.TemporaryDirectory() as folder:
        context = Path(folder, "ctx")
        shutil.copytree(ROOT, context, ignore=shutil.ignore_patterns(".git", ".venv", "tl-work", "__pycache__"))
        with open(context / "tl_core" / "__init__.py", "a") as f:
            f.write(f"\n# bench {time.time()}\n")
        out["code_change"], _ = timed([*BUILD, "-t", f"{IMAGE}-bench", "."], cwd=context)
    subprocess.run(["docker", "image", "rm", f"{IMAGE}-bench"], capture_output=True)
    return out


def image_size() -> dict:
    _, inspect = timed(["docker", "image", "inspect", "-f", "{{.Size}}", IMAGE])
    _, history = timed(["docker", "history", "--no-trunc", "--format", "{{.Size}}\t{{.CreatedBy}}", IMAGE])
    layers = [line.split("\t", 1) for line in history.stdout.splitlines()]
    return {"bytes": int(inspect.stdout.strip()), "layers": [(size, cmd[:90]) for size, cmd in layers if size != "0B"]}


def tl_run_times() -> dict:
    with tempfile.TemporaryDirectory() as folder:
        host, result = timed([str(ROOT / ".venv/bin/tl"), "run", "--json"], env={**os.environ, "TL_WORKDIR": folder})
        host_summary = last_json(result)
    container, result = timed(["docker", "run", "--rm", "--network", "host", "-e", "TL_WORKDIR=/tmp/work", IMAGE,
                               "run", "--json"])
    container_summary = last_json(result)

    def row(summary):
        return {r["strategy"]: (round(100 * r["test_accuracy"], 1), round(r["train_seconds"], 2)) for r in summary["table"]}

    return {"host_s": host, "container_s": container, "host": row(host_summary), "container": row(container_summary)}


def pipeline_times() -> dict:
    out = {}
    for runner in ("subprocess", "docker"):
        with tempfile.TemporaryDirectory() as folder:
            env = {**os.environ, "TL_WORKDIR": folder, "TL_IMAGE": IMAGE}
            env.pop("MLFLOW_TRACKING_URI", None)
            seconds, result = timed([str(ROOT / ".venv/bin/tl"), "pipeline", "run", "--local", "--runner", runner,
                                     "--json"], env=env, cwd=folder)
            summary = last_json(result)
            out[runner] = {"seconds": seconds, "accuracy": summary["accuracy"], "decision": summary["decision"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-cold", action="store_true", help="skip the cold (no-cache) build")
    args = parser.parse_args()
    builds = build_times(cold=not args.no_cold)
    size = image_size()
    runs = tl_run_times()
    pipeline = pipeline_times()
    lines = [
        "# The image, measured (`bench/container.py`)",
        "",
        f"{time.strftime('%Y-%m-%d')}, this machine (2 cores), nothing else running; base image {BASE} (the local",
        "stand-in for python:3.11-slim-bookworm that ../shared/tools/container-env.sh makes).",
        "",
        "| what | seconds |",
        "|---|---|",
        *(f"| build, {name.replace('_', ' ')} | {seconds:.0f} |" for name, seconds in builds.items()),
        f"| `tl run` on the host | {runs['host_s']:.0f} |",
        f"| `docker run --rm tl-core:dev run` | {runs['container_s']:.0f} |",
        *(f"| `tl pipeline run --local --runner {r}` | {v['seconds']:.0f} |" for r, v in pipeline.items()),
        "",
        f"Image size: {size['bytes'] / 1e9:.2f} GB. Layers that hold it:",
        "",
        "| size | layer |",
        "|---|---|",
        *(f"| {s} | `{c.strip()}` |" for s, c in size["layers"]),
        "",
        "`tl run` (test accuracy %, train seconds per run), host vs container:",
        "",
        "| strategy | host | container |",
        "|---|---|---|",
        *(f"| {k} | {runs['host'][k]} | {runs['container'].get(k)} |" for k in runs["host"]),
        "",
        "The pipeline, subprocess vs docker runner: "
        + "; ".join(f"{r}: accuracy {v['accuracy']:.4f}, {v['decision']}" for r, v in pipeline.items()),
        "",
    ]
    (ROOT / "bench" / "container.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
