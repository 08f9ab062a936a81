"""Real services for tests, started on 127.0.0.1 and always stopped: moto's S3 server, an MLflow
tracking server with S3 artifacts, a Ray cluster of two nodes. No mocks."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent  # the venv's bin: moto_server, mlflow, ray, tl


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, seconds: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except Exception:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {seconds} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@contextlib.contextmanager
def started(args: list, **popen):
    """A command run for the length of a `with` (a `tl` under test): in a session of its own, and
    SIGKILLed with everything it started (its local Ray too) on the way out, also when the test
    fails or times out."""
    proc = subprocess.Popen([str(a) for a in args], start_new_session=True, **popen)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def moto_s3(log_dir: Path):
    """A moto S3 server; yields its endpoint URL."""
    port = free_port()
    log = open(log_dir / "moto.log", "wb")
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url, 30, proc)
        yield url
    finally:
        stop(proc)
        log.close()


@contextlib.contextmanager
def mlflow_server(log_dir: Path, s3_endpoint: str, bucket: str):
    """`mlflow server` on SQLite with artifacts proxied to s3://bucket/mlflow; yields its URL."""
    port = free_port()
    # No GenAI job runner (8 processes the registry does not use), as k8s/base/mlflow.yaml runs it.
    env = {**os.environ, **S3_ENV, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(log_dir / "mlflow-server.log", "wb")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{log_dir / 'mlflow-server.db'}",
         "--artifacts-destination", f"s3://{bucket}/mlflow", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", 90, proc)
        yield url
    finally:
        stop(proc)
        log.close()


def make_bucket(endpoint: str, bucket: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in S3_ENV.items() if k != "AWS_DEFAULT_REGION"},
                 region_name="us-east-1").create_bucket(Bucket=bucket)


ADD_RAY_NODE: dict = {}  # address of a running ray_cluster -> a function that joins one more node to it


def wait_for_registered_checkpoint(run_dir: Path, running, seconds: float = 300) -> bool:
    """Wait until Ray Train's controller has taken in a checkpoint of the run stored at `run_dir`:
    its checkpoint manager writes `checkpoint_manager_snapshot.json` there after registering one.
    A checkpoint folder alone is not enough: workers write it before the controller hears of it,
    and a failure in between restarts the run from epoch 0 (CI failed so, twice, with a fixed
    one-second wait). `running()` says whether the run is still going. True once one is taken in."""
    import json

    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + seconds
    while running() and time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, ValueError):  # not yet written, or mid-write
            if json.loads(snapshot.read_text()).get("latest_checkpoint_result"):
                return True
        time.sleep(0.1)
    return False


