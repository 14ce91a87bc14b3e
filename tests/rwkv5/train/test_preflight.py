"""Each preflight check passing and failing, on CPU; Ray parts on the shared local Ray (no GPUs)."""

from __future__ import annotations

import socket
import threading
import time
from collections import namedtuple
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rwkv5.train import preflight
from rwkv5.train.preflight import (
    PreflightFailed,
    RunNeeds,
    cluster_resources,
    disk_space,
    hub_access,
    kernel_build,
    run_preflight,
    shared_paths,
    stack_credentials,
)
from tests.support.hub_server import hub, hub_server  # noqa: F401 (fixtures)

_Usage = namedtuple("_Usage", "total used free")


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_cluster_resources_counts_gpus_cpus_and_the_autoscaler_maximum():
    ok = cluster_resources(8, 1, total={"GPU": 8.0, "CPU": 64.0})
    assert ok.status == "ok" and "8 GPUs" in ok.detail
    short = cluster_resources(8, 1, total={"CPU": 2.0})
    assert short.failed and "has 0 GPUs" in short.detail and "needs 8 GPUs (8 workers x 1)" in short.detail
    cpus = cluster_resources(4, 0, total={"CPU": 2.0})
    assert cpus.failed and "needs 4 CPUs" in cpus.detail
    scaling = cluster_resources(64, 1, total={"CPU": 8.0}, most={"GPU": 256, "CPU": 1024})
    assert scaling.status == "ok" and "autoscaler maximum" in scaling.detail


def test_shared_paths_in_this_process(tmp_path):
    ok = shared_paths({"storage": str(tmp_path / "ckpt"), "data": str(tmp_path / "data")}, on_ray=False)
    assert ok.status == "ok", ok.detail
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # probes removed
    (tmp_path / "blocked").write_text("a file where the folder should be")
    bad = shared_paths({"storage": str(tmp_path / "blocked" / "ckpt")}, on_ray=False)
    assert bad.failed and "storage" in bad.detail and "not writable" in bad.detail


def test_shared_paths_from_ray_tasks(ray_cluster, tmp_path):
    ok = shared_paths({"storage": str(tmp_path / "ckpt"), "data": str(tmp_path / "data")}, on_ray=True)
    assert ok.status == "ok", ok.detail
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
    # memory:// lives in one process: the workers cannot see what this process wrote, as with a node-local disk.
    bad = shared_paths({"storage": "memory://preflight-probe"}, on_ray=True)
    assert bad.failed and "storage memory://preflight-probe on node" in bad.detail


def test_disk_space_shows_the_estimate_next_to_what_is_free(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: _Usage(100e9, 0, 50e9))
    ok = disk_space(str(tmp_path / "state"), "sample", ("train", "validation"), 1.0)
    assert ok.status == "ok" and "50.0 GB free" in ok.detail
    full = disk_space(str(tmp_path / "state"), "cerebras/SlimPajama-627B", ("train", "validation"), 1.0)
    assert full.failed and "download ~896.0 GB" in full.detail and "50.0 GB free" in full.detail
    assert disk_space(str(tmp_path), "cerebras/SlimPajama-627B", ("validation",), 1.0).status == "ok"


