"""The KFP pipeline: its compiled DAG, whole local runs with kfp.local's SubprocessRunner (no
mocks: real steps, real training, MLflow on the test's SQLite store), and submit/schedule against
a small fake KFP REST server on 127.0.0.1 that implements the endpoints kfp.Client calls (there is
no KFP server here). A step on a Ray cluster: test_ray_train, on its module's cluster."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests import servers
from tests.conftest import tl, tl_error, tl_json

# Small enough for CI: one pretraining epoch on the rendered fonts, a short fine-tune on 5 shots.
FAST = ["--pretrain-epochs", "1", "--epochs", "10"]
SPACE = json.dumps({"lr": {"choice": [0.001, 0.003]}})


# Credentials as a deployment sets them (unused here: local store, local files), to prove none leaks.
FAKE_SECRETS = {"AWS_ACCESS_KEY_ID": "AKIATLFAKEKEY0000001", "AWS_SECRET_ACCESS_KEY": "tlFakeSecretKey0wJalrXUtnFEMI",
                "MLFLOW_TRACKING_TOKEN": "tlFakeMlflowToken0dapi123", "MLFLOW_TRACKING_PASSWORD": "tlFakeMlflowPassword0"}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """One TL_WORKDIR (data, checkpoints, the SQLite MLflow store) for the module, so later runs
    reuse what the first one prepared and trained."""
    root = tmp_path_factory.mktemp("pipeline")
    mp = pytest.MonkeyPatch()
    mp.setenv("TL_WORKDIR", str(root / "work"))
    mp.setenv("RAY_AUTH_MODE", "disabled")
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.delenv("RAY_ADDRESS", raising=False)
    for name, value in FAKE_SECRETS.items():  # grepped for after the runs (test_no_credential_...)
        mp.setenv(name, value)
    yield root
    mp.undo()


def aliases(name: str) -> dict:
    """alias -> version (MLflow's SQLite store answers ints where a server answers strings)."""
    return {alias: int(version) for alias, version in mlflow_client().get_registered_model(name).aliases.items()}


def mlflow_client():
    from mlflow import MlflowClient

    from tl_core import tracking

    tracking.setup()  # the store the steps wrote to: TL_WORKDIR's SQLite
    return MlflowClient()


# -- the compiled pipeline -------------------------------------------------------------------------


def tasks(dag: dict) -> dict:
    """task name -> (component, upstream tasks, trigger condition)"""
    return {name: (t["componentRef"]["name"], sorted(t.get("dependentTasks", [])),
                   t.get("triggerPolicy", {}).get("condition")) for name, t in dag["tasks"].items()}


def test_compiled_pipeline_has_the_expected_dag(tmp_path):
    out = tmp_path / "pipeline.yaml"
    env = {**os.environ, "TL_IMAGE": "registry.example.com/tl-core:1.2.3"}  # the image is a setting
    done = subprocess.run([str(servers.BIN / "tl"), "pipeline", "compile", "--output", str(out), "--json"],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1])["image"] == "registry.example.com/tl-core:1.2.3"

    spec, platform = yaml.safe_load_all(out.read_text())
    comps = spec["components"]
    # Every step (not the sub-pipelines and branches) is retried by KFP, with backoff.
    steps = [task for dag in [spec["root"]["dag"], *(c["dag"] for c in comps.values() if "dag" in c)]
             for task in dag["tasks"].values() if "executorLabel" in comps[task["componentRef"]["name"]]]
    assert len(steps) == 13  # monitor, prepare x2, pretrain, tune, and transfer, evaluate, register, promote in each release
    assert all(task["retryPolicy"]["maxRetryCount"] == 2 and task["retryPolicy"]["backoffDuration"] == "60s"
               for task in steps)
    # The loop: the monitor first; everything else only when it finds drift (or is forced, or no champion yet).
    assert tasks(spec["root"]["dag"]) == {
        "monitor": ("comp-monitor", [], None),
        "condition-1": ("comp-condition-1", ["monitor"],
                        "inputs.parameter_values['pipelinechannel--monitor-Output'] != 'no-drift'")}
    root = tasks(comps["comp-condition-1"]["dag"])
    assert root == {
        "prepare": ("comp-prepare", [], None),  # the target
        "prepare-2": ("comp-prepare-2", ["prepare"], None),  # the source, at the target's shape
        "pretrain": ("comp-pretrain", ["prepare-2"], None),
        # the transfer takes the source too (dann, mcc, multitask and simclr train on it)
        "condition-branches-2": ("comp-condition-branches-2", ["prepare", "prepare-2", "pretrain"], None),
    }
    assert comps["comp-condition-1"]["dag"]["tasks"]["prepare-2"]["inputs"]["artifacts"]["like"]["taskOutputArtifact"] == {
        "outputArtifactKey": "dataset", "producerTask": "prepare"}
    # HPO only with a search space; either way the same release sub-pipeline follows.
    branches = tasks(comps["comp-condition-branches-2"]["dag"])
    assert branches["condition-3"][2] == "inputs.parameter_values['pipelinechannel--search_space'] != ''"
    assert branches["condition-4"][2] == "!(inputs.parameter_values['pipelinechannel--search_space'] != '')"
    with_hpo, without = tasks(comps["comp-condition-3"]["dag"]), tasks(comps["comp-condition-4"]["dag"])
    assert with_hpo == {"tune": ("comp-tune", [], None), "tl-release": ("comp-tl-release", ["tune"], None)}
    assert comps["comp-condition-3"]["dag"]["tasks"]["tl-release"]["inputs"]["parameters"]["tuned"][
        "taskOutputParameter"] == {"outputParameterKey": "Output", "producerTask": "tune"}
    assert without == {"tl-release-2": ("comp-tl-release-2", [], None)}
    for release, gate in (("comp-tl-release", "comp-condition-1-2"), ("comp-tl-release-2", "comp-condition-1-3")):
        steps = tasks(comps[release]["dag"])
        assert {name: deps for name, (_, deps, _) in steps.items()} == {
            "transfer": [], "evaluate": ["transfer"], "register": ["evaluate", "transfer"],
            "condition-1": ["evaluate", "register"]}
        # promote runs only when the evaluated accuracy reaches the floor
        assert steps["condition-1"][2] == ("inputs.parameter_values['pipelinechannel--evaluate-Output'] >= "
                                           "inputs.parameter_values['pipelinechannel--min_accuracy']")
        assert list(comps[gate]["dag"]["tasks"]) == ["promote"]

    # Parameters and their defaults, as `tl pipeline run` would send them.
    from pipelines.transfer import arguments
    from tl_core.config import PipelineConfig

    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {k: v["defaultValue"] for k, v in params.items() if "defaultValue" in v} == arguments(PipelineConfig())
    # A setting whose default is None (the text layout's column names, the backbone) is "" (KFP takes
    # no None); the image's shape, an int, is 0.
    assert {k for k, v in PipelineConfig().model_dump().items() if v is None} == {
        "text_column", "label_column", "backbone", "image_size", "channels"}
    assert params["text_column"]["defaultValue"] == params["label_column"]["defaultValue"] == ""
    assert params["image_size"]["defaultValue"] == params["channels"]["defaultValue"] == 0
    assert params["backbone"]["defaultValue"] == ""  # "auto": the transfer step ranks the candidates (test_rank)
    assert set(params) == set(PipelineConfig.model_fields), "every setting is a pipeline parameter"

    # Every step: the one image, no pip install at start, the cluster's settings from ConfigMaps and
    # the Secret (never values in the spec); KFP's cache off where a step has side effects.
    executors = spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {"registry.example.com/tl-core:1.2.3"}
    assert not any("pip install" in " ".join(e["container"]["command"]) for e in executors.values())
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(k8s) == set(executors)
    for config in k8s.values():
        assert [c["configMapName"] for c in config["configMapAsEnv"]] == ["tl-env", "tl-ray-client"]
        assert config["secretAsEnv"][0]["secretName"] == "tl-s3"
    caching = {name: t.get("cachingOptions", {}).get("enableCache", False)
               for c in [spec["root"], *comps.values()] if "dag" in c for name, t in c["dag"]["tasks"].items()}
    assert not caching["monitor"] and not caching["prepare"] and not caching["register"] and not caching["promote"]
    assert caching["pretrain"] and caching["transfer"] and caching["evaluate"]

    # --no-cache: every step, nested ones included.
    uncached = tmp_path / "uncached.yaml"
    assert tl_json("pipeline", "compile", "--output", uncached, "--no-cache")["caching"] is False
    spec = next(yaml.safe_load_all(uncached.read_text()))
    assert not any(t.get("cachingOptions", {}).get("enableCache") for c in [spec["root"], *spec["components"].values()]
                   if "dag" in c for t in c["dag"]["tasks"].values())


