"""`up`, `down` and `status` of the whole local stack, and the Prefect setup `up` does once the server answers."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from data_prep.atomic import atomic_write_text
from rwkv5_app.stack.processes import (
    START_ATTEMPTS,
    ServiceExitedError,
    _alive,
    _descendants,
    _ensure_token,
    _flow_run_id,
    _group_alive,
    _healthy,
    _kill_group,
    _log_file,
    _pid_file,
    _port_open,
    _read_pid,
    _start,
    _wait_healthy,
)
from rwkv5_app.stack.services import (
    MILESTONE_QUEUE,
    SERVICE_ENV,
    WORK_POOL,
    Service,
    StackConfig,
    _bin,
    _without_rendezvous,
    services,
)

__all__ = ["StackError", "is_failure", "up", "down", "status", "point_prefect_profile"]


def _prefect(cfg: StackConfig, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([_bin("prefect"), *args], env=env, capture_output=True, text=True, cwd=os.getcwd())


_WORKER = "prefect-worker"


def _reschedule_orphans(env: dict[str, str], dead_worker_started: datetime | None,
                        interrupted: list[str]) -> list[str]:
    """No worker of ours is alive: runs it left Running, runs that crashed since it started, and the runs `down`
    interrupted are orphans (`rwkv5_app.stack.recovery`); schedule them again."""
    since = dead_worker_started.isoformat() if dead_worker_started else "-"
    done = subprocess.run([sys.executable, "-m", "rwkv5_app.stack.recovery", WORK_POOL, since, *interrupted],
                          env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    if done.returncode != 0:
        raise RuntimeError(f"could not reschedule orphaned flow runs: {done.stderr.strip()[-2000:]}")
    return done.stdout.split()


def is_failure(state: str) -> bool:
    """Whether a state `up` reports means the service is not up."""
    return state.startswith(("failed", "not started"))


class StackError(RuntimeError):
    """Some services could not be started; `states` says what happened to each (the others were started)."""

    def __init__(self, states: dict[str, str]):
        self.states = states
        super().__init__("; ".join(f"{name}: {state}" for name, state in states.items() if is_failure(state)))


def up(cfg: StackConfig | None = None, deploy: Path | None = None, timeout: float = 600.0) -> dict[str, str]:
    """Start what is not running yet; returns {service: state} where state is 'started' or 'running'.

    Services start side by side, each once the one it `starts_after` answers (`services`: Ray's head alone, then
    the servers, then the worker); waits overlap, so the stack is up in about the slowest chain's time. A service that cannot be started does not keep the others down (a dead Ray head must not leave the
    Prefect worker unstarted): every service is tried, then `StackError` lists the failures with the states
    of all of them.

    Args:
        cfg (StackConfig, optional): where and on which ports. Default: StackConfig().
        deploy (Path, optional): a prefect.yaml whose deployments are (re)applied once the server is up.
        timeout (float): seconds to wait for each service to become healthy.
    """
    cfg = cfg or StackConfig()
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    _ensure_token(cfg.ray_token_file)
    env = {**_without_rendezvous(os.environ), **cfg.env(), **SERVICE_ENV}
    svcs = services(cfg)
    result: dict[str, str] = {}
    answered = {svc.name: threading.Event() for svc in svcs}  # it answers, or its start is over (either way)
    finished = {svc.name: threading.Event() for svc in svcs}
    errors: list[BaseException] = []

    def bring_up(svc: Service) -> None:
        try:
            if svc.starts_after in answered:
                # The worker needs its server's outcome (below); the others only that it answers.
                (finished if svc.name == _WORKER else answered)[svc.starts_after].wait()
            if svc.name == _WORKER:
                server_ok = not is_failure(result.get("prefect-server", ""))
                result[svc.name] = _up_worker(cfg, svc, env, prefect_ok=server_ok)
            else:
                result[svc.name] = _up_service(cfg, svc, env, timeout, on_ready=answered[svc.name].set)
        except (RuntimeError, OSError) as exc:
            result[svc.name] = f"failed: {exc}"
        except BaseException as exc:  # noqa: BLE001 - raised again below, once every start has ended
            errors.append(exc)
        finally:
            answered[svc.name].set()
            finished[svc.name].set()

    # Daemon threads: Ctrl-C stops `up` at once instead of waiting out the services' health timeouts.
    threads = [threading.Thread(target=bring_up, args=(svc,), name=f"rwkv5-up-{svc.name}", daemon=True)
               for svc in svcs]
    for thread in threads:
        thread.start()
    if deploy is not None:  # once the work pool is there; the other servers may still be starting
        if _WORKER in finished:
            finished[_WORKER].wait()
        else:
            for thread in threads:
                thread.join()
        if not is_failure(result.get("prefect-server", "")):
            done = _prefect(cfg, env, "--no-prompt", "deploy", "--all", "--prefect-file", str(deploy))
            if done.returncode != 0:
                result["deployments"] = f"failed: prefect deploy:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
            else:
                result["deployments"] = "applied"
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    result = {name: result[name] for name in [svc.name for svc in svcs] + ["deployments"] if name in result}
    (cfg.state_dir / "stack.json").write_text(json.dumps(
        {"prefect": cfg.prefect_api_url, "mlflow": cfg.mlflow_url, "ray": cfg.ray_address,
         "ray_dashboard": cfg.ray_dashboard_url}, indent=2))
    if any(map(is_failure, result.values())):
        raise StackError(result)
    return result


def _up_service(cfg: StackConfig, svc: Service, env: dict[str, str], timeout: float,
                on_ready: Callable[[], None] | None = None) -> str:
    if _healthy(svc.health_url, token=svc.health_token) or (svc.name == "ray-head" and _port_open(cfg.host, cfg.ray_port)):
        return "running"
    attempt = 1
    while True:
        log_offset = _log_file(cfg, svc).stat().st_size if _log_file(cfg, svc).is_file() else 0
        pid = _start(cfg, svc, env)
        try:
            _wait_healthy(cfg, svc, pid, timeout, log_offset, on_ready)
            return "started"
        except RuntimeError as exc:  # exited while starting (retried), or not healthy in time
            # What a failed start left behind (Ray's GCS server) must not hold the port or outlive `down`.
            _kill_group(pid)
            if not isinstance(exc, ServiceExitedError) or attempt == START_ATTEMPTS:
                raise
        attempt += 1


def _up_worker(cfg: StackConfig, svc: Service, env: dict[str, str], prefect_ok: bool) -> str:
    """The process worker, after rescheduling the runs a dead worker of ours left Running, or `down` stopped."""
    if _read_pid(cfg, svc.name) is not None:
        return "running"
    if not prefect_ok:
        return "not started: the Prefect server is down"
    created = _prefect(cfg, env, "work-pool", "create", WORK_POOL, "--type", "process")
    if created.returncode != 0 and "already exists" not in (created.stdout + created.stderr):
        raise RuntimeError(f"could not create work pool {WORK_POOL}: {created.stderr.strip()}")
    _limit_milestone_queue(cfg, env)
    # The pid file of a dead worker of ours is still there: its time is when that worker started. After `down`,
    # its marker says when the worker it stopped started and which flow runs that worker was running.
    stale = _pid_file(cfg, svc.name)
    started = datetime.fromtimestamp(stale.stat().st_mtime, timezone.utc) if stale.is_file() else None
    stopped_started, interrupted = _read_interrupted(cfg)
    if stopped_started is not None:
        started = min(started, stopped_started) if started is not None else stopped_started
    orphans = _reschedule_orphans(env, started, interrupted)
    _interrupted_file(cfg).unlink(missing_ok=True)
    _start(cfg, svc, env)
    return "started" + (f" (rescheduled {', '.join(orphans)})" if orphans else "")


def _limit_milestone_queue(cfg: StackConfig, env: dict[str, str]) -> None:
    """The milestone queue with a concurrency limit of 1, whether `prefect deploy` made it already or not."""
    done = _prefect(cfg, env, "work-queue", "create", MILESTONE_QUEUE, "--pool", WORK_POOL, "--limit", "1")
    if done.returncode != 0 and "already exists" in (done.stdout + done.stderr):
        done = _prefect(cfg, env, "work-queue", "set-concurrency-limit", MILESTONE_QUEUE, "1", "--pool", WORK_POOL)
    if done.returncode != 0:
        raise RuntimeError(f"could not limit work queue {MILESTONE_QUEUE}: {(done.stdout + done.stderr).strip()}")


def point_prefect_profile(cfg: StackConfig) -> str:
    """Set PREFECT_API_URL in the user's active Prefect profile (their PREFECT_HOME, not the stack's);
    returns the profile's name. Without it the `prefect` CLI would talk to a throwaway ephemeral server."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    done = subprocess.run([_bin("prefect"), "config", "set", f"PREFECT_API_URL={cfg.prefect_api_url}"], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"prefect config set failed: {done.stderr.strip()[-2000:]}")
    found = re.search(r"[Uu]pdated profile '([^']+)'", done.stdout)
    return found.group(1) if found else "active"


