"""Monitor: the pipeline's first step. Drift of the newest data from the champion's training data,
on the champion's embeddings (tl_core.monitor.retraining_decision, as `tl monitor`); the pipeline
retrains only after drift, a forced run or with no champion yet."""

from kfp.dsl import Metrics, Output

from components import tl_component


@tl_component
def monitor(model_name: str, data: str, force_retrain: bool, metrics: Output[Metrics], text_column: str = "",
            label_column: str = "", header: bool = True) -> str:
    """Returns the decision: drift, forced, no-champion (retrain) or no-drift (train nothing); the
    reason is printed and the statistics go to `metrics` (and to MLflow, against the champion)."""
    from components import artifacts
    from tl_core.monitor import retraining_decision

    result = retraining_decision(model_name, data, force_retrain, text_column or None, label_column or None, header)
    print(f"monitor: {result['reason']}", flush=True)
    if result["monitor"]:
        artifacts.log_metrics(metrics, {k: result["monitor"][k] for k in (
            "mmd2", "p_value", "mean_confidence_reference", "mean_confidence_data", "confidence_shift",
            "class_mix_tvd")} | {"drift": float(result["monitor"]["drift"])})
    return result["decision"]