# -- whole runs on this machine ----------------------------------------------------------------


@pytest.fixture(scope="module")
def first_run(work):
    """The embedded default end to end, with the HPO branch (a search space); `log` is all it printed."""
    result = tl("pipeline", "run", "--local", *FAST, "--strategy", "finetune", "--search-space", SPACE,
                "--num-samples", 2, "--json")
    assert result.exit_code == 0, result.output[-5000:]
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "log": result.output}


@pytest.mark.slow
def test_local_run_registers_and_promotes_a_champion(first_run):
    accuracy = first_run["accuracy"]
    assert accuracy > 0.5 and first_run["version"] == 1 and first_run["decision"] == "promoted"
    steps = first_run["steps"]  # the tasks of the HPO branch (the other branch's are named "<task>-2")
    # Metrics and the confusion matrix as KFP artifacts; the checkpoint as a pointer, not a blob.
    assert steps["evaluate"]["metrics"]["accuracy"] == accuracy
    assert steps["transfer"]["metrics"]["gain_over_scratch"] == pytest.approx(
        accuracy - steps["transfer"]["metrics"]["scratch_accuracy"], abs=1e-6)
    run_dir = Path(first_run["pipeline_root"])
    confusion = json.loads((run_dir / "evaluate" / "executor_output.json").read_text())
    matrix = confusion["artifacts"]["confusion"]["artifacts"][0]["metadata"]["confusionMatrix"]
    assert [c["displayName"] for c in matrix["annotationSpecs"]] == [str(d) for d in range(10)]
    assert sum(map(sum, (row["row"] for row in matrix["rows"]))) == steps["evaluate"]["metrics"]["n"]
    pointer = json.loads((run_dir / "transfer" / "checkpoint").read_text())
    assert Path(pointer["uri"]).is_file() and (run_dir / "transfer" / "checkpoint").stat().st_size < 20_000

    name = first_run["arguments"]["model_name"]
    assert aliases(name)["champion"] == 1
    assert mlflow_client().get_model_version(name, "1").tags["tl.promotion.decision"] == "promoted"


