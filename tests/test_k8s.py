"""Offline checks of the Kubernetes deployment in k8s/ (issue 6). No cluster, no Docker.

- Every plain Kubernetes object validates against the Kubernetes 1.30 OpenAPI schemas with
  unknown fields rejected (kubernetes-validate --strict).
- KubeRay objects (RayCluster, RayJob, RayService) use only fields of the KubeRay v1 Go types
  (ray-operator/apis/ray/v1/raycluster_types.go, rayjob_types.go, rayservice_types.go), with the
  right types, and every pod template inside them validates as a core/v1 PodTemplateSpec.
- The RayService's serveConfigV2 is a valid Ray Serve config whose import path builds `tl serve`'s
  application from its args (ServeConfig's fields), without starting Ray; its probes, ports,
  Service and NetworkPolicy agree with each other and with the application.
- Every pod runs non-root, without privilege escalation or capabilities, with a read-only
  root filesystem plus writable emptyDirs, and with CPU/memory requests and limits.
- Secrets hold only placeholders; credentials reach pods only through secretKeyRef/secretRef.
- Every reference (Secret, ConfigMap, PVC, ServiceAccount, volume, Service selector and port)
  resolves, and what the pods run (`tl ...` arguments, the run config) parses with the CLI.
- The kustomize overlays resolve: their resources exist, every patch targets one resource
  and applies (JSON patches, `test` ops included); the GPU overlay asks for nvidia.com/gpu,
  the local one asks for none and fits a laptop. Where `kubectl` is installed, its
  `kubectl kustomize` output is compared with this file's own build of the overlays.
- The Dockerfile pins its base image and packages and runs as a non-root user.
"""

from __future__ import annotations

import base64
import copy
import fnmatch
import functools
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
K8S_VERSION = "1.30"
NAMESPACE = "tl"
PROJECT_IMAGE = "registry.example.com/tl-core"
KUBERAY_API = "ray.io/v1"
PLACEHOLDER = re.compile(r"^CHANGE_ME")
CREDENTIAL_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|KEY_ID|CREDENTIAL", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------
# Loading the manifests
# ---------------------------------------------------------------------------------------------


def load_yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kustomization_files() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


def patch_files() -> set[Path]:
    """Files that kustomizations use as patches: JSON patch lists, not Kubernetes objects."""
    out = set()
    for kfile in kustomization_files():
        for patch in yaml.safe_load(kfile.read_text()).get("patches", []) or []:
            if "path" in patch:
                out.add((kfile.parent / patch["path"]).resolve())
    return out


@dataclass
class Doc:
    path: Path
    index: int
    obj: dict

    @property
    def kind(self) -> str:
        return self.obj["kind"]

    @property
    def name(self) -> str:
        meta = self.obj.get("metadata", {})
        return meta.get("name") or meta.get("generateName", "?")

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(K8S)}#{self.index}:{self.kind}/{self.name}"


def manifest_docs() -> list[Doc]:
    """Every Kubernetes object under k8s/ (kustomization files and patch files excluded)."""
    skip = patch_files()
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml" or path.resolve() in skip:
            continue
        for i, obj in enumerate(load_yaml_docs(path)):
            if isinstance(obj, dict) and "kind" in obj:  # anything else fails the test below
                docs.append(Doc(path, i, obj))
    return docs


DOCS = manifest_docs()
PLAIN = [d for d in DOCS if not d.obj.get("apiVersion", "").startswith("ray.io/")]
KUBERAY = [d for d in DOCS if d.obj.get("apiVersion", "").startswith("ray.io/")]
# Each overlay's serving/ (the RayService, applied on its own once a champion exists).
SERVING_OVERLAYS = sorted(f"{p.parent.parent.name}/serving"
                          for p in (K8S / "overlays").glob("*/serving/kustomization.yaml"))


def docs_of(kind: str, docs: list[Doc] | None = None) -> list[Doc]:
    return [d for d in (DOCS if docs is None else docs) if d.kind == kind]


def test_every_yaml_file_is_a_manifest_a_kustomization_or_a_patch():
    patches = patch_files()
    for path in sorted(K8S.rglob("*.yaml")):
        docs = load_yaml_docs(path)
        assert docs, f"{path} is empty"
        if path.name == "kustomization.yaml" or path.resolve() in patches:
            continue
        for doc in docs:
            assert isinstance(doc, dict) and {"apiVersion", "kind", "metadata"} <= doc.keys(), (
                f"{path}: not a Kubernetes object and not used as a patch by any kustomization")
    assert len(PLAIN) >= 15 and len(KUBERAY) >= 2, "the manifests went missing"


# ---------------------------------------------------------------------------------------------
# (a) Plain Kubernetes objects against the Kubernetes OpenAPI schemas
# ---------------------------------------------------------------------------------------------


def k8s_validate(obj: dict) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("doc", PLAIN, ids=lambda d: d.id)
def test_plain_manifest_validates_strictly(doc):
    k8s_validate(doc.obj)


