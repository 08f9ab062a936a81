"""Storage: one small layer for paths that are local or `s3://bucket/key`.

Every output goes through `write_bytes`, which never leaves a half-written file for a reader:
locally it writes a temporary file and renames it; on S3 a PUT is atomic per object. Steps
that write several files write their manifest last, so a folder with a manifest is complete.
Two processes making the same local output take turns (`exclusive`).

S3 is reached through boto3; the endpoint comes from `AWS_ENDPOINT_URL` or
`MLFLOW_S3_ENDPOINT_URL` (MinIO, moto, or a cluster's own store). While the endpoint cannot be
reached (a restarting MinIO, a network blip) every request is retried with backoff for up to
`TL_S3_OUTAGE_SECONDS` (default 60), then fails with one clear error; an endpoint that takes a
connection and never answers fails after that plus one read timeout (`TL_S3_READ_TIMEOUT_SECONDS`,
default 60).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
import time
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from tl_core.errors import UserError

# The process's umask, read once as the module loads (reading it means setting it for a moment).
UMASK = os.umask(0o022)
os.umask(UMASK)


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def join(base: str, *parts: str) -> str:
    if is_s3(base):
        return "/".join([str(base).rstrip("/"), *[p.strip("/") for p in parts]])
    return str(Path(base, *parts))


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise UserError(f"{uri!r} has no bucket name: write s3://BUCKET/PREFIX")
    return bucket, key


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None


S3_READ_TIMEOUT_SECONDS = 60.0  # how long one answer is waited for; TL_S3_READ_TIMEOUT_SECONDS overrides


@lru_cache(maxsize=4)
def _s3_client(endpoint: str | None, read_timeout: float):
    import boto3
    from botocore.config import Config

    # One attempt a call: _s3_call retries for as long as TL_S3_OUTAGE_SECONDS allows. With boto3's
    # own retries on top, an endpoint that accepts connections and never answers held each call for
    # three read timeouts (180 s), whatever the outage setting said.
    config = Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=5, read_timeout=read_timeout)
    return boto3.client("s3", endpoint_url=endpoint, config=config)


def s3_client():
    return _s3_client(s3_endpoint(), float(os.environ.get("TL_S3_READ_TIMEOUT_SECONDS", S3_READ_TIMEOUT_SECONDS)))


S3_OUTAGE_SECONDS = 60.0  # how long an unreachable endpoint is waited for; TL_S3_OUTAGE_SECONDS overrides
# Answers of a store that is up but cannot serve yet (MinIO starting, S3 throttling): worth waiting for.
_BUSY = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout"}


def outage_seconds() -> float:
    return float(os.environ.get("TL_S3_OUTAGE_SECONDS", S3_OUTAGE_SECONDS))


def _unreachable(err: Exception) -> bool:
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    if isinstance(err, ClientError):
        return err.response.get("Error", {}).get("Code") in _BUSY
    return isinstance(err, (ConnectionError, HTTPClientError))  # refused, reset, timed out, cut mid-body


def _s3_call(uri: str, request):
    """`request()` against S3; while the endpoint is unreachable or silent, again after 0.5, 1, 2, 4,
    8, 8... s until `outage_seconds()` have passed, then a UserError naming the endpoint: at most
    that plus one read timeout in all. This loop is the only retry (boto3 makes one attempt)."""
    deadline = time.monotonic() + outage_seconds()
    pause = 0.5
    while True:
        try:
            return request()
        except Exception as err:
            if not _unreachable(err):
                raise _s3_error(uri, err) from err
            if time.monotonic() + pause > deadline:
                raise UserError(
                    f"cannot reach {uri}: the S3 endpoint {s3_endpoint() or '(AWS)'} did not answer for "
                    f"{outage_seconds():.0f} s ({err.__class__.__name__}); start it or fix AWS_ENDPOINT_URL, then run "
                    "again (TL_S3_OUTAGE_SECONDS sets how long to wait)") from err
            time.sleep(pause)
            pause = min(2 * pause, 8.0)


def _s3_error(uri: str, err: Exception) -> UserError:
    return UserError(
        f"cannot reach {uri}: {err.__class__.__name__}: {err}. Check the bucket name, the credentials "
        f"(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) and the endpoint (AWS_ENDPOINT_URL, now {s3_endpoint()!r})"
    )


def exists(uri: str) -> bool:
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)

        def head() -> bool:
            try:
                s3_client().head_object(Bucket=bucket, Key=key)
                return True
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise

        return _s3_call(uri, head)
    return Path(uri).exists()


def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return _s3_call(uri, lambda: s3_client().get_object(Bucket=bucket, Key=key)["Body"].read())
    path = Path(uri)
    if not path.is_file():
        raise UserError(f"{uri} does not exist: check the path")
    return path.read_bytes()


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically: a reader sees the old file or the new one, never half of it."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        _s3_call(uri, lambda: s3_client().put_object(Bucket=bucket, Key=key, Body=data))
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp's file is private (0600); the written one is as any other
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def list_files(uri: str) -> list[str]:
    """All files below a folder or prefix, as relative paths, sorted."""
    if is_s3(uri):
        bucket, prefix = split_s3(uri)
        prefix = prefix.rstrip("/") + "/" if prefix else ""

        def listing() -> list[str]:
            pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            return [obj["Key"][len(prefix) :] for page in pages for obj in page.get("Contents", [])]

        keys = _s3_call(uri, listing)
        return sorted(k for k in keys if k and not k.endswith("/"))
    root = Path(uri)
    if not root.is_dir():
        raise UserError(f"{uri} is not a folder: check the path")
    # Links to folders are followed (an image folder whose class folders link to where the images
    # are), each real folder once: a second way into one is a loop or a duplicate, refused by name.
    files, seen = [], {}
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            raise UserError(f"{uri}: {folder} leads to {real}, which {seen[real]} leads to as well (a symlink loop or "
                            "a folder linked twice); remove one of the links")
        seen[real] = folder
        subfolders.sort()
        files += [os.path.relpath(os.path.join(folder, n), root) for n in names if os.path.isfile(os.path.join(folder, n))]
    return sorted(files)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextmanager
def exclusive(uri: str):
    """Hold an exclusive lock on the output `uri` among this machine's processes (flock on a hidden
    `.NAME.lock` beside it): a second identical run waits here for the first, then finds its
    result. s3:// has no locks: there each write is atomic and the last complete one stands."""
    if is_s3(uri):
        yield
        return
    path = Path(uri.rstrip("/"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        yield
