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
    assert [c.status for c in report.checks] == ["skipped", "ok", "ok", "skipped", "skipped", "ok"]
    report.raise_if_failed()


def test_7b_on_a_cpu_cluster_without_the_hub_fails_fast_with_one_line_each(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", _closed_port_url())
    state = tmp_path / "state"
    start = time.perf_counter()
    report = run_preflight(RunNeeds(8, 1, str(state / "checkpoints"), str(state / "data"), str(state),
                                    "cerebras/SlimPajama-627B", fraction=1e-6))
    assert time.perf_counter() - start < 30
    with pytest.raises(PreflightFailed) as raised:
        report.raise_if_failed()
    lines = str(raised.value).splitlines()[1:]
    assert [line.split(":")[0] for line in lines] == ["gpus", "hub"]
    assert "the run needs 8 GPUs" in lines[0]
    assert report.checks[4].status == "skipped"  # no kernel build without a GPU worker


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
