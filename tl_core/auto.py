"""`--strategy auto`: choose the strategy (and its recipe) by validation within the labels given.

The best strategy moves with the labels a task has (bench/label_efficiency.md, MNIST -> USPS: a
fine-tune with a head warm-up at 1 shot, a plain one at 10 and 50, scratch with every label; on
text at 8 shots, what starts from the class descriptions, bench/text_transfer.md), so a
retraining job cannot fix one. `auto` tries the candidates and keeps the one that validates best,
where validation sees **only the labelled training set**, never the test split:

    candidates   zero-shot (where the classes can be described), linear-probe, finetune, setfit
                 (text), and scratch, each with its recipe (the model's defaults, tl_core/recipes.py,
                 or the run's `recipes:`; a setting given explicitly, such as --epochs, wins)
    validation   the labelled shots split into k stratified folds (k = min(5, the fewest labels a
                 class has)). A candidate that trains on cached features or trains nothing
                 (linear-probe, zero-shot) is cross-validated on all k folds; one that trains the
                 network (scratch, finetune, setfit) on one held-out fold, k-1 folds training it.
                 Its score is its mean validation accuracy over the folds it ran.
    search       one Ray Tune search through the same `run_search` as `tl tune`: each (candidate,
                 fold) a trial, so a cluster trains them in parallel; every trial is an MLflow run.
                 `tl run` puts every seed's trials into one search (`choose_each`): a search's
                 trial processes start and import torch once, a few seconds on 2 CPUs.
    choice       the stated rule's candidate (`fallback`, below), unless another is right on more
                 of the same held-out labels beyond chance: an exact sign test on the labels where
                 the two differ, at one standard error's odds shared among the candidates weighed
                 against it (Bonferroni). Of those that pass, the one with the highest validation
                 accuracy. The probe's C is chosen by the same rule (strategies/logistic.py,
                 `clear_gain`): a default, left only on evidence. Two candidates are compared on
                 the labels both were validated on (fold 0 where either trains a network).
    why so       a fold of a few labels scores in big steps, and the highest of several such
                 scores is mostly luck. By the highest score alone, the demo's seed 2 took scratch
                 over finetune on a fold of 10 images and lost about 4 points on the test digits
                 (bench/tl_run_default.md), and SST-2's seed 1 took finetune on 3 sentences of 4,
                 5 points below the probe on the test sentences (bench/auto.md, sst2-8-described);
                 by the mean gain over its standard error it still took it, on 2 sentences won and
                 none lost, which a coin does one time in four. Without the odds shared (each of 4
                 candidates at one standard error's own, one passes by luck near half the time),
                 SST-2 at 64 shots with descriptions, seed 2, left SetFit for zero-shot on 3
                 sentences won of 26 and lost 4 points on the test sentences (bench/auto.md at
                 6ff3c85).
    refit        the winner trains again on all the labels, measured against scratch.

Budget: the held-out fold of a network-training candidate costs about (k-1)/k of one full run,
the cached-feature folds seconds, and the refit one run; with the text candidates (finetune and
setfit of similar cost) that is about 0.8 + 0.8 + 1 = 2.6x the most expensive candidate (scratch
and the cached folds are small beside them); bench/auto.md measures it.

The stated rule (`fallback`), and all of auto where some class has fewer than 2 labels (1 shot):
nothing to validate on, nothing searched, and the summary says so. It takes `finetune` where the
backbone's own head was trained on the target's classes, so that it starts from that head
(bench/source_head.md, 1 shot: 84.6 % on MNIST -> USPS against the probe's 76.5, and within 0.5
of it on fonts -> sklearn's digits); on text where every class has 2 labels or more, `setfit`
where no descriptions file came with the data (bench/text_transfer.md: the best single strategy
on bare labels at SST-2 64 shots and AG News 8, and 0.1 point from it at SST-2 8; with one label a
class it has no pair of the same class to learn from), and where one did, from 32 labels on
(`SETFIT_OVER_DESCRIPTIONS`); else `linear-probe` (strategies/logistic.py: scikit-learn's C, or
where class descriptions came with the data their zero-shot head, unless the labels show
better), the strongest single strategy at few labels on the other benches: text from a
descriptions file (SST-2 8 shots), photos from ImageNet at 5 and 10 shots
(bench/imagenet_transfer.md).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field

import numpy as np

from tl_core import storage
from tl_core.config import TrainConfig
from tl_core.errors import UserError

FOLDS = 5
CHEAP = ("zero-shot", "linear-probe")  # no network trained: every fold
NETWORK = ("scratch", "finetune", "setfit")  # one held-out fold each
CANDIDATES = CHEAP + NETWORK  # setfit on text only, zero-shot where the classes can be described (candidate_names)
PREFERENCE = ("finetune", "linear-probe", "setfit", "zero-shot", "scratch")  # who a tie goes to
# The stated rule on text with a descriptions file: SetFit (its head fitted towards the
# descriptions' head) from this many labels on, else the probe from that head. SetFit fine-tunes
# the encoder on pairs of the labels, and a few labels pull it away from what the descriptions
# gave: with descriptions, SST-2 at 8 shots (16 labels) probe 73.5 % against SetFit 63.8; AG News
# at 8 (32 labels) SetFit 84.2 against 79.4 (bench/text_transfer.md); SST-2 at 64 (128 labels)
# SetFit 76.9 against 74.5 (bench/auto.md). Between 16 and 32 it is unmeasured.
SETFIT_OVER_DESCRIPTIONS = 32


@dataclass
class Choice:
    strategy: str
    config: TrainConfig  # the winner's, on all labels (no folds)
    reason: str
    folds: int  # 0: not validated (the fallback rule)
    candidates: dict[str, dict] = field(default_factory=dict)  # name -> {val_accuracy, folds_run, settings}
    search: dict | None = None  # run_search's summary (None: nothing searched)
    seconds: float = 0.0


def label_counts(cfg: TrainConfig) -> np.ndarray:
    """How many labelled training examples each class has under `cfg`'s shots and seed."""
    from tl_core.data import load_prepared, sample_shots

    data = load_prepared(cfg.data)
    train_idx, _ = sample_shots(data.labels("train"), cfg.shots, cfg.seed, data.classes)
    return np.bincount(data.labels("train")[train_idx], minlength=len(data.classes))