def lose_ray_node(address: str, hosting: str = "RayTrainWorker") -> list[int]:
    """SIGKILL a node of the ray_cluster at `address` (not its head) that runs a process whose
    command line contains `hosting` (a Ray Train worker, by default): its raylet and every process
    under it, as when a machine is preempted. Which node Ray places work on is its choice (two
    half-CPU workers may share one): kill the last-joined node instead, and a run could lose none
    of its workers (CI saw that: nothing to resume). Returns the pids killed (none when no node
    but the head runs such a process)."""
    gcs_port = address.rsplit(":", 1)[1]  # a cluster's raylets name its GCS, at the host's own IP
    ps = [line.split(maxsplit=2) for line in subprocess.run(
        ["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout.splitlines()]  # -ww: whole lines
    args = {int(pid): rest[0] if rest else "" for pid, _, *rest in ps}
    children: dict[int, list[int]] = {}
    for pid, ppid, *_ in ps:
        children.setdefault(int(ppid), []).append(int(pid))

    def under(pid: int) -> list[int]:
        return [pid] + [p for child in children.get(pid, []) for p in under(child)]

    raylets = sorted(pid for pid, line in args.items()
                     if line.split()[:1] and line.split()[0].endswith("/raylet") and "--gcs-address=" in line
                     and f":{gcs_port} " in line + " ")
    for node in raylets[1:]:  # the first raylet started is the head's
        pids = under(node)
        if any(hosting in args[pid] for pid in pids):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return pids
    return []


@contextlib.contextmanager
def ray_cluster(nodes: int = 2, cpus_per_node: int = 1, head_cpus: int | None = None):
    """`ray start --head` (`head_cpus`, by default `cpus_per_node`) plus `nodes - 1` nodes joined
    with `ray start --address`; yields the address. It has a temp dir of its own, and only the
    processes of that cluster are stopped afterwards (`ray stop` would also end every other Ray on
    the machine)."""
    import shutil
    import tempfile

    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    ray = str(BIN / "ray")
    common = ["--disable-usage-stats", f"--temp-dir={temp_dir}"]
    address = f"127.0.0.1:{port}"

    def add_node() -> None:  # also a node that replaces a lost one, as KubeRay does
        subprocess.run([ray, "start", f"--address={address}", f"--num-cpus={cpus_per_node}", *common],
                       check=True, env=env, capture_output=True, timeout=120)

    try:
        head_cpus = cpus_per_node if head_cpus is None else head_cpus
        subprocess.run([ray, "start", "--head", f"--port={port}", f"--num-cpus={head_cpus}",
                        "--include-dashboard=false", *common], check=True, env=env, capture_output=True, timeout=120)
        for _ in range(nodes - 1):
            add_node()
        ADD_RAY_NODE[address] = add_node
        yield address
    finally:
        ADD_RAY_NODE.pop(address, None)
        subprocess.run(["pkill", "-TERM", "-f", temp_dir], capture_output=True)
        time.sleep(2)
        subprocess.run(["pkill", "-KILL", "-f", temp_dir], capture_output=True)
        shutil.rmtree(temp_dir, ignore_errors=True)


class Relay:
    """A TCP relay in front of a server on 127.0.0.1 that a test can take down and bring back.

    While it is down, connections are refused and open ones are cut, as when the endpoint of a
    store or a tracking server restarts; the server behind keeps its state (stopping moto itself
    would lose every object it holds). `cut_when(pattern, seconds)` takes it down the moment a
    request containing `pattern` passes (that request is cut before it reaches the server), for
    `seconds`, once per call: an outage in the middle of a given write or read.
    """

    def __init__(self, target_port: int):
        import threading

        self.target_port = target_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.outages: list[bytes] = []  # the patterns that took it down, in order
        self._triggers: list[tuple[bytes, float]] = []
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._holding = False
        self.up()

    def up(self) -> None:
        import threading

        with self._lock:
            self._holding = False
            if self._listener is not None:
                return
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(64)
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self, seconds: float | None = None) -> None:
        """Refuse and cut connections; back up after `seconds` (None: until `up()`)."""
        import threading

        with self._lock:
            listener, self._listener = self._listener, None
            connections, self._open = self._open, []
        for sock in ([listener] if listener else []) + connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept() or recv()
            sock.close()
        if seconds is not None:
            threading.Timer(seconds, self.up).start()

    def hang(self) -> None:
        """Accept connections and never answer on them (a wedged endpoint or a silent load balancer),
        until `up()` or `down()`."""
        with self._lock:
            self._holding = True

    def cut_when(self, pattern: bytes, seconds: float) -> None:
        with self._lock:
            self._triggers.append((pattern, seconds))

    def _accept(self, listener: socket.socket) -> None:
        import threading

        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # taken down
            with self._lock:
                if self._holding:  # kept open, never forwarded: closed by down()
                    self._open.append(client)
                    continue
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, requests: bool) -> None:
        try:
            while data := src.recv(65536):
                if requests and self._triggered(data):
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def _triggered(self, data: bytes) -> bool:
        with self._lock:
            hit = next((t for t in self._triggers if t[0] in data), None)
            if hit is None:
                return False
            self._triggers.remove(hit)
            self.outages.append(hit[0])
        self.down(hit[1])
        return True


@contextlib.contextmanager
def registry_services(root: Path, bucket: str):
    """TL_WORKDIR under `root`, no RAY_ADDRESS, a moto S3 with `bucket` and an `mlflow server`
    storing artifacts there (MLFLOW_TRACKING_URI set): what the registry and serving tests share.
    Yields (s3 endpoint, tracking URL); the environment is restored on the way out."""
    import pytest

    mp = pytest.MonkeyPatch()
    try:
        mp.setenv("TL_WORKDIR", str(root / "work"))
        mp.delenv("RAY_ADDRESS", raising=False)
        with moto_s3(root) as s3:
            make_bucket(s3, bucket)
            with mlflow_server(root, s3, bucket) as url:
                mp.setenv("MLFLOW_TRACKING_URI", url)
                yield s3, url
    finally:
        mp.undo()
