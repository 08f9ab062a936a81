"""`tl serve NAME`: the model an alias of NAME points to (`models:/NAME@champion`), served over
HTTP as a Ray Serve application, on a local Ray or the cluster in `RAY_ADDRESS`.

    POST /predict  {"image": "<base64 of a PNG or JPEG file>"}   or   {"text": "a sentence"}
                   -> {"class": "7", "probabilities": {"0": 0.001, ...}, "model": "digits", "version": 3}
    GET  /healthz  -> {"status": "ok", "model": ..., "version": ...}
    GET  /version  -> the version served, its checkpoint's sha256, what it takes, versions refused

Bad requests (not JSON, not an object, an empty or oversized body, no or two inputs, not base64,
not an image, an image of the wrong modality, a text sent to an image model) answer 4xx with a
JSON `error`; the replica stays up.

Requests are batched by `@serve.batch` (`max_batch_size`, `batch_wait_s`): each request's input
is decoded and prepared on its own (a bad one fails alone), then one forward pass answers the
batch. Every replica follows the alias: a thread looks it up every `poll_s` seconds and, when it
has moved (`tl promote`, `tl rollback`), loads the new version beside the one serving, checks it
(the sha256 digest inside the checkpoint, and its bytes against the version's
`tl.checkpoint_sha256` tag) and swaps it in with one assignment. Requests in flight finish on the
version they started with and the answer names the version that answered: none fails during a
switch. A version that fails its check is refused and logged, and the old one keeps serving; it
is tried again only once the alias has moved elsewhere and back. A version that cannot be fetched
(MLflow down) is tried again at the next look.

The settings are `tl_core.config.ServeConfig`. Those a running replica can change (the model, the
alias, batching, polling, the body limit) are the deployment's `user_config`, applied in
`reconfigure`. `build_app` is the application builder for Serve's config files and KubeRay's
RayService (`import_path: tl_core.serving:build_app`, `args:` the ServeConfig fields).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
import re
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from tl_core.config import ServeConfig, validate
from tl_core.errors import UserError

logger = logging.getLogger("ray.serve")  # a replica's logger: its log file, and the driver's console

APP_NAME = "tl-serve"
RELOADED = ("name", "alias", "max_batch_size", "batch_wait_s", "poll_s", "max_body_bytes")
MAX_IMAGE_SIDE = 4096  # pixels; a few bytes of PNG may claim a huge image (a decompression bomb)
PREDICT_PATHS = ("/", "/predict")
# Serve's own logs: warnings and errors (a switch, a refusal), no line per request (an access log
# line for each request costs throughput and floods the console).
LOGGING = {"log_level": "WARNING", "enable_access_log": False}


class BadRequest(Exception):
    """A request the client must change: answered with `status` and {"error": message}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


# -- a version, loaded and checked -----------------------------------------------------------


class Unavailable(Exception):
    """A version that could not be fetched (the registry or its store down): try again later."""


class Served:
    """One registered version ready to answer: the registered pyfunc's own classifier (the same
    preparation as `mlflow.pyfunc.load_model(...).predict`) over its checked checkpoint."""

    def __init__(self, name: str, version: int, classifier, sha256: str):
        self.name, self.version, self.classifier, self.sha256 = name, version, classifier, sha256
        self.loaded_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    @property
    def modality(self) -> str:
        return "text" if self.classifier.takes_text else "image"

    @property
    def classes(self) -> list[str]:
        return self.classifier.classes

    def prepare(self, kind: str, value):
        """One request's input as the model takes it (a 1-row tensor); BadRequest when it cannot be."""
        if kind != self.modality:
            example = '{"image": "<base64 of a PNG or JPEG file>"}' if self.modality == "image" else '{"text": "..."}'
            raise BadRequest(400, f"{self.name} version {self.version} classifies {self.modality}s, not "
                                  f"{kind}s: send {example}")
        if kind == "image":
            check_image_size(value)
        try:
            return self.classifier.prepare([value])
        except UserError as err:
            raise BadRequest(400, str(err)) from None
        except Exception as err:  # noqa: BLE001 - it parsed, so what the model cannot take is the input's doing
            logger.warning("tl serve: an input the model could not take: %r", err)
            raise BadRequest(400, f"the {kind} could not be read ({err.__class__.__name__}: {str(err)[:200]})") from None

    def describe(self) -> dict:
        return {"model": self.name, "version": self.version, "input": self.modality, "classes": self.classes,
                "checkpoint_sha256": self.sha256, "loaded_at": self.loaded_at}


