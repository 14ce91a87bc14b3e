"""`rwkv5 up|down|status` mechanics with small stand-in processes (the real services run in the e2e module):
a service that cannot start is reported with its log while the others still start, and `down` stops exactly
what `up` started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest

from rwkv5_app import stack
from rwkv5_app.stack import supervisor
from rwkv5_app.stack import Service, StackConfig, StackError
from tests.conftest import _free_port


def _http_service(name: str, port: int) -> Service:
    url = f"http://127.0.0.1:{port}/"
    return Service(name, [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], url, port, url)


def _crashing_service(name: str) -> Service:
    return Service(name, [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"],
                   "http://127.0.0.1:9/", 9, "http://127.0.0.1:9/")


@pytest.fixture
def cfg(tmp_path):
    return StackConfig(state_dir=tmp_path / "stack")


def test_a_failed_service_does_not_keep_the_others_down(cfg, monkeypatch):
    before, after = _free_port(), _free_port()
    monkeypatch.setattr(supervisor, "services", lambda _cfg: [
        _http_service("first", before), _crashing_service("broken"), _http_service("last", after)])
    with pytest.raises(StackError) as raised:
        stack.up(cfg, timeout=60)
    states = raised.value.states
    assert states["first"] == "started" and states["last"] == "started", states
    assert states["broken"].startswith("failed") and "broken.log" in states["broken"], states
    assert "boom" in (cfg.state_dir / "logs" / "broken.log").read_text()
    assert str(raised.value).startswith("broken: failed")
    try:
        rows = {row["service"]: row["healthy"] for row in stack.status(cfg)}
        assert rows == {"first": True, "broken": False, "last": True}
        # A second `up` leaves the running ones alone.
        with pytest.raises(StackError) as again:
            stack.up(cfg, timeout=60)
        assert again.value.states["first"] == again.value.states["last"] == "running"
    finally:
        stopped = stack.down(cfg)
    assert stopped == {"last": "stopped", "broken": "not started by us", "first": "stopped"}
    assert not any(row["healthy"] for row in stack.status(cfg))


def test_up_returns_states_when_everything_starts(cfg, monkeypatch):
    port = _free_port()
    monkeypatch.setattr(supervisor, "services", lambda _cfg: [_http_service("only", port)])
    try:
        assert stack.up(cfg, timeout=60) == {"only": "started"}
        assert stack.up(cfg, timeout=60) == {"only": "running"}
    finally:
        assert stack.down(cfg) == {"only": "stopped"}



def _stamped_service(name: str, port: int, delay_s: float = 0.0, after: str | None = None) -> Service:
    """An HTTP service that logs when its process began and when it started answering (after `delay_s`)."""
    script = (f"import time, runpy, sys; print('began', time.time(), flush=True); time.sleep({delay_s}); "
              "print('answers', time.time(), flush=True); "
              f"sys.argv = ['http.server', '{port}', '--bind', '127.0.0.1']; "
              "runpy.run_module('http.server', run_name='__main__')")
    url = f"http://127.0.0.1:{port}/"
    return Service(name, [sys.executable, "-c", script], url, port, url, starts_after=after)


def _stamp(cfg: StackConfig, name: str, what: str) -> float:
    line = next(line for line in (cfg.state_dir / "logs" / f"{name}.log").read_text().splitlines()
                if line.startswith(what))
    return float(line.split()[1])


def test_a_service_starts_once_the_one_it_follows_answers_and_the_rest_start_at_once(cfg, monkeypatch):
    """`rwkv5 up` overlaps the starts (Ray's head alone first, then the servers side by side): a dependent
    service must not begin before its dependency answers, an independent one must not wait for it."""
    slow, after, beside = _free_port(), _free_port(), _free_port()
    monkeypatch.setattr(supervisor, "services", lambda _cfg: [
        _stamped_service("slow", slow, delay_s=3.0), _stamped_service("after", after, after="slow"),
        _stamped_service("beside", beside)])
    try:
        assert stack.up(cfg, timeout=60) == {"slow": "started", "after": "started", "beside": "started"}
    finally:
        stack.down(cfg)
    assert _stamp(cfg, "after", "began") >= _stamp(cfg, "slow", "answers")
    assert _stamp(cfg, "beside", "began") < _stamp(cfg, "slow", "answers")


def test_services_do_not_inherit_a_distributed_rendezvous(cfg, monkeypatch):
    """A shell that ran torch.distributed keeps MASTER_PORT and friends; flow runs started through the worker
    must not join that stale group (the e2e's one-process pretraining once tried to listen on such a port)."""
    port = _free_port()
    script = ("import os, runpy, sys; "
              "print('rendezvous:', sorted(k for k in ('MASTER_PORT', 'WORLD_SIZE', 'RANK') if k in os.environ), "
              "flush=True); "
              f"sys.argv = ['http.server', '{port}', '--bind', '127.0.0.1']; "
              "runpy.run_module('http.server', run_name='__main__')")
    url = f"http://127.0.0.1:{port}/"
    monkeypatch.setattr(supervisor, "services", lambda _cfg: [Service("env", [sys.executable, "-c", script], url, port, url)])
    for key, value in {"MASTER_PORT": "29500", "WORLD_SIZE": "2", "RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    try:
        assert stack.up(cfg, timeout=60) == {"env": "started"}
    finally:
        stack.down(cfg)
    assert "rendezvous: []" in (cfg.state_dir / "logs" / "env.log").read_text()


def test_down_stops_and_records_the_worker_runs_so_up_reschedules_them(cfg, monkeypatch):
    """Issue 18, bug 6: `down` removed the worker's pid file, so the next `up` forgot the runs it had stopped.
    A stand-in worker starts a "flow run" in a session of its own, as the process worker does."""
    run_id = str(uuid.uuid4())
    child = (f"import os, subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; "
             f"time.sleep(600)'], env={{**os.environ, 'PREFECT__FLOW_RUN_ID': '{run_id}'}}, "
             "start_new_session=True); time.sleep(600)")
    worker = Service("prefect-worker", [sys.executable, "-c", child], None, 0, "http://127.0.0.1:9/")
    calls = []
    monkeypatch.setattr(supervisor, "services", lambda _cfg: [worker])
    monkeypatch.setattr(supervisor, "_prefect", lambda *a: subprocess.CompletedProcess(a, 0, "", ""))
    monkeypatch.setattr(supervisor, "_limit_milestone_queue", lambda *a: None)
    monkeypatch.setattr(supervisor, "_reschedule_orphans",
                        lambda env, since, runs=(): calls.append((since, list(runs))) or [])
    try:
        try:
            assert stack.up(cfg) == {"prefect-worker": "started"}
            pid_file = cfg.state_dir / "run" / "prefect-worker.pid"
            started = datetime.fromtimestamp(pid_file.stat().st_mtime, timezone.utc)
            deadline = time.monotonic() + 60
            while not _flow_run_processes(run_id):
                assert time.monotonic() < deadline, "the stand-in flow run never started"
                time.sleep(0.1)
        finally:
            assert stack.down(cfg, timeout=10) == {"prefect-worker": "stopped"}
        assert not _flow_run_processes(run_id), "the flow run outlived `down`"
        marker = cfg.state_dir / "run" / "prefect-worker.interrupted.json"
        assert json.loads(marker.read_text())["flow_runs"] == [run_id]
        try:
            stack.up(cfg)
        finally:
            stack.down(cfg, timeout=10)
        assert calls == [(None, []), (started, [run_id])]  # the stopped run, and when its worker started
    finally:
        for pid in _flow_run_processes(run_id):  # only if `down` left it behind
            os.kill(pid, signal.SIGKILL)


def _flow_run_processes(run_id: str) -> list[int]:
    """Pids of the live processes that run flow run `run_id`."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if (f"PREFECT__FLOW_RUN_ID={run_id}".encode() in (proc / "environ").read_bytes().split(b"\0")
                    and (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"):
                found.append(int(proc.name))
        except OSError:  # gone meanwhile
            continue
    return found


def _ray_head_argv(cfg) -> list[str]:
    from rwkv5_app.stack.services import services

    return next(svc.argv for svc in services(cfg) if svc.name == "ray-head")


def test_ray_head_offers_the_gpus_torch_sees(tmp_path, monkeypatch):
    import importlib

    services_module = importlib.import_module("rwkv5_app.stack.services")

    monkeypatch.setattr(services_module, "visible_gpus", lambda: 1)
    assert "--num-gpus=1" in _ray_head_argv(StackConfig(state_dir=tmp_path))
    assert "--num-gpus=4" in _ray_head_argv(StackConfig(state_dir=tmp_path, gpus=4))
    monkeypatch.setattr(services_module, "visible_gpus", lambda: 0)
    cpu_argv = _ray_head_argv(StackConfig(state_dir=tmp_path))
    assert not [arg for arg in cpu_argv if arg.startswith("--num-gpus")]  # a CPU head starts as it always did