def fold_count(cfg: TrainConfig) -> int:
    """k: as many folds as the class with the fewest labels allows, at most FOLDS (0 or 1: no validation)."""
    return min(FOLDS, int(label_counts(cfg).min()))


def describable(cfg: TrainConfig) -> bool:
    """Whether zero-shot by descriptions can name every class: a descriptions file came with the
    data; text whose class names are words; images whose class names are printed characters read
    by a network trained on such images (not a photo network)."""
    from tl_core.data import load_manifest
    from tl_core.models import INPUT_STATS
    from tl_core.strategies.zero_shot import descriptions_of, is_word

    manifest = load_manifest(cfg.data)
    content = descriptions_of(cfg) or {}
    if manifest["stored"] == "text":
        return bool(content.get("descriptions")) or all(map(is_word, manifest["classes"]))
    if "attributes" in content or cfg.architecture() in INPUT_STATS:
        return False
    return bool(content.get("glyphs")) or all(len(c) == 1 for c in manifest["classes"])


def candidate_names(cfg: TrainConfig) -> list[str]:
    from tl_core.data import load_manifest

    text = load_manifest(cfg.data)["stored"] == "text"
    names = [*(["zero-shot"] if describable(cfg) else []), "linear-probe", "scratch", "finetune"]
    return names + (["setfit"] if text else [])


def candidate_config(cfg: TrainConfig, strategy: str, recipe: dict) -> TrainConfig:
    """`strategy` with its recipe over the auto run's settings: the same data, labels, seed and backbone."""
    if strategy == "scratch":  # the baseline, by the run's recipe for it
        return cfg.baseline(recipe)
    update = {"strategy": strategy, **recipe}
    if strategy == "zero-shot":  # every class described, nothing trained: one pass
        update.update(epochs=1, unseen_classes=[])
    return TrainConfig(**{**cfg.model_dump(), **update})


def choose(cfg: TrainConfig, recipes: dict[str, dict] | None = None, say=print) -> Choice:
    """The candidate that validates best on the labels of `cfg` (never the test split), as the
    config to refit on all labels. `recipes`: strategy -> settings (default: the model's own, less
    the settings `cfg` was given: `recipe_for`)."""
    return choose_each([cfg], recipes, say)[0]