def _interrupted_file(cfg: StackConfig) -> Path:
    return cfg.state_dir / "run" / f"{_WORKER}.interrupted.json"


def _read_interrupted(cfg: StackConfig) -> tuple[datetime | None, list[str]]:
    """(when the worker `down` stopped had started, ids of the flow runs it was running), or (None, [])."""
    path = _interrupted_file(cfg)
    try:
        data = json.loads(path.read_text())
        return datetime.fromisoformat(data["worker_started"]), [str(run) for run in data["flow_runs"]]
    except FileNotFoundError:
        return None, []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RuntimeError(f"{path}: unreadable record of the runs `rwkv5 down` interrupted ({exc}); "
                           "reschedule them by hand and delete it") from None


def _mark_interrupted(cfg: StackConfig, pid: int | None) -> list[int]:
    """Before the worker is stopped: record when it started and the flow runs it is running, so the next `up`
    schedules them again (`down` removes the pid file, whose time `up` would otherwise go by). Returns the
    process groups of those runs: the process worker starts each run in a session of its own, so stopping
    the worker's group would leave them running against a stack that is going away."""
    pid_file = _pid_file(cfg, _WORKER)
    if not pid_file.is_file():
        return []
    started = datetime.fromtimestamp(pid_file.stat().st_mtime, timezone.utc)
    runs: set[str] = set()
    groups: set[int] = set()
    for child in _descendants(pid) if pid is not None else []:
        run = _flow_run_id(child)
        if run is not None:
            runs.add(run)
        try:
            groups.add(os.getpgid(child))
        except ProcessLookupError:  # ended meanwhile
            pass
    groups.discard(pid)
    # A second `down` before any `up` keeps what the first recorded.
    try:
        earlier, earlier_runs = _read_interrupted(cfg)
    except RuntimeError:  # unreadable: what this `down` sees replaces it
        earlier, earlier_runs = None, []
    if earlier is not None:
        started = min(started, earlier)
        runs.update(earlier_runs)
    atomic_write_text(_interrupted_file(cfg),
                      json.dumps({"worker_started": started.isoformat(), "flow_runs": sorted(runs)}))
    return sorted(groups)


