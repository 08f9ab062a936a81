"""The lock (issue 11): set-up installs exactly locks/, on any day, and says so when it drifts."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK_SCRIPT = ROOT / "scripts" / "lock.py"


def load_lock_module():
    spec = importlib.util.spec_from_file_location("tl_lock", LOCK_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_installed_is_exactly_locked():
    # Fails on any drift (a package upgraded by hand, a new dependency not locked) with the fix.
    result = subprocess.run([sys.executable, str(LOCK_SCRIPT), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_a_drift_is_named_with_the_command_that_fixes_it(tmp_path, monkeypatch, capsys):
    lock = load_lock_module()
    drifted = tmp_path / "runtime.txt"
    text = (ROOT / "locks" / "runtime.txt").read_text()
    ray = version("ray")
    drifted.write_text(text.replace(f"\nray=={ray}\n", "\nray==0.0.1\n").replace("\nboto3==", "\nnot-boto3=="))
    monkeypatch.setattr(lock, "RUNTIME", drifted)
    assert lock.check(quiet=True) == 1
    err = capsys.readouterr().err
    assert f"ray: installed {ray}, locked 0.0.1" in err
    assert "boto3: installed" in err and "not in locks/" in err
    assert "fix: bash scripts/setup.sh" in err and "scripts/lock.py --upgrade" in err


def test_the_locks_split_runtime_from_test_tools_and_agree_with_pyproject():
    lock = load_lock_module()
    runtime, test = lock.read_lock(lock.RUNTIME), lock.read_lock(lock.TEST)
    assert not set(runtime) & set(test), "a package is locked twice"
    for tool in ("pytest", "moto", "kubernetes-validate"):
        assert tool in test and tool not in runtime
    pyproject = (ROOT / "pyproject.toml").read_text()
    for package in ("torch", "torchvision"):
        assert f'"{package}=={runtime[package]}"' in pyproject, f"{package} pin differs from pyproject.toml"
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert lock.locked_python() == python, f"tests run on Python {python}, the lock was made on {lock.locked_python()}"


def test_setup_warns_when_python_differs_from_the_lock(tmp_path):
    # A stand-in interpreter that reports another version; set-up finds .venv up to date and stops.
    fake = tmp_path / "python9"
    fake.write_text("#!/bin/sh\necho 9.99\n")
    fake.chmod(0o755)
    result = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh")], capture_output=True, text=True,
                            env={**os.environ, "PYTHON": str(fake)})
    assert result.returncode == 0, result.stderr
    assert "warning: locks/ were made on Python 3.11 but" in result.stderr and "Python 9.99" in result.stderr
    assert "nothing to do" in result.stdout


def test_the_cpu_lock_is_the_runtime_lock_without_what_only_torchs_cuda_build_needs():
    # The image's CPU-only variant installs locks/runtime-cpu.txt beside torch's CPU wheels.
    lock = load_lock_module()
    runtime, cpu = lock.read_lock(lock.RUNTIME), lock.read_lock(lock.RUNTIME_CPU)
    assert all(runtime.get(name) == pinned for name, pinned in cpu.items()), "the CPU lock pins other versions"
    dropped = set(runtime) - set(cpu)
    assert {"triton", "cuda-toolkit", "nvidia-cudnn-cu13", "nvidia-cublas"} <= dropped
    assert all(name == "triton" or name.startswith(("nvidia-", "cuda-")) for name in dropped), sorted(dropped)
    # What torch's CPU wheels still need stays, and so does everything the project needs itself.
    for name in ("torch", "torchvision", "filelock", "sympy", "networkx", "jinja2", "fsspec", "ray", "mlflow", "pip"):
        assert name in cpu, f"{name} missing from the CPU lock"
    # Stale when the runtime lock moved without scripts/lock.py --write.
    installers = {tool: version(tool) for tool in lock.INSTALLERS}
    assert cpu == {**lock.closure(lock.PROJECT, lock.RUNTIME_EXTRAS, cpu_torch=True), **installers}, (
        "locks/runtime-cpu.txt is stale: .venv/bin/python scripts/lock.py --write")