def check_image_size(data: bytes) -> None:
    from tl_core.data.sources import _image_header

    try:
        _, height, width = _image_header(data, "in the request")
    except UserError as err:
        raise BadRequest(400, str(err)) from None
    if max(height, width) > MAX_IMAGE_SIDE:
        raise BadRequest(400, f"the image is {width} x {height} pixels; send one of at most {MAX_IMAGE_SIDE} a side")


def load_version(name: str, version: int, expected_sha256: str | None) -> Served:
    """Fetch version `version` of `name` and check it: Unavailable if it cannot be fetched, UserError
    if its checkpoint fails its integrity check (then it must never serve)."""
    from tl_core import storage
    from tl_core.checkpoints import checkpoint_from_bytes, read_checkpoint_bytes
    from tl_core.pyfunc_model import ClassifierModel

    uri = f"models:/{name}/{version}"
    try:
        data = read_checkpoint_bytes(uri)
    except UserError as err:
        raise Unavailable(str(err)) from None
    digest = storage.sha256_bytes(data)
    if expected_sha256 and digest != expected_sha256:
        raise UserError(f"checkpoint {uri} is corrupt: its sha256 {digest[:12]}... is not the "
                        f"{expected_sha256[:12]}... registered with the version (tag tl.checkpoint_sha256)")
    ckpt = checkpoint_from_bytes(data, uri)  # the digest inside it, and a whole tl checkpoint
    return Served(name, int(version), ClassifierModel().use_checkpoint(ckpt, uri), digest)


# -- requests ---------------------------------------------------------------------------------