def choose_each(cfgs: list[TrainConfig], recipes: dict[str, dict] | None = None, say=print) -> list[Choice]:
    """`choose` for one run on several seeds (`tl run`'s auto row), in one search: its trial
    processes start and import torch once (about 3 s a search on 2 CPUs), not once a seed. Each
    seed is chosen on its own labels and folds; each Choice's seconds are its share of the search."""
    started = time.perf_counter()
    if len({c.seed for c in cfgs}) != len(cfgs) or any(c.model_copy(update={"seed": 0}) != cfgs[0].model_copy(
            update={"seed": 0}) for c in cfgs):
        raise ValueError("choose_each takes one run's config on distinct seeds")
    if cfgs[0].shots == 0:
        raise UserError("--strategy auto chooses by validation on labels, and shots 0 gives none: give --shots N, or "
                        "pick a strategy that adapts to unlabeled images (dann, mcc)")
    prefix = (lambda seed: f"auto, seed {seed}") if len(cfgs) > 1 else (lambda seed: "auto")
    names = candidate_names(cfgs[0])
    chosen: dict[int, Choice] = {}
    validated: dict[int, tuple[dict[str, TrainConfig], int]] = {}  # seed -> its candidates' configs, k
    rule, why = fallback(cfgs[0])  # the seeds share everything it reads (the backbone, the data's classes)
    for cfg in cfgs:
        configs = {s: candidate_config(cfg, s, recipe_for(cfg, recipes, s)) for s in names}
        k = fold_count(cfg)
        if k < 2:
            reason = f"fewer than 2 labels in some class: nothing to validate on, so the stated rule: {rule} ({why})"
            say(f"{prefix(cfg.seed)}: {rule}, the stated rule (fewer than 2 labels in some class)")  # why: in the result
            chosen[cfg.seed] = Choice(rule, configs[rule], reason, 0, {}, None, 0.0)
        else:
            validated[cfg.seed] = configs, k
    if validated:
        summary = run_validation(validated, names, say)
        share = (time.perf_counter() - started) / len(validated)
        for seed, (configs, k) in validated.items():
            candidates = scored_candidates(summary["trials"], seed, names, k)
            if not any(c["val_accuracy"] is not None for c in candidates.values()):
                raise UserError(f"auto: no candidate finished its validation (search {summary['name']}); see its "
                                "trials in MLflow")
            best = best_candidate(candidates, rule)
            reason = reason_for(best, rule, why, candidates, names)
            say(f"{prefix(seed)}: chose {best} (validated on {k} folds)")  # why: in the result, printed once
            chosen[seed] = Choice(best, configs[best], reason, k, candidates, summary, share)
    return [chosen[cfg.seed] for cfg in cfgs]


def run_validation(validated: dict[int, tuple[dict[str, TrainConfig], int]], names: list[str], say) -> dict:
    """One Ray Tune search with every (seed, candidate, fold) a trial (`run_search`, as `tl tune`:
    a cluster trains them in parallel, every trial is an MLflow run); returns its summary.
    Validated after every epoch, as a search must be; a one-process trial reports only its end
    (`epoch_reports`), where the candidates are compared."""
    from tl_core.train import code_version
    from tl_core.tune.search import run_search
    from tl_core.tune.space import SearchConfig

    points = [{**configs[s].model_dump(), "cv_folds": k, "cv_fold": fold, "eval_every": 1, "checkpoint_every": 0}
              for configs, k in validated.values() for s in names for fold in (range(k) if s in CHEAP else [0])]
    varying = sorted({key for p in points for key in p if len({repr(q[key]) for q in points}) > 1})
    identity = json.dumps(points, sort_keys=True, default=str) + code_version()
    search = SearchConfig(
        base=points[0],
        space={key: {"choice": _distinct([p[key] for p in points])} for key in varying},
        points=[{key: p[key] for key in varying} for p in points],
        scheduler="fifo",  # every candidate runs its whole budget: they are compared at the end,
        epoch_reports=False,  # so a one-process trial reports only its end,
        keep_models=False,  # and no model: the winner trains again on all the labels
        # Named by its trials and the code: the same choice asked again (same labels, candidates,
        # recipes and tl_core) resumes the finished search and reuses its trials.
        name=f"auto-{storage.sha256_bytes(identity.encode())[:12]}",
        resume=True,
    )
    folds = sorted({k for _, k in validated.values()})
    seeds = f" of seeds {', '.join(map(str, validated))}" if len(validated) > 1 else ""
    say(f"auto: {len(names)} candidates ({', '.join(names)}), {len(points)} trials on "
        f"{'/'.join(map(str, folds))} folds of the labels{seeds}")
    return run_search(search)


