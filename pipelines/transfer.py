"""The transfer pipeline: prepare the target and the source -> pretrain -> HPO (optional) ->
transfer with the best config -> evaluate -> register -> promote if the gate passes.

    prepare target -> prepare source (at the target's shape) -> pretrain
      search_space set:   tune -> release(tuned config)
      search_space "":           release(base config)
    release: transfer -> evaluate -> register -> [accuracy >= min_accuracy] promote

`release` is a pipeline used as a component, so the HPO branch and the plain one share one
definition (kfp.local cannot pass an artifact out of an If/Else through dsl.OneOf, and the two
branches would otherwise repeat four steps).
"""

import json

from kfp import dsl
from pydantic import Field, field_validator

from components.evaluate import evaluate
from components.prepare import prepare
from components.pretrain import pretrain
from components.registry import promote, register
from components.transfer import transfer
from components.tune import tune
from tl_core.config import StepConfig, TrainConfig

NAME = "tl-transfer"


class PipelineConfig(StepConfig):
    """The pipeline's parameters: validated here before a run is compiled, sent or scheduled."""

    source: str = Field("fonts:digits", description="source data URI to pretrain on")
    target: str = Field("sklearn:digits", description="target data URI to transfer to")
    model: str = Field("small_cnn", description="architecture of the backbone")
    strategy: str = Field("finetune", description="transfer strategy")
    shots: int = Field(5, ge=0, description="labelled target images per class (0: all)")
    pretrain_epochs: int = Field(15, ge=1)
    epochs: int = Field(100, ge=1, description="transfer epochs")
    lr: float = Field(1e-3, gt=0, description="transfer learning rate")
    workers: int = Field(1, ge=1, description="Ray Train workers per training run")
    search_space: str = Field("", description='HPO search space, JSON: {"lr": {"loguniform": [1e-4, 1e-2]}}; '
                                              '"" skips HPO')
    num_samples: int = Field(8, ge=1, description="HPO trials")
    min_accuracy: float = Field(0.5, ge=0, le=1, description="promotion floor on the target's test accuracy")
    min_delta: float = Field(0.0, ge=0, description="promotion: beat the champion by at least this much accuracy")
    model_name: str = Field("tl-transfer", pattern=r"^[^/:]+$", description="registered model name")

    # The training core's own checks, so a typo fails here and not in the middle of a run.
    _strategy = field_validator("strategy")(TrainConfig._known_strategy.__func__)
    _model = field_validator("model")(TrainConfig._known_model.__func__)

    @field_validator("search_space")
    @classmethod
    def _search_space(cls, text: str) -> str:
        if not text.strip():
            return ""
        try:
            space = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"not JSON ({err})") from None
        if not isinstance(space, dict) or not space:
            raise ValueError('must be a JSON object of settings, e.g. {"lr": {"loguniform": [1e-4, 1e-2]}}')
        unknown = sorted(set(space) - set(TrainConfig.model_fields))
        if unknown:
            raise ValueError(f"{unknown} are not TrainConfig settings")
        return json.dumps(space, sort_keys=True)  # the search checks the distributions themselves


D = PipelineConfig()  # the defaults, written into the compiled pipeline

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


def _step(task: dsl.PipelineTask, cache: bool = True) -> dsl.PipelineTask:
    """What every step shares: the cluster's settings, and KFP caching off (cache=False) where a
    step has side effects or reads data that can change behind the same URI."""
    task.set_caching_options(cache)
    task.platform_config["kubernetes"] = CLUSTER_ENV
    return task


@dsl.pipeline(name="tl-release", description="transfer -> evaluate -> register -> promote if the gate passes")
def release(data: dsl.Input[dsl.Dataset], backbone: dsl.Input[dsl.Model], tuned: str, strategy: str, shots: int,
            epochs: int, lr: float, workers: int, min_accuracy: float, min_delta: float, model_name: str):
    trained = _step(transfer(data=data, backbone=backbone, strategy=strategy, shots=shots, epochs=epochs, lr=lr,
                             workers=workers, tuned=tuned))
    checkpoint = trained.outputs["checkpoint"]
    scored = _step(evaluate(model=checkpoint, data=data))
    # Every candidate that was evaluated is registered (the registry is the audit log), and
    # promote, the only step that moves `champion`, runs only above the floor; it compares the
    # candidate with the champion itself (min_delta), under the registry's lock.
    registered = _step(register(model=checkpoint, data=data, model_name=model_name), cache=False).after(scored)
    with dsl.If(scored.outputs["Output"] >= min_accuracy, name="gate"):
        _step(promote(model_name=model_name, version=registered.output, data=data, min_accuracy=min_accuracy,
                      min_delta=min_delta), cache=False)


@dsl.pipeline(name=NAME, description="Pretrain on a source, transfer to a target, evaluate, register, promote")
def transfer_pipeline(
    source: str = D.source, target: str = D.target, model: str = D.model, strategy: str = D.strategy,
    shots: int = D.shots, pretrain_epochs: int = D.pretrain_epochs, epochs: int = D.epochs, lr: float = D.lr,
    workers: int = D.workers, search_space: str = D.search_space, num_samples: int = D.num_samples,
    min_accuracy: float = D.min_accuracy, min_delta: float = D.min_delta, model_name: str = D.model_name,
):
    # prepare reads its source every time (data behind a URI can change); identical data is
    # recognised by its content hash and reused, so it never needs KFP's cache.
    target_data = _step(prepare(uri=target), cache=False).set_display_name("prepare-target")
    source_data = _step(prepare(uri=source, like=target_data.outputs["dataset"]), cache=False)
    source_data.set_display_name("prepare-source")
    backbone = _step(pretrain(data=source_data.outputs["dataset"], model=model, epochs=pretrain_epochs, workers=workers))
    common = dict(data=target_data.outputs["dataset"], backbone=backbone.outputs["checkpoint"], strategy=strategy,
                  shots=shots, epochs=epochs, lr=lr, workers=workers)
    release_args = dict(min_accuracy=min_accuracy, min_delta=min_delta, model_name=model_name)
    with dsl.If(search_space != "", name="hpo"):
        best = _step(tune(**common, search_space=search_space, num_samples=num_samples))
        release(**common, **release_args, tuned=best.outputs["Output"])
    with dsl.Else(name="no-hpo"):
        release(**common, **release_args, tuned="{}")
