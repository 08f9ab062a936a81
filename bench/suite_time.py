"""Benchmark: the test suite's wall time, as CI runs it, and where the time goes.

    .venv/bin/python bench/suite_time.py            # the README's test command (pyproject's addopts)
    .venv/bin/python bench/suite_time.py --clone    # on a fresh clone beside this one, set up as CI does

Writes bench/suite_time.json and bench/suite_time.md: the wall time of the whole run (the goal is
20 minutes on 2 cores), the outcome counts, and each test file's summed test time (from pytest's
JUnit XML), which is what the parallel workers (pytest-xdist, `--dist loadfile`) share out: a
file runs whole on one worker, so the longest file bounds the run from below.

The machine's load is recorded beside the figures: the suite run beside other jobs is slower, and
says so.
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
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GOAL_SECONDS = 20 * 60


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat (Linux)."""
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def run_suite(repo: Path, junit: Path) -> tuple[float, int, float]:
    """(wall seconds, pytest's exit code, the share of the machine's CPU time that was busy during the
    run): near 1, the cores had no idle time that more parallel workers could fill."""
    busy_before, total_before = cpu_ticks()
    started = time.monotonic()
    proc = subprocess.run([str(repo / ".venv" / "bin" / "python"), "-m", "pytest", "-q", f"--junitxml={junit}"],
                          cwd=repo, env={**os.environ, "CI": "true"})
    busy_after, total_after = cpu_ticks()
    return time.monotonic() - started, proc.returncode, (busy_after - busy_before) / max(total_after - total_before, 1)


def xdist_workers(repo: Path) -> str:
    """The `-n` of pyproject's pytest addopts: how many workers the README's command starts."""
    import tomllib

    addopts = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["addopts"].split()
    return addopts[addopts.index("-n") + 1] if "-n" in addopts else "1"


SLOWEST = 25  # tests listed one by one: where cutting time pays


