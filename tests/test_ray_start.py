"""A local Ray that misses its start-up deadline (tl_core.ray_cluster.start_local_ray): the raylet
has 30 s to register with the GCS, which a busy 2-core machine once missed. The fault is
injected into Ray's own start (its node reads the raylet's registration as missing and its clock
as past the deadline), in a process of its own; the GCS and raylet it starts are real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

# Runs init_ray with the first FAILS starts timed out, then prints what it saw as JSON.
SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    import ray, ray._private.node as node, ray._private.services as services
    from tl_core import ray_cluster
    from tl_core.errors import UserError

    fails = int(sys.argv[1])
    real_init, real_get_node, real_time = node.Node.__init__, services.get_node, node.time

    class PastTheDeadline:  # every reading of the node's clock is 31 s after the last
        def __init__(self):
            self.offset = 0
        def __getattr__(self, name):
            return getattr(time, name)
        def monotonic(self):
            self.offset += 31
            return time.monotonic() + self.offset

    def not_registered(*args, **kwargs):
        raise RuntimeError("injected: the raylet has not registered")

    def start(self, *args, **kwargs):
        global fails
        if fails <= 0:
            return real_init(self, *args, **kwargs)
        fails -= 1
        services.get_node, node.time = not_registered, PastTheDeadline()
        try:
            return real_init(self, *args, **kwargs)
        finally:
            services.get_node, node.time = real_get_node, real_time

    def ray_processes():  # Ray's GCS servers below this process
        found = []
        for entry in os.listdir("/proc"):
            try:
                cmdline = open(f"/proc/{entry}/cmdline", "rb").read().decode()
                ppid = int(open(f"/proc/{entry}/stat").read().rpartition(")")[2].split()[1])
            except (OSError, ValueError):
                continue
            if ppid == os.getpid() and "gcs_server" in cmdline:
                found.append(int(entry))
        return found

    node.Node.__init__ = start
    os.environ.pop("RAY_ADDRESS", None)
    try:
        ray_cluster.init_ray()
        result = {"started": ray.is_initialized(), "gcs": len(ray_processes()),
                  "cpus": ray.cluster_resources().get("CPU")}
        ray.shutdown()
    except UserError as e:
        time.sleep(1)
        result = {"error": str(e), "gcs": len(ray_processes())}
    print(json.dumps(result))
""")


def start_with(fails: int) -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(fails)], capture_output=True, text=True, env=env,
                          timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "log": done.stderr}


@pytest.mark.timeout(180)
def test_a_local_ray_that_misses_its_start_deadline_is_started_again_with_nothing_left_behind():
    result = start_with(fails=1)
    assert result["started"] and result["cpus"] == os.cpu_count()
    assert result["gcs"] == 1, result  # the first try's GCS was ended, not left beside the second
    assert "timed out during startup (try 1 of 3)" in result["log"]


@pytest.mark.timeout(180)
def test_a_local_ray_that_never_starts_is_one_line_that_says_what_to_do():
    result = start_with(fails=3)
    assert "timed out during startup 3 times" in result["error"] and "RAY_ADDRESS" in result["error"]
    assert result["gcs"] == 0, result  # every try's processes ended


# Ends the monitor of a local Ray as tl does before Ray's shutdown, then checks the rest still works.
MONITOR_SCRIPT = textwrap.dedent("""
    import json, os
    import ray
    from tl_core import ray_cluster

    def children(name):  # Ray's processes of that name below this process
        found = []
        for entry in os.listdir("/proc"):
            try:
                cmdline = open(f"/proc/{entry}/cmdline", "rb").read().decode()
                ppid = int(open(f"/proc/{entry}/stat").read().rpartition(")")[2].split()[1])
                state = open(f"/proc/{entry}/stat").read().rpartition(")")[2].split()[0]
            except (OSError, ValueError):
                continue
            if ppid == os.getpid() and name in cmdline and state != "Z":
                found.append(int(entry))
        return found

    os.environ.pop("RAY_ADDRESS", None)
    ray_cluster.init_ray()
    before = len(children("autoscaler/_private/monitor.py"))
    ray_cluster.end_monitor()
    after = len(children("autoscaler/_private/monitor.py"))
    answer = ray.get(ray.remote(lambda: 42).remote())
    print(json.dumps({"before": before, "after": after, "answer": answer, "gcs": len(children("gcs_server"))}))
""")


@pytest.mark.timeout(180)
def test_the_monitor_of_a_local_ray_is_ended_before_its_gcs_and_ray_goes_on():
    # ray.shutdown ends the GCS first, and the monitor then waits a second on it (ray_cluster.end_monitor).
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", MONITOR_SCRIPT], capture_output=True, text=True, env=env, timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"before": 1, "after": 0, "answer": 42, "gcs": 1}


@pytest.mark.timeout(180)
def test_a_local_ray_is_this_process_s_own_where_ray_start_left_its_address_behind():
    """`ray start` writes its Ray's address to ray_current_cluster in Ray's temp folder, and a
    killed one leaves the file; Ray's default ray.init() joins the Ray that file names, and
    refused tl's num_cpus there with a ValueError, in every tl command that starts a local Ray.
    With no RAY_ADDRESS, tl starts a Ray of its own whatever the file says."""
    import shutil
    import tempfile
    from pathlib import Path

    temp = Path(tempfile.mkdtemp(prefix="tlray", dir="/tmp"))  # short: Ray's sockets live below it
    (temp / "ray").mkdir()
    (temp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1\n")  # a Ray that is gone
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": str(temp)}
    env.pop("RAY_ADDRESS", None)
    code = ("import json, ray; from tl_core import ray_cluster; ray_cluster.init_ray(); "
            "print(json.dumps({'cpus': ray.cluster_resources().get('CPU'), 'answer': ray.get(ray.remote(lambda: 42)"
            ".remote())})); ray_cluster.shutdown_local_ray()")
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=150)
    finally:
        subprocess.run(["pkill", "-KILL", "-f", str(temp)], capture_output=True)  # whatever of that Ray is left
        shutil.rmtree(temp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"cpus": os.cpu_count(), "answer": 42}


@pytest.mark.timeout(120)
def test_a_ray_address_where_nothing_answers_is_one_line_not_a_wait():
    """Ray retries a RAY_ADDRESS where nothing listens for as long as the command runs (tl predict
    waited over 10 minutes); tl says so in one line, at once."""
    from tests.servers import free_port

    port = free_port()  # free a moment ago: nothing listens there
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    code = ("from tl_core import ray_cluster; from tl_core.errors import UserError\n"
            "try:\n    ray_cluster.init_ray()\nexcept UserError as err:\n    print(err)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=90)
    assert done.returncode == 0 and f"nothing answers at RAY_ADDRESS=127.0.0.1:{port}" in done.stdout, \
        done.stdout[-2000:] + done.stderr[-2000:]