def test_hub_access_reachable_unreachable_and_token(hub, monkeypatch, tmp_path):  # noqa: F811
    (tmp_path / "validation" / "chunk1").mkdir(parents=True)
    (tmp_path / "validation" / "chunk1" / "example_holdout_0.jsonl.zst").write_bytes(b"x")
    hub.add_repo("cerebras/SlimPajama-627B", tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", "good")
    assert hub_access("cerebras/SlimPajama-627B", "main").status == "ok"
    hub.token = "good"
    monkeypatch.setenv("HF_TOKEN", "wrong")
    denied = hub_access("cerebras/SlimPajama-627B", "main")
    assert denied.failed and "HTTP 401" in denied.detail and "wrong" not in denied.detail
    monkeypatch.setenv("HF_ENDPOINT", _closed_port_url())
    down = hub_access("cerebras/SlimPajama-627B", "main")
    assert down.failed and "ConnectError" in down.detail and down.seconds < 10


def test_kernel_build_in_a_ray_task(ray_cluster, monkeypatch):
    # The real build needs nvcc and a GPU; the Ray task around it is what is tested here.
    monkeypatch.setattr(preflight, "_build_kernel", lambda: "abc123")
    assert kernel_build(0, timeout=120).status == "ok"
    monkeypatch.setattr(preflight, "_build_kernel", lambda: 1 / 0)
    failed = kernel_build(0, timeout=120)
    assert failed.failed and "ZeroDivisionError" in failed.detail


def test_tiny_run_passes_without_starting_ray(tmp_path, monkeypatch):
    def no_ray(*args):
        raise AssertionError("a CPU run with workers=0 must not start Ray")

    monkeypatch.setattr("rwkv5.train.launch.ensure_ray", no_ray)
    state = tmp_path / "state"
    report = run_preflight(RunNeeds(0, 0, str(state / "checkpoints"), str(state / "data"), str(state), "sample"))
    assert [c.status for c in report.checks] == ["skipped", "ok", "ok", "ok", "skipped", "skipped", "ok"]
    assert report.milestone_mode == "dedicated"  # both sides in processes of their own
    report.raise_if_failed()


def test_7b_on_a_cpu_cluster_without_the_hub_fails_fast_with_one_line_each(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", _closed_port_url())
    state = tmp_path / "state"
    start = time.perf_counter()
    report = run_preflight(RunNeeds(8, 1, str(state / "checkpoints"), str(state / "data"), str(state),
                                    "cerebras/SlimPajama-627B", fraction=1e-6, finetune_workers=8,
                                    finetune_gpus_per_worker=1))
    assert time.perf_counter() - start < 30
    with pytest.raises(PreflightFailed) as raised:
        report.raise_if_failed()
    lines = str(raised.value).splitlines()[1:]
    assert [line.split(":")[0] for line in lines] == ["gpus", "milestones", "hub"]
    assert "the run needs 8 GPUs" in lines[0]
    assert "a milestone fine-tune never fits" in lines[1] and report.milestone_mode is None
    assert report.checks[5].status == "skipped"  # no kernel build without a GPU worker


_PLACEMENT_ON_A_GPU_CLUSTER = """
import json, os, sys
from ray.cluster_utils import Cluster
from rwkv5.train.preflight import RunNeeds, milestone_placement

workers, gpus, finetune_workers = (int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]))
needs = RunNeeds(workers, gpus, "unused", "unused", "unused", "sample", milestone_mode="auto",
                 finetune_workers=finetune_workers, finetune_gpus_per_worker=gpus)
cluster = Cluster()
try:
    cluster.add_node(num_cpus=16, num_gpus=8, include_dashboard=False)  # declared, as `ray start --num-gpus 8`
    cluster.wait_for_nodes()
    cluster.connect()
    rows = []
    for _ in range(2):  # one node of 8 GPUs, then a second one: 16
        check, placement = milestone_placement(needs)
        rows.append({"status": check.status, "detail": check.detail, "mode": placement.mode})
        if len(rows) == 1:
            cluster.add_node(num_cpus=16, num_gpus=8)
            cluster.wait_for_nodes()
    print("RESULT " + json.dumps(rows))
finally:
    import ray

    ray.shutdown()
    cluster.shutdown()
"""


def test_auto_resolves_on_ray_clusters_that_declare_8_and_16_gpus(tmp_path):
    """The 7b deployment's numbers on a real local Ray cluster (its own, in a child process; the GPUs are declared,
    not present): shared on one node of 8 GPUs, dedicated once a second node makes 16."""
    import json
    import os
    import subprocess
    import sys

    from pathlib import Path

    import yaml

    repo = Path(__file__).resolve().parents[3]
    spec = yaml.safe_load((repo / "prefect.yaml").read_text())
    (params,) = [d["parameters"] for d in spec["deployments"]
                 if d["name"] == "7b" and d["entrypoint"] == "flows/pretrain.py:pretrain"]
    args = [str(params["workers"]), str(params["gpus_per_worker"]), str(params["milestones"]["finetune_workers"])]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": ""}
    done = subprocess.run([sys.executable, "-c", _PLACEMENT_ON_A_GPU_CLUSTER, *args], capture_output=True, text=True,
                          cwd=repo, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    one_node, two_nodes = json.loads(line.removeprefix("RESULT "))
    assert one_node["status"] == "ok" and one_node["mode"] == "shared"
    assert one_node["detail"].startswith("auto -> shared: the cluster has 8 GPUs and 16 CPUs")
    assert "pretraining takes 8 GPUs (8 x 1), a fine-tune 8 GPUs (8 x 1)" in one_node["detail"]
    assert two_nodes["status"] == "ok" and two_nodes["mode"] == "dedicated"
    assert two_nodes["detail"].startswith("auto -> dedicated: the cluster has 16 GPUs and 32 CPUs")


def test_batch_split_names_the_worker_counts_that_work():
    from rwkv5.train.preflight import batch_split

    ok = batch_split(8, 2, 112)  # the 7b preset on one node
    assert ok.status == "ok" and ok.detail == "112 sequences per step = micro-batch 2 x 7 accumulations x 8 workers"
    bad = batch_split(16, 2, 112)
    assert bad.failed and "over 16 workers" in bad.detail and bad.detail.endswith("1, 2, 4, 7, 8, 14, 28, 56")
    assert batch_split(0, 2, 8).status == "ok"  # in-process: one worker
@pytest.fixture
def http_status():
    """A real HTTP server on 127.0.0.1 answering every GET with `server.status`; records the requests' headers."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.server.seen.append(dict(self.headers))
            self.send_response(self.server.status)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.status, server.seen = 200, []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_stack_credentials_fails_on_a_service_open_to_anonymous_requests(http_status):
    url = f"http://127.0.0.1:{http_status.server_port}"
    urls = {"Prefect API": f"{url}/api", "MLflow": url, "Ray dashboard": url}
    # Loopback-only services (the one-machine stack) pass without a request.
    assert stack_credentials(urls).status == "ok" and not http_status.seen
    opened = stack_credentials(urls, exempt_loopback=False)
    assert opened.failed and f"Prefect API 127.0.0.1:{http_status.server_port} answers without credentials " \
                             "(HTTP 200)" in opened.detail and "Ray dashboard" in opened.detail
    assert all("Authorization" not in h for h in http_status.seen) and len(http_status.seen) == 3
    for refused in (401, 403):
        http_status.status = refused
        check = stack_credentials(urls, exempt_loopback=False)
        assert check.status == "ok" and f"refuses anonymous requests ({refused})" in check.detail
    http_status.status = 404  # routed past any authentication: as open as a 200
    assert stack_credentials({"MLflow": url}, exempt_loopback=False).failed


def test_stack_credentials_reads_the_environment_and_skips_what_is_no_server(http_status, monkeypatch, tmp_path):
    url = f"http://127.0.0.1:{http_status.server_port}"
    monkeypatch.setenv("PREFECT_API_URL", f"{url}/api")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path}")
    monkeypatch.setenv("RWKV5_RAY_DASHBOARD", _closed_port_url())
    check = stack_credentials(exempt_loopback=False)
    assert check.failed and "Prefect API" in check.detail and "MLflow" not in check.detail
    assert stack_credentials().status == "ok"
    http_status.status = 401
    check = stack_credentials(exempt_loopback=False)
    assert check.status == "ok", check.detail
    assert "MLflow not a server" in check.detail and "Ray dashboard" in check.detail and "not reachable" in check.detail
