"""Bad input, fuzzed: a seeded subset of bench/fuzz.py's cases, at least one of every input class.

Each must be refused as the bench demands: exit code 2, one `error:` line naming the file, key or
URI at fault, no traceback, nothing outside the work directory touched, no stored file changed,
nothing half-written left behind. The whole bench (350+ cases, and a sample as `tl` processes):
`.venv/bin/python bench/fuzz.py`.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    """bench/fuzz.py as a module: the cases are generated there, for the bench and for this test."""
    spec = importlib.util.spec_from_file_location("bench_fuzz", ROOT / "bench" / "fuzz.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


fuzz = load_bench()


@pytest.fixture(scope="module")
def fz(tmp_path_factory):
    """The bench's folders in a temporary root, its environment for this module, and the valid
    dataset and checkpoint the cases garble."""
    mp = pytest.MonkeyPatch()
    fz = fuzz.Fuzz(tmp_path_factory.mktemp("fuzz").resolve(), seed=0)
    fuzz.make_folders(fz)
    for name, value in fuzz.environment(fz).items():
        mp.setenv(name, value)
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        mp.delenv(name, raising=False)
    mp.setattr(tempfile, "tempdir", None)  # read TMPDIR again (and again after this module)
    mp.chdir(fz.cwd)
    mp.setattr(fuzz, "BOMB_MB", 256)  # still 1000-fold: refused the same way, made in a second
    fuzz.make_valid_inputs(fz)
    fuzz.measure_baseline(fz)  # the memory of a `tl` process refusing at once, for the one below
    yield fz
    mp.undo()


def test_the_bench_has_300_malformed_cases(tmp_path):
    cases = fuzz.make_cases(fuzz.Fuzz(tmp_path, seed=0))  # nothing is written until a case is built
    assert sum(c.expect == "error" for c in cases) >= 300
    assert [c.name for c in cases] == [c.name for c in fuzz.make_cases(fuzz.Fuzz(tmp_path, seed=0))]


def test_a_seeded_sample_of_every_input_class_is_refused_cleanly(fz):
    cases = fuzz.make_cases(fz)
    # In this process, as the bench runs most cases; and one bomb as a `tl` process (7 s each).
    sample = fuzz.one_per_kind([c for c in cases if not c.isolate], seed=0, total=40)
    sample.append(next(c for c in cases if c.kind == "zip bombs" and c.isolate))
    assert {c.kind for c in sample} == {c.kind for c in cases}
    failed = []
    for case in sample:
        result, _ = fuzz.run_case(case, fz)
        if not result["passed"]:
            failed.append({k: fuzz.shorten(str(v), fz) for k, v in result.items()})
    assert not failed, "\n".join(map(str, failed))
