"""The project's lock: the exact version of every package, for the laptop, CI and the image.

Three files in locks/, written by this script, never by hand:

- `locks/runtime.txt`: what `tl-core[tune,server,text,vision,serve]` needs, and the pip that installs it. The image
  installs exactly this (k8s/Dockerfile); so do `scripts/setup.sh` and CI.
- `locks/runtime-cpu.txt`: the same pins for the image's CPU-only variant, without what only
  torch's CUDA build asks for (the CUDA runtime, cuda-bindings, triton): the Dockerfile installs it
  with torch's CPU wheels (`--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu`).
- `locks/test.txt`: what the test tools (`tl-core[test]`: pytest, moto, kubernetes-validate)
  need beyond the runtime. Set-up and CI install it too; the image never does.

Why a lock: `pip install -e .` alone takes the newest release of every package on the day it
runs, so a machine set up next week runs (and fails) other code than the one that was tested.
With the lock, a set-up on any later day installs the same versions, because released versions
on the package index do not change.

    python3 scripts/lock.py --check     # installed == locked? (set-up and the tests run this)
    python3 scripts/lock.py --upgrade   # re-resolve everything to the newest releases, rewrite
                                        # locks/, then: bash scripts/setup.sh && pytest
    .venv/bin/python scripts/lock.py --write   # lock what .venv holds now (after adding a
                                               # dependency: the other pins stay as they are)

The lock records the Python minor version it was made on; set-up warns when it differs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCKS = REPO / "locks"
RUNTIME = LOCKS / "runtime.txt"
RUNTIME_CPU = LOCKS / "runtime-cpu.txt"
TEST = LOCKS / "test.txt"
PROJECT = "tl-core"
RUNTIME_EXTRAS = {"tune", "server", "text", "vision", "serve"}  # the image runs HPO, the MLflow server, text and photo models, tl serve
TEST_EXTRAS = {"test"}
INSTALLERS = ("pip", "setuptools")  # pinned too: setuptools builds the project (no build isolation)
FIX = "bash scripts/setup.sh"
STAMP = REPO / ".venv" / "tl-lock.stamp"


def canonical(name: str) -> str:
    # PEP 503 normalisation, written out so that --check runs before `packaging` is installed.
    return re.sub(r"[-_.]+", "-", name).lower()


def cuda_only(name: str, requirement) -> bool:
    """Whether `requirement` of package `name` is one that only torch's CUDA build has.

    PyPI's Linux torch is the CUDA build: it asks for the CUDA runtime (cuda-toolkit, the nvidia-*
    libraries), cuda-bindings and triton, each under a `platform_system == "Linux"` marker. torch's
    CPU wheels ask for none of them and for everything else alike (compared on torch 2.13.0+cpu's
    metadata against 2.14.1's), so the CPU lock is the closure without these requirements.
    """
    return canonical(name) == "torch" and "platform_system" in str(requirement.marker or "")


def closure(root: str, extras: set[str], cpu_torch: bool = False) -> dict[str, str]:
    """{canonical name: installed version} for everything `root[extras]` needs in this env
    (cpu_torch: with torch's CPU build, which needs none of the CUDA packages)."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    env = default_environment()
    pins: dict[str, str] = {}
    todo: list[tuple[str, set[str]]] = [(root, extras)]
    seen: set[tuple[str, frozenset[str]]] = set()
    missing: list[str] = []
    while todo:
        name, wanted = todo.pop()
        key = (canonical(name), frozenset(wanted))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
            continue
        pins[canonical(name)] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            # A requirement applies without an extra, or with one of the extras asked for.
            applies = req.marker is None or any(
                req.marker.evaluate({**env, "extra": extra}) for extra in (wanted or {""})
            )
            if applies and not (cpu_torch and cuda_only(name, req)):
                todo.append((req.name, set(req.extras)))
    if missing:
        sys.exit(f"error: {', '.join(sorted(set(missing)))} required but not installed here; run {FIX} first")
    pins.pop(canonical(root))  # the project itself is installed from its source tree
    return pins


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonical(name)] = version
    return pins


def locked_python(path: Path = RUNTIME) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("# Python "):
            return line.split()[2].rstrip(",")
    raise SystemExit(f"error: {path} does not say which Python it was made on; rewrite it: python3 scripts/lock.py --upgrade")


def write_locks() -> None:
    installers = {tool: metadata.version(tool) for tool in INSTALLERS}
    runtime = {**closure(PROJECT, RUNTIME_EXTRAS), **installers}
    runtime_cpu = {**closure(PROJECT, RUNTIME_EXTRAS, cpu_torch=True), **installers}
    test = {k: v for k, v in closure(PROJECT, TEST_EXTRAS).items() if k not in runtime}
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    for path, pins, what in (
        (RUNTIME, runtime, "what tl-core[tune,server,text,vision,serve] needs, and the pip/setuptools that install it: the image, set-up and CI"),
        (RUNTIME_CPU, runtime_cpu, "locks/runtime.txt without what only torch's CUDA build needs: the image's CPU-only "
                                   "variant, with torch and torchvision from torch's CPU index (k8s/Dockerfile)"),
        (TEST, test, "the test tools (tl-core[test]) beyond locks/runtime.txt: set-up and CI, never the image"),
    ):
        path.parent.mkdir(exist_ok=True)
        lines = [
            "# Written by scripts/lock.py: do not edit by hand (python3 scripts/lock.py --upgrade re-resolves).",
            f"# Python {python}, {len(pins)} packages: {what}.",
            *(f"{name}=={version}" for name, version in sorted(pins.items())),
        ]
        path.write_text("\n".join(lines) + "\n")
        print(f"wrote {path.relative_to(REPO)} ({len(pins)} pins)")


def differences() -> list[str]:
    """What in this environment differs from locks/: one line per package, empty when none."""
    locked = {**read_lock(RUNTIME), **read_lock(TEST)}
    installed = {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
    installed.pop(canonical(PROJECT), None)
    out = []
    for name in sorted(set(locked) | set(installed)):
        want, have = locked.get(name), installed.get(name)
        if want == have:
            continue
        if have is None:
            # A locked package for another platform (say, CUDA wheels on macOS) is not a drift.
            continue
        out.append(f"{name}: installed {have}, " + (f"locked {want}" if want else "not in locks/"))
    # Locked packages that the project needs here but are missing show up as missing requirements.
    try:
        closure(PROJECT, RUNTIME_EXTRAS | TEST_EXTRAS)
    except SystemExit as missing:
        out.append(str(missing).removeprefix("error: "))
    return out


def inputs_digest() -> str:
    """What set-up installs from: when none of it changed since the last set-up, it has nothing to do."""
    h = hashlib.sha256()
    for path in (REPO / "pyproject.toml", RUNTIME, TEST):
        h.update(path.read_bytes())
    h.update(sys.version.encode())
    return h.hexdigest()


def check(quiet: bool) -> int:
    diffs = differences()
    if not diffs:
        if not quiet:
            print(f"installed == locked ({len(read_lock(RUNTIME)) + len(read_lock(TEST))} packages in locks/)")
        return 0
    print(f"error: this environment differs from locks/ in {len(diffs)} package(s):", file=sys.stderr)
    for line in diffs:
        print(f"  {line}", file=sys.stderr)
    print(f"fix: {FIX} (installs the locked versions); to move the lock itself: python3 scripts/lock.py --upgrade",
          file=sys.stderr)
    return 1


def upgrade() -> int:
    """Resolve the newest releases in a throwaway venv, lock them, and say what to run next."""
    venv = REPO / ".venv-lock"
    if venv.exists():
        shutil.rmtree(venv)
    python = venv / "bin" / "python"
    run = lambda *args: subprocess.run([str(a) for a in args], cwd=REPO, check=True)  # noqa: E731
    try:
        run(sys.executable, "-m", "venv", venv)
        run(python, "-m", "pip", "install", "-q", "--upgrade", *INSTALLERS)
        run(python, "-m", "pip", "install", "-q", "--upgrade", "-e", ".[test,tune,server,text,vision,serve]")
        run(python, "-m", "pip", "check")
        run(python, __file__, "--write")
    finally:
        shutil.rmtree(venv, ignore_errors=True)
    print("locks/ re-resolved to the newest releases. Now install and test them:\n"
          "  bash scripts/setup.sh && .venv/bin/python -m pytest -q\n"
          "then commit locks/ with any fixes (git diff locks/ lists what moved).")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="exit 1 (and say how to fix it) if installed != locked")
    mode.add_argument("--write", action="store_true", help="lock what this environment holds")
    mode.add_argument("--upgrade", action="store_true", help="re-resolve to the newest releases and rewrite locks/")
    mode.add_argument("--stamp", action="store_true", help="(set-up) record that this venv matches the lock")
    mode.add_argument("--up-to-date", action="store_true", help="(set-up) exit 0 if nothing changed since --stamp")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    if args.check:
        return check(args.quiet)
    if args.write:
        write_locks()
        return 0
    if args.upgrade:
        return upgrade()
    if args.stamp:
        STAMP.write_text(inputs_digest())
        return 0
    fresh = STAMP.exists() and STAMP.read_text() == inputs_digest() and not differences()
    return 0 if fresh else 1


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())
