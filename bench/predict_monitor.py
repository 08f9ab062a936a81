"""Benchmark: `tl predict` (Ray Data, an actor pool) against a plain in-process loop over the same
data at 10 000, 120 000 and 1 000 000 images (its memory; its start-up and rate, fitted from the
two largest), and `tl monitor`'s statistic and decision for MNIST -> USPS and for two halves of one
split.

    .venv/bin/python bench/predict_monitor.py                       # everything
    .venv/bin/python bench/predict_monitor.py --sizes 10000         # one size; rows of the others are kept
    .venv/bin/python bench/predict_monitor.py --parts monitor       # only the monitor rows
    .venv/bin/python bench/predict_monitor.py --markdown            # only rewrite the .md from the .json
    .venv/bin/python bench/predict_monitor.py --on-running-ray --sizes 10000,120000  # Ray started beforehand

Writes bench/predict_monitor.json and bench/predict_monitor.md. The model: a small CNN trained for
8 epochs on 50 images a class of one random half of MNIST's test images at 16 x 16 (`tl prepare
--image-size 16 --test-fraction 0.5`, `tl pretrain --shots 50`). Each size N is MNIST's 10 000
test images repeated to N rows, written as IDX files and prepared at 16 x 16 (`tl prepare`), then
predicted whole (both splits):

- `tl predict --data PREPARED --output DIR` in a fresh process: wall seconds of the command (Ray's
  start, the model's load, all of it) and the seconds of the Ray Data run alone (first read to last
  part, from its summary);
- the plain loop, in a fresh process: the same checkpoint and shards, read a shard at a time
  (sha256 checked, as tl does), normalised, scored by the model in batches of 512 with torch's
  default threads, probabilities written to one Parquet file; its loop seconds and its wall.

Peak memory: the largest sum, over every process of the command's session (the driver and the Ray
processes it starts), of their proportional set size (PSS, /proc/PID/smaps_rollup: a page shared
by k processes counts 1/k in each, so Ray's shared object store is counted once), sampled every
0.1 s. All on this machine's 2 cores, beside whatever else runs (the load is recorded).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = ROOT.parent / "shared" / "data"
TL = str(Path(sys.executable).parent / "tl")
OUT_JSON, OUT_MD = HERE / "predict_monitor.json", HERE / "predict_monitor.md"
GOALS = {"speed_ratio": 0.9, "rss_ratio": 1.3}

LOOP = r'''
import io, json, sys, time
started = time.perf_counter()
import numpy as np, pyarrow as pa, pyarrow.parquet as pq, torch
from tl_core.checkpoints import load_checkpoint
from tl_core.data import load_prepared, normalise
from tl_core.models import build_from_spec
ckpt_uri, data_uri, out = sys.argv[1:4]
ckpt = load_checkpoint(ckpt_uri)
model = build_from_spec(ckpt["model_spec"]); model.load_state_dict(ckpt["model"]); model.eval()
data = load_prepared(data_uri)
loop_started = time.perf_counter()
ids, best, probs = [], [], []
with torch.inference_mode():
    for split in ("train", "test"):
        n = 0
        for x, y in data.rows(split).chunks():
            for i in range(0, len(x), 512):
                p = torch.softmax(model(normalise(x[i:i + 512], ckpt["data"])), dim=1).numpy()
                probs.append(p); best.append(p.argmax(1))
            ids += [f"{split}/{j}" for j in range(n, n + len(x))]; n += len(x)
probs = np.concatenate(probs)
table = pa.table({"id": ids, "predicted": np.concatenate(best), **{f"p_{c}": probs[:, k] for k, c in enumerate(ckpt["data"]["classes"])}})
pq.write_table(table, out)
loop = time.perf_counter() - loop_started
print(json.dumps({"rows": len(ids), "loop_seconds": loop, "process_seconds": time.perf_counter() - started}))
'''


def session_pss_mb(sid: int) -> float:
    """The summed PSS of every process whose session is `sid`, in MB."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[3]) != sid:  # fields after the name: state ppid pgrp session
                continue
            for line in Path(f"/proc/{entry}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1024


def measured(args: list[str], env: dict) -> tuple[str, float, float, int]:
    """Run a command in a session of its own: (stdout, wall seconds, peak session PSS in MB, exit code)."""
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    peak, stop = [0.0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], session_pss_mb(proc.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    sampler.start()
    try:
        out, err = proc.communicate(timeout=1800)
    finally:
        wall = time.perf_counter() - start
        stop.set()
        sampler.join()
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    # Ray's processes may outlive the driver by a moment: end what is left of the session.
    subprocess.run(["pkill", "-KILL", "-s", str(proc.pid)], capture_output=True)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{err[-3000:]}")
    return out, wall, peak[0], proc.returncode


def tl_json(args: list[str], env: dict) -> dict:
    out, _, _, code = measured([TL, *args, "--json"], env)
    if code:
        raise RuntimeError(f"tl {' '.join(args)}: exit {code}")
    return json.loads(out.strip().splitlines()[-1])


def mnist() -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(SHARED / "mnist-test" / "t10k-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(SHARED / "mnist-test" / "t10k-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)
    return x, y


def write_repeated(folder: Path, n: int) -> None:
    """MNIST's test images repeated to n rows, as IDX train files (tl prepare holds out 30 % as test)."""
    x, y = mnist()
    folder.mkdir(parents=True)
    with open(folder / "train-images-idx3-ubyte", "wb") as images, open(folder / "train-labels-idx1-ubyte", "wb") as labels:
        images.write(bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (n, 28, 28)))
        labels.write(bytes([0, 0, 8, 1]) + n.to_bytes(4, "big"))
        for start in range(0, n, len(x)):
            count = min(len(x), n - start)
            images.write(x[:count].tobytes())
            labels.write(y[:count].tobytes())


def load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def saved() -> dict:
    return json.loads(OUT_JSON.read_text()) if OUT_JSON.exists() else {"predict": {}, "monitor": {}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,120000,1000000")
    parser.add_argument("--parts", default="predict,monitor")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--on-running-ray", action="store_true",
                        help="tl predict on a Ray started before it (`ray start --head`, RAY_ADDRESS), as on a cluster: "
                             "its rows are kept apart, the monitor is not run")
    args = parser.parse_args()
    results = saved()
    if args.markdown:
        write_markdown(results)
        return
    root = Path(tempfile.mkdtemp(prefix="tl-bench-predict-"))
    env = {**os.environ, "TL_WORKDIR": str(root / "tl-work"), "OMP_WAIT_POLICY": "PASSIVE", "RAY_AUTH_MODE": "disabled"}
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(name, None)
    table = "predict_running_ray" if args.on_running_ray else "predict"
    results.setdefault(table, {})
    head = None  # the Ray started beforehand (--on-running-ray)
    try:
        halves = tl_json(["prepare", f"idx:{SHARED / 'mnist-test'}", "--image-size", "16", "--test-fraction", "0.5"], env)
        model = tl_json(["pretrain", "--data", halves["path"], "--shots", "50", "--epochs", "8", "--batch-size", "64",
                         "--eval-every", "0", "--checkpoint-every", "0"], env)
        checkpoint = model["checkpoint"]
        results["model"] = {"checkpoint": "small_cnn, 8 epochs on 50 images a class of a random half of MNIST test at "
                                          "16 x 16 (so neither half is mostly images it learnt by heart)",
                            "test_accuracy": round(model["metrics"]["accuracy"], 4)}
        if "monitor" in args.parts and not args.on_running_ray:
            results["monitor"] = monitor_rows(checkpoint, halves["path"], env)
            OUT_JSON.write_text(json.dumps(results, indent=2))
        if args.on_running_ray:
            env["RAY_ADDRESS"], head = start_ray_head(env)
        if "predict" in args.parts:
            for n in [int(s) for s in args.sizes.split(",")]:
                results[table][str(n)] = predict_row(n, checkpoint, root, env)
                OUT_JSON.write_text(json.dumps(results, indent=2))
                print(json.dumps(results[table][str(n)]), flush=True)
    finally:
        if head is not None:
            stop_ray_head(head, env["RAY_ADDRESS"])
        shutil.rmtree(root, ignore_errors=True)
    write_markdown(results)


def monitor_rows(checkpoint: str, halves: str, env: dict) -> dict:
    rows = {}
    cases = {"MNIST -> USPS": ["--data", f"npz:{SHARED / 'usps' / 'usps_16x16.npz'}"],
             "MNIST halves": ["--reference", halves, "--reference-split", "train", "--data", halves,
                              "--data-split", "test"]}
    for name, extra in cases.items():
        out, wall, _, code = measured([TL, "monitor", "--model", checkpoint, *extra, "--json"], env)
        s = json.loads(out.strip().splitlines()[-1])
        rows[name] = {"exit": code, "drift": s["drift"], "mmd2": round(s["mmd2"], 5), "p_value": round(s["p_value"], 4),
                      "alpha": s["alpha"], "permutations": s["permutations"], "images_a_side": s["data_images"],
                      "mean_confidence_reference": round(s["mean_confidence_reference"], 4),
                      "mean_confidence_data": round(s["mean_confidence_data"], 4),
                      "class_mix_tvd": round(s["class_mix_tvd"], 4), "seconds": round(wall, 1), "load": load()}
        print(name, json.dumps(rows[name]), flush=True)
    return rows


def start_ray_head(env: dict) -> tuple[str, subprocess.Popen]:
    """A one-node Ray started apart from any tl command (`ray start --head --block`, both cores, in a
    session of its own), as a cluster is: its address, for RAY_ADDRESS, and its process. Stopped by
    ending that session (`ray stop` would end this script too: it kills whatever runs a
    `monitor.py`, its autoscaler's name)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus=2",
                             f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                             "--disable-usage-stats"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    timer = threading.Timer(300, lambda: os.killpg(head.pid, 9))  # a start that never says it is up
    timer.start()
    try:
        for line in head.stdout:
            if "Ray runtime started" in line:
                break
        else:
            raise RuntimeError("ray start --head ended before Ray was up")
    finally:
        timer.cancel()
    threading.Thread(target=head.stdout.read, daemon=True).start()  # drained, so --block never stalls on output
    return f"127.0.0.1:{port}", head


def stop_ray_head(head: subprocess.Popen, address: str) -> None:
    """End the head's session, and the address file `ray start` wrote (`ray stop` removes it): left
    behind, a plain ray.init() on this machine would try to join the Ray it names."""
    subprocess.run(["pkill", "-KILL", "-s", str(head.pid)], capture_output=True)
    head.wait()
    address_file = Path(os.environ.get("RAY_TMPDIR", "/tmp"), "ray", "ray_current_cluster")
    if address_file.is_file() and address_file.read_text().strip().endswith(address.rpartition(":")[2]):
        address_file.unlink()


def predict_row(n: int, checkpoint: str, root: Path, env: dict) -> dict:
    source = root / f"mnist-x{n}"
    write_repeated(source, n)
    prepared = tl_json(["prepare", f"idx:{source}", "--image-size", "16"], env)
    shutil.rmtree(source)
    out, wall, pss, _ = measured([TL, "predict", "--model", checkpoint, "--data", prepared["path"], "--output",
                                  str(root / f"preds-{n}"), "--json"], env)
    s = json.loads(out.strip().splitlines()[-1])
    loop_out, loop_wall, loop_pss, _ = measured([sys.executable, "-c", LOOP, checkpoint, prepared["path"],
                                                 str(root / f"loop-{n}.parquet")], env)
    loop = json.loads(loop_out.strip().splitlines()[-1])
    assert loop["rows"] == s["rows"] == n
    return {"images": n, "parts": len(s["parts"]), "load": load(),
            "tl_predict": {"wall_seconds": round(wall, 1), "ray_data_seconds": round(s["predict_seconds"], 2),
                           "images_per_s_ray_data": round(n / s["predict_seconds"], 1),
                           "first_batch_seconds": round(s["first_batch_seconds"], 2),
                           "images_per_s_actors": round(s["actor_images_per_s"], 1),
                           "actor_torch_threads": s["actor_torch_threads"],
                           "images_per_s_wall": round(n / wall, 1), "peak_pss_mb": round(pss, 1),
                           "accuracy": round(s["accuracy"], 4)},
            "plain_loop": {"wall_seconds": round(loop_wall, 1), "loop_seconds": round(loop["loop_seconds"], 2),
                           "images_per_s_loop": round(n / loop["loop_seconds"], 1),
                           "images_per_s_wall": round(n / loop_wall, 1), "peak_pss_mb": round(loop_pss, 1)}}


def fixed_and_rate(rows: list[dict]) -> str:
    """Each command's wall seconds as start-up + images / rate, from the two largest sizes, and the
    size from which `tl predict`'s whole command reaches the goal's share of the loop's images/s."""
    if len(rows) < 2:
        return ""
    a, b = rows[-2], rows[-1]
    fits = {}
    for who in ("tl_predict", "plain_loop"):
        rate = (b["images"] - a["images"]) / (b[who]["wall_seconds"] - a[who]["wall_seconds"])
        fits[who] = (b[who]["wall_seconds"] - b["images"] / rate, rate)
    (fixed_t, rate_t), (fixed_l, rate_l) = fits["tl_predict"], fits["plain_loop"]
    goal = GOALS["speed_ratio"]
    # n / (F_t + n / R_t) >= goal * n / (F_l + n / R_l)  <=>  n * (1 / (goal R_l) - 1 / R_t) >= F_t - F_l / goal
    slope = 1 / (goal * rate_l) - 1 / rate_t
    where = (f"so the whole command reaches {goal}x of the loop's images/s from about "
             f"{max(0.0, (fixed_t - fixed_l / goal) / slope):,.0f} images on" if slope > 0 else
             f"so the whole command never reaches {goal}x of the loop's images/s at any size")
    return (f"Wall seconds as start-up + images / rate, from the {a['images']:,} and {b['images']:,} rows: `tl predict` "
            f"{fixed_t:.1f} s + images / {rate_t:,.0f} per s; the loop {fixed_l:.1f} s + images / {rate_l:,.0f} per s; "
            f"{where}.")


def running_ray_lines(results: dict) -> list[str]:
    """The rows of `--on-running-ray`: the same command and loop, Ray started before the command."""
    rows = sorted(results.get("predict_running_ray", {}).values(), key=lambda r: r["images"])
    if not rows:
        return []
    lines = ["", "### On a Ray already running", "",
             "`--on-running-ray`: a one-node Ray started beforehand (`ray start --head`, both cores) and `tl predict` "
             "pointed at it with RAY_ADDRESS, as on a cluster; the plain loop as above, in the same run. (Peak memory "
             "is not compared here: Ray's processes are not the command's.)", "",
             "| images | tl predict wall s | Ray Data s (first batch at) | images/s wall | loop wall s | loop images/s "
             "wall | ratio wall | load |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, p = r["tl_predict"], r["plain_loop"]
        lines.append(f"| {r['images']:,} | {t['wall_seconds']} | {t['ray_data_seconds']} ({t['first_batch_seconds']}) | "
                     f"{t['images_per_s_wall']:.0f} | {p['wall_seconds']} | {p['images_per_s_wall']:.0f} | "
                     f"{t['images_per_s_wall'] / p['images_per_s_wall']:.2f} | {r['load']} |")
    fit = fixed_and_rate(rows)
    return lines + ([""] + [fit] if fit else [])


def write_markdown(results: dict) -> None:
    model = results.get("model", {})
    lines = ["# tl predict and tl monitor", "",
             "From `.venv/bin/python bench/predict_monitor.py` (its docstring says what each figure is). "
             f"Model: {model.get('checkpoint', '?')}, test accuracy {model.get('test_accuracy', '?')}. "
             "2 CPU cores; the machine's load (1, 5, 15 min averages) beside each figure: above 2, other jobs shared "
             "the cores.", "",
             "## tl predict against a plain in-process loop", "",
             "images/s of `tl predict`: in its actors (rows over the seconds spent scoring them: checking, decoding, "
             "the model), over the Ray Data run (from the dataset's start to the last part: the actor's start, a "
             "process importing torch, included), and over the whole command (Ray's start too). Of the loop: over "
             "its loop (checking, decoding, the model), and over its whole process.", "",
             "| images | parts | tl predict wall s | Ray Data s (first batch at) | images/s actors / run / wall | "
             "loop s | loop images/s loop / wall | ratio actors | ratio run | ratio wall | peak PSS tl predict | "
             "peak PSS loop | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = sorted(results["predict"].values(), key=lambda r: r["images"])
    for r in rows:
        t, p = r["tl_predict"], r["plain_loop"]
        lines.append(f"| {r['images']:,} | {r['parts']} | {t['wall_seconds']} | {t['ray_data_seconds']} "
                     f"({t['first_batch_seconds']}) | {t['images_per_s_actors']:.0f} / {t['images_per_s_ray_data']:.0f} / "
                     f"{t['images_per_s_wall']:.0f} | {p['loop_seconds']} | {p['images_per_s_loop']:.0f} / "
                     f"{p['images_per_s_wall']:.0f} | {t['images_per_s_actors'] / p['images_per_s_loop']:.2f} | "
                     f"{t['images_per_s_ray_data'] / p['images_per_s_loop']:.2f} | "
                     f"{t['images_per_s_wall'] / p['images_per_s_wall']:.2f} | {t['peak_pss_mb']:.0f} MB | "
                     f"{p['peak_pss_mb']:.0f} MB | {r['load']} |")
    lines.append("")
    by_size = {r["images"]: r for r in rows}
    if 10_000 in by_size:
        for n in (m for m in (120_000, 1_000_000) if m in by_size):  # the pair, then the largest
            ratio = by_size[n]["tl_predict"]["peak_pss_mb"] / by_size[10_000]["tl_predict"]["peak_pss_mb"]
            lines.append(f"Peak memory of `tl predict` (every process of the command), {n:,} against 10,000 images: "
                         f"{ratio:.2f}x (goal <= {GOALS['rss_ratio']}: {'met' if ratio <= GOALS['rss_ratio'] else 'missed'}).")
    for r in rows:
        t, p = r["tl_predict"], r["plain_loop"]
        steady, run = t["images_per_s_actors"] / p["images_per_s_loop"], t["images_per_s_ray_data"] / p["images_per_s_loop"]
        wall = t["images_per_s_wall"] / p["images_per_s_wall"]
        verdict = lambda x: "met" if x >= GOALS["speed_ratio"] else "missed"  # noqa: E731
        lines.append(f"At {r['images']:,} images, against the loop (goal >= {GOALS['speed_ratio']}): the actors "
                     f"{steady:.2f}x ({verdict(steady)}), the Ray Data run {run:.2f}x ({verdict(run)}), the whole "
                     f"command {wall:.2f}x ({verdict(wall)}).")
    first = rows[0]["tl_predict"]
    lines += ["", fixed_and_rate(rows),
              "", "Where the goal is missed, it is the fixed start-up: the command's imports, MLflow's setup and "
              "`ray.init` of a local Ray, outside the Ray Data run "
              f"({first['wall_seconds'] - first['ray_data_seconds']:.1f} s at {rows[0]['images']:,} images), then the "
              f"actor's own process importing torch and building the model before its first shard (first batch at "
              f"{first['first_batch_seconds']} s). The actors themselves score about as fast as the loop. On a "
              "Ray already running (RAY_ADDRESS, as on a cluster: the table below), ray.init's part goes; the actor's "
              "start remains. Since "
              "2026-12-06 a local Ray's workers take this process's environment from the raylet, not a job "
              "runtime_env, so the actor starts on a worker Ray started ahead, not a new process, and the "
              "command's exit waits neither on a full garbage collection nor on Ray's autoscaler monitor.",
              *running_ray_lines(results),
              "", "## tl monitor", "",
              "| case | exit | decision | MMD^2 | p-value | alpha | permutations | images a side | mean confidence "
              "(reference -> data) | class mix TVD | s | load |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in results["monitor"].items():
        lines.append(f"| {name} | {m['exit']} | {'drift' if m['drift'] else 'no drift'} | {m['mmd2']} | {m['p_value']} | "
                     f"{m['alpha']} | {m['permutations']} | {m['images_a_side']} | {m['mean_confidence_reference']} -> "
                     f"{m['mean_confidence_data']} | {m['class_mix_tvd']} | {m['seconds']} | {m['load']} |")
    OUT_MD.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