def test_kubernetes_validate_cli_accepts_the_split_documents(tmp_path):
    """The command line the README documents, run once over every plain object."""
    exe = Path(sys.executable).with_name("kubernetes-validate")
    if not exe.exists():
        pytest.skip("kubernetes-validate script not installed beside this python")
    files = []
    for i, doc in enumerate(PLAIN):
        file = tmp_path / f"{i:03d}-{doc.kind}.yaml"
        file.write_text(yaml.safe_dump(doc.obj))
        files.append(str(file))
    result = subprocess.run([str(exe), "--strict", "-k", K8S_VERSION, *files], check=False, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_validator_rejects_unknown_fields_and_wrong_types():
    deployment = copy.deepcopy(docs_of("Deployment")[0].obj)
    deployment["spec"]["template"]["spec"]["containers"][0]["resourcez"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate(deployment)
    deployment = copy.deepcopy(docs_of("Deployment")[0].obj)
    deployment["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate(deployment)


# ---------------------------------------------------------------------------------------------
# (b) KubeRay objects against the KubeRay v1 types
# ---------------------------------------------------------------------------------------------
# A small schema language: scalar type names, Struct (known fields, the non-optional ones),
# ListOf, Enum, and the core/v1 types that kubernetes-validate checks.

INT32, FLOAT, BOOL, STRING, STRING_MAP = "int32", "float", "bool", "string", "map[string]string"
POD_TEMPLATE_SPEC, SERVICE, OBJECT = "corev1.PodTemplateSpec", "corev1.Service", "object"


@dataclass(frozen=True)
class Struct:
    fields: dict
    required: frozenset = frozenset()


@dataclass(frozen=True)
class ListOf:
    item: Any


@dataclass(frozen=True)
class Enum:
    values: frozenset


# From ray-operator/apis/ray/v1/raycluster_types.go (KubeRay v1). Fields this project does not
# use but that exist are listed too, typed loosely (OBJECT) where they are deep structs.
WORKER_GROUP_SPEC = Struct(
    fields={
        "suspend": BOOL,
        "groupName": STRING,
        "replicas": INT32,
        "minReplicas": INT32,
        "maxReplicas": INT32,
        "idleTimeoutSeconds": INT32,
        "rayStartParams": STRING_MAP,
        "template": POD_TEMPLATE_SPEC,
        "scaleStrategy": Struct(fields={"workersToDelete": ListOf(STRING)}),
        "numOfHosts": INT32,
    },
    # No `omitempty`/`+optional` on these in the Go type.
    required=frozenset({"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"}),
)
HEAD_GROUP_SPEC = Struct(
    fields={
        "template": POD_TEMPLATE_SPEC,
        "headService": SERVICE,
        "enableIngress": BOOL,
        "rayStartParams": STRING_MAP,
        "serviceType": Enum(frozenset({"ClusterIP", "NodePort", "LoadBalancer", "ExternalName"})),
    },
    required=frozenset({"template", "rayStartParams"}),
)
RAY_CLUSTER_SPEC = Struct(
    fields={
        "suspend": BOOL,
        "managedBy": STRING,
        "autoscalerOptions": OBJECT,
        "headServiceAnnotations": STRING_MAP,
        "enableInTreeAutoscaling": BOOL,
        "gcsFaultToleranceOptions": OBJECT,
        "headGroupSpec": HEAD_GROUP_SPEC,
        "rayVersion": STRING,
        "workerGroupSpecs": ListOf(WORKER_GROUP_SPEC),
    },
    required=frozenset({"headGroupSpec"}),
)
# From ray-operator/apis/ray/v1/rayjob_types.go.
RAY_JOB_SPEC = Struct(
    fields={
        "activeDeadlineSeconds": INT32,
        "backoffLimit": INT32,
        "rayClusterSpec": RAY_CLUSTER_SPEC,
        "submitterPodTemplate": POD_TEMPLATE_SPEC,
        "metadata": STRING_MAP,
        "clusterSelector": STRING_MAP,
        "submitterConfig": Struct(fields={"backoffLimit": INT32}),
        "managedBy": STRING,
        "deletionPolicy": OBJECT,  # a string in older KubeRay, a struct in newer: unused here
        "entrypoint": STRING,
        "runtimeEnvYAML": STRING,
        "jobId": STRING,
        "submissionMode": Enum(frozenset({"K8sJobMode", "HTTPMode", "InteractiveMode"})),
        "entrypointResources": STRING,
        "entrypointNumCpus": FLOAT,
        "entrypointNumGpus": FLOAT,
        "ttlSecondsAfterFinished": INT32,
        "shutdownAfterJobFinishes": BOOL,
        "suspend": BOOL,
    },
)
# From ray-operator/apis/ray/v1/rayservice_types.go (KubeRay v1.x). The two thresholds are
# deprecated and ignored since 1.1; upgradeStrategy's `type` is NewCluster or None (1.3+), and
# NewClusterWithIncrementalUpgrade behind a feature gate in later releases.
RAY_SERVICE_SPEC = Struct(
    fields={
        "rayClusterDeletionDelaySeconds": INT32,
        "serviceUnhealthySecondThreshold": INT32,
        "deploymentUnhealthySecondThreshold": INT32,
        "serveService": SERVICE,
        "upgradeStrategy": Struct(fields={
            "type": Enum(frozenset({"NewCluster", "None", "NewClusterWithIncrementalUpgrade"})),
            "clusterUpgradeOptions": OBJECT,
        }),
        "serveConfigV2": STRING,
        "rayClusterConfig": RAY_CLUSTER_SPEC,
        "excludeHeadPodFromServeSvc": BOOL,
    },
    required=frozenset({"rayClusterConfig"}),  # no omitempty on it in the Go type
)
KUBERAY_SPECS = {"RayCluster": RAY_CLUSTER_SPEC, "RayJob": RAY_JOB_SPEC, "RayService": RAY_SERVICE_SPEC}


def wrap_core(kind: str, body: dict, key: str) -> dict:
    return {"apiVersion": "v1", "kind": kind, "metadata": {"name": "check"}, key: body}


def core_errors(obj: dict) -> list[str]:
    try:
        k8s_validate(obj)
        return []
    except kubernetes_validate.ValidationError as err:
        return [str(err).splitlines()[0]]


def schema_errors(value: Any, schema: Any, where: str) -> list[str]:
    """Problems with `value` against `schema`; empty when it conforms."""
    if isinstance(schema, Struct):
        if not isinstance(value, dict):
            return [f"{where}: expected an object, got {type(value).__name__}"]
        errors = [f"{where}.{key}: unknown field" for key in value if key not in schema.fields]
        errors += [f"{where}.{key}: required field missing" for key in sorted(schema.required - value.keys())]
        for key, sub in value.items():
            if key in schema.fields:
                errors += schema_errors(sub, schema.fields[key], f"{where}.{key}")
        return errors
    if isinstance(schema, ListOf):
        if not isinstance(value, list):
            return [f"{where}: expected a list"]
        return [e for i, item in enumerate(value) for e in schema_errors(item, schema.item, f"{where}[{i}]")]
    if isinstance(schema, Enum):
        return [] if value in schema.values else [f"{where}: {value!r} not one of {sorted(schema.values)}"]
    if schema == INT32:
        ok = isinstance(value, int) and not isinstance(value, bool) and -(2**31) <= value < 2**31
        return [] if ok else [f"{where}: expected int32, got {value!r}"]
    if schema == FLOAT:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return [] if ok else [f"{where}: expected a number, got {value!r}"]
    if schema == BOOL:
        return [] if isinstance(value, bool) else [f"{where}: expected a boolean, got {value!r}"]
    if schema == STRING:
        return [] if isinstance(value, str) else [f"{where}: expected a string, got {value!r}"]
    if schema == STRING_MAP:
        # rayStartParams' values must be strings: `num-cpus: 0` (an int) is refused by the API.
        if not isinstance(value, dict):
            return [f"{where}: expected a map of strings"]
        return [f"{where}.{k}: expected a string value, got {v!r}" for k, v in value.items()
                if not isinstance(k, str) or not isinstance(v, str)]
    if schema == OBJECT:
        return [] if isinstance(value, dict) else [f"{where}: expected an object"]
    if schema == POD_TEMPLATE_SPEC:
        return [f"{where}: {e}" for e in core_errors(wrap_core("PodTemplate", value, "template"))]
    if schema == SERVICE:
        return [f"{where}: {e}" for e in core_errors({"apiVersion": "v1", "kind": "Service", **value})]
    raise AssertionError(f"unknown schema {schema!r}")


def kuberay_errors(obj: dict) -> list[str]:
    errors = []
    if obj.get("apiVersion") != KUBERAY_API:
        errors.append(f"apiVersion {obj.get('apiVersion')!r}: the types checked are {KUBERAY_API}")
    if obj.get("kind") not in KUBERAY_SPECS:
        return errors + [f"kind {obj.get('kind')!r} is not checked here"]
    top_level = ("apiVersion", "kind", "metadata", "spec")
    errors += [f"{key}: unknown top-level field" for key in obj if key not in top_level]
    # ObjectMeta is the same for every kind: let the Kubernetes schema check it.
    errors += [f"metadata: {e}" for e in core_errors({"apiVersion": "v1", "kind": "ConfigMap",
                                                       "metadata": obj.get("metadata", {})})]
    errors += schema_errors(obj.get("spec"), KUBERAY_SPECS[obj["kind"]], "spec")
    return errors


@pytest.mark.parametrize("doc", KUBERAY, ids=lambda d: d.id)
def test_kuberay_object_uses_only_known_fields_of_the_right_types(doc):
    assert kuberay_errors(doc.obj) == []


def test_the_kuberay_checker_catches_mistakes():
    cluster = copy.deepcopy(docs_of("RayCluster")[0].obj)
    cluster["spec"]["workerGroupSpecs"][0]["replica"] = 2  # typo
    cluster["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "8"  # wrong type
    cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resourcez"] = {}
    del cluster["spec"]["workerGroupSpecs"][1]["groupName"]
    errors = "\n".join(kuberay_errors(cluster))
    for expected in ("workerGroupSpecs[0].replica: unknown field", "workerGroupSpecs[0].maxReplicas: expected int32",
                     "rayStartParams.num-cpus: expected a string", "resourcez",
                     "workerGroupSpecs[1].groupName: required field missing"):
        assert expected in errors
    job = copy.deepcopy(docs_of("RayJob")[0].obj)
    job["spec"]["submissionMode"] = "SSHMode"
    job["spec"]["shutdownAfterJobFinish"] = True
    errors = "\n".join(kuberay_errors(job))
    assert "submissionMode" in errors and "shutdownAfterJobFinish: unknown field" in errors
    service = copy.deepcopy(docs_of("RayService")[0].obj)
    service["spec"]["serveConfig"] = {}  # the v1alpha1 field, gone from v1
    service["spec"]["upgradeStrategy"] = {"type": "RollingUpdate"}
    service["spec"]["serveService"]["spec"]["ports"][0]["port"] = "http"
    service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["probe"] = {}
    errors = "\n".join(kuberay_errors(service))
    for expected in ("spec.serveConfig: unknown field", "upgradeStrategy.type", "serveService", "probe"):
        assert expected in errors
    del service["spec"]["rayClusterConfig"]
    assert "rayClusterConfig: required field missing" in "\n".join(kuberay_errors(service))


def constraint_pin(package: str) -> str:
    for line in (ROOT / "locks" / "runtime.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        if name.strip().lower() == package:
            return version.strip()
    raise AssertionError(f"{package} is not pinned in locks/runtime.txt")


def test_raycluster_matches_the_image_and_kuberay_rules():
    (cluster,) = docs_of("RayCluster")
    spec = cluster.obj["spec"]
    # KubeRay builds the `ray job submit` command for this version: it must be the image's Ray.
    assert spec["rayVersion"] == constraint_pin("ray")
    groups = spec["workerGroupSpecs"]
    names = [g["groupName"] for g in groups]
    assert len(names) == len(set(names)), "worker group names must be unique"
    assert set(names) == {"cpu", "gpu"}
    for group in groups:
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], group["groupName"]
    # KubeRay treats containers[0] as the Ray container; it must be the project image.
    for template in [spec["headGroupSpec"]["template"], *[g["template"] for g in groups]]:
        assert template["spec"]["containers"][0]["image"].startswith(PROJECT_IMAGE + ":")
    head_params = spec["headGroupSpec"]["rayStartParams"]
    assert head_params.get("dashboard-host") == "0.0.0.0", "RayJobs reach the Jobs API through the head Service"
    gpu = next(g for g in groups if g["groupName"] == "gpu")
    assert int(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1


def test_rayjob_runs_tl_on_the_standing_cluster():
    (job,) = docs_of("RayJob")
    spec = job.obj["spec"]
    assert ("clusterSelector" in spec) != ("rayClusterSpec" in spec), "exactly one of clusterSelector/rayClusterSpec"
    cluster_names = {d.name for d in docs_of("RayCluster")}
    assert spec["clusterSelector"] == {"ray.io/cluster": next(iter(cluster_names))}
    # Deleting the cluster after the job only makes sense for a cluster the job created.
    assert not spec.get("shutdownAfterJobFinishes", False)
    assert_tl_invocation(spec["entrypoint"].split())
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML", "")) or {}
    for name in runtime_env.get("env_vars", {}):
        assert not CREDENTIAL_NAME.search(name), f"credential {name} in runtimeEnvYAML (shown in the dashboard)"
    assert job.obj["metadata"].get("namespace") == NAMESPACE, "kustomize does not see this file: set its namespace"


# ---------------------------------------------------------------------------------------------
# The serving RayService (k8s/serving): `tl serve`'s application, its probes, Service and policy
# ---------------------------------------------------------------------------------------------


def rayservice() -> dict:
    (service,) = docs_of("RayService")
    return service.obj


def serve_config(obj: dict | None = None) -> dict:
    return yaml.safe_load((obj or rayservice())["spec"]["serveConfigV2"])


def unknown_keys(value: dict, model: Any, where: str) -> list[str]:
    """Keys Serve's schema does not define (its schemas accept unknown keys, for newer configs)."""
    return [f"{where}.{key}" for key in value if key not in model.model_fields]


def serving_pods(obj: dict) -> dict[str, dict]:
    """{"head": pod spec, <worker group name>: pod spec} of a RayService."""
    cluster = obj["spec"]["rayClusterConfig"]
    return {"head": cluster["headGroupSpec"]["template"]["spec"],
            **{g["groupName"]: g["template"]["spec"] for g in cluster["workerGroupSpecs"]}}


def named_port(container: dict, name: str) -> int:
    (port,) = [p["containerPort"] for p in container.get("ports", []) if p["name"] == name]
    return port


# Importing Ray Serve warns about its own pydantic usage (not this project's): not a finding here.
SERVE_IMPORT_WARNINGS = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@SERVE_IMPORT_WARNINGS
def test_serve_config_is_a_serve_config_of_known_fields():
    from ray.serve.schema import HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    config = serve_config()
    parsed = ServeDeploySchema.model_validate(config)  # Serve's own validation of serveConfigV2
    errors = unknown_keys(config, ServeDeploySchema, "serveConfigV2")
    errors += unknown_keys(config["http_options"], HTTPOptionsSchema, "http_options")
    for i, app in enumerate(config["applications"]):
        errors += unknown_keys(app, ServeApplicationSchema, f"applications[{i}]")
    assert errors == [], "fields Ray Serve does not know (it would ignore them silently)"
    assert [a.name for a in parsed.applications] == ["tl-serve"]


@SERVE_IMPORT_WARNINGS
def test_the_import_path_builds_tl_serves_application_from_its_args(monkeypatch):
    """What the Serve controller does with serveConfigV2, without a Ray cluster: import the
    builder, call it with `args` as Serve does, and look at the application it returns."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray._common.utils import import_attr

    from tl_core.config import ServeConfig
    from tl_core.serving import APP_NAME, LOGGING, RELOADED, ModelServer, build_app

    config = serve_config()
    (app,) = config["applications"]
    assert app["name"] == APP_NAME and app["route_prefix"] == "/", "the name and route `tl serve` deploys under"
    assert config["logging_config"] == LOGGING, "the logging `tl serve` starts Serve with"
    builder = import_attr(app["import_path"])
    assert builder is build_app
    args = app["args"]
    assert set(args) <= set(ServeConfig.model_fields) - {"host", "port"}, "args are ServeConfig's fields"
    settings = ServeConfig(**args)
    # The replicas read the registry from the pods' environment: the ConfigMap's address.
    uri = config_map("tl-env")["MLFLOW_TRACKING_URI"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    built = call_user_app_builder_with_args_if_necessary(builder, args)
    deployment = built._bound_deployment
    assert deployment.func_or_class is ModelServer.func_or_class
    assert deployment.num_replicas == settings.replicas
    assert deployment.user_config == {**settings.model_dump(include=set(RELOADED)), "tracking_uri": uri}
    # Settings that would be ignored in args are refused, bad values name their field.
    for ignored in ({"port": 9000}, {"host": "0.0.0.0"}):
        with pytest.raises(ValueError, match="http_options"):
            build_app({**args, **ignored})
    with pytest.raises(Exception, match="poll_s"):
        build_app({**args, "poll_s": 0})


def test_rayservice_runs_the_project_image_with_the_registry_and_no_secret():
    obj = rayservice()
    cluster = obj["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == constraint_pin("ray")
    assert obj["metadata"]["name"] == "tl-serve"
    for where, pod in serving_pods(obj).items():
        (c,) = pod["containers"]
        assert c["image"].startswith(PROJECT_IMAGE + ":"), where
        refs = [r.get("configMapRef", r.get("secretRef", {})).get("name") for r in c["envFrom"]]
        assert refs == ["tl-env"], f"{where}: the registry's address, and no credentials"
        assert not any("valueFrom" in e or CREDENTIAL_NAME.search(e["name"]) for e in c.get("env", [])), where
    assert "MLFLOW_TRACKING_URI" in config_map("tl-env")
    # No S3 keys needed: the MLflow server proxies the artifacts the replicas download.
    (mlflow,) = [d for d in docs_of("Deployment") if d.name == "tl-mlflow"]
    mlflow_args = mlflow.obj["spec"]["template"]["spec"]["containers"][0]["args"]
    assert any(a.startswith("--artifacts-destination=") for a in mlflow_args)
    assert "--no-serve-artifacts" not in mlflow_args
    # Nothing secret travels in the serve config either (the dashboard shows it).
    text = obj["spec"]["serveConfigV2"]
    assert not CREDENTIAL_NAME.search(text) and not re.search(r"://[^/\s]*:[^/\s]*@", text)


def test_probes_ports_and_service_agree_with_the_application():
    obj = rayservice()
    config = serve_config(obj)
    port = config["http_options"]["port"]
    assert config["http_options"]["host"] == "0.0.0.0", "the kubelet and the Service reach the proxies by the pod IP"
    assert config["proxy_location"] == "EveryNode"
    pods = serving_pods(obj)
    # KubeRay finds the Serve port by the name `serve` on the head (and uses it for the Service).
    for where, pod in pods.items():
        assert named_port(pod["containers"][0], "serve") == port, where
    (svc_port,) = obj["spec"]["serveService"]["spec"]["ports"]
    assert svc_port == {"name": "serve", "port": port}
    assert obj["spec"]["serveService"]["metadata"]["name"] == "tl-serve"
    assert "selector" not in obj["spec"]["serveService"]["spec"], "KubeRay sets (and overrides) the selector"
    # The workers take traffic only while the application answers GET /healthz on their proxy.
    assert obj["spec"]["excludeHeadPodFromServeSvc"] is True
    head = pods.pop("head")["containers"][0]
    assert pods, "no worker group"
    from ray._private.ray_constants import DEFAULT_DASHBOARD_AGENT_LISTEN_PORT as agent_port

    # The agent of the image's Ray: the raylet (and the GCS on the head).
    ray_health = {"path": "/api/healthz", "port": agent_port}
    for group, pod in pods.items():
        c = pod["containers"][0]
        assert c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "serve"}, group
        assert c["livenessProbe"]["httpGet"] == ray_health, f"{group}: liveness is Ray's own health"
    # The head's readiness must not wait for the application: KubeRay deploys it only once the
    # head is Ready.
    for probe in ("readinessProbe", "livenessProbe"):
        assert head[probe]["httpGet"] == ray_health, probe
    assert obj["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


@SERVE_IMPORT_WARNINGS
@pytest.mark.parametrize("overlay", SERVING_OVERLAYS)
def test_the_workers_hold_the_replicas_asked_for(overlay):
    from tl_core.serving import ModelServer

    (obj,) = [o for o in built(overlay) if o["kind"] == "RayService"]
    replicas = serve_config(obj)["applications"][0]["args"]["replicas"]
    per_replica = ModelServer.ray_actor_options["num_cpus"]
    groups = obj["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    ray_cpus = sum(g["replicas"] * quantity(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
                   for g in groups)
    assert ray_cpus >= replicas * per_replica, f"{overlay}: {replicas} replicas of {per_replica} CPU do not fit"
    # A worker without a replica has no proxy (EveryNode: nodes with a replica) and is never Ready.
    assert sum(g["replicas"] for g in groups) <= replicas, f"{overlay}: more workers than replicas"


def test_the_local_serving_overlay_fits_beside_the_local_stack():
    cpu = memory = 0.0
    for obj in built("local/serving"):
        for _, pod in pod_specs(obj):
            for c in pod["containers"]:
                assert gpus(c) == 0
                cpu += quantity(c["resources"]["requests"]["cpu"])
                memory += quantity(c["resources"]["limits"]["memory"])
    assert cpu <= 1 and memory <= 6 * 2**30, (cpu, memory / 2**30)


def test_the_serving_network_policy_admits_only_the_cluster_the_operator_and_clients():
    (policy,) = [d for d in docs_of("NetworkPolicy") if d.path.parent == K8S / "serving"]
    spec = policy.obj["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    selector = spec["podSelector"]["matchLabels"]
    pods = [rayservice()["spec"]["rayClusterConfig"]["headGroupSpec"]["template"],
            *[g["template"] for g in rayservice()["spec"]["rayClusterConfig"]["workerGroupSpecs"]]]
    for template in pods:
        assert selector.items() <= template["metadata"]["labels"].items(), "every serving pod is selected"
    serve_port = serve_config()["http_options"]["port"]
    admitted = {}
    for rule in spec["ingress"]:
        ports = tuple(sorted(p["port"] for p in rule.get("ports", []))) or "all"
        for source in rule["from"]:
            if "namespaceSelector" in source:
                namespace = source["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                admitted[("namespace", namespace)] = ports
            else:
                admitted[("pods", tuple(sorted(source["podSelector"].get("matchLabels", {}).items())))] = ports
    assert admitted == {
        ("pods", tuple(sorted(selector.items()))): "all",  # Ray between its own nodes
        ("namespace", "kuberay-system"): (8265,),  # the operator, on the dashboard only
        ("pods", ()): (serve_port,),  # clients in the namespace, on the HTTP port only
    }
    assert "--namespace kuberay-system" in (K8S / "README.md").read_text(), "the namespace the operator is in"


def test_readmes_say_how_to_serve_and_how_a_promotion_reaches_the_service():
    steps = (K8S / "README.md").read_text()
    for step in ("kubectl apply -k k8s/overlays/local/serving", "k8s/overlays/gpu/serving",
                 "kubectl delete -k k8s/overlays/local/serving", "svc/tl-serve"):
        assert step in steps, f"k8s/README.md does not cover: {step}"
    readme = (ROOT / "README.md").read_text()
    serving = readme[readme.index("## Serving"):readme.index("## Batch predictions")]
    section = serving[serving.index("### On a cluster"):]
    for point in ("kubectl apply -k k8s/overlays/local/serving", "tl promote", "tl rollback", "poll_s",
                  "MLFLOW_TRACKING_URI", "import_path:", "readiness"):
        assert point in section, f"README, Serving / On a cluster does not say: {point}"


# ---------------------------------------------------------------------------------------------
# Pods: security context and resources, wherever a pod spec appears
# ---------------------------------------------------------------------------------------------


def pod_specs(obj: dict) -> Iterator[tuple[str, dict]]:
    """(where, pod spec) for every pod template in an object, KubeRay's included."""
    kind, spec = obj.get("kind"), obj.get("spec") or {}
    if kind in ("Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet"):
        yield "spec.template", spec["template"]["spec"]
    elif kind == "CronJob":
        yield "spec.jobTemplate.spec.template", spec["jobTemplate"]["spec"]["template"]["spec"]
    elif kind == "Pod":
        yield "spec", spec
    elif kind == "RayCluster":
        yield from ray_cluster_pod_specs(spec, "spec")
    elif kind == "RayService":
        yield from ray_cluster_pod_specs(spec["rayClusterConfig"], "spec.rayClusterConfig")
    elif kind == "RayJob":
        if "submitterPodTemplate" in spec:
            yield "spec.submitterPodTemplate", spec["submitterPodTemplate"]["spec"]
        if "rayClusterSpec" in spec:
            yield from ray_cluster_pod_specs(spec["rayClusterSpec"], "spec.rayClusterSpec")


def ray_cluster_pod_specs(spec: dict, where: str) -> Iterator[tuple[str, dict]]:
    yield f"{where}.headGroupSpec.template", spec["headGroupSpec"]["template"]["spec"]
    for group in spec.get("workerGroupSpecs", []):
        yield f"{where}.workerGroupSpecs[{group['groupName']}].template", group["template"]["spec"]


QUANTITY = re.compile(r"^([0-9.]+)(m|k|Ki|M|Mi|G|Gi|T|Ti)?$")
UNITS = {None: 1, "m": 1e-3, "k": 1e3, "Ki": 2**10, "M": 1e6, "Mi": 2**20, "G": 1e9, "Gi": 2**30, "T": 1e12,
         "Ti": 2**40}


def quantity(value: Any) -> float:
    match = QUANTITY.match(str(value))
    assert match, f"not a quantity: {value!r}"
    return float(match.group(1)) * UNITS[match.group(2)]


def pod_problems(pod: dict) -> list[str]:
    """Departures from the project's pod rules (empty list: the pod complies)."""
    problems = []
    psc = pod.get("securityContext", {})
    if psc.get("runAsNonRoot") is not True:
        problems.append("pod securityContext.runAsNonRoot is not true")
    if psc.get("runAsUser", 1) == 0:
        problems.append("pod runs as uid 0")
    if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append("pod seccompProfile is not RuntimeDefault (the restricted standard requires it)")
    if pod.get("serviceAccountName") == "tl-workload" and pod.get("automountServiceAccountToken") is not False:
        problems.append("tl-workload pods must not mount an API token")
    mounts_of_emptydir = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
    for c in pod.get("initContainers", []) + pod.get("containers", []):
        name = c.get("name")
        sc = c.get("securityContext", {})
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            problems.append(f"{name}: capabilities do not drop ALL")
        if sc.get("capabilities", {}).get("add"):
            problems.append(f"{name}: adds capabilities")
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        if sc.get("runAsUser", psc.get("runAsUser", 1)) == 0:
            problems.append(f"{name}: runs as uid 0")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: root filesystem is writable")
        elif not any(m["mountPath"] == "/tmp" and m["name"] in mounts_of_emptydir for m in c.get("volumeMounts", [])):
            problems.append(f"{name}: read-only root but no emptyDir at /tmp")
        res = c.get("resources", {})
        for part in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if resource not in res.get(part, {}):
                    problems.append(f"{name}: no {resource} in resources.{part}")
        for resource, limit in res.get("limits", {}).items():
            request = res.get("requests", {}).get(resource)
            if request is not None and quantity(request) > quantity(limit):
                problems.append(f"{name}: {resource} request {request} above limit {limit}")
        if not c.get("image"):
            problems.append(f"{name}: no image")
    return problems


POD_CASES = [(d, where, pod) for d in DOCS for where, pod in pod_specs(d.obj)]


@pytest.mark.parametrize("doc,where,pod", POD_CASES, ids=[f"{d.id}:{w}" for d, w, _ in POD_CASES])
def test_pod_is_locked_down_and_sized(doc, where, pod):
    assert pod_problems(pod) == []


def test_every_workload_has_a_pod_checked():
    kinds = {d.kind for d, _, _ in POD_CASES}
    assert {"Deployment", "StatefulSet", "Job", "CronJob", "RayCluster", "RayJob", "RayService"} <= kinds
    # 2 deployments, statefulset, job, cronjob, ray head + 2 groups, submitter, serving head + group
    assert len(POD_CASES) >= 11


def test_the_pod_checker_catches_mistakes():
    pod = copy.deepcopy(docs_of("Deployment")[0].obj["spec"]["template"]["spec"])
    container = pod["containers"][0]
    del container["resources"]["limits"]["memory"]
    container["securityContext"]["allowPrivilegeEscalation"] = True
    container["securityContext"]["capabilities"] = {"drop": ["NET_RAW"]}
    container["resources"]["requests"]["cpu"] = "4"
    pod["securityContext"]["runAsNonRoot"] = False
    problems = "\n".join(pod_problems(pod))
    for expected in ("no memory in resources.limits", "allowPrivilegeEscalation", "drop ALL", "request 4 above limit",
                     "runAsNonRoot"):
        assert expected in problems


def test_namespace_enforces_the_restricted_pod_security_standard():
    (ns,) = docs_of("Namespace")
    assert ns.name == NAMESPACE
    assert ns.obj["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_images_are_pinned():
    for doc, where, pod in POD_CASES:
        for c in pod.get("initContainers", []) + pod["containers"]:
            image = c["image"]
            name, _, tag = image.rpartition(":") if "@" not in image else (image, "", "digest")
            assert name and tag and tag != "latest" and "/" not in tag, f"{doc.id} {where}: unpinned image {image}"
            assert c.get("imagePullPolicy") == "IfNotPresent", f"{doc.id}: pinned tags need no Always pull"


# ---------------------------------------------------------------------------------------------
# Secrets and credentials
# ---------------------------------------------------------------------------------------------


def secret_values(secret: dict) -> dict[str, str]:
    values = dict(secret.get("stringData", {}))
    values.update({k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()})
    return values


def test_secrets_hold_only_placeholders():
    secrets = docs_of("Secret")
    assert {s.name for s in secrets} == {"tl-s3", "tl-postgres"}
    for secret in secrets:
        assert secret.path.parent == K8S / "secrets", f"{secret.id}: Secrets live only in k8s/secrets/ as templates"
        for key, value in secret_values(secret.obj).items():
            assert PLACEHOLDER.match(str(value)), f"{secret.id}: {key} has a value that is not a placeholder"


def test_no_secret_is_applied_by_kustomize():
    """`kubectl apply -k` would overwrite the real credentials with the templates' placeholders."""
    for kfile in kustomization_files():
        k = yaml.safe_load(kfile.read_text())
        assert "secretGenerator" not in k, f"{kfile}: generate no Secrets (they would carry the values)"
        for resource in k.get("resources", []):
            assert "secrets" not in Path(resource).parts, f"{kfile} lists {resource}"
    for name in OVERLAYS + SERVING_OVERLAYS:
        assert not [o for o in built(name) if o["kind"] == "Secret"], f"overlay {name} creates a Secret"


def containers_with_owner() -> Iterator[tuple[str, dict, dict]]:
    for doc, where, pod in POD_CASES:
        for c in pod.get("initContainers", []) + pod["containers"]:
            yield f"{doc.id}:{where}:{c['name']}", pod, c


def test_credentials_come_only_from_secrets():
    for owner, _, c in containers_with_owner():
        for env in c.get("env", []):
            if CREDENTIAL_NAME.search(env["name"]):
                assert "secretKeyRef" in env.get("valueFrom", {}), f"{owner}: {env['name']} must come from a Secret"
            value = str(env.get("value", ""))
            # A URI with user:password@ may only build the password from $(VAR)s (from Secrets).
            for userinfo in re.findall(r"://([^@/\s]+)@", value):
                assert re.fullmatch(r"(\$\([A-Z_]+\))(:\$\([A-Z_]+\))?", userinfo), (
                    f"{owner}: literal credentials in a URI")
        for args in (c.get("command", []), c.get("args", [])):
            assert not any(re.search(r"://[^/\s]*:[^/\s]*@", a) for a in args), (
                f"{owner}: credentials in the command line")
    for cm in docs_of("ConfigMap"):
        for key in cm.obj.get("data", {}):
            assert not CREDENTIAL_NAME.search(key), f"{cm.id}: {key} belongs in a Secret"


def test_mlflow_backend_password_stays_out_of_the_command_line():
    (mlflow,) = [d for d in docs_of("Deployment") if d.name == "tl-mlflow"]
    c = mlflow.obj["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["mlflow", "server"]
    assert not any(a.startswith("--backend-store-uri") for a in c["args"])
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("postgresql+psycopg2://$(POSTGRES_USER):$(POSTGRES_PASSWORD)@")
    names = list(env)
    assert names.index("POSTGRES_PASSWORD") < names.index("MLFLOW_BACKEND_STORE_URI"), "$(VAR) only sees earlier vars"


def test_mlflow_runs_without_the_genai_job_runner():
    """MLflow 3's server would start 8 more processes for GenAI jobs tl never submits."""
    (mlflow,) = [d for d in docs_of("Deployment") if d.name == "tl-mlflow"]
    env = {e["name"]: e for e in mlflow.obj["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"


def test_mlflow_allows_the_service_names_clients_use():
    """The server's Host check answers 403 to names it does not list."""
    (mlflow,) = [d for d in docs_of("Deployment") if d.name == "tl-mlflow"]
    args = mlflow.obj["spec"]["template"]["spec"]["containers"][0]["args"]
    allowed = next(a.split("=", 1)[1] for a in args if a.startswith("--allowed-hosts=")).split(",")
    assert "*" not in allowed
    uri = config_map("tl-env")["MLFLOW_TRACKING_URI"]
    host = re.match(r"http://([^/]+)", uri).group(1)
    assert host in allowed, f"{host} (from MLFLOW_TRACKING_URI) is not in --allowed-hosts"
    assert "localhost:*" in allowed, "kubectl port-forward sends Host: localhost:<port>"
    assert any(a.startswith("--artifacts-destination=s3://" + config_map("tl-env")["TL_BUCKET"] + "/") for a in args)


# ---------------------------------------------------------------------------------------------
# References between objects, and what the pods run
# ---------------------------------------------------------------------------------------------


def config_map(name: str) -> dict:
    (cm,) = [d for d in docs_of("ConfigMap") if d.name == name]
    return cm.obj["data"]


def named(kind: str) -> set[str]:
    return {d.name for d in docs_of(kind)}


def test_references_resolve():
    secrets = {s.name: set(secret_values(s.obj)) for s in docs_of("Secret")}
    config_maps = {d.name: set(d.obj.get("data", {})) for d in docs_of("ConfigMap")}
    accounts, claims = named("ServiceAccount"), named("PersistentVolumeClaim")
    for doc, where, pod in POD_CASES:
        owner = f"{doc.id}:{where}"
        assert pod.get("serviceAccountName") in accounts, f"{owner}: service account"
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        if doc.kind == "StatefulSet":
            volumes.update({t["metadata"]["name"]: t for t in doc.obj["spec"].get("volumeClaimTemplates", [])})
        for v in pod.get("volumes", []):
            if "configMap" in v:
                assert v["configMap"]["name"] in config_maps, f"{owner}: ConfigMap {v['configMap']['name']}"
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, f"{owner}: PVC"
            if "secret" in v:
                assert v["secret"]["secretName"] in secrets, f"{owner}: Secret volume"
        for c in pod.get("initContainers", []) + pod["containers"]:
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{owner}:{c['name']}: mounts unknown volume {m['name']}"
            for source in c.get("envFrom", []):
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in secrets, f"{owner}: Secret {source['secretRef']['name']}"
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in config_maps, f"{owner}: ConfigMap"
            for env in c.get("env", []):
                ref = env.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    s = ref["secretKeyRef"]
                    assert s["key"] in secrets.get(s["name"], ()), (
                        f"{owner}: {s['name']}/{s['key']} is not in the template")
                if "configMapKeyRef" in ref:
                    s = ref["configMapKeyRef"]
                    assert s["key"] in config_maps.get(s["name"], ()), f"{owner}: {s['name']}/{s['key']}"
    for binding in docs_of("RoleBinding"):
        assert binding.obj["roleRef"]["name"] in named("Role")
        for subject in binding.obj["subjects"]:
            assert subject["name"] in accounts and subject.get("namespace") == NAMESPACE


def pod_templates_with_labels() -> list[tuple[dict, dict]]:
    """(labels, pod spec) of every workload's pod template, the Ray clusters' groups included."""
    out = []
    for doc in DOCS:
        spec = doc.obj.get("spec", {})
        if doc.kind in ("Deployment", "StatefulSet"):
            out.append((spec["template"]["metadata"]["labels"], spec["template"]["spec"]))
        elif doc.kind in ("RayCluster", "RayService"):
            cluster = spec["rayClusterConfig"] if doc.kind == "RayService" else spec
            for template in [cluster["headGroupSpec"]["template"], *[g["template"] for g in cluster["workerGroupSpecs"]]]:
                out.append((template["metadata"]["labels"], template["spec"]))
    return out


def test_services_and_network_policies_select_pods_that_exist():
    templates = pod_templates_with_labels()
    for svc in docs_of("Service"):
        selector = svc.obj["spec"]["selector"]
        matches = [pod for labels, pod in templates if selector.items() <= labels.items()]
        assert len(matches) == 1, f"{svc.id}: selects {len(matches)} workloads"
        port_names = {p["name"] for c in matches[0]["containers"] for p in c.get("ports", [])}
        for port in svc.obj["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert isinstance(target, int) or target in port_names, f"{svc.id}: no container port {target}"
    for policy in docs_of("NetworkPolicy"):
        selector = policy.obj["spec"]["podSelector"]["matchLabels"]
        assert any(selector.items() <= labels.items() for labels, _ in templates), policy.id
        for rule in policy.obj["spec"].get("ingress", []):
            assert rule.get("from"), f"{policy.id}: a rule without `from` admits everyone"
            for source in rule["from"]:
                if "namespaceSelector" in source:  # another namespace's pods (the KubeRay operator)
                    continue
                sel = source["podSelector"].get("matchLabels", {})  # {}: every pod of the namespace
                assert any(sel.items() <= labels.items() for labels, _ in templates), f"{policy.id}: source"
    (sts,) = docs_of("StatefulSet")
    assert sts.obj["spec"]["serviceName"] in named("Service")


def test_env_gives_tl_what_it_reads():
    env = config_map("tl-env")
    for name in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "TL_WORKDIR"):
        assert env.get(name), name
    assert env["TL_WORKDIR"].startswith(f"s3://{env['TL_BUCKET']}/"), "the work dir lives in the bucket the Job creates"
    assert env["AWS_ENDPOINT_URL"] == env["MLFLOW_S3_ENDPOINT_URL"]
    ray_address = config_map("tl-ray-client")["RAY_ADDRESS"]
    (cluster,) = docs_of("RayCluster")
    # KubeRay names the head Service <cluster>-head-svc; 10001 is the Ray Client port.
    assert re.fullmatch(rf"ray://{cluster.name}-head-svc(\.{NAMESPACE}\.svc)?:10001", ray_address)
    for service_url in (env["MLFLOW_TRACKING_URI"], env["AWS_ENDPOINT_URL"]):
        host, port = re.match(r"http://([^:/]+):(\d+)", service_url).groups()
        service = host.split(".")[0]
        assert service in named("Service"), service_url
        (svc,) = [d for d in docs_of("Service") if d.name == service]
        assert int(port) in {p["port"] for p in svc.obj["spec"]["ports"]}, service_url
    # Ray pods get the tl settings and keys but not RAY_ADDRESS (Ray sets it for job drivers).
    for where, pod in ray_cluster_pod_specs(cluster.obj["spec"], "spec"):
        refs = {r.get("configMapRef", r.get("secretRef", {})).get("name") for r in pod["containers"][0]["envFrom"]}
        assert refs == {"tl-env", "tl-s3"}, where


def assert_tl_invocation(argv: list[str]) -> dict:
    """Parse `tl ...` with the real CLI (without running it): unknown options fail here."""
    import typer

    from tl_core.cli import app

    assert argv and argv[0] in ("tl", "run", "transfer", "prepare", "pretrain", "evaluate"), argv
    args = argv[1:] if argv[0] == "tl" else argv
    group = typer.main.get_command(app)
    root = group.make_context("tl", [], resilient_parsing=True)
    command = group.get_command(root, args[0])
    assert command is not None, f"tl has no command {args[0]!r}"
    try:
        return command.make_context(args[0], list(args[1:]), parent=root).params
    except Exception as err:  # noqa: BLE001 - click's UsageError; typer vendors click privately
        raise AssertionError(f"`tl {' '.join(args)}` does not parse: {err}") from None


def test_cronjob_runs_tl_run_with_the_configmap_against_the_cluster():
    (cron,) = docs_of("CronJob")
    spec = cron.obj["spec"]
    assert spec["concurrencyPolicy"] == "Forbid", "a retraining must never overlap (or kill) the previous one"
    assert spec["timeZone"]
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    params = assert_tl_invocation(c.get("command", []) + c["args"])
    assert params["as_json"] is True
    config_path = Path(params["config"])
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == str(config_path.parent))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert config_path.name in config_map(volume["configMap"]["name"])
    refs = {r.get("configMapRef", r.get("secretRef", {})).get("name") for r in c["envFrom"]}
    assert {"tl-env", "tl-ray-client", "tl-s3"} <= refs


def test_run_config_is_a_valid_tl_run_config():
    from tl_core.config import ExperimentConfig

    cfg = yaml.safe_load(config_map("tl-run-config")["run.yaml"])
    ExperimentConfig(**cfg)  # unknown keys or bad values raise


def test_rbac_is_namespaced_and_minimal():
    assert not docs_of("ClusterRole") and not docs_of("ClusterRoleBinding")
    (role,) = docs_of("Role")
    granted = {(g, r): set(rule["verbs"]) for rule in role.obj["rules"]
               for g in rule["apiGroups"] for r in rule["resources"]}
    assert granted == {("ray.io", "rayjobs"): {"get", "list", "watch", "create", "delete"},
                       ("ray.io", "rayclusters"): {"get"}}
    for verbs in granted.values():
        assert "*" not in verbs and not verbs & {"update", "patch", "escalate", "bind", "impersonate"}


# ---------------------------------------------------------------------------------------------
# Kustomize: a small pure-Python build of base and overlays (resources, namespace, images,
# JSON 6902 patches), checked on its own and, where kubectl exists, against `kubectl kustomize`
# ---------------------------------------------------------------------------------------------


def pointer(path: str) -> list[str]:
    assert path.startswith("/"), path
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def walk(doc: Any, parts: list[str]) -> Any:
    for part in parts:
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc


def apply_json_patch(doc: dict, ops: list[dict]) -> dict:
    """RFC 6902 add/remove/replace/test: enough for the overlays (KeyError/IndexError on a bad path)."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parent_parts, last = pointer(op["path"])
        parent = walk(doc, parent_parts)
        key: Any = int(last) if isinstance(parent, list) and last != "-" else last
        if op["op"] == "test":
            assert parent[key] == op["value"], f"test failed at {op['path']}: {parent[key]!r} != {op['value']!r}"
        elif op["op"] == "replace":
            parent[key]  # must exist
            parent[key] = copy.deepcopy(op["value"])
        elif op["op"] == "add":
            if isinstance(parent, list):
                parent.insert(len(parent) if key == "-" else key, copy.deepcopy(op["value"]))
            else:
                parent[key] = copy.deepcopy(op["value"])
        elif op["op"] == "remove":
            del parent[key]
        else:
            raise AssertionError(f"unsupported patch op {op['op']}")
    return doc


def group_version(api_version: str) -> tuple[str, str]:
    group, _, version = api_version.rpartition("/")
    return group, version


def is_patch_target(obj: dict, target: dict) -> bool:
    """kustomize's patch target: kind and name, group ("" for core) and version when given."""
    group, version = group_version(obj["apiVersion"])
    return (obj["kind"] == target["kind"] and obj["metadata"].get("name") == target["name"]
            and group == target.get("group", "") and version == target.get("version", version))


def build(directory: Path) -> list[dict]:
    """Objects a kustomization directory produces (the subset of kustomize this project uses)."""
    kfile = directory / "kustomization.yaml"
    assert kfile.is_file(), f"{directory} has no kustomization.yaml"
    k = yaml.safe_load(kfile.read_text())
    known = {"apiVersion", "kind", "namespace", "labels", "resources", "images", "patches"}
    assert set(k) <= known, f"{kfile}: {set(k) - known} not handled by this test's build"
    objs: list[dict] = []
    for resource in k.get("resources", []):
        path = (directory / resource).resolve()
        assert path.exists(), f"{kfile}: resource {resource} does not exist"
        objs += build(path) if path.is_dir() else [copy.deepcopy(o) for o in load_yaml_docs(path)]
    for patch in k.get("patches", []):
        assert "path" in patch and "target" in patch, f"{kfile}: patches are files with a target"
        ops = yaml.safe_load((directory / patch["path"]).read_text())
        assert isinstance(ops, list), f"{patch['path']}: a JSON 6902 patch (a list of operations)"
        hits = [i for i, o in enumerate(objs) if is_patch_target(o, patch["target"])]
        assert len(hits) == 1, f"{kfile}: patch {patch['path']} targets {len(hits)} resources"
        objs[hits[0]] = apply_json_patch(objs[hits[0]], ops)
    for obj in objs:
        if "namespace" in k and obj["kind"] != "Namespace":
            obj["metadata"]["namespace"] = k["namespace"]
        for _, pod in pod_specs(obj):
            for c in pod.get("initContainers", []) + pod["containers"]:
                for image in k.get("images", []):
                    name, _, tag = c["image"].rpartition(":")
                    if name == image["name"]:
                        c["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    return objs


OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))


@functools.cache
def _built(name: str) -> list[dict]:
    return build(K8S / "overlays" / name)


def built(name: str) -> list[dict]:
    """The objects an overlay produces (a fresh copy: tests may not change each other's input)."""
    return copy.deepcopy(_built(name))


def test_overlays_exist():
    assert OVERLAYS == ["gpu", "local"]
    assert SERVING_OVERLAYS == ["gpu/serving", "local/serving"]


def test_kustomization_paths_exist():
    for kfile in kustomization_files():
        k = yaml.safe_load(kfile.read_text())
        for resource in k.get("resources", []):
            path = kfile.parent / resource
            assert path.is_file() or (path / "kustomization.yaml").is_file(), f"{kfile}: no resource {resource}"
        for patch in k.get("patches", []):
            assert (kfile.parent / patch["path"]).is_file(), f"{kfile}: no patch file {patch['path']}"


def test_every_file_in_a_kustomization_directory_is_used():
    for kfile in kustomization_files():
        k = yaml.safe_load(kfile.read_text())
        used = {(kfile.parent / r).resolve() for r in k.get("resources", [])}
        used |= {(kfile.parent / p["path"]).resolve() for p in k.get("patches", [])}
        for path in kfile.parent.glob("*.yaml"):
            if path.name != "kustomization.yaml":
                assert path.resolve() in used, f"{path} is in {kfile.parent} but the kustomization never uses it"


def test_base_builds_to_the_manifests():
    base = build(K8S / "base")
    assert {(o["kind"], o["metadata"]["name"]) for o in base} == {
        (d.kind, d.name) for d in DOCS if d.path.parent == K8S / "base"}
    assert all(o["metadata"]["namespace"] == NAMESPACE for o in base if o["kind"] != "Namespace")


@pytest.mark.parametrize("overlay", OVERLAYS + SERVING_OVERLAYS)
def test_overlay_output_is_valid_and_locked_down(overlay):
    objs = built(overlay)
    for obj in objs:
        if obj["apiVersion"].startswith("ray.io/"):
            assert kuberay_errors(obj) == []
        else:
            k8s_validate(obj)
        for where, pod in pod_specs(obj):
            assert pod_problems(pod) == [], f"{overlay} {obj['kind']}/{obj['metadata']['name']} {where}"
            for c in pod["containers"]:
                assert not c["image"].startswith(PROJECT_IMAGE + ":") or overlay.split("/")[0] == "gpu", (
                    f"{overlay}: the placeholder image is still set")


def ray_groups(objs: list[dict]) -> dict[str, dict]:
    (cluster,) = [o for o in objs if o["kind"] == "RayCluster"]
    return {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}


def gpus(container: dict) -> int:
    res = container["resources"]
    return int(res.get("limits", {}).get("nvidia.com/gpu", 0))


def test_gpu_overlay_requests_gpus():
    objs = built("gpu")
    groups = ray_groups(objs)
    gpu = groups["gpu"]
    assert gpu["replicas"] >= 1
    container = gpu["template"]["spec"]["containers"][0]
    assert gpus(container) >= 1
    # Extended resources: a request, if given, must equal the limit.
    assert int(container["resources"].get("requests", {}).get("nvidia.com/gpu", gpus(container))) == gpus(container)
    (cron,) = [o for o in objs if o["kind"] == "CronJob"]
    assert cron["spec"]["suspend"] is False, "the GPU cluster retrains on schedule"


def test_local_overlay_is_small_and_needs_no_gpu():
    objs = built("local")
    groups = ray_groups(objs)
    assert groups["gpu"]["replicas"] == 0 and groups["cpu"]["replicas"] == 1
    cpu_requests = memory_limits = 0.0
    for obj in objs:
        replicas = obj.get("spec", {}).get("replicas", 1)
        if obj["kind"] == "RayCluster":
            pods = [(1, obj["spec"]["headGroupSpec"]["template"]["spec"])]
            pods += [(g.get("replicas", 0), g["template"]["spec"]) for g in obj["spec"]["workerGroupSpecs"]]
        elif obj["kind"] in ("Deployment", "StatefulSet"):
            pods = [(replicas, obj["spec"]["template"]["spec"])]
        else:
            continue  # Jobs come and go
        for count, pod in pods:
            for c in pod["containers"]:
                if count:
                    assert gpus(c) == 0, f"local: {obj['metadata']['name']} asks for a GPU"
                cpu_requests += count * quantity(c["resources"]["requests"]["cpu"])
                memory_limits += count * quantity(c["resources"]["limits"]["memory"])
    # A laptop with 4 CPUs, about one of them taken by Kubernetes itself, and 12 GiB for pods.
    assert cpu_requests <= 3, f"the local stack requests {cpu_requests} CPUs: more than a laptop's cluster"
    assert memory_limits <= 12 * 2**30, f"the local stack may use {memory_limits / 2**30:.1f} GiB"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("overlay", OVERLAYS + SERVING_OVERLAYS)
def test_kubectl_kustomize_agrees_with_this_build(overlay):
    result = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)], check=False,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    theirs = [o for o in yaml.safe_load_all(result.stdout) if o]

    def summary(objs):
        out = {}
        for o in objs:
            images = sorted(c["image"] for _, pod in pod_specs(o) for c in pod["containers"])
            spec = o.get("spec", {})
            replicas = spec.get("replicas") if isinstance(spec, dict) else None
            groups = ray_groups([o]) if o["kind"] == "RayCluster" else {}
            if o["kind"] == "RayService":
                cluster = o["spec"]["rayClusterConfig"]
                groups = {"head": cluster["headGroupSpec"], **{g["groupName"]: g for g in cluster["workerGroupSpecs"]}}
            resources = {n: g["template"]["spec"]["containers"][0]["resources"] for n, g in groups.items()}
            out[(o["kind"], o["metadata"]["name"])] = (o["metadata"].get("namespace"), images, replicas,
                                                       {n: g.get("replicas") for n, g in groups.items()}, resources)
        return out

    assert summary(theirs) == summary(built(overlay))


# ---------------------------------------------------------------------------------------------
# The image: Dockerfile, .dockerignore, pinned packages
# ---------------------------------------------------------------------------------------------

DOCKERFILE = K8S / "Dockerfile"


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_pins_its_base_and_runs_as_a_non_root_user():
    steps = dockerfile_instructions()
    args = dict(a.split("=", 1) for w, a in steps if w == "ARG" and "=" in a)
    bases = [a.split()[0] for w, a in steps if w == "FROM"]
    assert bases, "no FROM"
    for base in bases:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
        assert re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+", image), f"base image not pinned to a patch release: {image}"
    python_minor = re.search(r"python:(3\.\d+)", args["PYTHON_IMAGE"]).group(1)
    assert f"# Python {python_minor}," in (ROOT / "locks" / "runtime.txt").read_text(), "image and lock on different Pythons"
    users = [a for w, a in steps if w == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), "the last USER must be a numeric non-root uid"
    assert users[-1].split(":")[0] == "1000"
    assert ("ENTRYPOINT", '["tl"]') in steps
    env = " ".join(a for w, a in steps if w == "ENV")
    workdir = re.search(r"TL_WORKDIR=(\S+)", env).group(1)
    volumes = [p for w, a in steps if w == "VOLUME" for p in re.findall(r'"([^"]+)"', a)]
    assert any(workdir.startswith(v + "/") for v in volumes), "TL_WORKDIR must be on a volume (writable, not the image)"
    runs = " ".join(a for w, a in steps if w == "RUN")
    assert re.search(r"pip install -r \S*runtime\.txt", runs), "install the locked dependencies"
    assert re.search(r"pip install --no-deps --no-build-isolation -c \S*runtime\.txt \\?\s*\"?\S*tl-src(\[[\w,]+\])?\"?",
                     runs), "install the package itself over the locked dependencies"
    assert "wget" in runs, "KubeRay's probes need wget"
    # KubeRay runs `bash -lc`: /etc/profile resets PATH, so the venv must be put back there.
    venv_bin = re.search(r"PATH=(/\S+/bin):\$PATH", env).group(1)
    assert re.search(rf"export PATH={re.escape(venv_bin)}:\$PATH' > /etc/profile\.d/\S+\.sh", runs), (
        "the venv is not on a login shell's PATH")
    for w, a in steps:
        if w in ("ENV", "ARG"):
            assert not CREDENTIAL_NAME.search(a), f"credential in the image: {w} {a}"


def test_dockerignore_keeps_the_context_small_and_the_sources_in():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    for needed in (".venv", "tl-work", ".git"):
        assert needed in patterns
    assert any("__pycache__" in p for p in patterns) and any("pytest_cache" in p for p in patterns)
    copied = [src for w, a in dockerfile_instructions() if w == "COPY" and not a.startswith("--from")
              for src in a.split()[:-1]]
    assert "locks/runtime.txt" in copied and "pyproject.toml" in copied and "tl_core" in copied
    for src in copied:
        for pattern in patterns:
            assert not fnmatch.fnmatch(src, pattern.lstrip("/")) and not src.startswith(pattern.rstrip("/") + "/"), (
                f".dockerignore pattern {pattern} hides {src}, which the Dockerfile copies")


def test_the_image_installs_the_runtime_lock_and_no_test_tool():
    # That installed == locked on this machine is tests/test_lock.py's job; here: the image's half.
    runtime = (ROOT / "locks" / "runtime.txt").read_text()
    copied = [src for w, a in dockerfile_instructions() if w == "COPY" and not a.startswith("--from")
              for src in a.split()[:-1]]
    assert "locks/test.txt" not in copied, "the image must not install test tools"
    for package in ("ray", "mlflow", "kfp", "boto3", "optuna", "torch", "psycopg2-binary", "pip", "setuptools"):
        assert f"\n{package}==" in runtime, f"{package} is not in the image's lock"
    for test_only in ("pytest", "moto", "kubernetes-validate"):
        assert f"\n{test_only}==" not in runtime, f"{test_only} is a test tool, not part of the image"


def test_the_cpu_variant_takes_torch_from_its_index_and_the_rest_from_the_cpu_lock():
    # docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu: no CUDA runtime.
    steps = dockerfile_instructions()
    assert ("ARG", "TORCH_INDEX_URL=") in steps, "the default build must stay PyPI's (CUDA) torch"
    copied = [src for w, a in steps if w == "COPY" for src in a.split()[:-1]]
    assert "locks/runtime-cpu.txt" in copied
    runs = " ".join(a for w, a in steps if w == "RUN")
    assert re.search(r'pip install --no-deps --index-url "\$TORCH_INDEX_URL" -c \S*runtime-cpu\.txt torch torchvision',
                     runs), "torch and torchvision alone, at the locked versions, from the CPU index"
    assert re.search(r"pip install -r \S*runtime-cpu\.txt", runs), "the rest from the CPU lock"
    assert "nvidia-" not in (ROOT / "locks" / "runtime-cpu.txt").read_text()


def test_readme_walks_from_an_empty_cluster_to_a_schedule():
    text = (K8S / "README.md").read_text()
    for step in ("helm install kuberay-operator", "create namespace", "create secret generic tl-s3",
                 "create secret generic tl-postgres", "kubectl apply -k k8s/overlays/local", "docker build",
                 "port-forward", "kubectl create -f k8s/jobs/rayjob-tl-run.yaml", "cronjob", "tl pipeline schedule"):
        assert step in text, f"k8s/README.md does not cover: {step}"