def scored_candidates(trials: list[dict], seed: int, names: list[str], k: int) -> dict[str, dict]:
    """Each candidate's validation on `seed`'s folds: the mean over the folds its trials finished,
    and per fold which held-out labels it got right. (A trial's params hold only what varies
    between trials: a seed or fold they all share is left out.)"""
    scores: dict[str, dict[int, dict]] = {s: {} for s in names}  # candidate -> fold -> its trial's summary
    for trial in trials:
        params = trial["params"]
        if params.get("seed", seed) != seed:
            continue
        strategy = params.get("strategy", names[0])
        if trial["status"] == "completed" and trial["val_accuracy"] is not None:
            scores[strategy][params.get("cv_fold", 0)] = trial
    return {s: {"val_accuracy": statistics.mean(t["val_accuracy"] for t in v.values()) if v else None,
                "folds_run": len(v), "validation": f"{k}-fold" if s in CHEAP else f"1 held-out fold of {k}",
                "correct": {str(fold): t["val_correct"] for fold, t in sorted(v.items()) if t.get("val_correct")}}
            for s, v in scores.items()}


def paired_gain(candidate: dict, other: dict) -> np.ndarray:
    """+1, 0 or -1 per held-out label that both were validated on (the folds both ran): where
    `candidate` was right and `other` wrong, both alike, or the reverse."""
    shared = [fold for fold in candidate["correct"] if fold in other["correct"]]
    bits = [np.array([c == "1" for c in "".join(scored["correct"][fold] for fold in shared)], dtype=np.float64)
            for scored in (candidate, other)]
    return bits[0] - bits[1]


def best_candidate(candidates: dict[str, dict], default: str) -> str:
    """`default` (the stated rule's choice, `fallback`), unless other candidates are right on more of
    the same held-out labels than it beyond chance (`clear_gain`); then the one of
    those with the highest validation accuracy, a tie to the earlier in PREFERENCE."""
    from tl_core.strategies.logistic import clear_gain

    scored = [s for s, c in candidates.items() if c["val_accuracy"] is not None]
    if default not in scored:  # its validation failed: the scores alone
        return max(scored, key=lambda s: (candidates[s]["val_accuracy"], -PREFERENCE.index(s)))
    others = [s for s in scored if s != default]
    evidenced = [s for s in others if clear_gain(paired_gain(candidates[s], candidates[default]), len(others))]
    return max(evidenced or [default], key=lambda s: (candidates[s]["val_accuracy"], -PREFERENCE.index(s)))


def reason_for(best: str, default: str, why: str, candidates: dict[str, dict], names: list[str]) -> str:
    ranked = [s for s in names if candidates[s]["val_accuracy"] is not None]
    scores = ", ".join(f"{s} {candidates[s]['val_accuracy']:.3f} ({candidates[s]['validation']})" for s in ranked)
    if best == default:
        return (f"the stated rule's {default} ({why}): no candidate was right on more of the same held-out labels "
                f"beyond chance; validation accuracy {scores}")
    if candidates[default]["val_accuracy"] is None:
        return f"highest validation accuracy on the labels ({default}, the stated rule's, failed): {scores}"
    from tl_core.strategies.logistic import EVIDENCE, sign_test

    gain = paired_gain(candidates[best], candidates[default])
    wins, losses, p = sign_test(gain)
    others = len(ranked) - 1
    return (f"of the {len(gain)} held-out labels it shares with the stated rule's {default} ({why}), right on {wins} "
            f"that one got wrong and wrong on {losses} it got right (a fair coin does as well with p = {p:.3f}, "
            f"under {EVIDENCE / others:.3f}: one standard error's {EVIDENCE:.3f} shared among the {others} candidates "
            f"weighed against it); validation accuracy {scores}")