def parse_body(body: bytes) -> tuple[str, object]:
    """A request body -> ("image", file bytes) or ("text", str); BadRequest otherwise."""
    usage = 'send JSON {"image": "<base64 of a PNG or JPEG file>"} or {"text": "..."}'
    if not body.strip():
        raise BadRequest(400, f"the request has no body: {usage}")
    try:
        doc = json.loads(body)
    except UnicodeDecodeError:
        raise BadRequest(400, f"the body is not UTF-8 text: {usage}") from None
    except json.JSONDecodeError as err:
        raise BadRequest(400, f"the body is not JSON ({err.msg} at line {err.lineno} column {err.colno}): {usage}") from None
    except RecursionError:
        raise BadRequest(400, f"the body nests too deeply to be a request: {usage}") from None
    if not isinstance(doc, dict):
        raise BadRequest(400, f"the body is a JSON {type(doc).__name__}, not an object: {usage}")
    unknown = sorted(set(doc) - {"image", "text"})
    if unknown:
        raise BadRequest(400, f"unknown field(s) {', '.join(map(repr, unknown))[:200]}: {usage}")
    if len(doc) != 1:
        raise BadRequest(400, f"the body names no input, or both an image and a text: {usage}")
    (kind, value), = doc.items()
    if not isinstance(value, str):
        raise BadRequest(400, f"{kind!r} must be a string, not a JSON {type(value).__name__}: {usage}")
    if kind == "text":
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest(400, "'text' is not valid Unicode (it holds a lone surrogate, \\ud800-\\udfff)") from None
        return kind, value
    try:
        data = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(400, "'image' is not base64: send the bytes of a PNG or JPEG file in base64") from None
    if not data:
        raise BadRequest(400, "'image' is empty: send the bytes of a PNG or JPEG file in base64")
    return kind, data


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it passes `limit` bytes: never held whole beyond it."""
    length = request.headers.get("content-length", "")
    too_large = f"the body is larger than {limit} bytes (max_body_bytes): send one smaller image or text"
    if length.isdigit() and int(length) > limit:
        raise BadRequest(413, too_large)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, too_large)
        chunks.append(chunk)
    return b"".join(chunks)


def answer(served: Served, probs) -> dict:
    best = int(probs.argmax())
    return {"class": served.classes[best],
            "probabilities": {name: round(float(p), 6) for name, p in zip(served.classes, probs)},
            "model": served.name, "version": served.version}


def forward(items: list) -> list:
    """One forward pass per version in the batch (one, but for a batch formed during a switch)."""
    import torch

    out: list = [None] * len(items)
    groups: dict[int, list[int]] = {}
    for i, (served, _) in enumerate(items):
        groups.setdefault(id(served), []).append(i)
    for indices in groups.values():
        served = items[indices[0]][0]
        probs = served.classifier.probabilities(torch.cat([items[i][1] for i in indices]))
        for row, i in enumerate(indices):
            out[i] = answer(served, probs[row])
    return out


# -- the deployment ---------------------------------------------------------------------------


@serve.deployment(name="model", max_ongoing_requests=256, ray_actor_options={"num_cpus": 1},
                  health_check_period_s=5, logging_config=LOGGING)
class ModelServer:
    """A replica: answers requests with the version the alias points to, and follows the alias."""

    def __init__(self):
        self.settings: ServeConfig | None = None
        self.tracking_uri: str | None = None
        self.served: Served | None = None
        self.refused: dict[int, str] = {}  # version -> why (the version the alias points to, if refused)
        self.unavailable = ""  # why the last look failed, if it did
        self._lock = threading.Lock()  # one look (and load) at a time: the follower's or reconfigure's
        self._forward_pool = ThreadPoolExecutor(1, thread_name_prefix="forward")  # torch, one batch at a time
        self._stop = threading.Event()
        self._follower: threading.Thread | None = None

    # Settings: the user_config, on start and whenever it changes on the running application.
    def reconfigure(self, config: dict) -> None:
        config = dict(config)
        tracking_uri = config.pop("tracking_uri", None) or os.environ.get("MLFLOW_TRACKING_URI")
        settings = ServeConfig(**config)  # raises on a bad setting: Serve reports the failed update
        previous = self.settings
        self.settings, self.tracking_uri = settings, tracking_uri
        self.batch.set_max_batch_size(settings.max_batch_size)
        self.batch.set_batch_wait_timeout_s(settings.batch_wait_s)
        if previous is None or (previous.name, previous.alias) != (settings.name, settings.alias):
            kept = self.served, self.refused
            self.served, self.refused = None, {}
            self.look()  # the model it now names, before any request
            if self.served is None:
                why = next(iter(self.refused.values()), None) or self.unavailable
                if previous is not None:  # the update fails; the model serving goes on
                    self.settings, (self.served, self.refused) = previous, kept
                raise RuntimeError(f"cannot serve models:/{settings.name}@{settings.alias}: {why}")
        if self._follower is None:
            self._follower = threading.Thread(target=self._follow, name="follow-alias", daemon=True)
            self._follower.start()
        logger.info("tl serve settings: %s", settings.model_dump(include=set(RELOADED)))

    def _client(self):
        import mlflow
        from mlflow import MlflowClient

        from tl_core import tracking

        if self.tracking_uri:
            os.environ["MLFLOW_TRACKING_URI"] = self.tracking_uri
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar on every version fetched
        tracking._bounded_retries()
        mlflow.set_tracking_uri(self.tracking_uri or mlflow.get_tracking_uri())
        return MlflowClient()

    def look(self) -> None:
        """Where does the alias point? Load and check that version if it is new; never raises."""
        with self._lock:
            name, alias = self.settings.name, self.settings.alias
            try:
                target = self._client().get_model_version_by_alias(name, alias)
            except Exception as err:  # the registry is down or the alias is gone: keep serving
                self._unavailable(f"cannot look up models:/{name}@{alias} ({err.__class__.__name__}: "
                                  f"{str(err).splitlines()[0][:200] if str(err) else ''})")
                return
            version = int(target.version)
            self.refused = {v: why for v, why in self.refused.items() if v == version}  # moved away: forgotten
            if (self.served is not None and self.served.version == version) or version in self.refused:
                self.unavailable = ""
                return
            started = time.perf_counter()
            try:
                served = load_version(name, version, target.tags.get("tl.checkpoint_sha256"))
            except Unavailable as err:
                self._unavailable(f"cannot fetch version {version} of {name}: {err}")
                return
            except Exception as err:  # failed its integrity check, or no tl classifier: never served
                self.refused[version] = str(err)
                keeps = f"version {self.served.version} keeps serving" if self.served else "nothing to serve"
                logger.error("tl serve REFUSED version %s of %s (models:/%s@%s): %s; %s", version, name, name,
                             alias, err, keeps)
                return
            previous, self.served, self.unavailable = self.served, served, ""
            logger.warning("tl serve: now serving version %s of %s (models:/%s@%s; was %s), loaded in %.2f s",
                           version, name, name, alias, previous.version if previous else "none",
                           time.perf_counter() - started)

    def _unavailable(self, why: str) -> None:
        if why != self.unavailable:
            logger.warning("tl serve: %s; %s", why,
                           f"version {self.served.version} keeps serving" if self.served else "nothing to serve yet")
        self.unavailable = why

    def _follow(self) -> None:
        while not self._stop.wait(self.settings.poll_s):
            self.look()

    def check_health(self) -> None:  # Serve's health check: a replica without a model is restarted
        if self.served is None or self._follower is None or not self._follower.is_alive():
            raise RuntimeError("no model loaded, or the alias follower stopped")

    def __del__(self):
        self._stop.set()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def batch(self, items: list) -> list:
        return await asyncio.get_running_loop().run_in_executor(self._forward_pool, forward, items)

    def status(self) -> dict:
        out = self.served.describe() if self.served else {"model": self.settings.name, "version": None}
        out.update(alias=self.settings.alias,
                   refused=[{"version": v, "reason": why} for v, why in self.refused.items()],
                   registry_problem=self.unavailable or None)
        return out

    async def __call__(self, request: Request):
        path = request.url.path.rstrip("/") or "/"
        if self.served is None:  # only between a replica's start and its first model: Serve routes nothing then
            return error(503, "no model loaded yet: retry in a moment")
        try:
            if path in ("/healthz", "/version"):
                if request.method not in ("GET", "HEAD"):
                    raise BadRequest(405, f"{path} answers GET")
                if path == "/healthz":
                    return JSONResponse({"status": "ok", "model": self.served.name, "version": self.served.version})
                return JSONResponse(self.status())
            if path not in PREDICT_PATHS:
                raise BadRequest(404, f"no such path {path[:100]!r}: POST /predict, GET /healthz or GET /version")
            if request.method != "POST":
                raise BadRequest(405, 'POST a JSON body to /predict: {"image": "<base64>"} or {"text": "..."}')
            kind, value = parse_body(await read_body(request, self.settings.max_body_bytes))
            served = self.served  # this request's version, whatever the alias does meanwhile
            x = await asyncio.to_thread(served.prepare, kind, value)
            return JSONResponse(await self.batch((served, x)))
        except BadRequest as err:
            return error(err.status, str(err))


def application(cfg: ServeConfig, tracking_uri: str | None = None):
    """The application serving `cfg`, its replicas reading the registry at `tracking_uri`
    (default: their MLFLOW_TRACKING_URI)."""
    user_config = cfg.model_dump(include=set(RELOADED))
    user_config["tracking_uri"] = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return ModelServer.options(num_replicas=cfg.replicas, user_config=user_config).bind()


def build_app(args: dict):
    """The application builder of Serve's config files and KubeRay's RayService
    (`import_path: tl_core.serving:build_app`, `args:` ServeConfig's fields); the registry is the
    replicas' MLFLOW_TRACKING_URI (the pods' environment: k8s/serving/rayservice.yaml). The
    address the proxies listen on is the config's `http_options`, not an argument: `host` or
    `port` here would be ignored, so they are refused."""
    if not isinstance(args, ServeConfig):
        ignored = sorted({"host", "port"} & set(args))
        if ignored:
            raise ValueError(f"{' and '.join(ignored)} in the application's args would be ignored: set them "
                             "under http_options of the Serve config (the proxies' address)")
        args = validate(ServeConfig, dict(args))
    return application(args)


# -- tl serve ---------------------------------------------------------------------------------


def _alias_target(name: str, alias: str) -> int:
    """The version the alias points to, or one line saying what is missing."""
    from mlflow.exceptions import MlflowException

    from tl_core import registry

    client = registry._client()
    with registry._mlflow_errors(f"looking up models:/{name}@{alias}"):
        registry._registered_model(client, name)
        try:
            return int(client.get_model_version_by_alias(name, alias).version)
        except MlflowException as err:
            if registry._error_code(err) not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
    raise UserError(f"{name} has no alias {alias!r}: promote a version first (`tl promote --model {name} --data "
                    f"PREPARED`), or pass --alias")


def _port_free(host: str, port: int) -> None:
    with socket.socket() as s:
        # As the proxy binds (uvicorn): a listener refuses the port, but not the closed connections
        # a server stopped a moment ago leaves waiting (TIME_WAIT), which made a restart fail for a minute.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            raise UserError(f"cannot listen on {host}:{port} ({err.strerror}): pass another --port (or --host)") from None


def serve_forever(cfg: ServeConfig, on_ready=None, stop: threading.Event | None = None) -> dict:
    """Deploy the application, call `on_ready(summary)` once it answers, and serve until SIGTERM,
    SIGINT or `stop`; then take the application down (and a local Ray with it)."""
    import urllib.request

    from tl_core import tracking
    from tl_core.ray_cluster import init_ray, shutdown_local_ray

    tracking_uri = tracking.setup()  # the registry answers, or one line before anything starts
    version = _alias_target(cfg.name, cfg.alias)
    on_cluster = bool(os.environ.get("RAY_ADDRESS"))
    if not on_cluster:
        _port_free(cfg.host, cfg.port)
    stop = stop or threading.Event()
    started = time.perf_counter()
    # Serve's INFO lines here (started, connecting to it again, the application ready, deleted)
    # say what tl serve prints itself; Serve sets this logger's level as it is imported.
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    init_ray()
    # After ray.init, which installs a SIGTERM handler of its own: the application is taken down first.
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)} \
        if threading.current_thread() is threading.main_thread() else {}
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config=LOGGING)
        try:
            serve.run(application(cfg, tracking_uri), name=APP_NAME, route_prefix="/", logging_config=LOGGING)
        except Exception as err:  # a replica that could not start: its reason is in the message
            found = re.search(r"cannot serve models:/[^\n]*", str(err))
            reason = found.group(0) if found else " ".join(str(err).split())[-600:]
            raise UserError(f"the application did not start: {reason}") from None
        url = f"http://{'127.0.0.1' if cfg.host in ('0.0.0.0', '::') else cfg.host}:{cfg.port}"
        deadline = time.monotonic() + 60
        while True:  # the proxy answers a moment after the replicas are up
            try:
                with urllib.request.urlopen(f"{url}/version", timeout=5) as reply:
                    status = json.loads(reply.read())
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise UserError(f"the application runs but {url} does not answer: check --host/--port") from None
                time.sleep(0.3)
        summary = {"model": cfg.name, "alias": cfg.alias, "version": status.get("version", version), "url": url,
                   "predict": f"{url}/predict", "ray": os.environ.get("RAY_ADDRESS") or "local",
                   "replicas": cfg.replicas, "start_seconds": round(time.perf_counter() - started, 1)}
        if on_ready:
            on_ready(summary)
        while not stop.wait(0.5):
            pass
        return {**summary, "stopped": True}
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            # Its replicas drained and stopped. A local Ray then ends whole, Serve's controller and
            # proxies with it: serve.shutdown() there only raced its own ray.kill of the controller
            # (a "(raylet) Task ServeController.graceful_shutdown failed" line on the way out).
            serve.delete(APP_NAME)
        except Exception:  # noqa: BLE001 - on the way out, a Ray already gone is fine
            pass
        if not on_cluster:
            shutdown_local_ray()
