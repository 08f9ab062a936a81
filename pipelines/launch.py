"""`tl pipeline ...`: compile the transfer pipeline, run it on this machine with kfp.local,
submit it to a KFP endpoint, or keep one recurring run of it per name.

Every function returns a JSON-able summary dict; bad input and unreachable endpoints raise
UserError (one line, exit 2 in the CLI). KFP's own chatter (links, step logs) goes to stderr so
`--json` keeps stdout to one object.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

from pipelines.transfer import NAME, arguments
from tl_core import storage
from tl_core.config import PipelineConfig, workdir
from tl_core.errors import UserError
from tl_core.monitor import NO_DRIFT
from tl_core.ray_cluster import FORWARDED_ENV

MANAGED = "managed by `tl pipeline schedule`; fingerprint"  # recurring runs' description
FINISHED = {"SUCCEEDED", "FAILED", "SKIPPED", "CANCELED"}  # any other run state: in flight


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


@contextlib.contextmanager
def _kfp_output_to_stderr(copy: io.StringIO | None = None):
    """KFP's output (and, with kfp.local, the steps' logs) to stderr; also into `copy` if given."""
    with contextlib.redirect_stdout(_Tee(sys.stderr, copy) if copy else sys.stderr), warnings.catch_warnings():
        # kfp.local warns for every step that the image's name has no "python" in it: it is ours.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")  # display names
        yield


# -- compile -----------------------------------------------------------------------------------


def compile_pipeline(output: str, cache: bool = True) -> dict:
    """The pipeline as KFP YAML. cache=False: KFP's cache off for every step, nested ones included
    (kfp.Client's enable_caching=False rewrites only the top-level tasks, and the compile-time
    default of kfp#11092 does not override the steps that set their caching explicitly)."""
    import yaml
    from kfp import compiler

    from components import IMAGE
    from pipelines.transfer import transfer_pipeline

    path = Path(output)
    if path.suffix not in (".yaml", ".yml"):
        raise UserError(f"--output {output}: the pipeline is written as YAML; name the file .yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(transfer_pipeline, package_path=str(path))
    if not cache:
        spec, *platform = yaml.safe_load_all(path.read_text())
        for dag in [spec["root"]["dag"], *(c["dag"] for c in spec["components"].values() if "dag" in c)]:
            for task in dag["tasks"].values():
                task["cachingOptions"] = {}  # enableCache: false, as KFP writes it
        path.write_text(yaml.safe_dump_all([spec, *platform], sort_keys=False))
    return {"output": str(path), "pipeline": NAME, "image": IMAGE, "caching": cache,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


# -- run on this machine -----------------------------------------------------------------------


def _local_root(root: str | None) -> Path:
    """kfp.local's outputs (small JSON pointers and metrics) need a local folder: the work
    directory's `kfp/` when it is local, else ./tl-kfp."""
    if root:
        return Path(root).resolve()
    return (Path("tl-kfp") if storage.is_s3(workdir()) else Path(workdir(), "kfp")).resolve()


def _step_outputs(run_dir: Path) -> dict:
    """Each step's output parameters and metrics, from the executor_output.json kfp.local leaves."""
    steps = {}
    for output in sorted(run_dir.rglob("executor_output.json")):
        result = json.loads(output.read_text())
        values = dict(result.get("parameterValues", {}))
        for name, artifacts in result.get("artifacts", {}).items():
            metadata = artifacts["artifacts"][0].get("metadata", {})
            values[name] = {k: v for k, v in metadata.items() if k != "confusionMatrix"}
        steps[output.parent.relative_to(run_dir).as_posix()] = values
    return steps


# What a step's container must see of this environment (credentials travel as variables of the
# container, never in the image or the pipeline's parameters).
CONTAINER_ENV = (*FORWARDED_ENV, "RAY_ADDRESS", "RAY_AUTH_MODE")


def _docker_runner(image: str, base: Path):
    """kfp.local's DockerRunner: each step in `image`, on the host's network (services on
    127.0.0.1 stay reachable), as this user (files in the mounted folder stay ours), with the work
    directory mounted at the same path, so the paths the steps hand each other mean the same
    inside and out."""
    import os

    from kfp import local

    from components import IMAGE

    try:
        import docker

        docker.from_env().ping()
    except Exception as err:  # no Python client, no daemon, no permission: one line either way
        raise UserError(f"--runner docker needs a running Docker daemon ({str(err).splitlines()[0][:160]}): start "
                        "it (bash ../shared/tools/container-env.sh here), or use --runner subprocess") from None
    if image != IMAGE:
        raise UserError(f"--image {image}: the steps were already defined with {IMAGE}; set TL_IMAGE={image} for the "
                        "whole command instead")
    env = {name: os.environ[name] for name in CONTAINER_ENV if os.environ.get(name)}
    env["TL_WORKDIR"] = str(base)
    # The image's entry point is `tl`; a KFP step brings its own command (as a pod's `command:`
    # replaces the entry point, which docker's CMD alone would not).
    return local.DockerRunner(network_mode="host", user=f"{os.getuid()}:{os.getgid()}", environment=env,
                              entrypoint=["/usr/bin/env"])


# On one machine a retry rides out a blip (tl itself waits out S3 and MLflow outages); the cluster's
# 60 s and 120 s are for lost nodes. A step failing on bad input then says so in seconds, not 3 minutes.
LOCAL_RETRY_BACKOFF_SECONDS = 2


def _as_run_locally(pipeline):
    """A copy of the pipeline whose retries wait LOCAL_RETRY_BACKOFF_SECONDS (then twice that)."""
    import copy

    local = copy.deepcopy(pipeline)
    spec = local.component_spec.implementation.graph
    for dag in [spec.root.dag, *(c.dag for c in spec.components.values() if c.HasField("dag"))]:
        for task in dag.tasks.values():
            if task.HasField("retry_policy"):
                task.retry_policy.backoff_duration.seconds = LOCAL_RETRY_BACKOFF_SECONDS
    return local


def run_local(cfg: PipelineConfig, root: str | None = None, runner: str = "subprocess",
              image: str | None = None) -> dict:
    """The whole pipeline on this machine with kfp.local. runner="subprocess": each step a
    subprocess of this Python, seeing this environment (TL_WORKDIR, MLFLOW_TRACKING_URI,
    RAY_ADDRESS). runner="docker": each step a container of `image` (default TL_IMAGE), as a
    cluster runs it; the local work directory is mounted into every step."""
    from kfp import local

    from components import IMAGE
    from pipelines.transfer import transfer_pipeline

    if runner == "subprocess":
        base = _local_root(root)
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(base),
                   workspace_root=str(base / "workspace"))
    elif runner == "docker":
        if storage.is_s3(workdir()) or root:
            raise UserError("--runner docker keeps kfp.local's outputs in the work directory, which it mounts into "
                            "the steps: give a local TL_WORKDIR and no --root")
        base = Path(workdir()).resolve()
        base.mkdir(parents=True, exist_ok=True)
        local.init(runner=_docker_runner(image or IMAGE, base), pipeline_root=str(base))
    else:
        raise UserError(f"--runner {runner}: choose subprocess or docker")
    started, earlier, log = time.time(), set(base.glob(f"{NAME}-*")), io.StringIO()
    with _kfp_output_to_stderr(copy=log):
        try:
            _as_run_locally(transfer_pipeline)(**arguments(cfg))
        except RuntimeError as err:
            # A step that failed on bad input said why in a UserError line of its log: repeat it.
            why = re.findall(r"UserError: (.+)", log.getvalue())
            raise UserError(f"{str(err).splitlines()[0]} {why[-1] if why else '(its log is above)'}") from None
    (run_dir,) = set(base.glob(f"{NAME}-*")) - earlier  # kfp.local's folder for this run
    steps = _step_outputs(run_dir)

    def result(step: str):  # a step's return value, from whichever branch ran (evaluate, evaluate-2)
        return next((v["Output"] for task, v in steps.items() if re.sub(r"-\d+$", "", task) == step), None)

    drift = result("monitor")  # the first step's decision: drift, forced, no-champion or no-drift
    if drift == NO_DRIFT:
        decision = "not retrained: the monitor found no drift from the champion's training data (--force-retrain to train)"
    else:
        decision = result("promote") or f"not promoted: below --min-accuracy {cfg.min_accuracy}"
    return {"pipeline": NAME, "pipeline_root": str(run_dir), "arguments": arguments(cfg), "model": cfg.model_name,
            "monitor": drift, "accuracy": result("evaluate"), "version": result("register"), "decision": decision,
            "steps": steps, "seconds": time.time() - started}


# -- a KFP endpoint ----------------------------------------------------------------------------


def _check_endpoint(host: str) -> None:
    """Fail in seconds with one line, before kfp.Client retries for half a minute."""
    if not re.match(r"^https?://[^/\s]+", host):
        raise UserError(f"--host {host!r} must be a URL such as http://localhost:8080 (the KFP UI or API service)")
    url = f"{host.rstrip('/')}/apis/v2beta1/healthz"
    try:
        with urllib.request.urlopen(url, timeout=10):
            return
    except urllib.error.HTTPError as err:
        raise UserError(f"{host} answered HTTP {err.code} on /apis/v2beta1/healthz: is it a Kubeflow Pipelines "
                        "endpoint? (port-forward: kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80)") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise UserError(f"cannot reach the KFP endpoint {host} ({reason}); check --host and that the endpoint is up "
                        "(port-forward: kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80)") from None


@contextlib.contextmanager
def _kfp_errors(host: str, action: str):
    """A failing KFP API call becomes one line: what failed and what the server said."""
    import urllib3
    from kfp_server_api.exceptions import ApiException

    try:
        with _kfp_output_to_stderr():
            yield
    except ApiException as err:
        said = " ".join(str(err.body or err.reason).split())[:300]
        raise UserError(f"KFP at {host} refused to {action}: HTTP {err.status}: {said}") from None
    except (urllib3.exceptions.HTTPError, OSError) as err:
        raise UserError(f"lost the KFP endpoint {host} while trying to {action} ({err.__class__.__name__})") from None


def _client(host: str):
    import kfp

    _check_endpoint(host)
    with _kfp_errors(host, "connect"):
        return kfp.Client(host=host.rstrip("/"))


def submit(cfg: PipelineConfig, host: str, experiment: str = "tl", cache: bool = True,
           service_account: str | None = None) -> dict:
    """One run of the pipeline on a KFP endpoint; cache=False: KFP's cache off for its every step."""
    client = _client(host)
    with tempfile.TemporaryDirectory() as folder, _kfp_errors(host, "create the run"):
        package = compile_pipeline(str(Path(folder, "pipeline.yaml")), cache)["output"]
        run = client.create_run_from_pipeline_package(
            package, arguments=arguments(cfg), run_name=f"{NAME} {time.strftime('%Y-%m-%d %H:%M:%S')}",
            experiment_name=experiment, service_account=service_account)
    return {"run_id": run.run_id, "experiment": experiment, "host": host, "caching": cache,
            "url": f"{host.rstrip('/')}/#/runs/details/{run.run_id}", "arguments": arguments(cfg)}


# -- a recurring run, idempotent by name ----------------------------------------------------------

CRON_FIELDS = [("second", 59), ("minute", 59), ("hour", 23), ("day of month", 31), ("month", 12), ("day of week", 6)]


def kfp_cron(expression: str) -> str:
    """A cron expression as KFP takes it: six fields, seconds first. Five-field (crontab)
    expressions get a leading 0 seconds."""
    fields = expression.split()
    if len(fields) == 5:
        fields = ["0", *fields]
    problem = None if len(fields) == 6 else f"has {len(expression.split())} fields, not 5 (crontab) or 6 (seconds first)"
    for field, (what, top) in zip(fields if problem is None else [], CRON_FIELDS):
        if not re.fullmatch(r"[0-9A-Za-z*?/,\-#]+", field) or any(int(n) > top for n in re.findall(r"\d+", field)):
            problem = f"has a bad {what} field {field!r}"
    if problem:
        raise UserError(f"--cron {expression!r} {problem}; for example '0 3 * * 1' (Mondays 03:00 UTC)")
    return " ".join(fields)


def _fingerprint(package: Path, cron: str, arguments: dict, service_account: str | None) -> str:
    """What the recurring run would do: the compiled pipeline and everything sent with it."""
    settings = json.dumps({"cron": cron, "arguments": arguments, "sa": service_account}, sort_keys=True)
    return hashlib.sha256(package.read_bytes() + settings.encode()).hexdigest()[:16]


def _pages(list_call, field: str, **kwargs) -> list:
    items, token = [], ""
    while True:
        page = list_call(page_token=token, page_size=100, **kwargs)
        items += getattr(page, field) or []
        token = page.next_page_token
        if not token:
            return items


def _retire(client, old, runs: list) -> dict:
    """Retire an older recurring run of the same name without stopping a run it started
    (deleting a recurring run deletes its workflows, running ones too). Enabled: disable it, so
    it starts no more runs. Already disabled (by an earlier call, or a person) and none of its
    runs in flight: delete it. Never both in one call: KFP lists a run only once its persistence
    agent has reported it, some seconds after it started."""
    in_flight = sum(r.recurring_run_id == old.recurring_run_id and r.state not in FINISHED for r in runs)
    deleted = old.status == "DISABLED" and not in_flight
    if deleted:
        client.delete_recurring_run(old.recurring_run_id)
    elif old.status != "DISABLED":
        client.disable_recurring_run(old.recurring_run_id)
    return {"recurring_run_id": old.recurring_run_id, "deleted": deleted, "runs_in_flight": in_flight}


def schedule(cfg: PipelineConfig, host: str, name: str, cron: str, experiment: str = "tl", cache: bool = True,
             service_account: str | None = None) -> dict:
    """Make `name` a recurring run of the pipeline with these settings. KFP cannot update a
    recurring run in place (kfp#3789), so: the same settings already scheduled -> nothing is
    created; otherwise the new recurring run is created first (no gap in the schedule). Either
    way the older ones of that name are retired (`_retire`)."""
    cron = kfp_cron(cron)
    if not name.strip():
        raise UserError("--name must not be empty: it is how later `schedule` calls find this recurring run")
    client = _client(host)
    values = arguments(cfg)
    with tempfile.TemporaryDirectory() as folder, _kfp_errors(host, f"schedule {name!r}"):
        package = Path(compile_pipeline(str(Path(folder, "pipeline.yaml")), cache)["output"])
        fingerprint = _fingerprint(package, cron, values, service_account)
        experiment_id = client.create_experiment(experiment).experiment_id  # gets it when it exists
        same_name = json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})
        existing = [r for r in _pages(client.list_recurring_runs, "recurring_runs", experiment_id=experiment_id,
                                      filter=same_name) if r.display_name == name]
        current = next((r for r in existing if r.description == f"{MANAGED} {fingerprint}"), None)
        if current is None:
            current = client.create_recurring_run(
                experiment_id, job_name=name, description=f"{MANAGED} {fingerprint}", cron_expression=cron,
                max_concurrency=1, no_catchup=True, params=values, pipeline_package_path=str(package),
                service_account=service_account)
            action = "replaced" if existing else "created"
        else:
            if current.status == "DISABLED":
                client.enable_recurring_run(current.recurring_run_id)
            action = "unchanged"
        older = [r for r in existing if r.recurring_run_id != current.recurring_run_id]
        runs = _pages(client.list_runs, "runs", experiment_id=experiment_id) if older else []
        retired = [_retire(client, r, runs) for r in older]
    return {"name": name, "action": action, "recurring_run_id": current.recurring_run_id, "cron": cron,
            "experiment": experiment, "fingerprint": fingerprint, "retired": retired, "host": host,
            "arguments": values}