@pytest.mark.slow
def test_no_credential_leaks_into_tracking_logs_or_the_pipeline(first_run, work, tmp_path):
    """Issue 14, security: with credentials in the environment, none of them shows up in MLflow's
    params and tags, the run's log, the KFP arguments and step outputs, or the compiled YAML."""
    compiled = tmp_path / "pipeline.yaml"
    tl_json("pipeline", "compile", "--output", compiled)
    client = mlflow_client()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    assert len(runs) >= 10  # prepare, pretrain, tune and its trials, transfer, scratch, evaluate, register...
    tracked = json.dumps([[r.data.params, r.data.tags] for r in runs])
    places = {"MLflow params and tags": tracked, "the run's log": first_run["log"],
              "the KFP arguments": json.dumps(first_run["arguments"]), "the compiled pipeline": compiled.read_text()}
    # Every file the runs wrote: the SQLite store, MLflow's artifacts, kfp.local's step outputs and logs.
    for path in (work / "work").rglob("*"):
        if path.is_file():
            places[str(path)] = path.read_bytes().decode("latin-1")
    assert len(places) > 50
    leaks = [(secret, where) for where, text in places.items() for secret in FAKE_SECRETS.values() if secret in text]
    assert not leaks, leaks


@pytest.mark.slow
def test_the_hpo_branch_picks_on_validation_data(first_run):
    tuned = json.loads(first_run["steps"]["tune"]["Output"])
    assert tuned["lr"] in (0.001, 0.003) and tuned["val_per_class"] > 0  # a search picks on validation data
    assert "best_val_accuracy" in first_run["steps"]["tune"]["metrics"]


