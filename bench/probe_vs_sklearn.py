"""Benchmark: the linear probe as it ships against scikit-learn's LogisticRegression on the very
same features, on every image and text row of the benches (issue 27: the probe must at least
match it; DEVELOPERS.md: a method must match its trivial equivalent).

    .venv/bin/python bench/probe_vs_sklearn.py                   # every row: bench/probe_vs_sklearn.{json,md}
    .venv/bin/python bench/probe_vs_sklearn.py --rows usps-10,sst2-8
    .venv/bin/python bench/probe_vs_sklearn.py --report          # the .md again from the .json

Rows, seeds 0-2, each with the labels `sample_shots` gives the seed (as every bench):
- photos-lite0/1/2-{5,10,all}: hymenoptera at 224 px (its val split is the test split), the packaged
  EfficientNet-Lite0/1/2 (bench/imagenet_transfer.py);
- usps-{1,10,all}: MNIST-test -> USPS 16 x 16, small_cnn pretrained on MNIST-test (bench/auto.py);
- sst2-8, agnews-8, sst2-8-described: MiniLM-L6; SST-2's bare labels 0/1, AG News's class names
  (which the probe's head may start from: a guess it keeps only where the labels support it), and
  SST-2 with its descriptions file (a head it starts from and pulls towards) (bench/auto.py).

Each seed: `linear-probe` trained through `tl_core.train.train` with the model's default recipe,
as `tl transfer` runs it (its head solved, C chosen on the labels: tl_core/strategies/logistic.py),
scored on the test split; and on the same frozen features, scikit-learn's
`LogisticRegression()` (C=1, lbfgs, its default tolerance 1e-4) and the same solved to tol 1e-10:
where the probe keeps C=1 it solves the same objective, and a difference from the default-
tolerance fit is that fit stopping early (an image near the boundary), not another answer.

TL_WORKDIR (default /tmp/tl-bench-probe) keeps data, features and backbones between runs; the
probe is solved again every run (a solved head costs seconds; a reused checkpoint would be the
solver of the code that wrote it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT_JSON, OUT_MD = HERE / "probe_vs_sklearn.json", HERE / "probe_vs_sklearn.md"
PHOTOS = HERE.parent.parent / "shared" / "data" / "hymenoptera"
ROWS = [f"photos-{m}-{s}" for m in ("lite0", "lite1", "lite2") for s in (5, 10, "all")] + \
       ["usps-1", "usps-10", "usps-all", "sst2-8", "agnews-8", "sst2-8-described"]


def row_settings(row: str, root: Path) -> dict:
    """The row's TrainConfig settings but the seed and strategy."""
    from tl_core.config import PrepareConfig
    from tl_core.data import prepare

    if row.startswith("photos-"):
        _, model, shots = row.split("-")
        data, _ = prepare(PrepareConfig(uri=f"imagefolder:{PHOTOS}"))
        return {"data": data.path, "backbone": f"packaged:efficientnet-{model}",
                "shots": None if shots == "all" else int(shots)}
    sys.path.insert(0, str(HERE))
    from auto import row_setup  # bench/auto.py: the usps and text rows as auto measures them

    return {k: v for k, v in row_setup(row, root).items() if k != "augment"}


def features(cfg, train_idx) -> tuple:
    """The frozen backbone's features of the labelled rows and of the test split (with their labels),
    through the probe's own cache; the backbone is built once for both."""
    from tl_core.checkpoints import load_checkpoint
    from tl_core.data import load_prepared
    from tl_core.models import INPUT_STATS
    from tl_core.strategies import create_strategy

    data = load_prepared(cfg.data)
    probe = create_strategy(cfg)
    network, spec = probe.build_model(len(data.classes), data.shape, load_checkpoint(cfg.backbone))
    data = data.normalised_as(INPUT_STATS.get(spec["name"]))
    out = []
    for rows in (data.rows("train", train_idx), data.rows("test")):
        out += [probe.rows_features(network, rows, data.normalise)[0].numpy(), rows.labels()]
    return tuple(out)


def measure(row: str, seed: int, settings: dict) -> dict:
    from sklearn.linear_model import LogisticRegression

    from tl_core.config import TrainConfig
    from tl_core.data import load_prepared, sample_shots
    from tl_core.recipes import default_recipe
    from tl_core.strategies.base import head_start
    from tl_core.train import train

    model = settings["backbone"].split(":", 1)[1] if settings["backbone"].startswith("packaged:") else "small_cnn"
    cfg = TrainConfig(strategy="linear-probe", seed=seed, eval_every=0, checkpoint_every=0, **settings,
                      **default_recipe(model, "linear-probe"))
    started = time.perf_counter()
    result = train(cfg, force=True)  # solved again: the solver of this code, not of a reused checkpoint
    probe_seconds = time.perf_counter() - started
    metrics = result.checkpoint["metrics"]
    data = load_prepared(cfg.data)
    train_idx, _ = sample_shots(data.labels("train"), cfg.shots, seed, data.classes)
    x, y, x_test, y_test = features(cfg, train_idx)
    sklearn = {name: float((LogisticRegression(max_iter=10_000, **kw).fit(x, y).predict(x_test) == y_test).mean())
               for name, kw in (("default", {}), ("tol_1e-10", {"tol": 1e-10}))}
    return {"row": row, "seed": seed, "labels": int(len(y)), "test": int(len(y_test)),
            "probe": metrics["test_accuracy"], "C": metrics.get("head_c"), "C_folds": metrics.get("head_cv_folds"),
            "head_start": head_start(cfg, "linear-probe", model, None)[0],
            "towards_start": metrics.get("head_towards_start"),
            "sklearn": sklearn["default"], "sklearn_tol_1e-10": sklearn["tol_1e-10"],
            "probe_seconds": probe_seconds, "load_1min": os.getloadavg()[0]}