def per_file(junit: Path) -> tuple[dict, dict, list]:
    seconds, counts, tests = defaultdict(float), defaultdict(int), []
    for case in ET.parse(junit).getroot().iter("testcase"):
        tests.append((f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}", float(case.get("time", 0))))
        seconds[case.get("classname", "").split(".")[1] if "." in case.get("classname", "") else "?"] += float(case.get("time", 0))
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        counts[outcome] += 1
    slowest = sorted(tests, key=lambda t: -t[1])[:SLOWEST]
    return dict(sorted(seconds.items(), key=lambda kv: -kv[1])), dict(counts), slowest


def report(result: dict) -> str:
    """bench/suite_time.md from the figures in bench/suite_time.json."""
    wall, files, history = result["wall_seconds"], result["seconds_by_file"], result.get("history", [])
    load_before, load_after = result["load_1min_before_after"]
    lines = [
        "# The test suite's time",
        "",
        "From `.venv/bin/python bench/suite_time.py" + (" --clone`" if result["clone"] else "`") + f" at "
        f"{result['commit']}, on {result['cores']} cores (1-minute load {load_before:.1f} before the run; "
        f"{load_after:.1f} after, the run's own).",
        "",
        f"- **Wall time: {wall / 60:.1f} min** ({wall:.0f} s; goal {GOAL_SECONDS // 60} min: "
        f"{'met' if wall <= GOAL_SECONDS else 'NOT met'}); pytest exit {result['pytest_exit']}; "
        + ", ".join(f"{n} {k}" for k, n in sorted(result["outcomes"].items())) + ".",
    ]
    if result["setup_seconds"] is not None:
        lines.append(f"- Set-up of the fresh clone (`bash scripts/setup.sh`): {result['setup_seconds']:.0f} s, "
                     "not counted above.")
    if "cpu_busy_share" in result:
        lines.append(f"- The CPUs were busy {result['cpu_busy_share']:.0%} of the run's time (all cores, /proc/stat).")
    lines += [
        f"- {result.get('xdist_workers', '2')} pytest-xdist workers, `--dist loadfile` (pyproject's addopts): a file's "
        "tests share its module",
        "  fixtures (a Ray runtime, a moto, an MLflow server) on one worker.",
        "",
        "| test file | summed test seconds |",
        "|---|---|",
        *(f"| {name} | {seconds:.0f} |" for name, seconds in files.items()),
        f"| **all files (serial sum)** | **{sum(files.values()):.0f}** |",
        "",
        f"The {SLOWEST} slowest tests (seconds, their module fixtures' set-up counted in the first test that uses them):",
        "",
        "| test | seconds |",
        "|---|---|",
        *(f"| {name} | {seconds:.0f} |" for name, seconds in result["slowest_tests"].items()),
        "",
        "Earlier runs (newest first; not all on the same machine, or as quiet: compare a file's seconds",
        "across runs before crediting a change with them):",
        "",
        "| commit | wall min | serial sum s | 1-minute load before | outcomes |",
        "|---|---|---|---|---|",
        *(f"| {h['commit']} | {h['wall_seconds'] / 60:.1f} | {h['serial_seconds']} | {h['load_1min_before']} | "
          + ", ".join(f"{n} {k}" for k, n in sorted(h["outcomes"].items())) + " |" for h in history),
        "",
    ]
    return "\n".join(lines)


def measure(clone: bool, keep_junit: Path | None) -> dict:
    repo, setup_seconds = REPO, None
    if clone:
        repo = REPO.parent / "suite-time-clone"  # beside this one: ../shared must be its sibling too
        shutil.rmtree(repo, ignore_errors=True)
        subprocess.run(["git", "clone", "-q", str(REPO), str(repo)], check=True)
        started = time.monotonic()
        subprocess.run(["bash", "scripts/setup.sh"], cwd=repo, check=True)
        setup_seconds = time.monotonic() - started
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        wall, rc, busy = run_suite(repo, junit)
        files, counts, slowest = per_file(junit)
        if keep_junit:
            shutil.copy(junit, keep_junit)
    load_after = os.getloadavg()[0]

    # Earlier runs stay in the file: machines differ (and so do their loads), so one figure alone says little.
    earlier = json.loads((HERE / "suite_time.json").read_text()) if (HERE / "suite_time.json").is_file() else {}
    history = earlier.pop("history", [])
    if earlier:
        history = [{"commit": earlier["commit"], "wall_seconds": earlier["wall_seconds"],
                    "serial_seconds": round(sum(earlier["seconds_by_file"].values())),
                    "load_1min_before": earlier["load_1min_before_after"][0], "outcomes": earlier["outcomes"]}, *history]
    return {"commit": commit, "clone": clone, "setup_seconds": setup_seconds, "wall_seconds": round(wall, 1),
            "goal_seconds": GOAL_SECONDS, "within_goal": wall <= GOAL_SECONDS, "pytest_exit": rc, "outcomes": counts,
            "cores": os.cpu_count(), "xdist_workers": xdist_workers(repo),
            "cpu_busy_share": round(busy, 3), "load_1min_before_after": [round(load_before, 2), round(load_after, 2)],
            "seconds_by_file": {k: round(v, 1) for k, v in files.items()},
            "slowest_tests": {name: round(v, 1) for name, v in slowest}, "history": history}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clone", action="store_true", help="time a fresh clone set up by scripts/setup.sh, as CI")
    parser.add_argument("--keep-junit", type=Path, help="also copy pytest's JUnit XML (every test's time) here")
    parser.add_argument("--report", action="store_true", help="only write suite_time.md again from suite_time.json")
    args = parser.parse_args()

    if args.report:
        result = json.loads((HERE / "suite_time.json").read_text())
    else:
        result = measure(args.clone, args.keep_junit)
        (HERE / "suite_time.json").write_text(json.dumps(result, indent=2) + "\n")
    text = report(result)
    (HERE / "suite_time.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