def down(cfg: StackConfig | None = None, timeout: float = 30.0) -> dict[str, str]:
    """Stop the processes `up` started (by pid file), newest first; returns {service: state}.

    The worker goes with the flow runs it was running, and they are recorded so that the next `up` schedules
    them again (they resume from their last checkpoint)."""
    cfg = cfg or StackConfig()
    result: dict[str, str] = {}
    for svc in reversed(services(cfg)):
        pid = _read_pid(cfg, svc.name)
        runs = _mark_interrupted(cfg, pid) if svc.name == _WORKER else []
        if pid is None:
            _pid_file(cfg, svc.name).unlink(missing_ok=True)
            result[svc.name] = "not started by us"
            continue
        for group in [pid, *runs]:
            try:
                os.killpg(group, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (_alive(pid) or any(map(_group_alive, runs))):
            time.sleep(0.2)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
        for group in filter(_group_alive, runs):
            try:
                os.killpg(group, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):  # ended meanwhile
                pass
        _pid_file(cfg, svc.name).unlink(missing_ok=True)
        result[svc.name] = "stopped"
    return result


def status(cfg: StackConfig | None = None) -> list[dict[str, object]]:
    """One row per service: pid (if we started it), whether it answers, and its URL."""
    cfg = cfg or StackConfig()
    rows = []
    for svc in services(cfg):
        pid = _read_pid(cfg, svc.name)
        if svc.health_url is not None:
            healthy = _healthy(svc.health_url, token=svc.health_token)
        else:
            healthy = pid is not None
        rows.append({"service": svc.name, "pid": pid, "healthy": healthy, "url": svc.url})
    return rows