@pytest.mark.slow
def test_a_zero_label_run_that_fails_the_gate_leaves_the_champion(first_run):
    """Two things of one run (a kfp.local run costs ~100 s here): shots 0 means no target labels, in
    the pipeline as in tl transfer (mcc adapts from the source), and a version under the gate is
    registered as the challenger while the champion stays."""
    again = tl_json("pipeline", "run", "--local", *FAST, "--strategy", "mcc", "--shots", "0", "--min-accuracy", 0.999,
                    "--force-retrain")  # the same data: no drift, so only forced does it train
    assert again["arguments"]["shots"] == 0 and again["version"] == 2 and again["accuracy"] < 0.999
    assert "scratch_accuracy" not in again["steps"]["transfer-2"]["metrics"]  # no labels: no scratch baseline
    assert "promote-2" not in again["steps"] and again["decision"].startswith("not promoted")  # the gate skipped it
    # Reruns reuse identical outputs: the prepared data and the pretrained backbone.
    assert again["steps"]["pretrain"]["checkpoint"] == first_run["steps"]["pretrain"]["checkpoint"]
    assert aliases(again["arguments"]["model_name"]) == {"champion": 1, "challenger": 2}
    # The same adaptation through tl run: its baseline is the source model as it is.
    # (mcc alone: dann at 0 labels is test_domain_adaptation's; one training less for the suite's time)
    run = tl_json("run", *FAST, "--shots", "0", "--strategies", "mcc", "--seeds", "0")
    assert run["baseline"] == "source-only" and [r["strategy"] for r in run["table"]] == ["source-only", "mcc"]
    assert run["pretrain"]["checkpoint"] == first_run["steps"]["pretrain"]["checkpoint"]["uri"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_run_that_finds_no_drift_ends_green_and_trains_nothing(first_run):
    # The champion was trained on the target's data, and the target holds the same data now.
    result = tl("pipeline", "run", "--local", *FAST, "--strategy", "finetune", "--json")
    assert result.exit_code == 0, result.output[-5000:]
    again = json.loads(result.stdout.strip().splitlines()[-1])
    assert again["monitor"] == "no-drift" and again["decision"].startswith("not retrained: the monitor found no drift")
    assert list(again["steps"]) == ["monitor"] and again["version"] is None  # nothing prepared, trained or registered
    assert "monitor: no drift: MMD^2" in result.output  # the step says so in its log
    assert aliases(again["arguments"]["model_name"])["champion"] == 1
    assert again["steps"]["monitor"]["metrics"]["p_value"] >= 0.01


@pytest.mark.slow
def test_tl_run_and_the_pipeline_build_the_same_configs_and_reuse_each_other(first_run):
    # The same settings through `tl run`: the pipeline's datasets and backbone are reused, not redone.
    run = tl_json("run", *FAST, "--seeds", "0", "--strategies", "finetune")
    assert run["pretrain"]["checkpoint"] == first_run["steps"]["pretrain"]["checkpoint"]["uri"]
    assert run["pretrain"]["reused"] and run["target"]["reused"] and run["source"]["reused"]


# -- a KFP endpoint: submit and schedule against a fake KFP REST API ----------------------------


class FakeKfp(BaseHTTPRequestHandler):
    """The v2beta1 endpoints kfp.Client calls, in memory. Lists answer two items a page, so the
    client's paging is exercised too."""

    state: dict = {}

    def log_message(self, *args):  # quiet
        pass

    def _reply(self, body: dict, status: int = 200) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _page(self, key: str, items: list, query: dict) -> None:
        start = int(query.get("page_token", ["0"])[0] or 0)
        body = {key: items[start:start + 2], "total_size": len(items)}
        if start + 2 < len(items):
            body["next_page_token"] = str(start + 2)
        self._reply(body)

    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        query = urllib.parse.parse_qs(url.query)
        named = json.loads(query["filter"][0])["predicates"][0]["stringValue"] if "filter" in query else None

        def in_experiment(item: dict) -> bool:
            return "experiment_id" not in query or item["experiment_id"] == query["experiment_id"][0]

        if url.path == "/apis/v2beta1/healthz":
            self._reply({"multi_user": False})
        elif url.path == "/apis/v2beta1/experiments":
            self._page("experiments", [e for e in self.state["experiments"] if named in (None, e["display_name"])], query)
        elif url.path == "/apis/v2beta1/recurringruns":
            self._page("recurringRuns", [r for r in self.state["recurring"].values()  # camelCase: the API's name
                                          if in_experiment(r) and named in (None, r["display_name"])], query)
        elif url.path == "/apis/v2beta1/runs":
            self._page("runs", [r for r in self.state["runs"] if in_experiment(r)], query)
        else:
            self._reply({"error": "not found"}, 404)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        path, state = self.path.split("?")[0], self.state
        if path == "/apis/v2beta1/experiments":
            experiment = {**body, "experiment_id": f"exp-{len(state['experiments']) + 1}"}
            state["experiments"].append(experiment)
            self._reply(experiment)
        elif path == "/apis/v2beta1/runs":
            run = {**body, "run_id": f"run-{len(state['runs']) + 1}", "state": "PENDING"}
            state["runs"].append(run)
            self._reply(run)
        elif path == "/apis/v2beta1/recurringruns":
            state["created"] += 1
            rid = f"rr-{state['created']}"
            state["recurring"][rid] = {**body, "recurring_run_id": rid,
                                       "status": "ENABLED" if body.get("mode") == "ENABLE" else "DISABLED"}
            self._reply(state["recurring"][rid])
        elif path.endswith((":disable", ":enable")):
            rid, _, action = path.rsplit("/", 1)[1].partition(":")
            state["recurring"][rid]["status"] = "DISABLED" if action == "disable" else "ENABLED"
            self._reply({})
        else:
            self._reply({"error": "not found"}, 404)

    def do_DELETE(self):
        self.state["recurring"].pop(self.path.rsplit("/", 1)[1])
        self._reply({})


@pytest.fixture
def kfp_server():
    FakeKfp.state = {"experiments": [], "runs": [], "recurring": {}, "created": 0}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeKfp)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{server.server_port}", state=FakeKfp.state)
    finally:
        server.shutdown()
        server.server_close()


