"""Connecting to Ray: the cluster named by `RAY_ADDRESS`, else a local Ray in this process."""

from __future__ import annotations

import atexit
import copyreg
import logging
import os
import signal
from pathlib import Path

from tl_core.errors import UserError

# A local Ray's object store would claim 30 % of RAM by default; tl passes small objects only.
LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2


# Settings the workers need to see the same storage and tracking as the driver. Credentials
# travel as environment variables of the job (never in images or parameters).
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                 "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "MLFLOW_TRACKING_URI")


def worker_env() -> dict[str, str]:
    env = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    # Ray Train V2's controller collects each ray.train.report on its health-check poll (2 s by
    # default) and a worker's next report waits for it: measured here, every per-epoch report
    # cost up to 2 s. Polling every 0.1 s made it about 0.1 s.
    env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    return env


def absolute_workdir() -> str:
    """The work directory as workers elsewhere must see it (they run in another folder)."""
    from tl_core import storage
    from tl_core.config import workdir

    wd = workdir()
    return wd if storage.is_s3(wd) else os.path.abspath(wd)


def init_ray() -> None:
    import ray

    if ray.is_initialized():
        return
    # Train V2 is Ray's default; say so, as Tune's integration reads the same switch.
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    address = os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")  # the controller runs beside the driver
    if address:
        check_answers(address)
        try:
            ray.init(address=address, logging_level=logging.WARNING, runtime_env={"env_vars": worker_env()})
        except ConnectionError as err:
            # Ray sends its token only where RAY_AUTH_MODE=token says so (never on its own to an
            # address given), and `ray start` turns token authentication on by default.
            raise UserError(f"cannot connect to the Ray cluster at RAY_ADDRESS={address} ({err}): where it was "
                            "started with token authentication (Ray's default for `ray start`), set "
                            "RAY_AUTH_MODE=token so that its token (~/.ray/auth_token, or RAY_AUTH_TOKEN) is sent; "
                            "else check that the cluster runs") from None
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local Ray needs no token
        # Ray Train's preemption watcher (one more actor process a run) follows node drains, as
        # on KubeRay; this process's own node is never drained. Off, a 2-worker fit on digits
        # took 21.6-24.1 s here instead of 25.1-27.9 s.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # No runtime_env: a local Ray's workers are children of its raylet, itself started from this
        # process now, so they have this environment already (worker_env's variables included). A
        # job's runtime_env, even env_vars alone, keeps it off the workers Ray starts ahead: each
        # task or actor then waited on a new process, 0.6-0.8 s here against 0.01-0.17 s.
        # address "local": a Ray of this process's own even where `ray start` left one running (or
        # only its address file, after a kill), which Ray would join by default and then refuse
        # num_cpus with a ValueError. A cluster is used where RAY_ADDRESS names it, above.
        start_local_ray(address="local", num_cpus=os.cpu_count(), object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                        include_dashboard=False, logging_level=logging.WARNING)


# How long a cluster's address may take to accept a connection: Ray itself retries an address
# where nothing listens for as long as the command runs (over 10 minutes, seen here).
CONNECT_SECONDS = 10


def check_answers(address: str) -> None:
    """One error line where nothing accepts a connection at `address` (host:port of a cluster's
    GCS; "auto" and Ray Client's ray:// are left to Ray)."""
    import socket

    host, sep, port = address.rpartition(":")
    if address == "auto" or "://" in address or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_SECONDS).close()
    except OSError as err:
        raise UserError(f"nothing answers at RAY_ADDRESS={address} ({err.strerror or err}): start the cluster "
                        "(`ray start --head`) or fix the address; unset RAY_ADDRESS to run on a local Ray") from None


def quiet_ray_data() -> None:
    """Ray Data's console lines from WARNING up only. It logs each dataset's start, plan and end at
    INFO, and its progress too where stderr is not a terminal, through a console handler of its own
    that the `ray` logger's level (cli_app) does not reach; tl says what it did itself. Its log file
    in Ray's session folder keeps every line. Call after `import ray.data`, which sets them up."""
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)


# Ray gives a local node's raylet 30 s to register with its GCS (a constant in ray/_private/node.py).
# On 2 busy cores (three test workers each starting Ray, a training beside them) it once missed
# that, and a whole test module errored. Starting again, after ending what the first try left,
# has always worked; a machine where three tries miss gets one line that says so.
LOCAL_START_ATTEMPTS = 3
STARTUP_TIMEOUT = "timed out during startup"


