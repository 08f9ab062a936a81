"""Evaluation: a checkpoint on the target's test split (tl_core.steps.evaluate_step)."""

from kfp.dsl import ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from components import tl_component


@tl_component
def evaluate(model: Input[Model], data: Input[Dataset], metrics: Output[Metrics],
             confusion: Output[ClassificationMetrics]) -> float:
    """Accuracy, macro-F1, ECE, per-class accuracy and the confusion matrix; returns the accuracy
    (the pipeline's promotion gate reads it)."""
    from components import artifacts
    from tl_core.steps import evaluate_step

    result = evaluate_step(artifacts.uri(model), artifacts.uri(data))
    artifacts.log_metrics(metrics, result["metrics"])
    confusion.log_confusion_matrix(result["classes"], result["confusion"])
    return result["metrics"]["accuracy"]
