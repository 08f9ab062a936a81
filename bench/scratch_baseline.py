"""Benchmark: one photo transfer's scratch baseline as each command trains it, and what it costs.

    .venv/bin/python bench/scratch_baseline.py                   # writes bench/scratch_baseline.{json,md}
    .venv/bin/python bench/scratch_baseline.py --against 2d69989 # also that commit's tl_core (before one baseline)

The ants/bees photos (../shared/data/hymenoptera) at 5 shots a class, seed 0, the packaged
EfficientNet-Lite0, in a fresh work directory, one command after the other:

    tl run --strategies linear-probe     its scratch row (the model's scratch recipe) and the probe
    tl transfer --strategy linear-probe  the probe again, with the scratch baseline it trains itself
    tl register + tl promote             the probe's gate, which needs its scratch baseline too

Each figure: the scratch accuracy the command states the gain against, and the command's wall
seconds. With `--against REF`, REF's tl_core (git archive, on PYTHONPATH) runs the same commands
in a work directory of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PHOTOS = HERE.parent.parent / "shared" / "data" / "hymenoptera"
SHOTS, SEED, MODEL = 5, 0, "efficientnet-lite0"


def tl(work: str, code: str | None, *args: str) -> tuple[dict, float]:
    """`tl ARGS --json` in `work`: (its summary, wall seconds)."""
    env = {**os.environ, "TL_WORKDIR": str(Path(work, "tl-work"))}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    if code:
        env["PYTHONPATH"] = code
    started = time.perf_counter()
    proc = subprocess.run([str(Path(sys.executable).parent / "tl"), *args, "--json"], cwd=work, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"tl {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), time.perf_counter() - started


def measure(code: str | None) -> dict:
    work = tempfile.mkdtemp(prefix="tl-bench-baseline-")
    run, run_s = tl(work, code, "run", "--target", f"imagefolder:{PHOTOS}", "--model", MODEL, "--shots", str(SHOTS),
                    "--seeds", str(SEED), "--strategies", "linear-probe")
    rows = {r["strategy"]: r for r in run["runs"]}
    data = run["target"]["path"]
    transfer, transfer_s = tl(work, code, "transfer", "--data", data, "--backbone", f"packaged:{MODEL}", "--strategy",
                              "linear-probe", "--shots", str(SHOTS), "--seed", str(SEED))
    tl(work, code, "register", "--checkpoint", rows["linear-probe"]["checkpoint"], "--name", "photos")
    promote, promote_s = tl(work, code, "promote", "--model", "photos", "--data", data)
    return {
        "tl run": {"scratch_accuracy": rows["scratch"]["accuracy"], "seconds": run_s},
        "tl transfer": {"scratch_accuracy": transfer["baseline"]["metrics"]["accuracy"], "seconds": transfer_s,
                        "baseline_seconds": transfer["baseline"]["seconds"],
                        "baseline_reused": transfer["baseline"]["reused"]},
        "tl promote": {"scratch_accuracy": promote["scratch_accuracy"], "seconds": promote_s},
    }


def baseline_line(when: str, transfer: dict) -> str:
    if transfer["baseline_reused"]:
        return f"{when}, `tl transfer`'s baseline was tl run's scratch row, reused from the training cache."
    return (f"{when}, `tl transfer`'s baseline took {transfer['baseline_seconds']:.0f} s: trained, not the same run "
            "as tl run's scratch row.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", help="a commit whose tl_core runs the same commands")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from tl_run_default import tl_core_of

    load = os.getloadavg()
    this = measure(None)
    ref_code, ref = tl_core_of(args.against) if args.against else (None, None)
    before = measure(ref_code) if ref_code else None
    commit = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    (HERE / "scratch_baseline.json").write_text(json.dumps({"commit": commit, "this": this, "against": ref,
                                                            "before": before, "load": load}, indent=2))
    columns = f" | scratch % at {ref} | s at {ref}" if before else ""
    lines = [f"| command | scratch % | s{columns} |", "|---|---|---" + ("|---|---" if before else "") + "|"]
    for name, figures in this.items():
        cells = f"| {name} | {100 * figures['scratch_accuracy']:.1f} | {figures['seconds']:.0f}"
        if before:
            cells += f" | {100 * before[name]['scratch_accuracy']:.1f} | {before[name]['seconds']:.0f}"
        lines.append(cells + " |")
    transfer = this["tl transfer"]
    text = f"""# One scratch baseline: the same photo transfer's, as each command trains it

`.venv/bin/python bench/scratch_baseline.py{' --against ' + ref if ref else ''}` at {commit} (recipe in its docstring): ants/bees
photos, 5 shots a class, seed 0, packaged EfficientNet-Lite0, a linear probe. Scratch %: the test
accuracy of the scratch baseline the command states the probe's gain against; s: the command's
wall seconds on {os.cpu_count()} CPU cores (1-minute load {load[0]:.1f} at the start).

{chr(10).join(lines)}

{baseline_line('Here', transfer)}
`tl promote` states the gain against tl run's own scratch row, reused from the training cache.
"""
    if before:
        text += f"""
{baseline_line(f'At {ref}', before['tl transfer'])}
"""
    (HERE / "scratch_baseline.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