def start_local_ray(**options) -> None:
    import ray

    for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
        try:
            ray.init(**options)
            atexit.unregister(end_monitor)  # once a process, however often it starts Ray
            atexit.register(end_monitor)  # after Ray's own handler, so it runs before it (LIFO)
            return
        except Exception as e:  # Ray raises a bare Exception for this
            if STARTUP_TIMEOUT not in str(e):
                raise
            end_leftover_ray_processes()
            logging.getLogger(__name__).warning("a local Ray %s (try %d of %d)", STARTUP_TIMEOUT, attempt,
                                                LOCAL_START_ATTEMPTS)
    raise UserError(f"a local Ray {STARTUP_TIMEOUT} {LOCAL_START_ATTEMPTS} times (its raylet did not register "
                    "within Ray's 30 s): this machine is too busy; retry when it is quieter, or set RAY_ADDRESS "
                    "to a running Ray cluster")


def end_monitor() -> None:
    """End a local Ray's autoscaler monitor while its GCS still runs. `ray.shutdown` ends the GCS
    first; the monitor's SIGTERM handler then reports its exit to the GCS that is gone and hangs
    until Ray kills it a second later (measured here: 1.0 s of a 1.35 s shutdown; `ray stop` orders
    them the other way for this reason, ray-project/ray#30672). A single local node needs no
    autoscaler, so it is killed outright. Ray keeps the node in a private module: where a Ray
    version moves it, this does nothing and shutdown only takes its second longer."""
    try:
        from ray._private import worker

        worker._global_node.kill_monitor(check_alive=False)  # None (no local node): AttributeError
    except Exception:  # noqa: BLE001 - on the way out; ray.shutdown ends it its own way
        pass


def shutdown_local_ray() -> None:
    """`ray.shutdown` of the local Ray this process started, without the monitor's wait (`end_monitor`)."""
    import ray

    end_monitor()
    ray.shutdown()


def end_leftover_ray_processes() -> None:
    """End the Ray processes (GCS, raylet, agents, workers) this process started and still has
    below it: a start that timed out leaves them running, as ray.init drops the node that would
    stop them. Linux only (/proc); elsewhere they end with this process."""
    import ray

    proc = Path("/proc")
    if not proc.is_dir():
        return
    parent_of = {}
    for stat in proc.glob("[0-9]*/stat"):
        try:  # "pid (name) state ppid ...": the name may hold spaces and brackets
            parent_of[int(stat.parent.name)] = int(stat.read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # it ended meanwhile
    below, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, ppid in parent_of.items() if ppid in frontier} - below
        below |= frontier
    ray_dir = os.path.dirname(ray.__file__)
    for pid in below:
        try:
            cmdline = (proc / str(pid) / "cmdline").read_bytes().decode(errors="replace")
            if ray_dir in cmdline or cmdline.startswith("ray::"):
                os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


def cluster_cpus_and_gpus() -> tuple[int, int]:
    import ray

    resources = ray.cluster_resources()
    return int(resources.get("CPU", 1)), int(resources.get("GPU", 0))


S3_ATTEMPTS = 8  # with the AWS SDK's backoff: an endpoint down for about half a minute is ridden out
# (measured here against a closed port: 3 attempts gave up after 2 s, 8 after 30-120 s, 10 after 95 s)


def s3_filesystem(options: dict):
    """A pyarrow S3FileSystem with `options` and tl's retries, as tl_core.storage's own requests have."""
    import pyarrow.fs

    return pyarrow.fs.S3FileSystem(**options, retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(S3_ATTEMPTS))


def storage_for(uri: str):
    """(storage_path, storage_filesystem) for Ray's RunConfig: local folders must be absolute;
    s3:// uses the endpoint from the environment (MinIO, moto) through pyarrow."""
    from tl_core import storage

    if not storage.is_s3(uri):
        return os.path.abspath(uri), None
    endpoint = storage.s3_endpoint()
    if not endpoint:
        return uri, None
    import pyarrow.fs

    scheme, _, host = endpoint.partition("://")
    fs = s3_filesystem({"endpoint_override": host, "scheme": scheme or "https", "connect_timeout": 5,
                        "request_timeout": 60, "region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")})
    # pyarrow pickles an S3FileSystem without its retry strategy: Ray's TrainController, its
    # workers and Ray Data's tasks would get 3 attempts (2 s) and fail a run on the first blip of
    # the endpoint (ray#47939). Pickled from here, it is rebuilt through s3_filesystem, retries kept.
    copyreg.pickle(pyarrow.fs.S3FileSystem, lambda fs: (s3_filesystem, (fs.__reduce__()[1][0],)))
    return uri[len("s3://"):], fs
