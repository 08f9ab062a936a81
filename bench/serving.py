"""Benchmark: `tl serve` (Ray Serve) against `mlflow models serve --env-manager local`, on the same
registered model, with the same client, in the same run; and the champion switched under load.

    .venv/bin/python bench/serving.py              # about 10 minutes on 2 cores
    .venv/bin/python bench/serving.py --seconds 10 # shorter windows

Writes bench/serving.json and bench/serving.md. Everything is started here on 127.0.0.1 and ended
here: a moto S3 server and an `mlflow server` (SQLite, artifacts on S3) as the registry, `tl serve
digits` (default settings) and `mlflow models serve -m models:/digits@champion --env-manager local`
(its defaults: one worker). The model: small CNNs trained on the embedded digits (sklearn:digits,
no download), registered and promoted with `tl`.

- Throughput and latency: 1, 8 and 32 concurrent clients (threads of this process, each with one
  keep-alive connection: tests/serve_tools.py `load`), each request one digit as a base64 PNG,
  `{"image": ...}` to tl serve and `{"inputs": [...]}` to MLflow; per window, a warm-up, then
  `--seconds` of requests counted: requests/s answered, p50 and p99 latency, failures. The two
  servers take turns at each concurrency, in alternating order over `--rounds` rounds; the table
  has every round. Both servers are up throughout (the idle one idles) and the client shares the
  machine's cores with them.
- Switches under load: 8 clients send requests to tl serve while `tl promote` runs 3 times
  (each a better model, through the gate) and `tl rollback` once, as a user runs them
  (subprocesses). Every request counts: failed requests, and the seconds from each command's
  start (the gate's evaluation included) and from its return (the alias has moved by then) to
  the first answer from the new version.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from tests import servers  # noqa: E402
from tests.serve_tools import (AliasWatch, b64, load, mlflow_models_serve, png_bytes, serve_env,  # noqa: E402
                               summarise, tl_serve)

TL = str(Path(sys.executable).parent / "tl")
BUCKET = "tl-bench-serving"
NAME = "digits"


def tl(args: list, env: dict) -> dict:
    out = subprocess.run([TL, *map(str, args), "--json"], env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"tl {' '.join(map(str, args))} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def models(env: dict) -> tuple[str, list[dict]]:
    """The prepared digits and 5 registered versions, from the weakest to the best by test accuracy."""
    data = tl(["prepare", "sklearn:digits"], env)["path"]
    recipes = [(2, 8, 0), (4, 8, 1), (6, 16, 0), (10, 16, 1), (16, 32, 0)]  # epochs, width, seed
    registered = []
    for epochs, width, seed in recipes:
        config = Path(env["TL_WORKDIR"]) / f"width{width}.yaml"
        config.write_text(f"model_kwargs: {{width: {width}}}\n")
        fit = tl(["transfer", "--data", data, "--strategy", "scratch", "--epochs", epochs, "--seed", seed,
                  "--config", config, "--eval-every", 0, "--checkpoint-every", 0, "--no-baseline"], env)
        reg = tl(["register", "--checkpoint", fit["checkpoint"], "--name", NAME, "--data", data], env)
        registered.append({"version": reg["version"], "accuracy": reg["metrics"]["accuracy"],
                           "epochs": epochs, "width": width, "seed": seed})
    return data, sorted(registered, key=lambda v: v["accuracy"])


def windows(tl_url: str, mlflow_url: str, pngs: list[bytes], clients: int, seconds: float, rounds: int) -> list[dict]:
    tl_bodies = [json.dumps({"image": b64(p)}).encode() for p in pngs]
    mlflow_bodies = [json.dumps({"inputs": [b64(p)]}).encode() for p in pngs]
    targets = {"tl serve": (tl_url, "/predict", tl_bodies), "mlflow models serve": (mlflow_url, "/invocations",
                                                                                    mlflow_bodies)}
    rows = []
    for r in range(rounds):
        order = list(targets) if r % 2 == 0 else list(reversed(targets))
        for server in order:
            url, path, bodies = targets[server]
            load(url, path, lambda i: bodies[i % len(bodies)], clients, seconds=min(3.0, seconds))  # warm-up
            started = time.perf_counter()
            results = load(url, path, lambda i: bodies[i % len(bodies)], clients, seconds=seconds)
            wall = time.perf_counter() - started
            row = {"server": server, "clients": clients, "round": r + 1, "seconds": round(wall, 1),
                   **summarise(results, wall)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def switches(url: str, pngs: list[bytes], order: list[dict], env: dict, data: str) -> list[dict]:
    """3 promotions and 1 rollback while 8 clients send requests."""
    bodies = [json.dumps({"image": b64(p)}).encode() for p in pngs]
    stop = threading.Event()
    results: list = []
    runner = threading.Thread(target=lambda: results.extend(
        load(url, "/predict", lambda i: bodies[i % len(bodies)], 8, stop=stop, version_of=lambda a: a["version"])),
        daemon=True)
    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    watch = AliasWatch(NAME)
    runner.start()
    time.sleep(3)
    steps = [("promote", v["version"]) for v in order[1:4]] + [("rollback", order[2]["version"])]
    marks = []
    for action, expected in steps:
        started = time.perf_counter()
        if action == "promote":
            outcome = tl(["promote", "--model", NAME, "--data", data, "--version", expected], env)
            assert outcome["decision"] == "promoted", outcome
        else:
            outcome = tl(["rollback", "--model", NAME], env)
            assert outcome["champion"] == expected, outcome
        ended = time.perf_counter()
        marks.append((action, expected, started, ended))
        time.sleep(12)  # the switch, then load on the new version
    stop.set()
    runner.join(120)
    watch.stop()
    rows = []
    for i, (action, expected, started, ended) in enumerate(marks):
        until = marks[i + 1][2] if i + 1 < len(marks) else float("inf")
        answered = [r.start + r.seconds for r in results if r.version == expected and r.start >= started and r.start < until]
        first = min(answered, default=None)
        moved = watch.moved_to(expected, started)
        during = [r for r in results if started - 1 <= r.start < until]
        rows.append({"action": f"tl {action}" + (f" --version {expected}" if action == "promote" else ""),
                     "new_version": expected, "command_seconds": round(ended - started, 2),
                     "requests": len(during), "failed": sum(r.status != 200 for r in during),
                     "first_answer_from_alias_move_s": None if first is None or moved is None else round(first - moved, 2),
                     "first_answer_from_command_start_s": None if first is None else round(first - started, 2),
                     "first_answer_from_command_return_s": None if first is None else round(first - ended, 2)})
        print(json.dumps(rows[-1]), flush=True)
    failed = [r for r in results if r.status != 200]
    return rows, {"requests": len(results), "failed": len(failed),
                  "failures": [{"status": r.status, "error": r.error[:200]} for r in failed[:10]]}


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE.parent, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "tl_core", "bench/serving.py", "tests/serve_tools.py"],
                           cwd=HERE.parent, capture_output=True, text=True).stdout.strip()
    return out.stdout.strip() + ("+uncommitted" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20, help="seconds a window counts requests")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of windows (alternating which server goes first)")
    parser.add_argument("--report", action="store_true", help="only write serving.md again from serving.json")
    args = parser.parse_args()
    if args.report:
        (HERE / "serving.md").write_text(report(json.loads((HERE / "serving.json").read_text())))
        return
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    root = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    print(f"working in {root}", flush=True)
    with servers.moto_s3(root) as s3:
        servers.make_bucket(s3, BUCKET)
        with servers.mlflow_server(root, s3, BUCKET) as registry_url:
            env = serve_env({"TL_WORKDIR": str(root / "work"), "MLFLOW_TRACKING_URI": registry_url})
            data, order = models(env)
            first = tl(["promote", "--model", NAME, "--data", data, "--version", order[0]["version"]], env)
            assert first["decision"] == "promoted", first
            from tl_core.data import load_prepared

            x, _ = load_prepared(data).split("test")
            pngs = [png_bytes(img) for img in x[:200]]
            tl_port, mlflow_port = servers.free_port(), servers.free_port()
            rows, switch_rows, switch_total, left = [], [], {}, {}
            with tl_serve(NAME, tl_port, root / "tl-serve.log", env=env) as tl_server, \
                    mlflow_models_serve(f"models:/{NAME}@champion", mlflow_port, root / "mlflow-serve.log",
                                        env=env) as mlflow_server:
                for clients in (1, 8, 32):
                    rows += windows(tl_server.url, mlflow_server.url, pngs, clients, args.seconds, args.rounds)
                switch_rows, switch_total = switches(tl_server.url, pngs, order, env, data)
            left = {"tl serve": tl_server.left_behind, "mlflow models serve": mlflow_server.left_behind}
            refused = tl_server.output().count("REFUSED")
    result = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": git_commit(),
        "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, 1-minute load average "
                   f"{load_before:.1f} before the bench and {os.getloadavg()[0]:.1f} at its end (its own)",
        "seconds_per_window": args.seconds, "rounds": args.rounds,
        "versions": order, "windows": rows, "switches": switch_rows, "switch_load": switch_total,
        "processes_left_behind": left, "refusals_logged": refused,
        "bench_seconds": round(time.perf_counter() - started),
    }
    shutil.rmtree(root, ignore_errors=True)
    (HERE / "serving.json").write_text(json.dumps(result, indent=1) + "\n")
    (HERE / "serving.md").write_text(report(result))
    print((HERE / "serving.md").read_text())


def report(r: dict) -> str:
    import statistics

    lines = [
        "# Serving the champion: `tl serve` against `mlflow models serve` (`bench/serving.py`)",
        "",
        f"`.venv/bin/python bench/serving.py` ({r['seconds_per_window']:.0f} s windows, {r['rounds']} rounds), "
        f"{r['when']}, commit {r['commit']}, {r['machine']}; the whole bench {r['bench_seconds']} s.",
        "",
        "One registered model (`digits`, a small CNN trained on the embedded sklearn digits), its champion",
        "served by `tl serve digits` (Ray Serve on a local Ray, default settings: 1 replica, batches of",
        "up to 16, 5 ms wait) and by `mlflow models serve -m models:/digits@champion --env-manager local`",
        "(its defaults: 1 worker), both up for the whole run. The client: threads of one process, one",
        "keep-alive connection each, every request one 8 x 8 digit as a base64 PNG (`{\"image\": ...}` and",
        "`{\"inputs\": [...]}`), on the same 2 cores as both servers.",
        "",
        "| clients | server | round | requests/s | p50 ms | p99 ms | requests | failed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for w in r["windows"]:
        lines.append(f"| {w['clients']} | {w['server']} | {w['round']} | {w['req_per_s']} | {w['p50_ms']} | "
                     f"{w['p99_ms']} | {w['requests']} | {w['failed']} |")
    lines += ["", "Median over the rounds:", "", "| clients | tl serve req/s | mlflow req/s | tl serve p99 ms | "
              "mlflow p99 ms | goal (tl serve >= mlflow in req/s and p99) |", "|---|---|---|---|---|---|"]
    for clients in sorted({w["clients"] for w in r["windows"]}):
        def med(server, key):
            values = [w[key] for w in r["windows"] if w["clients"] == clients and w["server"] == server and w[key]]
            return round(statistics.median(values), 1) if values else None
        t_rps, m_rps = med("tl serve", "req_per_s"), med("mlflow models serve", "req_per_s")
        t_p99, m_p99 = med("tl serve", "p99_ms"), med("mlflow models serve", "p99_ms")
        if clients == 1:
            goal = "—"
        else:
            goal = (f"req/s {'met' if t_rps >= m_rps else '**missed**'} ({t_rps / m_rps:.2f}x), "
                    f"p99 {'met' if t_p99 <= m_p99 else '**missed**'} ({t_p99 / m_p99:.2f}x)")
        lines.append(f"| {clients} | {t_rps} | {m_rps} | {t_p99} | {m_p99} | {goal} |")
    total = r["switch_load"]
    lines += [
        "", "## The champion switched under load (8 clients, `tl serve`)", "",
        f"{total['requests']} requests during the switches, **{total['failed']} failed** (goal: 0).",
        "", "| command | new version | command s | requests in its window | failed | first answer of the new "
            "version, s after the alias moved | ... after the command's start | ... after its return |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in r["switches"]:
        lines.append(f"| `{s['action']}` | {s['new_version']} | {s['command_seconds']} | {s['requests']} | "
                     f"{s['failed']} | **{s['first_answer_from_alias_move_s']}** | "
                     f"{s['first_answer_from_command_start_s']} | {s['first_answer_from_command_return_s']} |")
    lines += [
        "",
        "After the alias moved: from the start of the last look at the registry (a thread polling it every",
        "50 ms) that still saw the old version, to the end of the first request answered by the new one: an",
        "upper bound (goal: 10 s). The command's start includes `tl`'s own start (importing torch) and the",
        "gate's evaluation of both models; the alias moves near its end. A replica looks at the alias every",
        "second (`--poll-s`), then fetches and checks the version before it swaps it in.",
        "",
        "Versions (test accuracy, from `tl register --data`): "
        + ", ".join(f"v{v['version']} {100 * v['accuracy']:.1f} %" for v in r["versions"]) + ".",
        f"Processes left behind after both servers were stopped: {sum(map(len, r['processes_left_behind'].values()))}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