def fallback(cfg: TrainConfig) -> tuple[str, str]:
    """The strategy taken where nothing can be validated (1 shot), and why (the module's docstring)."""
    from tl_core.checkpoints import load_checkpoint
    from tl_core.data import load_manifest
    from tl_core.strategies.base import source_head
    from tl_core.strategies.zero_shot import descriptions_of

    manifest = load_manifest(cfg.data)
    if (cfg.head_init in ("auto", "source") and cfg.backbone
            and source_head(load_checkpoint(cfg.backbone), manifest["classes"]) is not None):
        return "finetune", "from the backbone's own head, which was trained on these classes"
    counts = label_counts(cfg) if manifest["stored"] == "text" else None
    if counts is not None and counts.min() >= 2:  # a pair of the same class to learn from, in every class
        if not descriptions_of(cfg):
            return "setfit", ("SetFit's recipe for a sentence encoder's few labels, where no descriptions file came "
                              "with the data")
        labelled = int(counts.sum())
        if labelled >= SETFIT_OVER_DESCRIPTIONS:
            return "setfit", (f"SetFit from the descriptions file's head: {labelled} labels, at least the "
                              f"{SETFIT_OVER_DESCRIPTIONS} where it beat their probe")
    return "linear-probe", ("its head solved: scikit-learn's C=1, or where a descriptions file came with the data "
                            "that file's zero-shot head, unless the labels show another C better")


def recipe_for(cfg: TrainConfig, recipes: dict[str, dict] | None, strategy: str) -> dict:
    """A candidate's recipe: from `recipes` (tl run's, the model's defaults under the file's
    `recipes:`) where given, else the model's default recipe (tl_core/recipes.py) in the settings
    `cfg` was not given: `tl transfer --strategy auto --epochs 3` trains every candidate 3 epochs."""
    return dict(recipes.get(strategy, {})) if recipes is not None else cfg.recipe(strategy)


def _distinct(values: list) -> list:
    seen, out = set(), []
    for value in values:
        if repr(value) not in seen:
            seen.add(repr(value))
            out.append(value)
    return out


def auto_step(cfg: TrainConfig, recipes: dict[str, dict] | None = None, on_report=None, force: bool = False,
              baseline: bool = True, say=print, scratch_accuracy: float | None = None,
              choice: Choice | None = None) -> dict:
    """`tl transfer --strategy auto` and `tl run`'s auto row: choose (unless `choice` was made
    already, by `choose_each` for every seed of a run), refit the winner on all the labels
    (measured against scratch, as every transfer), and log the candidates, the choice and the
    reason to MLflow."""
    import mlflow

    from tl_core import tracking
    from tl_core.steps import train_step

    with tracking.run(f"transfer auto seed={cfg.seed} shots={cfg.shots}", params=cfg.model_dump(),
                      tags={"tl.step": "transfer", "tl.strategy": "auto"}) as active:
        choice = choice or choose(cfg, recipes, say)
        scratch = None  # the baseline on the same labels: given (tl run trained it), or trained here
        if baseline and scratch_accuracy is None:
            scratch = train_step(candidate_config(cfg, "scratch", recipe_for(cfg, recipes, "scratch")), "transfer",
                                 on_report)
            scratch_accuracy = scratch["metrics"]["accuracy"]
        refit = train_step(choice.config, "transfer", on_report, force, scratch_accuracy=scratch_accuracy)
        tracking.log_metrics({f"auto.val_accuracy.{s}": c["val_accuracy"] for s, c in choice.candidates.items()
                              if c["val_accuracy"] is not None})
        tracking.log_metrics({"auto.folds": choice.folds, "auto.choose_seconds": choice.seconds,
                              "test_accuracy": refit["metrics"]["accuracy"]})
        mlflow.set_tags({"tl.auto.choice": choice.strategy, "tl.auto.reason": choice.reason[:5000],
                         "tl.auto.fallback": str(choice.folds == 0).lower()})
        record = {"choice": choice.strategy, "reason": choice.reason, "folds": choice.folds,
                  "fallback": choice.folds == 0, "candidates": choice.candidates,
                  "search": choice.search["name"] if choice.search else None, "choose_seconds": choice.seconds,
                  "refit": {k: refit[k] for k in ("strategy", "checkpoint", "run_id")}}
        tracking.log_json(record, "auto.json")
    # Its cost is the choosing and the refit together
    out = {**refit, "strategy": "auto", "auto": record, "run_id": active.info.run_id,
           "seconds": choice.seconds + refit["seconds"], "train_seconds": choice.seconds + refit["train_seconds"]}
    if scratch:
        out["baseline"] = scratch
    return out