def all_tasks(sent: dict) -> list[dict]:
    spec = sent["pipeline_spec"]  # kfp.Client sends {pipeline_spec, platform_spec}
    return [t for c in [spec["root"], *spec["components"].values()] if "dag" in c for t in c["dag"]["tasks"].values()]


def test_submit_sends_the_pipeline_with_its_arguments_and_no_cache(kfp_server):
    sent = tl_json("pipeline", "submit", "--host", kfp_server.url, "--epochs", 7, "--no-cache")
    run = kfp_server.state["runs"][0]
    assert sent["run_id"] == run["run_id"] and run["runtime_config"]["parameters"]["epochs"] == 7
    assert kfp_server.state["experiments"][0]["display_name"] == "tl"
    assert not any(t.get("cachingOptions", {}).get("enableCache") for t in all_tasks(run["pipeline_spec"]))
    tl_json("pipeline", "submit", "--host", kfp_server.url)  # the same experiment, the compiled caching
    assert len(kfp_server.state["experiments"]) == 1
    assert any(t.get("cachingOptions", {}).get("enableCache") for t in all_tasks(kfp_server.state["runs"][1]["pipeline_spec"]))


def test_schedule_is_idempotent_by_name_and_spares_runs_in_flight(kfp_server):
    host, state = kfp_server.url, kfp_server.state

    def schedule(*args):
        return tl_json("pipeline", "schedule", "--host", host, *args)

    def live(name):
        return [r for r in state["recurring"].values() if r["display_name"] == name]

    weekly = schedule("--name", "weekly", "--cron", "0 4 * * 0")  # another name: never touched below
    first = schedule("--name", "nightly", "--cron", "0 3 * * *")
    assert first["action"] == "created" and first["cron"] == "0 0 3 * * *"  # KFP's seconds field added
    created = state["recurring"][first["recurring_run_id"]]
    assert created["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *" and int(created["max_concurrency"]) == 1
    assert created["no_catchup"] is True and created["runtime_config"]["parameters"]["min_accuracy"] == 0.5

    # The same settings again: nothing is created or removed.
    again = schedule("--name", "nightly", "--cron", "0 3 * * *")
    assert again["action"] == "unchanged" and again["recurring_run_id"] == first["recurring_run_id"]
    assert len(live("nightly")) == 1 and state["created"] == 2

    # New settings while one of its runs is in flight: the new one is created first, the old one
    # is disabled, not deleted (deleting it would take its running workflow with it).
    state["runs"].append({"run_id": "r-busy", "experiment_id": created["experiment_id"],
                          "recurring_run_id": first["recurring_run_id"], "state": "RUNNING"})
    changed = schedule("--name", "nightly", "--cron", "0 3 * * *", "--epochs", 50)
    assert changed["action"] == "replaced" and changed["recurring_run_id"] != first["recurring_run_id"]
    assert changed["retired"] == [{"recurring_run_id": first["recurring_run_id"], "deleted": False, "runs_in_flight": 1}]
    assert {r["recurring_run_id"]: r["status"] for r in live("nightly")} == {
        first["recurring_run_id"]: "DISABLED", changed["recurring_run_id"]: "ENABLED"}
    assert state["recurring"][changed["recurring_run_id"]]["runtime_config"]["parameters"]["epochs"] == 50

    # Still running: a later call keeps it. Once the run has finished, the next call deletes it
    # and changes nothing else.
    assert schedule("--name", "nightly", "--cron", "0 3 * * *", "--epochs", 50)["retired"][0]["deleted"] is False
    state["runs"][-1]["state"] = "SUCCEEDED"
    tidy = schedule("--name", "nightly", "--cron", "0 3 * * *", "--epochs", 50)
    assert tidy["action"] == "unchanged" and tidy["retired"][0]["deleted"] is True
    assert [r["recurring_run_id"] for r in live("nightly")] == [changed["recurring_run_id"]]

    # Replaced with no run in flight: disabled in that call (a run just started may not be listed
    # yet), deleted by the next.
    newer = schedule("--name", "nightly", "--cron", "0 2 * * *", "--epochs", 50)
    assert newer["action"] == "replaced" and newer["retired"][0]["deleted"] is False
    assert schedule("--name", "nightly", "--cron", "0 2 * * *", "--epochs", 50)["retired"][0]["deleted"] is True
    assert [(r["recurring_run_id"], r["status"]) for r in live("nightly")] == [(newer["recurring_run_id"], "ENABLED")]
    assert [(r["recurring_run_id"], r["status"]) for r in live("weekly")] == [(weekly["recurring_run_id"], "ENABLED")]


def test_bad_input_and_unreachable_endpoints_are_one_line_errors(kfp_server, work):
    assert "--cron 'every monday'" in tl_error("pipeline", "schedule", "--host", kfp_server.url, "--name", "n",
                                               "--cron", "every monday")
    assert "bad hour field '25'" in tl_error("pipeline", "schedule", "--host", kfp_server.url, "--name", "n",
                                             "--cron", "0 25 * * *")
    closed = f"http://127.0.0.1:{servers.free_port()}"
    assert "cannot reach the KFP endpoint" in tl_error("pipeline", "submit", "--host", closed)
    assert "must be a URL" in tl_error("pipeline", "submit", "--host", "localhost:8080")
    assert "search_space" in tl_error("pipeline", "submit", "--host", kfp_server.url, "--search-space", "{lr: 1")
    assert "unknown strategy" in tl_error("pipeline", "submit", "--host", kfp_server.url, "--strategy", "magic")
    assert "add --local" in tl_error("pipeline", "run")
    # A step that fails on bad input stops the local run: its log (traceback included) comes
    # first, then one error line that says which step failed and why.
    # (A model with no champion: the monitor lets it through, and the target's prepare reads it first.)
    failed = tl("pipeline", "run", "--local", "--target", "sklearn:nope", "--model-name", "never-trained")
    last = failed.output.strip().splitlines()[-1]
    assert failed.exit_code == 2 and last.startswith("error: ") and "Inner task failed: 'prepare'" in last
    assert "only sklearn:digits ships with scikit-learn" in last
    assert kfp_server.state["runs"] == [] and kfp_server.state["recurring"] == {}  # nothing half-done
