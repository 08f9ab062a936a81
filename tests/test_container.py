"""The image, for real (issue 15): built from k8s/Dockerfile, every pipeline step run in it.

Needs a Docker daemon (`bash ../shared/tools/container-env.sh` installs and starts one here, and
makes the local stand-in base image). Where there is none, these tests are skipped with the
reason; the image is built once when it is missing (about 8 minutes cold) and reused after.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMAGE = os.environ.get("TL_TEST_IMAGE", "tl-core:dev")
BASE = os.environ.get("TL_TEST_BASE_IMAGE", "tl-local/python:3.11-bookworm")

pytestmark = [pytest.mark.slow, pytest.mark.container]


def docker(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def image() -> str:
    if shutil.which("docker") is None:
        pytest.skip("no docker client on this machine")
    if docker("info").returncode != 0:
        pytest.skip("no Docker daemon running: `bash ../shared/tools/container-env.sh` starts one here")
    if docker("image", "inspect", IMAGE).returncode != 0:
        if docker("image", "inspect", BASE).returncode != 0:
            pytest.skip(f"neither {IMAGE} nor the base image {BASE} is here: run ../shared/tools/container-env.sh")
        built = docker("build", "--network", "host", "--build-arg", f"PYTHON_IMAGE={BASE}", "-f", "k8s/Dockerfile",
                       "-t", IMAGE, ".", cwd=ROOT, timeout=1800)
        assert built.returncode == 0, built.stderr[-3000:]
    return IMAGE


def test_the_image_runs_tl_as_uid_1000_with_a_consistent_environment(image):
    uid = docker("run", "--rm", "--network", "host", "--entrypoint", "id", image, "-u")
    assert uid.stdout.strip() == "1000"
    check = docker("run", "--rm", "--network", "host", "--entrypoint", "pip", image, "check")
    assert check.returncode == 0, check.stdout + check.stderr
    # No compiler and no pip cache in the runtime stage.
    leftovers = docker("run", "--rm", "--network", "host", "--entrypoint", "sh", image, "-c",
                       "command -v gcc cc; ls /home/tl/.cache/pip /root/.cache/pip 2>/dev/null")
    assert leftovers.stdout.strip() == ""
    # The image runs what the tests run: the same lock.
    freeze = docker("run", "--rm", "--network", "host", "--entrypoint", "pip", image, "freeze", "--all")
    locked = {line for line in (ROOT / "locks" / "runtime.txt").read_text().splitlines() if "==" in line}
    installed = {line.lower().replace("_", "-") for line in freeze.stdout.splitlines() if "==" in line}
    assert {p.lower() for p in locked} <= installed, sorted({p.lower() for p in locked} - installed)[:5]


def test_every_pipeline_step_runs_in_the_image(image, tmp_path):
    """`tl pipeline run --local --runner docker`: prepare, pretrain, transfer, evaluate, register
    and the gate, each a container of the image, sharing the work directory through a mount; the
    result equals the subprocess runner's on the same settings."""
    fast = ["--pretrain-epochs", "1", "--epochs", "10", "--json"]
    env = {**os.environ, "TL_WORKDIR": str(tmp_path / "docker"), "TL_IMAGE": image}
    env.pop("MLFLOW_TRACKING_URI", None)
    in_docker = subprocess.run([sys.executable, "-m", "tl_core.cli", "pipeline", "run", "--local", "--runner", "docker",
                                *fast], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1800)
    assert in_docker.returncode == 0, in_docker.stderr[-4000:]
    docker_run = json.loads(in_docker.stdout.strip().splitlines()[-1])
    env["TL_WORKDIR"] = str(tmp_path / "subprocess")
    here = subprocess.run([sys.executable, "-m", "tl_core.cli", "pipeline", "run", "--local", *fast],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1800)
    assert here.returncode == 0, here.stderr[-4000:]
    subprocess_run = json.loads(here.stdout.strip().splitlines()[-1])
    assert docker_run["decision"] == subprocess_run["decision"] == "promoted"
    assert docker_run["accuracy"] == pytest.approx(subprocess_run["accuracy"], abs=0.02)
    assert "Found image" in in_docker.stderr  # kfp.local ran the steps in the image, not here
