"""Benchmark: faults thrown at `tl`, and what it does then.

    .venv/bin/python bench/reliability.py

Writes bench/reliability.json and bench/reliability.md. Everything runs as a user runs it: `tl`
commands in subprocesses, one fresh work directory (SQLite MLflow store), a local Ray started by
the commands themselves, on sklearn's digits. For each fault: whether `tl` survived it (the run
finished, or the damaged input was refused with exit 2 and an `error:` line naming it), the
stored files changed or lost by it (a snapshot of the work directory's files and their sha256
before and after; new files do not count), and the seconds it cost against the same command
undisturbed.

The S3 endpoint (moto) and the MLflow server are real servers on 127.0.0.1 behind a TCP relay
(`tests/servers.py: Relay`) that is taken down the moment a given request passes, so the outage
falls inside that write or read, and the servers keep their state. The fuzzed bad inputs have a
bench of their own: bench/fuzz.py.
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
sys.path.insert(0, str(HERE.parent))
from tests import servers  # noqa: E402  (moto, mlflow server, the relay: the suite's own)

TL = str(Path(sys.executable).parent / "tl")


def tl(args: list, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([TL, *map(str, args)], env=env, capture_output=True, text=True)
    if check and out.returncode:
        raise RuntimeError(f"tl {' '.join(map(str, args))} failed:\n{out.stderr[-3000:]}")
    return out


def timed(args: list, env: dict, check: bool = True) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    out = tl(args, env, check)
    return out, time.perf_counter() - start


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


def fit_with_a_fault(args: list, env: dict, work: Path, name: str, strike) -> tuple[dict | None, str, float, bool]:
    """`tl <args> --output work/name` (a folder of its own: --force would replace an undisturbed
    run's checkpoint); once its Ray run has stored two epochs' checkpoints, `strike()` (True when it
    found what to hit). Returns the run's summary (None if it failed), its stderr, its seconds and
    whether the fault struck."""
    start = time.perf_counter()
    run = subprocess.Popen([TL, *args, "--output", work / name], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    known = set((work / "ray").glob("*"))
    struck = False
    while run.poll() is None and not struck:
        new = [d for d in (work / "ray").glob("*") if d not in known]
        if new and len(list(new[0].glob("checkpoint_*"))) >= 2:
            struck = strike()
        time.sleep(0.1)
    try:
        out, err = run.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        run.kill()
        out, err = run.communicate()
    result = json.loads(out.strip().splitlines()[-1]) if run.returncode == 0 else None
    return result, err, time.perf_counter() - start, struck


def resumed_row(fault: str, fitted: tuple, undisturbed: dict, undisturbed_s: float, before: dict, work: Path) -> dict:
    """The row of a run hit mid-fit: survived if it went on from a checkpoint to the end."""
    import torch

    result, err, seconds, struck = fitted
    metrics = torch.load(result["checkpoint"], weights_only=True)["metrics"] if result else {}
    return {"fault": fault, "tried": 1,
            "survived": int(struck and result is not None and "resumed_at_epoch" in metrics),
            "data_lost": lost(before, snapshot(work)), "seconds_lost": round(seconds - undisturbed_s, 1),
            "detail": (f"{'' if struck else 'NOT HIT: nothing found to kill; '}went on from epoch "
                       f"{metrics.get('resumed_at_epoch')}; test accuracy {100 * result['metrics']['accuracy']:.1f} % "
                       f"against {100 * undisturbed['metrics']['accuracy']:.1f} % undisturbed")
            if result else (err or "")[-300:]}


def worker_killed(data: str, env: dict, work: Path) -> dict:
    """SIGKILL one of 2 Ray Train workers once two epochs' checkpoints are stored."""
    args = ["transfer", "--data", data, "--strategy", "scratch", "--shots", "20", "--epochs", "10",
            "--workers", "2", "--no-baseline", "--json"]
    undisturbed, undisturbed_s = timed(args, env)
    before = snapshot(work)

    def kill_a_worker() -> bool:
        ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout.splitlines()
        workers = [int(line.split()[0]) for line in ps if "RayTrainWorker" in line]
        if workers:
            os.kill(workers[-1], signal.SIGKILL)
        return bool(workers)

    fitted = fit_with_a_fault(args, env, work, "killed-run", kill_a_worker)
    return resumed_row("a Ray Train worker SIGKILLed mid-fit (2 workers, 10 epochs)", fitted, summary(undisturbed),
                       undisturbed_s, before, work)


def raylet_killed(data: str, env: dict, work: Path) -> dict:
    """A 2-node Ray cluster (1 CPU each, so each node holds one of the 2 workers); the worker
    node's raylet SIGKILLed once two epochs' checkpoints are stored (its Ray Train worker dies
    with it), and a new node joined in its place a moment later, as KubeRay replaces a lost pod."""
    args = ["transfer", "--data", data, "--strategy", "scratch", "--shots", "20", "--epochs", "10", "--workers", "2",
            "--no-baseline", "--json"]
    with servers.ray_cluster(nodes=2, cpus_per_node=1) as address:  # one worker per node
        env = {**env, "RAY_ADDRESS": address}
        undisturbed, undisturbed_s = timed([*args, "--seed", "1"], env)
        before = snapshot(work)

        def lose_a_node() -> bool:
            if not servers.lose_ray_node(address):  # the node joined last, with its Ray Train worker
                return False
            time.sleep(3)
            servers.ADD_RAY_NODE[address]()
            return True

        fitted = fit_with_a_fault(args, env, work, "raylet-killed-run", lose_a_node)
    return resumed_row("a Ray node's raylet SIGKILLed mid-fit (2-node cluster, 2 workers), a new node joined", fitted,
                       summary(undisturbed), undisturbed_s, before, work)


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


def damaged_copies(data: str, env: dict, work: Path, model: str, root: Path) -> list[dict]:
    """A flipped byte in the copies of a checkpoint that travel without a `.sha256` file: the one a
    transfer logged to MLflow, a registry version's, one on S3. The digest inside the checkpoint
    must refuse each, in every reader, with a line naming that copy."""
    def flip(raw: bytes) -> bytes:
        damaged = bytearray(raw)
        damaged[len(damaged) // 2] ^= 0x01
        return bytes(damaged)

    def refused(commands: list[list], copy: str, run_env: dict = env) -> tuple[int, int, str]:
        tried, ok, first = 0, 0, ""
        for command in commands:
            tried += 1
            out = tl(command, run_env, check=False)
            line = error_line(out)
            ok += int(out.returncode == 2 and f"checkpoint {copy} is corrupt" in line)
            first = first or line
        return tried, ok, first

    rows = []
    # 1. MLflow's copy of the transfer's checkpoint (mlartifacts/<run>/artifacts/checkpoint/checkpoint.pt).
    logged = next(p for p in work.rglob("checkpoint.pt") if "artifacts" in p.parts
                  and p.read_bytes() == Path(model).read_bytes())
    before = snapshot(work)
    original = logged.read_bytes()
    logged.write_bytes(flip(original))
    tried, ok, line = refused([["evaluate", "--model", logged, "--data", data],
                               ["transfer", "--data", data, "--strategy", "finetune", "--backbone", logged,
                                "--epochs", "1", "--no-baseline"]], str(logged))
    logged.write_bytes(original)
    rows.append({"fault": "a flipped byte in the checkpoint a transfer logged to MLflow (no .sha256 beside it), given "
                          "to evaluate and transfer", "tried": tried, "survived": ok,
                 "data_lost": lost(before, snapshot(work)), "seconds_lost": None, "detail": line})

    # 2. A registry version: its checkpoint artifact damaged; evaluate, promote and the pyfunc load it.
    reg = summary(tl(["register", "--checkpoint", model, "--name", "bench-copies", "--data", data, "--json"], env))
    model_id = reg["model_uri"].rsplit("/", 1)[-1]
    (artifact,) = [p for p in work.rglob("checkpoint.pt") if model_id in str(p)]
    before = snapshot(work)
    original = artifact.read_bytes()
    artifact.write_bytes(flip(original))
    version = f"models:/bench-copies/{reg['version']}"
    tried, ok, line = refused([["evaluate", "--model", version, "--data", data]], version)
    out = tl(["promote", "--model", "bench-copies", "--data", data], env, check=False)
    tried, ok = tried + 1, ok + int(out.returncode == 2 and "is corrupt" in error_line(out))
    pyfunc = subprocess.run([sys.executable, "-c", "import mlflow; mlflow.pyfunc.load_model('models:/bench-copies@challenger')"],
                            env={**env, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}, capture_output=True,
                            text=True)
    tried, ok = tried + 1, ok + int(pyfunc.returncode != 0 and "is corrupt" in pyfunc.stderr)
    artifact.write_bytes(original)  # the bench's own damage undone: what is left changed, tl changed
    rows.append({"fault": "a flipped byte in a registry version's checkpoint, given to evaluate, promote and "
                          "mlflow.pyfunc.load_model", "tried": tried, "survived": ok,
                 "data_lost": lost(before, snapshot(work)), "seconds_lost": None, "detail": line})

    # 3. A copy on S3 made without its .sha256 (aws s3 cp of the .pt alone).
    with servers.moto_s3(root) as endpoint:
        servers.make_bucket(endpoint, "bench-copies")
        s3_env = {**env, **servers.S3_ENV, "AWS_ENDPOINT_URL": endpoint}
        copy = "s3://bench-copies/models/checkpoint.pt"
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").put_object(Bucket="bench-copies", Key="models/checkpoint.pt",
                                                                 Body=flip(Path(model).read_bytes()))
        before = snapshot(work)
        tried, ok, line = refused([["evaluate", "--model", copy, "--data", data],
                                   ["transfer", "--data", data, "--strategy", "finetune", "--backbone", copy,
                                    "--epochs", "1", "--no-baseline"]], copy, s3_env)
        rows.append({"fault": "a flipped byte in a checkpoint's copy on S3 (no .sha256 beside it), given to evaluate "
                              "and transfer", "tried": tried, "survived": ok,
                     "data_lost": lost(before, snapshot(work)), "seconds_lost": None, "detail": line})
    return rows


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


def s3_outages(env: dict, root: Path) -> list[dict]:
    """The S3 endpoint down during a prepare's writes, a streaming transfer's shard reads and
    checkpoint upload, a Ray Train checkpoint upload; and down for good."""
    rows = []
    with servers.moto_s3(root) as moto:
        relay = servers.Relay(int(moto.rsplit(":", 1)[1]))
        bucket = "bench-outage"
        servers.make_bucket(moto, bucket)
        env = {**env, **servers.S3_ENV, "AWS_ENDPOINT_URL": relay.url, "MLFLOW_S3_ENDPOINT_URL": relay.url,
               "TL_WORKDIR": f"s3://{bucket}/work"}
        cwd = root / "s3-run"  # where the SQLite tracking store of an s3:// work directory lives
        cwd.mkdir()
        os.chdir(cwd)
        stored = lambda: s3_snapshot(moto, bucket)  # noqa: E731  (every object's ETag, read past the relay)

        undisturbed, plain = timed(["prepare", "sklearn:digits", "--output", f"s3://{bucket}/plain", "--json"], env)
        before = stored()
        relay.cut_when(f"PUT /{bucket}/work/data/".encode(), 10)
        out, seconds = timed(["prepare", "sklearn:digits", "--json"], env, check=False)
        data = summary(out)["path"] if out.returncode == 0 else None
        rows.append({"fault": "S3 endpoint down 10 s in the middle of tl prepare's writes", "tried": 1,
                     "survived": int(out.returncode == 0 and len(relay.outages) == 1), "data_lost": lost(before, stored()),
                     "seconds_lost": round(seconds - plain, 1),
                     "detail": "waited and finished: every shard and the manifest stored" if data else error_line(out)})

        args = ["transfer", "--data", data, "--strategy", "scratch", "--shots", "10", "--epochs", "3",
                "--in-memory-mb", "0", "--no-baseline", "--json"]
        _, plain = timed([*args, "--seed", "1"], env)
        before = stored()
        relay.cut_when(b"/shards/", 8)
        relay.cut_when(f"PUT /{bucket}/work/models/".encode(), 8)
        out, seconds = timed(args, env, check=False)
        rows.append({"fault": "S3 endpoint down 8 s during a streaming transfer's shard read, and 8 s more during "
                              "its checkpoint upload", "tried": 1,
                     "survived": int(out.returncode == 0 and len(relay.outages) == 3), "data_lost": lost(before, stored()),
                     "seconds_lost": round(seconds - plain, 1),
                     "detail": (f"finished, test accuracy {100 * summary(out)['metrics']['accuracy']:.1f} %"
                                if out.returncode == 0 else error_line(out) or out.stderr[-300:])})

        ray_args = ["transfer", "--data", data, "--strategy", "scratch", "--shots", "10", "--epochs", "4",
                    "--workers", "2", "--no-baseline", "--json"]
        _, plain = timed([*ray_args, "--seed", "1"], env)
        before = stored()
        relay.cut_when(f"PUT /{bucket}/work/ray/".encode(), 10)  # Ray Train's storage: checkpoints, run state
        out, seconds = timed(ray_args, env, check=False)
        rows.append({"fault": "S3 endpoint down 10 s while Ray Train (2 workers) stores its run state and checkpoints",
                     "tried": 1, "survived": int(out.returncode == 0 and len(relay.outages) == 4),
                     "data_lost": lost(before, stored()),
                     "seconds_lost": round(seconds - plain, 1),
                     "detail": (f"finished, test accuracy {100 * summary(out)['metrics']['accuracy']:.1f} %"
                                if out.returncode == 0 else error_line(out) or out.stderr[-300:])})

        before = stored()
        relay.cut_when(f"PUT /{bucket}/stays-down/".encode(), 3600)
        out, seconds = timed(["prepare", "sklearn:digits", "--output", f"s3://{bucket}/stays-down"],
                             {**env, "TL_S3_OUTAGE_SECONDS": "10"}, check=False)
        relay.up()
        from tl_core import storage

        os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
        left = storage.list_files(f"s3://{bucket}/stays-down")
        again = tl(["prepare", "sklearn:digits", "--output", f"s3://{bucket}/stays-down", "--json"], env, check=False)
        complete = not any(name.endswith("manifest.json") for name in left)
        rows.append({"fault": "S3 endpoint down for good during tl prepare (TL_S3_OUTAGE_SECONDS=10), then back",
                     "tried": 1, "survived": int(out.returncode == 2 and bool(error_line(out)) and complete
                                                 and again.returncode == 0), "data_lost": lost(before, stored()),
                     "seconds_lost": round(seconds, 1),
                     "detail": (f"{error_line(out)} -- {len(left)} shard(s) left and no manifest, so never read as a "
                                "dataset; the rerun completed it")})
        relay.down()
        os.chdir(root)
    return rows


def s3_snapshot(endpoint: str, bucket: str) -> dict[str, str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing")
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", []) if not o["Key"].endswith(LIVE)}


def mlflow_outages(env: dict, root: Path) -> list[dict]:
    """The MLflow server restarting after training, down for good after training, down at register."""
    rows = []
    with servers.moto_s3(root) as moto:
        servers.make_bucket(moto, "bench-mlflow")
        with servers.mlflow_server(root, moto, "bench-mlflow") as url:
            relay = servers.Relay(int(url.rsplit(":", 1)[1]))
            env = {**env, "MLFLOW_TRACKING_URI": relay.url, "TL_WORKDIR": str(root / "tracked-work")}
            data = summary(tl(["prepare", "sklearn:digits", "--json"], env))["path"]
            args = ["transfer", "--data", data, "--strategy", "scratch", "--shots", "10", "--epochs", "3",
                    "--no-baseline", "--json"]
            _, plain = timed([*args, "--seed", "1"], env)
            tracked = root / "tracked-work"
            before = snapshot(tracked)
            relay.cut_when(b"train_loss", 6)
            out, seconds = timed([*args, "--seed", "2"], env, check=False)
            rows.append({"fault": "MLflow server down 6 s while a transfer logs its metrics", "tried": 1,
                         "survived": int(out.returncode == 0 and len(relay.outages) == 1),
                         "data_lost": lost(before, snapshot(tracked)),
                         "seconds_lost": round(seconds - plain, 1),
                         "detail": "retried, logged, finished" if out.returncode == 0 else error_line(out)})

            before = snapshot(tracked)
            relay.cut_when(b"train_loss", 3600)
            out, seconds = timed([*args, "--seed", "3"], env, check=False)
            relay.up()
            again, rerun = timed([*args, "--seed", "3"], env, check=False)
            reused = again.returncode == 0 and summary(again)["reused"]
            rows.append({"fault": "MLflow server down for good once a transfer has trained, then back", "tried": 1,
                         "survived": int(out.returncode == 2 and bool(error_line(out)) and reused),
                         "data_lost": lost(before, snapshot(tracked)),
                         "seconds_lost": round(seconds + rerun - plain, 1),
                         "detail": f"{error_line(out)} -- the rerun reused the checkpoint: {reused}"})

            model = summary(again)["checkpoint"] if reused else summary(tl(args, env))["checkpoint"]
            before = snapshot(tracked)
            relay.cut_when(b"MLmodel", 3600)
            out = tl(["register", "--checkpoint", model, "--name", "bench-outage", "--data", data], env, check=False)
            relay.up()
            from mlflow import MlflowClient

            left = MlflowClient(relay.url).search_model_versions("name='bench-outage'")
            again = tl(["register", "--checkpoint", model, "--name", "bench-outage", "--data", data, "--json"], env,
                       check=False)
            version = summary(again)["version"] if again.returncode == 0 else None
            rows.append({"fault": "MLflow server down while tl register uploads the model, then back", "tried": 1,
                         "survived": int(out.returncode == 2 and not left and version == 1),
                         "data_lost": lost(before, snapshot(tracked)),
                         "seconds_lost": None,
                         "detail": f"{error_line(out)} -- versions left behind: {len(left)}; the rerun registered "
                                   f"version {version}"})
            relay.down()
    return rows


def tune_driver_killed(data: str, env: dict, work: Path, backbone: str) -> dict:
    """SIGKILL the whole `tl tune` process group (driver and its local Ray) once one trial has
    finished and the next has started; `tl tune --resume` then; against an unbroken search."""
    import yaml

    def search_config(name: str) -> Path:
        path = work.parent / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "base": {"data": data, "strategy": "finetune", "backbone": backbone, "shots": 5, "epochs": 6,
                     "batch_size": 25},
            "space": {"lr": {"grid": [0.0003, 0.003, 0.03]}}, "search": "grid", "scheduler": "fifo",
            "max_concurrent_trials": 1, "name": name}))
        return path

    unbroken, plain = timed(["tune", "--config", search_config("unbroken"), "--json"], env)
    before = snapshot(work)
    killed = search_config("killed")
    start = time.perf_counter()
    run = subprocess.Popen([TL, "tune", "--config", killed, "--json"], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    def reports() -> dict[Path, int]:  # trial folder -> epochs it has reported
        return {p.parent: len(p.read_text().splitlines()) for p in (work / "tune" / "killed").glob("trial-*/result.json")}

    done_at_kill = []
    while run.poll() is None:
        now = reports()
        done = [trial for trial, epochs in now.items() if epochs >= 6]
        if done and any(0 < epochs < 6 for epochs in now.values()):  # one finished, the next under way
            os.killpg(run.pid, signal.SIGKILL)
            done_at_kill = done
            break
        time.sleep(0.2)
    run.communicate()
    resumed = tl(["tune", "--config", killed, "--resume", "--json"], env, check=False)
    seconds = time.perf_counter() - start
    if resumed.returncode:
        detail, survived = error_line(resumed) or resumed.stderr[-300:], 0
    else:
        s, u = summary(resumed), summary(unbroken)
        after = reports()
        rerun = sum(after.get(trial, 0) > 6 for trial in done_at_kill)  # reported its epochs twice: trained again
        same = s["best_params"] == u["best_params"]
        survived = int(bool(done_at_kill) and same and s["trials_completed"] == 3 and not rerun)
        detail = (f"killed with {len(done_at_kill)} trial finished; resumed: "
                  f"{s['trials_completed']}/3 trials completed, {rerun} trained again, best lr {s['best_params']['lr']} "
                  f"({'the same as' if same else 'NOT the same as'} the unbroken search's {u['best_params']['lr']})")
    return {"fault": "tl tune's driver SIGKILLed mid-search (with its local Ray), then tl tune --resume", "tried": 1,
            "survived": survived, "data_lost": lost(before, snapshot(work)),
            "seconds_lost": round(seconds - plain, 1), "detail": detail}


FAULTS = ("worker", "raylet", "tune", "checkpoints", "copies", "data", "twice", "register", "s3", "mlflow")


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(FAULTS),
                        help=f"comma-separated faults to run again, replacing their rows: {', '.join(FAULTS)}")
    only = set(parser.parse_args().only.split(","))
    if only - set(FAULTS):
        parser.error(f"unknown faults {sorted(only - set(FAULTS))}: choose from {', '.join(FAULTS)}")
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
        runs = {"worker": lambda: [worker_killed(data, env, work)],
                "raylet": lambda: [raylet_killed(data, env, work)],
                "tune": lambda: [tune_driver_killed(data, env, work, backbone)],
                "checkpoints": lambda: [damaged_checkpoints(data, env, work, backbone)],
                "copies": lambda: damaged_copies(data, env, work, model, root),
                "data": lambda: [damaged_dataset(env, work)],
                "twice": lambda: [same_run_twice(data, env, work, backbone)],
                "register": lambda: [register_retried(data, env, work, model)],
                "s3": lambda: s3_outages(env, root), "mlflow": lambda: mlflow_outages(env, root)}
        new = {fault: runs[fault]() for fault in FAULTS if fault in only}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    # Rows of the faults not run this time stay as the last full run measured them.
    kept = json.loads((HERE / "reliability.json").read_text()) if only != set(FAULTS) else {"rows": []}
    old = {row.get("kind"): [] for row in kept["rows"]}
    for row in kept["rows"]:
        old[row.get("kind")].append(row)
    rows = [row for fault in FAULTS for row in
            ([{**r, "kind": fault} for r in new[fault]] if fault in new else old.get(fault, []))]
    report = {"rows": rows, "changed_files": CHANGED, "wall_seconds": round(time.perf_counter() - started),
              "rerun": sorted(only) if only != set(FAULTS) else "all"}
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
    fuzz = HERE / "fuzz.json"  # the bad-input classes, from bench/fuzz.py's latest run
    if fuzz.exists():
        found = json.loads(fuzz.read_text())
        lines += ["", f"Bad input, by class (`bench/fuzz.py`, seed {found['seed']}, run of {found['runs'][-1]['date']}; "
                      "survived: exit 2 with one `error:` line naming it, no traceback; data lost: stored files "
                      "changed, outside files touched, half-written outputs left):", "",
                  "| input class | tried | survived | tracebacks | data lost |", "|---|---|---|---|---|"]
        for name, row in found["rows"].items():
            if row["expect"] == "error":
                lost_files = row["stored_changed"] + row["outside_touched"] + row["left_behind"]
                lines.append(f"| {name} | {row['cases']} | {row['passed']} | {row['tracebacks']} | {lost_files} |")
    ran = "the whole bench" if report["rerun"] == "all" else f"the rows of {', '.join(report['rerun'])} (the others as last measured)"
    lines += ["", f"Last run: {ran}, {report['wall_seconds']} s. Rerun some: `--only s3,mlflow`.", "",
              "The S3 and MLflow rows: real servers on 127.0.0.1 behind a relay taken down the moment a given",
              "request passes (tests/servers.py: Relay). Data lost there: the bucket's objects (ETags) or the",
              "tracked run's work directory, before and after. Fuzzed bad inputs: bench/fuzz.md."]
    (HERE / "reliability.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
