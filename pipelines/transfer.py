"""The transfer pipeline: monitor -> (drift, forced, or no champion yet) prepare the target and
the source -> pretrain -> HPO (optional) -> transfer with the best config -> evaluate -> register
-> promote if the gate passes. With a packaged encoder (model minilm-l6, a text target) the
source and pretrain steps pass the encoder on, as `tl run` does.

    monitor: the target's data now (the newest snapshot) against the champion's training data,
             on the champion's embeddings; "no-drift" ends the run here, green, nothing trained
    [decision != no-drift] retrain:
    prepare target -> prepare source (at the target's shape) -> pretrain
      search_space set:   tune -> release(tuned config)
      search_space "":           release(base config)
    release: transfer -> evaluate -> register -> [accuracy >= min_accuracy] promote
    backbone "auto": the transfer step ranks the candidates (tl rank: the registry's versions, the
             packaged backbones, the pretrainings, this run's among them) and trains from the first

`release` is a pipeline used as a component, so the HPO branch and the plain one share one
definition (kfp.local cannot pass an artifact out of an If/Else through dsl.OneOf, and the two
branches would otherwise repeat four steps).
"""

import inspect

from kfp import dsl

from components.evaluate import evaluate
from components.monitor import monitor
from components.prepare import prepare
from components.pretrain import pretrain
from components.registry import promote, register
from components.transfer import transfer
from components.tune import tune
from tl_core.config import BY_RECIPE, PipelineConfig
from tl_core.monitor import NO_DRIFT

NAME = "tl-transfer"

# In a cluster every step needs the settings the rest of tl gets from k8s/base (MLflow, S3,
# TL_WORKDIR, RAY_ADDRESS): the ConfigMaps `tl-env` and `tl-ray-client` and the Secret `tl-s3`,
# which must also exist in the namespace where KFP runs its pods. This is the JSON kfp-kubernetes
# would write (KubernetesExecutorConfig), without the extra dependency; kfp.local ignores it.
CONFIG_MAPS = {
    "tl-env": ["MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_DEFAULT_REGION", "TL_WORKDIR"],
    "tl-ray-client": ["RAY_ADDRESS"],
}
SECRETS = {"tl-s3": ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]}


def _as_env(kind: str, name: str, keys: list[str]) -> dict:
    # Both spellings of the name: older KFP backends read `secretName`, newer ones the parameter.
    return {f"{kind}Name": name, f"{kind}NameParameter": {"runtimeValue": {"constant": name}},
            "keyToEnv": [{f"{kind}Key": key, "envVar": key} for key in keys]}


CLUSTER_ENV = {"configMapAsEnv": [_as_env("configMap", name, keys) for name, keys in CONFIG_MAPS.items()],
               "secretAsEnv": [_as_env("secret", name, keys) for name, keys in SECRETS.items()]}


# A step that fails (a preempted node, storage or the tracking server away for a while) is run
# again by KFP, after 1, then 2 minutes: every step is safe to repeat after a crash at any point
# (prepare and training reuse what is complete by its hash, tune resumes its search, register
# gives back a version still waiting to be judged, promote reports an earlier promotion again).
RETRIES = 2


def _step(task: dsl.PipelineTask, cache: bool = True) -> dsl.PipelineTask:
    """What every step shares: the cluster's settings, retries, and KFP caching off (cache=False)
    where a step has side effects or reads data that can change behind the same URI."""
    task.set_caching_options(cache)
    task.set_retry(num_retries=RETRIES, backoff_duration="60s", backoff_factor=2.0, backoff_max_duration="3600s")
    task.platform_config["kubernetes"] = CLUSTER_ENV
    return task


# The settings each training step takes, as ExperimentSettings names them: each component builds
# its TrainConfig from them with the ExperimentSettings method that `tl run` uses too, so the same
# settings make the same checkpoints (and reuse them) whichever runs them.
PRETRAINING = ("model", "pretrain_epochs", "pretrain_lr", "batch_size", "augment", "workers")
TRANSFER = ("model", "shots", "epochs", "lr", "batch_size", "augment", "workers")
TEXT_LAYOUT = ("text_column", "label_column", "header")
IMAGE_SHAPE = ("image_size", "channels")  # of the target as prepared; 0: the target's own


def arguments(cfg: PipelineConfig) -> dict:
    """The pipeline's arguments for `cfg`: its fields, with "all labels" as shots=-1 (a KFP
    parameter is an int; tl_core.config reads -1 as all), and a setting left unset (None) as "" for
    a text column's name, 0 for the image's shape (KFP takes no None; the prepare step reads both
    as unset); a training setting a recipe may set (BY_RECIPE: epochs, lr, batch_size), not given,
    as 0: each step takes the model's recipe for its strategy there, as `tl run` does."""
    values = {k: "" if v is None else v for k, v in cfg.model_dump().items()}
    return values | {"shots": -1 if cfg.shots is None else cfg.shots} | {k: getattr(cfg, k) or 0 for k in IMAGE_SHAPE} | {
        k: type(getattr(cfg, k))(0) for k in BY_RECIPE if k not in cfg.model_fields_set}


