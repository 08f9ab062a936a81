"""What tests/test_serving.py and bench/serving.py share: the servers they start (`tl serve`,
`mlflow models serve`), always stopped with everything they started; one HTTP client for both
servers; the malformed requests of the fuzz; and a load of concurrent clients."""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import random
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.servers import BIN, wait_http


def png_bytes(image, fmt: str = "PNG") -> bytes:
    """An image (H x W or C x H x W uint8) as a PNG (or JPEG) file."""
    import numpy as np
    from PIL import Image

    arr = np.asarray(image)
    if arr.ndim == 3:
        arr = arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- the servers ---------------------------------------------------------------------------------


def group_alive(pgid: int) -> list[str]:
    """The processes still in process group `pgid` (ps lines)."""
    out = subprocess.run(["ps", "-o", "pid=,args=", "-g", str(pgid)], capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def end_group(proc: subprocess.Popen, grace: float = 60) -> list[str]:
    """SIGTERM the process (it takes its application down), then SIGKILL whatever of its group is
    left; returns the processes that were still there after the grace period (ideally none)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + 10
    while group_alive(proc.pid) and time.monotonic() < deadline:  # Ray's own processes follow their driver
        time.sleep(0.5)
    left = group_alive(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
    return left


@dataclass
class Running:
    proc: subprocess.Popen
    url: str
    log: Path
    left_behind: list = field(default_factory=list)  # filled when it has been stopped

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def serve_env(extra: dict | None = None) -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_WAIT_POLICY": "PASSIVE", **(extra or {})}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # mlflow models serve runs `uvicorn` from the PATH
    env.pop("RAY_ADDRESS", None)
    return env


@contextlib.contextmanager
def tl_serve(name: str, port: int, log: Path, *flags, env: dict | None = None, start_seconds: float = 300):
    """`tl serve NAME --port PORT ...` in a process group of its own, until the `with` ends (also
    on failure): SIGTERM, then SIGKILL of the whole group."""
    out = open(log, "wb")
    proc = subprocess.Popen([str(BIN / "tl"), "serve", name, "--port", str(port), *map(str, flags)], stdout=out,
                            stderr=subprocess.STDOUT, env=env or serve_env(), start_new_session=True)
    running = Running(proc, f"http://127.0.0.1:{port}", log)
    try:
        wait_http(f"{running.url}/healthz", start_seconds, proc)
        yield running
    finally:
        running.left_behind = end_group(proc)
        out.close()


@contextlib.contextmanager
def mlflow_models_serve(model_uri: str, port: int, log: Path, env: dict | None = None, start_seconds: float = 180):
    """`mlflow models serve -m URI --env-manager local` on 127.0.0.1:PORT, stopped the same way."""
    out = open(log, "wb")
    proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT,
                            env=env or serve_env(), start_new_session=True)
    running = Running(proc, f"http://127.0.0.1:{port}", log)
    try:
        wait_http(f"{running.url}/ping", start_seconds, proc)
        yield running
    finally:
        running.left_behind = end_group(proc)
        out.close()


# -- the client ----------------------------------------------------------------------------------


class Client:
    """One keep-alive HTTP connection (a client as a load generator or a service would hold it);
    reconnects after the server closed it."""

    def __init__(self, url: str, timeout: float = 60):
        host_port = url.split("://", 1)[1].split("/", 1)[0]
        self.host, self.port = host_port.rsplit(":", 1)
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None) -> tuple[int, bytes]:
        """(status, body); status 0 when the connection failed (which counts as a failed request)."""
        headers = {"Content-Type": "application/json", **(headers or {})}
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, int(self.port), timeout=self.timeout)
            try:
                self.conn.request(method, path, body=body, headers=headers)
                reply = self.conn.getresponse()
                data = reply.read()
                if reply.will_close:
                    self.close()
                return reply.status, data
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as err:
                self.close()
                # A kept-alive connection the server had closed between two requests: once more on a
                # new one. A failure on a fresh connection is the answer.
                if attempt or not isinstance(err, http.client.RemoteDisconnected):
                    return 0, repr(err).encode()
            except OSError as err:
                self.close()
                return 0, repr(err).encode()
        return 0, b"unreachable"

    def post_json(self, path: str, doc) -> tuple[int, dict | None]:
        status, data = self.request("POST", path, json.dumps(doc).encode())
        try:
            return status, json.loads(data)
        except ValueError:
            return status, None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


# -- the fuzz ------------------------------------------------------------------------------------


@dataclass
class Bad:
    name: str
    body: bytes | None
    method: str = "POST"
    path: str = "/predict"
    headers: dict = field(default_factory=dict)


def malformed_requests(png: bytes, max_body_bytes: int, seed: int = 0, random_cases: int = 80) -> list[Bad]:
    """Requests `tl serve` must refuse with a 4xx and a JSON error, on an image model: the named
    classes, then seeded mutations of a valid request (bytes flipped, cut, inserted; keys and
    values swapped) that are no longer a valid request."""
    import struct
    import zlib

    valid = b64(png)

    def png_claiming(width: int, height: int) -> bytes:  # a PNG header claiming a huge image
        ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
        chunk = b"IHDR" + ihdr
        return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
                + struct.pack(">I", zlib.crc32(chunk)) + b"\x00\x00\x00\x00IEND\xaeB`\x82")

    cases = [
        Bad("empty body", b""),
        Bad("whitespace body", b"  \n "),
        Bad("no body at all", None),
        Bad("not JSON", b"image=abc"),
        Bad("truncated JSON", b'{"image": "' + valid[:20].encode()),
        Bad("JSON with a trailing comma", b'{"image": "abc",}'),
        Bad("single quotes", b"{'image': 'abc'}"),
        Bad("not UTF-8", b'{"text": "\xff\xfe\xfa"}'),
        Bad("UTF-16 JSON", '{"image": "abc"}'.encode("utf-16")),
        Bad("a JSON list", json.dumps([valid]).encode()),
        Bad("a JSON string", json.dumps(valid).encode()),
        Bad("a JSON number", b"42"),
        Bad("JSON null", b"null"),
        Bad("JSON true", b"true"),
        Bad("an empty object", b"{}"),
        Bad("unknown key", json.dumps({"img": valid}).encode()),
        Bad("MLflow's request to tl serve", json.dumps({"inputs": [valid]}).encode()),
        Bad("both image and text", json.dumps({"image": valid, "text": "a"}).encode()),
        Bad("image and an extra key", json.dumps({"image": valid, "extra": 1}).encode()),
        Bad("image is null", b'{"image": null}'),
        Bad("image is a number", b'{"image": 12}'),
        Bad("image is a list", json.dumps({"image": [valid]}).encode()),
        Bad("image is an object", json.dumps({"image": {"b64": valid}}).encode()),
        Bad("image is an empty string", b'{"image": ""}'),
        Bad("image is not base64", b'{"image": "not base64 at all!"}'),
        Bad("image base64 with bad padding", json.dumps({"image": valid[:-2] + "="}).encode()),
        Bad("image base64url alphabet", json.dumps({"image": valid.replace("+", "-").replace("/", "_") + "-_"}).encode()),
        Bad("base64 of text", json.dumps({"image": b64(b"hello, this is not an image")}).encode()),
        Bad("base64 of zero bytes", json.dumps({"image": b64(b"\0" * 64)}).encode()),
        Bad("a truncated PNG", json.dumps({"image": b64(png[: len(png) // 2])}).encode()),
        Bad("a PNG header only", json.dumps({"image": b64(png[:8])}).encode()),
        Bad("a PNG claiming 100000 x 100000", json.dumps({"image": b64(png_claiming(100000, 100000))}).encode()),
        Bad("a PNG claiming 5000 x 1", json.dumps({"image": b64(png_claiming(5000, 1))}).encode()),
        Bad("a JPEG header only", json.dumps({"image": b64(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00")}).encode()),
        Bad("a GIF header only", json.dumps({"image": b64(b"GIF89a\x01\x00")}).encode()),
        Bad("a text to an image model", b'{"text": "a sentence"}'),
        Bad("an empty text to an image model", b'{"text": ""}'),
        Bad("text is a number", b'{"text": 3}'),
        Bad("text with a lone surrogate", b'{"text": "\\ud800"}'),
        Bad("deeply nested lists", b'{"image": ' + b"[" * 100000 + b"]" * 100000 + b"}"),
        Bad("deeply nested objects", b'{"image": ' + b'{"a":' * 50000 + b"1" + b"}" * 50000 + b"}"),
        Bad("a body over max_body_bytes", json.dumps({"image": "A" * (max_body_bytes + 10)}).encode()),
        Bad("a body over max_body_bytes by one byte", b" " * (max_body_bytes + 1)),
        Bad("GET /predict", None, method="GET"),
        Bad("PUT /predict", json.dumps({"image": valid}).encode(), method="PUT"),
        Bad("DELETE /predict", None, method="DELETE"),
        Bad("POST /healthz", b"{}", path="/healthz"),
        Bad("POST /version", b"{}", path="/version"),
        Bad("unknown path", json.dumps({"image": valid}).encode(), path="/predictions"),
        Bad("path traversal", b"{}", path="/../../etc/passwd"),
        Bad("a very long path", b"{}", path="/" + "a" * 4000),
        Bad("a form body", b"image=" + valid.encode(), headers={"Content-Type": "application/x-www-form-urlencoded"}),
        Bad("binary PNG as the body", png, headers={"Content-Type": "image/png"}),
        Bad("NaN literal", b'{"image": NaN}'),
        Bad("a duplicate key, the last not a string", json.dumps({"image": valid}).encode()[:-1] + b', "image": 1}'),
    ]
    rng = random.Random(seed)
    base = json.dumps({"image": valid}).encode()
    made = 0
    while made < random_cases:
        body = bytearray(base)
        kind = rng.choice(["flip", "cut", "insert", "swap-key", "swap-value"])
        if kind == "flip":  # a byte of the JSON frame (not inside the base64 value, which would stay valid JSON)
            i = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, len(body) - 2, len(body) - 1])
            body[i] = rng.choice(b'{}[]":, \\\x00\xff')
        elif kind == "cut":
            body = body[: rng.randrange(0, len(body) - 1)]
        elif kind == "insert":
            i = rng.randrange(11, len(body) - 2)  # inside the base64: an illegal character
            body[i:i] = rng.choice([b"!", b"*", b"\xc3\xa9", b"\\u0000", b" ", b"%", b"#"])
        elif kind == "swap-key":
            body = bytearray(json.dumps({rng.choice(["Image", "images", "IMAGE", "", "image ", "data"]): valid}).encode())
        else:
            value = rng.choice([b64(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))),
                                valid[: rng.randrange(4, len(valid) - 4) // 4 * 4], "=" * rng.randrange(1, 8)])
            body = bytearray(json.dumps({"image": value}).encode())
        if bytes(body) == base:
            continue
        try:  # a mutation that is still a valid request is no bad request: skip it
            doc = json.loads(bytes(body))
            if isinstance(doc, dict) and list(doc) == ["image"] and isinstance(doc["image"], str):
                raw = base64.b64decode(doc["image"].strip(), validate=True)
                from PIL import Image

                with Image.open(io.BytesIO(raw)) as img:
                    img.load()
                continue
        except Exception:  # noqa: BLE001 - not a valid request: a case
            pass
        cases.append(Bad(f"mutation {made} ({kind})", bytes(body)))
        made += 1
    return cases


# -- load ----------------------------------------------------------------------------------------


@dataclass
class Result:
    status: int
    version: int | None
    start: float
    seconds: float
    error: str = ""


def load(url: str, path: str, body_of, clients: int, seconds: float | None = None, requests: int | None = None,
         stop: threading.Event | None = None, version_of=None) -> list[Result]:
    """`clients` threads, each with one keep-alive connection, sending `body_of(i)` in a loop for
    `seconds` (or `requests` in all, or until `stop`). Every answer is recorded: status, the version
    that answered (`version_of(reply_json)`), when it started and how long it took."""
    results: list[Result] = []
    lock = threading.Lock()
    counter = iter(range(10**9))
    deadline = time.perf_counter() + seconds if seconds else None
    stop = stop or threading.Event()

    def worker() -> None:
        client = Client(url)
        mine = []
        while not stop.is_set():
            i = next(counter)
            if requests is not None and i >= requests:
                break
            if deadline is not None and time.perf_counter() > deadline:
                break
            started = time.perf_counter()
            status, data = client.request("POST", path, body_of(i))
            took = time.perf_counter() - started
            version, problem = None, ""
            if status == 200:
                try:
                    version = version_of(json.loads(data)) if version_of else None
                except Exception as err:  # noqa: BLE001 - a 200 that is not an answer is a failure
                    status, problem = -1, f"not an answer: {err!r} {data[:200]!r}"
            else:
                problem = data[:300].decode(errors="replace")
            mine.append(Result(status, version, started, took, problem))
        client.close()
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(results, key=lambda r: r.start)


def summarise(results: list[Result], wall: float) -> dict:
    import numpy as np

    ok = [r.seconds for r in results if r.status == 200]
    return {"requests": len(results), "failed": sum(r.status != 200 for r in results),
            "req_per_s": round(len(ok) / wall, 1) if wall else None,
            "p50_ms": round(1000 * float(np.percentile(ok, 50)), 2) if ok else None,
            "p99_ms": round(1000 * float(np.percentile(ok, 99)), 2) if ok else None}


class AliasWatch:
    """Polls where `name@alias` points (every `every` s) in a thread, to time a switch from the
    moment the alias moved: that moment lies after the start of the last look that still saw the
    old version, which is what `moved_to` returns (so a delay measured from it is an upper bound)."""

    def __init__(self, name: str, alias: str = "champion", every: float = 0.05):
        from mlflow import MlflowClient

        self.client, self.name, self.alias, self.every = MlflowClient(), name, alias, every
        self.looks: list[tuple[float, int | None]] = []  # (when the look started, the version seen)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                version = int(self.client.get_model_version_by_alias(self.name, self.alias).version)
            except Exception:  # noqa: BLE001 - a failed look says nothing
                version = None
            self.looks.append((started, version))
            self._stop.wait(self.every)

    def moved_to(self, version: int, since: float) -> float | None:
        """The start of the last look after `since` that saw another version before one saw `version`."""
        last_other = since
        for started, seen in list(self.looks):
            if started < since or seen is None:
                continue
            if seen == version:
                return last_other
            last_other = started
        return None

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
