"""Benchmark: faults thrown at `tl`, and what it does then.

    .venv/bin/python bench/reliability.py

Writes bench/reliability.json and bench/reliability.md. Everything runs as a user runs it: `tl`
commands in subprocesses, one fresh work directory (SQLite MLflow store), a local Ray started by
the commands themselves, on sklearn's digits. For each fault: whether `tl` survived it (the run
finished, or the damaged input was refused with exit 2 and an `error:` line naming it), the
stored files changed or lost by it (a snapshot of the work directory's files and their sha256
before and after; new files do not count), and the seconds it cost against the same command
undisturbed.

Not covered here (see the note at the end of the markdown): S3 and MLflow servers going down
mid-run, the tune driver killed (the suite has an interrupted search resumed), the fuzzed bad
inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TL = str(Path(sys.executable).parent / "tl")


def tl(args: list, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([TL, *map(str, args)], env=env, capture_output=True, text=True)
    if check and out.returncode:
        raise RuntimeError(f"tl {' '.join(map(str, args))} failed:\n{out.stderr[-3000:]}")
    return out


def summary(out: subprocess.CompletedProcess) -> dict:
    return json.loads(out.stdout.strip().splitlines()[-1])


def error_line(out: subprocess.CompletedProcess) -> str:
    lines = [line for line in (out.stderr + out.stdout).splitlines() if line.startswith("error:")]
    return lines[0] if len(lines) == 1 and "Traceback" not in out.stderr else ""


# Files every command rewrites by design: the SQLite tracking database and Ray Train's run state.
LIVE = ("mlflow.db", "mlflow.db-journal", ".lock")
CHANGED: list[str] = []  # what `lost` found, for the report


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(LIVE)}


def lost(before: dict, after: dict) -> int:
    """Stored files changed or gone."""
    changed = [name for name, sha in before.items() if after.get(name) != sha]
    CHANGED.extend(changed)
    return len(changed)


def worker_killed(data: str, env: dict, work: Path) -> dict:
    """SIGKILL one of 2 Ray Train workers once two epochs' checkpoints are stored."""
    args = ["transfer", "--data", data, "--strategy", "scratch", "--shots", "20", "--epochs", "10",
            "--workers", "2", "--no-baseline", "--json"]
    start = time.perf_counter()
    undisturbed = summary(tl(args, env))
    undisturbed_s = time.perf_counter() - start
    before = snapshot(work)
    start = time.perf_counter()
    # The same run into a folder of its own (--force would replace the undisturbed run's checkpoint).
    run = subprocess.Popen([TL, *args, "--output", work / "killed-run"], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    known = set((work / "ray").glob("*"))
    killed = False
    while run.poll() is None and not killed:
        new = [d for d in (work / "ray").glob("*") if d not in known]
        if new and len(list(new[0].glob("checkpoint_*"))) >= 2:
            ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout.splitlines()
            workers = [int(line.split()[0]) for line in ps if "RayTrainWorker" in line]
            if workers:
                os.kill(workers[-1], signal.SIGKILL)
                killed = True
        time.sleep(0.1)
    out, err = run.communicate()
    seconds = time.perf_counter() - start
    result = json.loads(out.strip().splitlines()[-1]) if run.returncode == 0 else None
    import torch

    metrics = torch.load(result["checkpoint"], weights_only=True)["metrics"] if result else {}
    return {"fault": "a Ray Train worker SIGKILLed mid-fit (2 workers, 10 epochs)", "tried": 1,
            "survived": int(killed and result is not None and "resumed_at_epoch" in metrics),
            "data_lost": lost(before, snapshot(work)),
            "seconds_lost": round(seconds - undisturbed_s, 1),
            "detail": (f"went on from epoch {metrics.get('resumed_at_epoch')}; test accuracy "
                       f"{100 * result['metrics']['accuracy']:.1f} % against {100 * undisturbed['metrics']['accuracy']:.1f} % "
                       "undisturbed") if result else err[-300:]}


def damaged_checkpoints(data: str, env: dict, work: Path, backbone: str) -> dict:
    """A flipped byte, a truncated copy, and a checkpoint swapped under its checksum."""
    tried, refused, lines, changed = 0, 0, [], 0
    for damage in ("flip a byte", "truncate", "swap in another checkpoint"):
        folder = work / "damaged" / damage.replace(" ", "-")
        folder.mkdir(parents=True)
        for name in ("checkpoint.pt", "checkpoint.pt.sha256"):
            shutil.copy(Path(backbone).parent / name, folder / name)
        raw = bytearray((folder / "checkpoint.pt").read_bytes())
        if damage == "flip a byte":
            raw[len(raw) // 2] ^= 0x01
        elif damage == "truncate":
            raw = raw[: len(raw) * 3 // 4]
        else:
            other = sorted(p for p in (work / "models").rglob("checkpoint.pt") if p.parent != Path(backbone).parent)[0]
            raw = bytearray(other.read_bytes())
        (folder / "checkpoint.pt").write_bytes(bytes(raw))
        before = snapshot(work)
        for command in (["evaluate", "--model", folder / "checkpoint.pt", "--data", data],
                        ["transfer", "--data", data, "--strategy", "finetune", "--backbone", folder / "checkpoint.pt",
                         "--epochs", "1", "--no-baseline"]):
            tried += 1
            out = tl(command, env, check=False)
            line = error_line(out)
            refused += int(out.returncode == 2 and "is corrupt" in line)
            lines.append(line)
        changed += lost(before, snapshot(work))
    return {"fault": "damaged checkpoints (flipped byte, truncated, swapped) given to evaluate and transfer",
            "tried": tried, "survived": refused, "data_lost": changed, "seconds_lost": None,
            "detail": lines[0]}


def damaged_dataset(env: dict, work: Path) -> dict:
    """A flipped byte in a shard, a truncated shard, a manifest whose hash of the labels lies."""
    tried, refused, lines, changed = 0, 0, [], 0
    for damage in ("flip a byte in a shard", "truncate a shard", "a manifest hash that lies"):
        prepared = summary(tl(["prepare", "sklearn:digits", "--json"], env))["path"]
        copy = work / "damaged-data" / damage.replace(" ", "-")
        shutil.copytree(prepared, copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        shard = copy / manifest["shards"]["train"][0]["name"]
        if damage == "flip a byte in a shard":
            raw = bytearray(shard.read_bytes())
            raw[len(raw) // 2] ^= 0x01
            shard.write_bytes(bytes(raw))
        elif damage == "truncate a shard":
            shard.write_bytes(shard.read_bytes()[:-1000])
        else:
            manifest["files"]["labels-train.npy"]["sha256"] = "0" * 64
            (copy / "manifest.json").write_text(json.dumps(manifest))
        before = snapshot(work)
        tried += 1
        out = tl(["transfer", "--data", copy, "--strategy", "scratch", "--epochs", "1", "--no-baseline"], env, check=False)
        line = error_line(out)
        refused += int(out.returncode == 2 and "does not match its sha256" in line)
        lines.append(line)
        changed += lost(before, snapshot(work))
    return {"fault": "damaged prepared data (flipped byte, truncated shard, lying manifest)", "tried": tried,
            "survived": refused, "data_lost": changed, "seconds_lost": None, "detail": lines[0]}


def same_run_twice(data: str, env: dict, work: Path, backbone: str) -> dict:
    """Two identical `tl transfer` (linear-probe: the feature cache too) started at once."""
    args = [TL, "transfer", "--data", data, "--strategy", "linear-probe", "--backbone", backbone, "--shots", "10",
            "--epochs", "20", "--seed", "7", "--no-baseline", "--json"]
    before = snapshot(work)
    start = time.perf_counter()
    runs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [run.communicate() for run in runs]
    seconds = time.perf_counter() - start
    ok = all(run.returncode == 0 for run in runs)
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs] if ok else []
    trained_once = ok and sorted(r["reused"] for r in results) == [False, True]
    return {"fault": "the same tl transfer started twice at once in one work directory", "tried": 1,
            "survived": int(trained_once and results[0]["checkpoint"] == results[1]["checkpoint"]),
            "data_lost": lost(before, snapshot(work)), "seconds_lost": None,
            "detail": f"trained once, reused once; both done in {seconds:.0f} s" if trained_once else str(outs)[-300:]}


def register_retried(data: str, env: dict, work: Path, model: str) -> dict:
    """A register step retried after it succeeded (a KFP retry): the same version comes back."""
    before = snapshot(work)
    first = summary(tl(["register", "--checkpoint", model, "--name", "bench-digits", "--data", data, "--json"], env))
    again = summary(tl(["register", "--checkpoint", model, "--name", "bench-digits", "--data", data, "--json"], env))
    return {"fault": "tl register run again after it succeeded (a retried pipeline step)", "tried": 1,
            "survived": int(again["version"] == first["version"] and again["reused"]),
            "data_lost": lost(before, snapshot(work)), "seconds_lost": None,
            "detail": f"version {first['version']} both times"}


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="tl-bench-reliability-"))
    work = root / "tl-work"
    env = {**os.environ, "TL_WORKDIR": str(work), "RAY_AUTH_MODE": "disabled"}
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(name, None)
    started = time.perf_counter()
    try:
        data = summary(tl(["prepare", "sklearn:digits", "--json"], env))["path"]
        backbone = summary(tl(["pretrain", "--data", data, "--epochs", "2", "--json"], env))["checkpoint"]
        model = summary(tl(["transfer", "--data", data, "--strategy", "finetune", "--backbone", backbone,
                            "--shots", "10", "--epochs", "5", "--no-baseline", "--json"], env))["checkpoint"]
        rows = [worker_killed(data, env, work), damaged_checkpoints(data, env, work, backbone),
                damaged_dataset(env, work), same_run_twice(data, env, work, backbone),
                register_retried(data, env, work, model)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report = {"rows": rows, "changed_files": CHANGED, "wall_seconds": round(time.perf_counter() - started)}
    (HERE / "reliability.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report)
    print(json.dumps(report))


def write_markdown(report: dict) -> None:
    lines = ["# Faults thrown at tl (`bench/reliability.py`)", "",
             "`tl` commands in subprocesses, one fresh work directory, sklearn's digits, this machine (2 cores).",
             "survived: runs that finished, or damaged inputs refused with exit 2 and one `error:` line naming them.",
             "data lost: stored files changed or gone (sha256 before and after; the SQLite tracking database, which",
             "every command writes, is not counted). seconds lost: against the same",
             "command undisturbed.", "",
             "| fault | tried | survived | data lost | seconds lost | what happened |", "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        seconds = "" if r["seconds_lost"] is None else f"{r['seconds_lost']:.0f}"
        detail = r["detail"].replace("|", "/")
        lines.append(f"| {r['fault']} | {r['tried']} | {r['survived']} | {r['data_lost']} | {seconds} | {detail} |")
    lines += ["", f"Whole bench: {report['wall_seconds']} s.", "",
              "Not measured here yet (issue 14): the S3 endpoint or the MLflow server down mid-run, the",
              "`tl tune` driver killed (the test suite interrupts a search and resumes it), a Ray node's",
              "raylet killed, and the fuzzed bad inputs."]
    (HERE / "reliability.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
