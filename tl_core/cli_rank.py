"""`tl rank`: rank candidate source models for a target by transferability (tl_core/rank.py)."""

from __future__ import annotations

from typing import Optional

from tl_core.cli_app import AS_JSON, app, console, execute, table_console, with_settings


def show_ranking(s: dict) -> None:
    from rich.table import Table

    table = Table(title=f"candidates for {s['target']} ({s['shots'] or 'all'} shots per class, seed {s['seed']})",
                  title_style="dim")
    for col in ("rank", "candidate", "LogME", "LEEP", "NCE", "H-score", "seconds", ""):
        table.add_column(col, justify="left" if col in ("candidate", "") else "right", no_wrap=col != "candidate")
    for row in s["table"]:
        leep, nce = ("—" if row[k] is None else f"{row[k]:.3f}" for k in ("leep", "nce"))
        table.add_row(str(row["rank"]), row["candidate"], f"{row['logme']:.4f}", leep, nce, f"{row['hscore']:.2f}",
                      f"{row['seconds']:.1f}", "features cached" if row["feature_cache_hit"] else "")
    out = table_console(140)
    out.print(table)
    for row in s["skipped"]:
        out.print(f"skipped {row['candidate']}: {row['skipped']}", highlight=False)
    out.print(f"best by LogME: {s['best']}; MLflow run {s['run_id']}; {s['seconds']:.1f}s in all", highlight=False)


@app.command()
@with_settings("RankConfig")
def rank(settings: dict, config: Optional[str], as_json: bool = AS_JSON):
    """Rank candidate source models for a target before training: LogME on the features of the target's labelled
    training shots, highest first; H-score beside it, and LEEP and NCE where a candidate has its source classifier.
    The features are cached as linear-probe caches them, so probing the winner afterwards does not extract them again."""

    def work():
        from tl_core.config import RankConfig, load_config
        from tl_core.rank import rank_step

        err = console()
        return rank_step(load_config(RankConfig, config, settings), say=lambda m: err.print(f"[dim]{m}[/dim]"))

    execute(work, as_json, show_ranking)
