"""The services users deploy from the project's image, started for real in containers: PostgreSQL,
the MLflow server as k8s/base/mlflow.yaml starts it, a Ray head and a Ray worker (two containers,
one cluster) and KubeRay's health probes run inside them. Shared by tests/test_container.py and
bench/container.py.

Host networking (`--network host`) throughout, every port a free one of this machine, every
container removed afterwards. Like the pods, the containers run as uid 1000 with a read-only root
filesystem and writable /tmp, /home/tl and /data (tmpfs here, emptyDirs there).
"""

from __future__ import annotations

import contextlib
import subprocess
import time
import urllib.request
from pathlib import Path

import yaml

from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "tl-core:dev"
BASE = "tl-local/python:3.11-bookworm"
POSTGRES_IMAGE = "tl-local/postgres:15"

# PostgreSQL from Debian's own package (bookworm: 15) on the same base as the project's image: no
# registry is reachable here, so the manifests' postgres:16.4-bookworm cannot be pulled. The start
# script does what that image's entry point does with POSTGRES_USER/PASSWORD/DB: a cluster owned by
# the user, password (scram) authentication over TCP, the database created, then the server.
POSTGRES_DOCKERFILE = """\
ARG BASE
FROM ${BASE}
RUN apt-get update \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql \\
 && rm -rf /var/lib/apt/lists/*
ENV PATH=/usr/lib/postgresql/15/bin:$PATH PGDATA=/tmp/pgdata
USER postgres
"""

POSTGRES_START = """set -e
printf %s "$POSTGRES_PASSWORD" > /tmp/pw
initdb -U "$POSTGRES_USER" --pwfile=/tmp/pw --auth-local=trust --auth-host=scram-sha-256 >/dev/null
rm /tmp/pw
pg_ctl -w -o "-c listen_addresses='' -k /tmp" start >/dev/null
createdb -h /tmp -U "$POSTGRES_USER" "$POSTGRES_DB"
pg_ctl -w -m fast stop >/dev/null
exec postgres -c listen_addresses=127.0.0.1 -k /tmp
"""

# KubeRay's probes of Ray containers (ray-operator/controllers/ray/common/pod.go,
# initLivenessAndReadinessProbe; utils/constant.go BaseWgetHealthCommand, v1.4): `bash -c` of
# these, joined by &&; the raylet's through the dashboard agent (port 52365 unless rayStartParams
# set dashboard-agent-listen-port), on the head also the GCS's through the dashboard (8265 unless
# dashboard-port). -T 10 for the GCS is KubeRay's own (it passes the readiness failure threshold).
# For Ray >= 2.53 newer KubeRay releases probe with an httpGet of /api/healthz on the agent's port
# instead (one endpoint for raylet and GCS): see `unified_probe`.
WGET = "wget --tries 1 -T {timeout} -q -O- http://localhost:{port}/{path} | grep success"


def kuberay_probe_command(agent_port: int, dashboard_port: int | None = None) -> str:
    """The exec probe KubeRay injects: the raylet's health; the head's adds the GCS's."""
    commands = [WGET.format(timeout=2, port=agent_port, path="api/local_raylet_healthz")]
    if dashboard_port is not None:
        commands.append(WGET.format(timeout=10, port=dashboard_port, path="api/gcs_healthz"))
    return " && ".join(commands)


def docker(*args: str, timeout: float = 120, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:3])} ... failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return result


def have_image(name: str) -> bool:
    return docker("image", "inspect", name).returncode == 0


def build_postgres_image(base: str = BASE) -> str:
    """Debian's postgresql on the local base (about a minute, once): tagged POSTGRES_IMAGE."""
    if not have_image(POSTGRES_IMAGE):
        docker("build", "--network", "host", "--build-arg", f"BASE={base}", "-t", POSTGRES_IMAGE, "-",
               input=POSTGRES_DOCKERFILE, timeout=900, check=True)
    return POSTGRES_IMAGE


# What the pods mount writable over a read-only root (emptyDirs); tmpfs here, owned by uid 1000.
POD_LIKE = ["--network", "host", "--read-only", "--user", "1000:1000",
            "--tmpfs", "/tmp:rw,exec,mode=1777", "--tmpfs", "/home/tl:rw,uid=1000,gid=1000",
            "--tmpfs", "/data:rw,uid=1000,gid=1000"]


