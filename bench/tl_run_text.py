"""Benchmark: `tl run` on SST-2 with the packaged text encoder, as issue 27 states it: no flag
beyond data, model and shots, so every default row (scratch, TF-IDF + LR, linear-probe, finetune,
auto) on seeds 0-2 with the model's default recipes; wall seconds against the goal of 10 minutes
on 2 cores.

    .venv/bin/python bench/tl_run_text.py       # writes bench/tl_run_text.json and .md

One `tl run` in a fresh work directory (nothing prepared, embedded or trained before: a new
user's first run), in a subprocess, as bench/tl_run_default.py runs the embedded default.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from tl_run_default import table_row, tl_run  # noqa: E402  (the same subprocess and table)

SST2 = HERE.parent.parent / "shared" / "data" / "text" / "sst2"
ARGS = ["--target", f"tsv:{SST2}", "--model", "minilm-l6", "--shots", "8"]
GOAL_S = 600


def main() -> None:
    load = os.getloadavg()
    run = tl_run(*ARGS)
    report = {**run, "goal_wall_s": GOAL_S, "cpus": os.cpu_count(), "load_at_start": load}
    (HERE / "tl_run_text.json").write_text(json.dumps(report, indent=2))
    header = "| strategy | test accuracy % | vs scratch (points) | seeds won | train s (mean) | |\n|---|---|---|---|---|---|"
    choices = "; ".join(f"seed {a['seed']}: {a['choice']}" for a in run["auto"])
    verdict = "met" if run["wall_s"] <= GOAL_S else "**missed**"
    text = f"""# `tl run` on SST-2 with MiniLM-L6, 8 shots (issue 27)

`.venv/bin/python bench/tl_run_text.py`: `tl run --target tsv:../shared/data/text/sst2 --model minilm-l6 --shots 8`,
seeds 0-2, every default row, in a fresh work directory (SST-2 prepared, texts embedded, every
model trained in the run), on {os.cpu_count()} CPUs, 1/5/15-minute load {' / '.join(f'{x:.1f}' for x in load)} at the start.

| figure | measured | goal |
|---|---|---|
| wall seconds | {run['wall_s']:.0f} | <= {GOAL_S}: {verdict} |
| peak RSS of the `tl` process (GB) | {run['peak_rss_gb']:.2f} | |

Auto's choices: {choices}. Best row (the baselines never are): {run['best_strategy']}.

{header}
{chr(10).join(table_row(r) for r in run['table'])}

Train s is one run's training, mean over the seeds; auto's is its share of the choosing (one Ray
Tune search for the 3 seeds: the probe on 5 folds of a seed's 16 sentences, scratch, finetune and
SetFit on one held-out fold) plus its refit, which reuses the row of the strategy it chose where
that row trained the same recipe (SetFit has no row of its own: its refit trains).
"""
    (HERE / "tl_run_text.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