@dsl.pipeline(name="tl-release", description="transfer -> evaluate -> register -> promote if the gate passes")
def release(data: dsl.Input[dsl.Dataset], backbone: dsl.Input[dsl.Model], source: dsl.Input[dsl.Dataset], tuned: str,
            backbone_choice: str, strategy: str, model: str, shots: int, epochs: int, lr: float, batch_size: int,
            augment: int, workers: int, min_accuracy: float, min_delta: float, model_name: str):
    trained = _step(transfer(data=data, backbone=backbone, source=source, strategy=strategy, tuned=tuned, model=model,
                             shots=shots, epochs=epochs, lr=lr, batch_size=batch_size, augment=augment, workers=workers,
                             backbone_choice=backbone_choice))
    checkpoint = trained.outputs["checkpoint"]
    scored = _step(evaluate(model=checkpoint, data=data))
    # Every candidate that was evaluated is registered (the registry is the audit log), and
    # promote, the only step that moves `champion`, runs only above the floor; it compares the
    # candidate with the champion itself (min_delta), under the registry's lock.
    registered = _step(register(model=checkpoint, data=data, model_name=model_name), cache=False).after(scored)
    with dsl.If(scored.outputs["Output"] >= min_accuracy, name="gate"):
        _step(promote(model_name=model_name, version=registered.output, data=data, min_accuracy=min_accuracy,
                      min_delta=min_delta), cache=False)


def pipeline(cfg: PipelineConfig):
    # The loop's first step: drift of the newest data (what the target holds now) from what the
    # champion was trained on. Never cached: the data behind the URI and the champion change.
    checked = _step(monitor(model_name=cfg.model_name, data=cfg.target, force_retrain=cfg.force_retrain,
                            **{name: getattr(cfg, name) for name in TEXT_LAYOUT}), cache=False)
    with dsl.If(checked.outputs["Output"] != NO_DRIFT, name="retrain"):
        retrain(cfg)


def retrain(cfg: PipelineConfig):
    # prepare reads its source every time (data behind a URI can change); identical data is
    # recognised by its content hash and reused, so it never needs KFP's cache.
    target_data = _step(prepare(uri=cfg.target, **{name: getattr(cfg, name) for name in TEXT_LAYOUT + IMAGE_SHAPE}),
                        cache=False)
    target_data.set_display_name("prepare-target")
    # A packaged encoder (model minilm-l6) is its own source: these two steps then pass it on.
    source_data = _step(prepare(uri=cfg.source, like=target_data.outputs["dataset"], model=cfg.model), cache=False)
    source_data.set_display_name("prepare-source")
    backbone = _step(pretrain(data=source_data.outputs["dataset"], **{name: getattr(cfg, name) for name in PRETRAINING}))
    common = dict(data=target_data.outputs["dataset"], backbone=backbone.outputs["checkpoint"],
                  source=source_data.outputs["dataset"], strategy=cfg.strategy,
                  **{name: getattr(cfg, name) for name in TRANSFER})
    release_args = dict(min_accuracy=cfg.min_accuracy, min_delta=cfg.min_delta, model_name=cfg.model_name,
                        backbone_choice=cfg.backbone)
    with dsl.If(cfg.search_space != "", name="hpo"):
        best = _step(tune(**common, search_space=cfg.search_space, num_samples=cfg.num_samples))
        release(**common, **release_args, tuned=best.outputs["Output"])
    with dsl.Else(name="no-hpo"):
        release(**common, **release_args, tuned="{}")


def _pipeline_signature() -> inspect.Signature:
    """The pipeline's parameters: PipelineConfig's fields, their defaults written into the YAML."""
    defaults = arguments(PipelineConfig())
    params = []
    for name, field in PipelineConfig.model_fields.items():
        kind = {"shots": int, "backbone": str}.get(name) or next(
            k for k in (bool, int, float, str) if k in (field.annotation, *getattr(field.annotation, "__args__", ())))
        params.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=kind,
                                        default=defaults[name]))
    return inspect.Signature(params)


def _transfer_pipeline(*values):
    # KFP calls this with one placeholder per parameter, in order: nothing to validate here.
    pipeline(PipelineConfig.model_construct(**dict(zip(PipelineConfig.model_fields, values))))


_transfer_pipeline.__signature__ = _pipeline_signature()
transfer_pipeline = dsl.pipeline(
    name=NAME, description="Pretrain on a source, transfer to a target, evaluate, register, promote")(_transfer_pipeline)
