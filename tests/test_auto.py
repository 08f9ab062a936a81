"""`--strategy auto` (issue 27): the candidates are chosen by validation on folds of the labels,
through the same Ray Tune search as `tl tune`; the test split is never read while choosing (the
test makes every read of it fail); the winner is refitted on all the labels; the candidates, the
choice and the reason are logged to MLflow."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest

from tl_core.config import PrepareConfig, TrainConfig


@pytest.fixture(scope="module")
def local_ray(module_workdir):
    import ray

    from tl_core.ray_cluster import init_ray

    init_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def digits(module_workdir):
    from tl_core.data import prepare
    from tl_core.train import train

    data, _ = prepare(PrepareConfig(uri="sklearn:digits"))
    backbone = train(TrainConfig(data=data.path, epochs=2, seed=1, batch_size=128))
    return data, TrainConfig(data=data.path, strategy="auto", backbone=backbone.checkpoint_uri, shots=5, epochs=10)


@pytest.mark.timeout(600)
def test_auto_chooses_on_folds_of_the_labels_never_the_test_split_and_refits_on_all(digits, local_ray,
                                                                                     module_workdir):
    from tl_core.auto import CHEAP, auto_step, best_candidate, choose, fallback

    data, cfg = digits
    # Every file of the test split moved away while auto chooses: any read of it fails.
    hidden = module_workdir / "hidden-test"
    hidden.mkdir()
    test_files = [p for p in Path(data.path).rglob("*test*") if p.is_file()]
    assert test_files
    for path in test_files:
        shutil.move(path, hidden / path.name)
    try:
        choice = choose(cfg, say=lambda line: None)
    finally:
        for path in test_files:
            shutil.move(hidden / path.name, path)
    assert choice.folds == 5 and set(choice.candidates) == {"zero-shot", "linear-probe", "scratch", "finetune"}
    for name, candidate in choice.candidates.items():
        assert candidate["folds_run"] == (5 if name in CHEAP else 1) and 0 <= candidate["val_accuracy"] <= 1
        # Which held-out labels it got right, per fold: 10 a fold (50 labels, 5 folds), as its accuracy says
        assert set(candidate["correct"]) == ({"0", "1", "2", "3", "4"} if name in CHEAP else {"0"})
        for right in candidate["correct"].values():
            assert len(right) == 10 and set(right) <= {"0", "1"}
        mean = sum(r.count("1") / len(r) for r in candidate["correct"].values()) / candidate["folds_run"]
        assert mean == pytest.approx(candidate["val_accuracy"])
    assert choice.strategy == best_candidate(choice.candidates, fallback(cfg)[0]) and choice.strategy in choice.reason
    assert all(t["test_accuracy"] is None for t in choice.search["trials"])  # no trial scored the test split
    # No trial kept its model (SearchConfig.keep_models): the winner trains again on all the labels
    assert choice.search["best_checkpoint"] is None and Path(choice.search["storage"]).is_dir()
    assert not list(Path(choice.search["storage"]).rglob("checkpoint_*"))
    assert choice.config.strategy == choice.strategy and choice.config.cv_folds == 0  # refitted on every label

    result = auto_step(cfg, say=lambda line: None)  # the same choice (its trials reused), refitted, logged
    assert result["auto"]["choice"] == choice.strategy
    from tl_core.checkpoints import load_checkpoint

    refit = load_checkpoint(result["checkpoint"])
    assert refit["config"]["strategy"] == choice.strategy and refit["config"]["cv_folds"] == 0
    assert refit["metrics"]["train_images"] == 5 * len(data.classes)  # all the labels, none held out
    run = mlflow.get_run(result["run_id"])
    assert run.data.tags["tl.auto.choice"] == choice.strategy and run.data.tags["tl.auto.reason"] == choice.reason
    for name, candidate in choice.candidates.items():
        assert run.data.metrics[f"auto.val_accuracy.{name}"] == pytest.approx(candidate["val_accuracy"])
    logged = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=result["run_id"], artifact_path="auto.json"))
                        .read_text())
    assert logged["choice"] == choice.strategy and logged["fallback"] is False
    assert "gain_over_scratch" in result


@pytest.mark.timeout(600)
def test_the_seeds_of_a_run_are_chosen_in_one_search_each_on_its_own_labels(digits, local_ray):
    """`tl run`'s auto row: every seed's trials in one search (its trial processes start once, not
    once a seed), and each seed scored on its own folds, as it is alone."""
    from tl_core.auto import CHEAP, best_candidate, choose, choose_each, fallback

    _, cfg = digits
    runs = [cfg, cfg.model_copy(update={"seed": 1})]
    together = choose_each(runs, say=lambda line: None)
    assert together[0].search is together[1].search and len(together[0].search["trials"]) == 2 * 12
    assert {t["params"]["seed"] for t in together[0].search["trials"]} == {0, 1}
    for run, choice in zip(runs, together):
        alone = choose(run, say=lambda line: None)
        assert alone.search["name"] != choice.search["name"] and len(alone.search["trials"]) == 12
        for name, candidate in alone.candidates.items():  # solved or untrained: the same; trained: within an image
            assert choice.candidates[name]["folds_run"] == candidate["folds_run"]
            assert choice.candidates[name]["val_accuracy"] == pytest.approx(candidate["val_accuracy"],
                                                                            abs=0 if name in CHEAP else 0.11)
        assert choice.strategy == best_candidate(choice.candidates, fallback(run)[0]) and choice.config.seed == run.seed
    with pytest.raises(ValueError, match="distinct seeds"):
        choose_each([cfg, cfg.model_copy(update={"shots": 3})])


def test_one_label_a_class_falls_back_to_the_stated_rule(digits):
    from tl_core.auto import choose

    _, cfg = digits  # its backbone was trained on the target's own classes: its head fits them
    one = cfg.model_copy(update={"shots": 1})
    choice = choose(one, say=lambda line: None)
    assert choice.strategy == "finetune" and "own head" in choice.reason
    assert choice.folds == 0 and choice.search is None
    assert "fewer than 2 labels" in choice.reason and choice.config.shots == 1
    # A head that is not to start from the source's: the solved probe.
    plain = choose(one.model_copy(update={"head_init": "random"}), say=lambda line: None)
    assert plain.strategy == "linear-probe" and "scikit-learn's C=1" in plain.reason and plain.folds == 0


def test_the_stated_rule_holds_unless_a_candidate_is_right_on_more_of_the_same_labels_beyond_chance():
    from tl_core.auto import best_candidate, reason_for

    def scored(*folds: str | None) -> dict:
        """A candidate from which labels it got right on folds 0, 1, ... (None: a fold it did not run)."""
        correct = {str(i): bits for i, bits in enumerate(folds) if bits is not None}
        means = [bits.count("1") / len(bits) for bits in correct.values()]
        return {"val_accuracy": sum(means) / len(means) if means else None, "folds_run": len(means),
                "validation": f"{len(means)} folds", "correct": correct}

    ten = "1" * 10
    # One image of 10 is no evidence (the demo's seed 2: scratch 10/10 against finetune 9/10)
    candidates = {"finetune": scored("1111111110"), "scratch": scored(ten), "linear-probe": scored("1111111100")}
    assert best_candidate(candidates, "finetune") == "finetune"
    reason = reason_for("finetune", "finetune", "its rule", candidates, list(candidates))
    assert reason.startswith("the stated rule's finetune (its rule)") and "scratch 1.000" in reason
    # Two of 10, all one way, are not (a coin does it one time in four); three are (one in eight)
    # against the one other candidate, but not against two, which share one standard error's odds
    # (0.159 / 2); four are (one in 16)
    assert best_candidate({"finetune": scored("1111111000"), "scratch": scored(ten)}, "finetune") == "scratch"
    candidates["finetune"] = scored("1111111100")
    assert best_candidate(candidates, "finetune") == "finetune"
    candidates["finetune"] = scored("1111111000")
    assert best_candidate(candidates, "finetune") == "finetune"
    candidates["finetune"] = scored("1111110000")
    assert best_candidate(candidates, "finetune") == "scratch"
    reason = reason_for("scratch", "finetune", "r", candidates, list(candidates))
    assert "right on 4 that one got wrong and wrong on 0 it got right" in reason and "p = 0.062" in reason
    assert "under 0.079: one standard error's 0.159 shared among the 2 candidates weighed against it" in reason
    # Paired on the fold both ran: the probe's 5 folds average higher, but finetune is right on
    # 5 more of fold 0's labels than the probe, which is the stated rule here
    candidates = {"linear-probe": scored("1111100000", ten, ten, ten, ten), "finetune": scored(ten)}
    assert candidates["linear-probe"]["val_accuracy"] > 0.85 and best_candidate(candidates, "linear-probe") == "finetune"
    # Label by label: 7 won against 2 lost is evidence (p 0.09); 5 against 2 is not (p 0.23), nor one against one
    candidates = {"linear-probe": scored("1100000000"), "zero-shot": scored("0011111110")}
    assert best_candidate(candidates, "linear-probe") == "zero-shot"
    candidates = {"linear-probe": scored("1100000000"), "zero-shot": scored("0011111000")}
    assert best_candidate(candidates, "linear-probe") == "linear-probe"
    candidates = {"linear-probe": scored("1111100000"), "zero-shot": scored("0111110000")}
    assert best_candidate(candidates, "linear-probe") == "linear-probe"
    # Several with evidence: the highest score; no labels in common (a trial without them): no evidence
    candidates = {"linear-probe": scored("1100000000"), "scratch": scored("1111110000"), "finetune": scored("1111111100")}
    assert best_candidate(candidates, "linear-probe") == "finetune"
    assert best_candidate({"linear-probe": scored("1100000000"), "finetune": {**scored(ten), "correct": {}}},
                          "linear-probe") == "linear-probe"
    # The stated rule's candidate failed its validation: the highest score, a tie to PREFERENCE
    candidates = {"finetune": scored(None), "scratch": scored("1111111100"), "linear-probe": scored("1111111100")}
    assert best_candidate(candidates, "finetune") == "linear-probe"


def test_the_run_table_keeps_its_figures_whole_beside_autos_long_notes(capsys):
    """Piped (not a terminal), `tl run`'s table is 110 columns wide: auto's notes for 3 seeds at 1
    shot once squeezed every figure to '62.4…'. The notes wrap; the figures do not."""
    from tl_core.cli import show_table

    def row(strategy, accuracy):
        return {"strategy": strategy, "test_accuracy": accuracy, "test_accuracy_std": 0.065, "gain_over_scratch": 0.2,
                "seeds_beating_scratch": 3, "seeds": 3, "train_seconds": 0.6, "negative_transfer": False}

    show_table({"source": {"path": "tl-work/data/fonts-digits-80127cb17fe5"},
                "target": {"path": "tl-work/data/sklearn-digits-dbae076d8f64"}, "baseline": "scratch",
                "best_strategy": "finetune", "table": [row("scratch", 0.624), row("finetune", 0.834), row("auto", 0.834)],
                "auto": [{"seed": s, "choice": "finetune", "fallback": True, "reason": "the stated rule"} for s in range(3)],
                "pretrain": {"checkpoint": "tl-work/models/scratch-8ddb33852d575bdd/checkpoint.pt", "metrics": None},
                "run_id": "0" * 32, "seconds": 18.0})
    out = capsys.readouterr().out
    assert "62.4 ± 6.5" in out and "83.4 ± 6.5" in out and "test acc %" in out and "…" not in out, out
    assert "finetune (1-shot rule)" in out