@contextlib.contextmanager
def running(name: str, *run_args: str):
    """`docker run -d --name NAME ...`; yields the name; the container is removed afterwards (its
    last log lines are kept in `running.logs[name]` for a failing test to show)."""
    docker("run", "-d", "--name", name, *run_args, check=True)
    try:
        yield name
    finally:
        logs = docker("logs", "--tail", "60", name)
        running.logs[name] = logs.stdout[-4000:] + logs.stderr[-4000:]
        docker("rm", "-f", "-v", name)


running.logs = {}


def wait_for(check, seconds: float, what: str) -> float:
    """Poll `check()` until it is true; returns the seconds it took, raises after `seconds`."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if check():
            return time.monotonic() - started
        time.sleep(0.5)
    raise TimeoutError(f"{what} not within {seconds} s")


def http_ok(url: str, timeout: float = 5) -> bool:
    """A GET answered 200 within `timeout` (5 s: the MLflow manifest's liveness probe timeout)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except Exception:
        return False


@contextlib.contextmanager
def postgres(user: str = "mlflow", password: str = "c0ffee", db: str = "mlflow"):
    """A PostgreSQL server on 127.0.0.1; yields (container name, port, seconds to ready)."""
    port = free_port()
    image = build_postgres_image()
    started = time.monotonic()
    with running(f"tl-test-postgres-{port}", "--network", "host", "-e", f"PGPORT={port}",
                 "-e", f"POSTGRES_USER={user}", "-e", f"POSTGRES_PASSWORD={password}", "-e", f"POSTGRES_DB={db}",
                 image, "bash", "-c", POSTGRES_START) as name:
        wait_for(lambda: docker("exec", name, "pg_isready", "-q", "-h", "127.0.0.1", "-p", str(port),
                                "-d", db).returncode == 0, 90, "PostgreSQL")
        yield name, port, time.monotonic() - started


def mlflow_manifest_command() -> tuple[list[str], list[str]]:
    """The MLflow container's command and args in k8s/base/mlflow.yaml."""
    docs = [d for d in yaml.safe_load_all((ROOT / "k8s" / "base" / "mlflow.yaml").read_text()) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return container["command"], container["args"]


def manifest_plain_env() -> dict:
    """The MLflow container's variables in k8s/base/mlflow.yaml that are set to a plain value and
    need no substitution (not from a Secret or ConfigMap, no $(VAR))."""
    docs = [d for d in yaml.safe_load_all((ROOT / "k8s" / "base" / "mlflow.yaml").read_text()) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    return {e["name"]: e["value"] for e in env if "value" in e and "$(" not in e["value"]}


def mlflow_backend_store_uri(user: str, password: str, port: int) -> str:
    """The manifest's MLFLOW_BACKEND_STORE_URI (its scheme names the driver) for a PostgreSQL on
    127.0.0.1:port, with the user and password Kubernetes would put in from the Secret."""
    docs = [d for d in yaml.safe_load_all((ROOT / "k8s" / "base" / "mlflow.yaml").read_text()) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    template = env["MLFLOW_BACKEND_STORE_URI"]["value"]
    uri = template.replace("$(POSTGRES_USER)", user).replace("$(POSTGRES_PASSWORD)", password)
    return uri.replace("@tl-postgres:5432/", f"@127.0.0.1:{port}/")


def mlflow_artifact_bucket() -> str:
    """The bucket of the manifest's --artifacts-destination=s3://BUCKET/..."""
    _, args = mlflow_manifest_command()
    destination = next(a.split("=", 1)[1] for a in args if a.startswith("--artifacts-destination="))
    return destination.removeprefix("s3://").split("/", 1)[0]


@contextlib.contextmanager
def mlflow_server(image: str, backend_store_uri: str, s3_endpoint: str, s3_env: dict):
    """The manifest's `mlflow server` command and args, run from the image, with the backend store
    from MLFLOW_BACKEND_STORE_URI (as the Deployment sets it) and the artifact proxy's S3 endpoint
    and keys; only --host and --port are changed (127.0.0.1 and a free port: the host's network).
    Yields (url, seconds until /health answered)."""
    command, args = mlflow_manifest_command()
    port = free_port()
    args = [a for a in args if not a.startswith(("--host=", "--port="))] + ["--host=127.0.0.1", f"--port={port}"]
    env = {"MLFLOW_BACKEND_STORE_URI": backend_store_uri, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint, **s3_env,
           **manifest_plain_env()}
    started = time.monotonic()
    with running(f"tl-test-mlflow-{port}", *POD_LIKE, *(f"--env={k}={v}" for k, v in env.items()),
                 "--entrypoint", command[0], image, *command[1:], *args) as name:
        url = f"http://127.0.0.1:{port}"

        # Ready after 3 answers in a row: with --workers=2 the first answer can come while the
        # second worker is still starting, and a check just after it once timed out here (load 4).
        answers = []

        def healthy() -> bool:
            if docker("inspect", "-f", "{{.State.Running}}", name).stdout.strip() != "true":
                raise RuntimeError(f"the MLflow container stopped:\n{docker('logs', name).stderr[-3000:]}")
            answers.append(http_ok(f"{url}/health"))
            return answers[-3:] == [True] * 3

        wait_for(healthy, 180, "MLflow's /health, 3 times in a row")
        yield url, time.monotonic() - started


@contextlib.contextmanager
def ray_cluster(image: str, shared: Path, cpus_per_node: int = 1, object_store_bytes: int = 200_000_000):
    """A Ray head and a Ray worker, each its own container of the image, started as KubeRay starts
    them (`ulimit -n 65536; ray start ... --block` through bash; the head through a login shell,
    `bash -lc`, as KubeRay before 1.4 and with ENABLE_LOGIN_SHELL does), joined into one cluster;
    `shared` is mounted at its own path in both. Yields a dict: address, the head's and the
    worker's container names, their dashboard-agent ports, the dashboard port, and the seconds
    until both nodes were in the cluster."""
    gcs, dashboard, head_agent, worker_agent, client = (free_port() for _ in range(5))
    address = f"127.0.0.1:{gcs}"
    common = [f"--num-cpus={cpus_per_node}", "--node-ip-address=127.0.0.1", f"--object-store-memory={object_store_bytes}",
              "--block"]
    # Both nodes share the host's network here (two pods have two IPs): every listening port that
    # would collide is set apart. Traffic stays on 127.0.0.1.
    head_start = ["ray", "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                  f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={head_agent}",
                  f"--ray-client-server-port={client}", *common]
    worker_start = ["ray", "start", f"--address={address}", f"--dashboard-agent-listen-port={worker_agent}", *common]
    env = ["-e", "RAY_USAGE_STATS_ENABLED=0"]  # as the manifests set it; nothing else
    mounts = ["-v", f"{shared}:{shared}", "--shm-size=512m"]
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        head = stack.enter_context(running(f"tl-test-ray-head-{gcs}", *POD_LIKE, *env, *mounts, "--entrypoint", "bash",
                                           image, "-lc", "ulimit -n 65536; " + " ".join(head_start)))
        worker = stack.enter_context(running(f"tl-test-ray-worker-{gcs}", *POD_LIKE, *env, *mounts, "--entrypoint",
                                             "bash", image, "-c", "ulimit -n 65536; " + " ".join(worker_start)))

        def two_nodes() -> bool:
            for name in (head, worker):
                if docker("inspect", "-f", "{{.State.Running}}", name).stdout.strip() != "true":
                    raise RuntimeError(f"{name} stopped:\n{docker('logs', name).stdout[-3000:]}")
            status = docker("exec", *env, head, "ray", "status", f"--address={address}", timeout=60)
            return status.returncode == 0 and status.stdout.count("node_") >= 2

        wait_for(two_nodes, 240, "a Ray cluster of 2 nodes")
        yield {"address": address, "head": head, "worker": worker, "head_agent_port": head_agent,
               "worker_agent_port": worker_agent, "dashboard_port": dashboard, "env": env,
               "seconds_to_two_nodes": time.monotonic() - started}


def unified_probe(agent_port: int) -> bool:
    """Newer KubeRay's probe for Ray >= 2.53: an httpGet of /api/healthz on the agent's port (the
    kubelet makes it from outside the container; here, from the host)."""
    return http_ok(f"http://127.0.0.1:{agent_port}/api/healthz")