def report(results: list[dict]) -> None:
    rows = [r for r in ROWS if any(x["row"] == r for x in results)]
    lines = ["# The linear probe against scikit-learn's LogisticRegression on the same features (`bench/probe_vs_sklearn.py`)",
             "", f"`.venv/bin/python bench/probe_vs_sklearn.py`, measured {results[0]['when']} on this machine's 2 cores "
             f"(commit {results[0]['commit']}). Test accuracy %, mean of seeds 0-2; per seed: probe / scikit-learn.", "",
             "The probe: `linear-probe` as `tl transfer` runs it (head solved, C chosen on the labels only, "
             "tl_core/strategies/logistic.py). scikit-learn: `LogisticRegression()` (C=1, its default tolerance) on the "
             "very same frozen features; beside it the same solved to tol 1e-10. Goal: probe >= scikit-learn on every "
             "row (issue 27).", "",
             "| row | labels | probe % | scikit-learn % | sklearn tol 1e-10 % | probe - sklearn | per seed | C chosen | "
             "head starts at | goal |", "|---|---|---|---|---|---|---|---|---|---|"]
    misses = []
    for row in rows:
        got = sorted((x for x in results if x["row"] == row), key=lambda x: x["seed"])
        mean = {k: 100 * statistics.mean(x[k] for x in got) for k in ("probe", "sklearn", "sklearn_tol_1e-10")}
        gap = round(mean["probe"], 1) - round(mean["sklearn"], 1) + 0.0  # as the table shows them (+0.0: no "-0.0")
        met = gap >= -1e-9
        if not met:
            converged = round(mean["probe"], 1) >= round(mean["sklearn_tol_1e-10"], 1)
            misses.append(f"{row} ({gap:+.1f}" + (": scikit-learn solved to tol 1e-10 scores as the probe does, so the "
                                                   "shortfall is its default tolerance stopping short of the optimum)"
                                                   if converged else ")"))
        chosen = ", ".join("0 (its head as it is)" if x.get("towards_start") and not x["C"] else
                           f"{x['C']:g}" + (" (towards it)" if x.get("towards_start") else "") for x in got)
        per_seed = ", ".join(f"{100 * x['probe']:.1f}/{100 * x['sklearn']:.1f}" for x in got)
        lines.append(f"| {row} | {got[0]['labels']} | {mean['probe']:.1f} | {mean['sklearn']:.1f} | "
                     f"{mean['sklearn_tol_1e-10']:.1f} | {gap:+.1f} | {per_seed} | "
                     f"{chosen} | {got[0]['head_start']} | {'met' if met else '**missed**'} |")
    lines += ["", f"Rows where the probe is below scikit-learn: {'; '.join(misses) or 'none'}.", "",
              "Before 2026-12-06 the probe took the C of the best held-out accuracy (ties to the lower log-loss), and "
              "its C on two classes was scikit-learn's C=2 (logistic.py, `penalty_c`). The benches' committed rows "
              "then (probe / scikit-learn %): photos-lite0 89.8/89.5, 90.6/90.4, 93.9/94.8 (5, 10, all shots); "
              "photos-lite2 94.8/95.6, 95.4/95.4, 96.1/96.1 (bench/imagenet_transfer.md); usps-10 88.0/88.1, "
              "usps-all 95.4/95.0, sst2-8 58.6/58.8 (bench/auto.md); agnews-8, with the probe pulled towards its "
              "class names, was not measured (74.5/77.3 when this bench first ran, before guessed starts became "
              "optional).", "",
              "On the evening of 2026-12-06 two rules changed: a C needs, against the default, the exact sign test on "
              "the held-out labels where they differ at one standard error's odds (logistic.py, `clear_gain`; before, "
              "the mean gain over its own standard error, which moved usps-10 seed 1 to C=0.1), and with a "
              "descriptions file the default is the descriptions' zero-shot head itself (C 0), which the labels must "
              "show a C better than: sst2-8-described's probe is then zero-shot's 73.5 % (bench/auto.md), its "
              "trivial equivalent, where the best of the Cs gave 71.3 (C 30, 10 and 0.01 towards the head)."]
    OUT_MD.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    results = json.loads(OUT_JSON.read_text())["results"] if OUT_JSON.exists() else []
    if not args.report:
        import subprocess

        os.environ.setdefault("TL_WORKDIR", "/tmp/tl-bench-probe")
        root = Path(os.environ["TL_WORKDIR"])
        root.mkdir(parents=True, exist_ok=True)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=HERE).stdout.strip()
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        for row in args.rows.split(","):
            settings = row_settings(row, root)
            for seed in (int(s) for s in args.seeds.split(",")):
                got = {**measure(row, seed, settings), "commit": commit, "when": when}
                results = [r for r in results if (r["row"], r["seed"]) != (row, seed)] + [got]
                OUT_JSON.write_text(json.dumps({"results": results}, indent=2) + "\n")
                print(f"{row} seed {seed}: probe {100 * got['probe']:.1f} (C {got['C']}), sklearn "
                      f"{100 * got['sklearn']:.1f}, tol 1e-10 {100 * got['sklearn_tol_1e-10']:.1f}", flush=True)
    report(results)


if __name__ == "__main__":
    main()
