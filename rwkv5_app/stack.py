"""The local stack behind `rwkv5 up|down|status`: Prefect server and worker, MLflow server, Ray head.

Everything binds to 127.0.0.1 and keeps its state under one directory. `up` starts only what is not already
answering, records a pid file for each process it started, and `down` stops exactly those (whole process
groups, so children such as Ray's raylets go too).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from data_prep.atomic import atomic_path, atomic_write_text

__all__ = ["StackConfig", "StackError", "is_failure", "Service", "services", "up", "down", "status", "offline_env", "point_prefect_profile"]

WORK_POOL = "local-process"
MILESTONE_QUEUE = "milestones"
"""The milestone deployment's work queue. Its limit of one makes the worker take only the earliest waiting
milestone run, so runs start in the order the milestone events created them. The deployment's own ENQUEUE
limit alone refuses the others with a new, later start time each, which reorders them (seen in the e2e)."""


def offline_env() -> dict[str, str]:
    """Telemetry and update checks off: the machines this runs on may have no internet."""
    return {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "RAY_USAGE_STATS_ENABLED": "0",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "DO_NOT_TRACK": "1",
        # `ray start --head` gives its dashboard 60 s to come up by default; a busy 2-core box needs more.
        "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "600",
    }


# What the services do not need to run: MLflow's GenAI job runner (seven huey consumer processes on an idle
# server) and Ray's idle worker processes started ahead of any task (each polls at ~8% of a core here);
# and Ray Train's patience with slow worker start-up.
SERVICE_ENV = {
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "RAY_enable_worker_prestart": "0",
    "RAY_prestart_worker_first_driver": "0",
    # Ray Train gives a worker group 60 s to start; on 2 busy cores importing torch and DeepSpeed in each
    # worker can take longer, and every retry starts the imports over.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "900",
    # Ray Train's preemption watcher is one more actor process per worker group (~12 s of imports on CI's
    # cores) that only acts on cloud node preemption notices; a one-machine stack never gets any.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Prefect server loops the pipeline has no use for: no deployment has a schedule, no flow pauses, and
    # a "Late" label on an enqueued milestone run changes nothing. Each loop queries the database every few
    # seconds; the server took ~36% of a core through the first e2e attempt on the 2-core machine.
    "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_PAUSE_EXPIRATIONS_ENABLED": "false",
    # A milestone run that finds the milestone deployment's one slot taken is told to try again this much later
    # (Prefect's default: 30 s). The e2e's ten enqueued milestone runs spent minutes waiting on the default
    # while the slot was free; a try costs the server one state transition.
    "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "10",
}


# torch.distributed's rendezvous variables. A shell or process that ran a distributed job keeps them; a flow
# run that inherited them through the worker would join that stale group (seen in the test suite: the one-process
# pretraining of the e2e tried to listen on a port an earlier test's process group still held).
RENDEZVOUS_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                  "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE", "TORCHELASTIC_RUN_ID")


def _without_rendezvous(env) -> dict[str, str]:
    return {key: value for key, value in env.items() if key not in RENDEZVOUS_ENV}


@dataclass
class StackConfig:
    """Where the local stack lives and listens.

    Args:
        state_dir (Path): all state: databases, artifacts, logs, pid files. Default: $RWKV5_HOME or ./.state.
        prefect_port, mlflow_port, ray_port, ray_dashboard_port, ray_client_port (int): ports on 127.0.0.1.
    """

    state_dir: Path = field(default_factory=lambda: Path(os.environ.get("RWKV5_HOME", ".state")).resolve())
    host: str = "127.0.0.1"
    prefect_port: int = 4200
    mlflow_port: int = 5000
    ray_port: int = 6379
    ray_dashboard_port: int = 8265
    ray_client_port: int = 10001

    @property
    def prefect_api_url(self) -> str:
        return f"http://{self.host}:{self.prefect_port}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    @property
    def ray_address(self) -> str:
        return f"{self.host}:{self.ray_port}"

    @property
    def ray_dashboard_url(self) -> str:
        return f"http://{self.host}:{self.ray_dashboard_port}"

    @property
    def ray_token_file(self) -> Path:
        """The Ray cluster's authentication token (Ray >= 2.5x turns token auth on by default)."""
        return self.state_dir / "ray-auth-token"

    def env(self) -> dict[str, str]:
        """Variables every process of the pipeline needs to find the stack (Ray workers included)."""
        return {
            **offline_env(),
            "PREFECT_HOME": str(self.state_dir / "prefect"),
            "PREFECT_API_URL": self.prefect_api_url,
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "RAY_ADDRESS": self.ray_address,
            # Token auth, explicitly and with the stack's own token: left to Ray, it depends on whether some
            # earlier `ray.init()` of this user happened to write ~/.ray/auth_token.
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.ray_token_file),
            "RWKV5_RAY_DASHBOARD": self.ray_dashboard_url,
            "RWKV5_HOME": str(self.state_dir),
        }


@dataclass
class Service:
    name: str
    argv: list[str]
    health_url: str | None
    port: int
    url: str
    health_token: Path | None = None  # a bearer token the health check must send
    ready_line: str | None = None  # also wait for this in the service's log: its health URL answers earlier
    settle_s: float = 0.0  # once ready, it must stay alive this long to count as started


def _bin(name: str) -> str:
    """A console script of this interpreter's environment (works without activating a venv)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def services(cfg: StackConfig) -> list[Service]:
    """The stack's long-running processes, in start order.

    Ray's head goes first: its raylet must register with its GCS within a fixed 30 s, which fails on a
    2-core machine while a Prefect server is starting beside it.
    """
    ml = cfg.state_dir / "mlflow"
    return [
        Service(
            "ray-head",
            [
                _bin("ray"), "start", "--head", "--block", f"--node-ip-address={cfg.host}",
                f"--port={cfg.ray_port}", "--include-dashboard=true", f"--dashboard-host={cfg.host}",
                f"--dashboard-port={cfg.ray_dashboard_port}", f"--temp-dir={cfg.state_dir / 'ray'}",
                f"--ray-client-server-port={cfg.ray_client_port}",
            ],
            f"{cfg.ray_dashboard_url}/api/version",
            cfg.ray_port,
            cfg.ray_dashboard_url,
            cfg.ray_token_file,
            # The dashboard answers before the raylet has registered, which can still time out.
            "Ray runtime started.",
            # Ray's client server gives up when the raylet has not registered within its own 30 s (counted from
            # before the raylet starts), and `ray start --block` then stops the whole head: seen 1 s after
            # "Ray runtime started." on a busy 2-core machine. Past that line the raylet is registered, so the
            # client server either finds it at its next 1 s retry or has already given up.
            settle_s=10.0,
        ),
        Service(
            "prefect-server",
            [_bin("prefect"), "server", "start", "--host", cfg.host, "--port", str(cfg.prefect_port)],
            f"{cfg.prefect_api_url}/health",
            cfg.prefect_port,
            f"http://{cfg.host}:{cfg.prefect_port}",
        ),
        Service(
            "mlflow-server",
            [
                _bin("mlflow"), "server", "--host", cfg.host, "--port", str(cfg.mlflow_port),
                "--backend-store-uri", f"sqlite:///{ml / 'mlflow.db'}",
                "--artifacts-destination", str(ml / "artifacts"),
                "--workers", "1",
            ],
            f"{cfg.mlflow_url}/health",
            cfg.mlflow_port,
            cfg.mlflow_url,
        ),
        Service(
            "prefect-worker",
            [_bin("prefect"), "worker", "start", "--pool", WORK_POOL, "--type", "process"],
            None,
            0,
            f"http://{cfg.host}:{cfg.prefect_port}/work-pools/work-pool/{WORK_POOL}",
        ),
    ]


def _pid_file(cfg: StackConfig, name: str) -> Path:
    return cfg.state_dir / "run" / f"{name}.pid"


def _read_pid(cfg: StackConfig, name: str) -> int | None:
    try:
        pid = int(_pid_file(cfg, name).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if _alive(pid) else None


def _healthy(url: str | None, timeout: float = 2.0, token: Path | None = None) -> bool:
    if url is None:
        return False
    request = urllib.request.Request(url)
    if token is not None and token.is_file():
        request.add_header("Authorization", f"Bearer {token.read_text().strip()}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except OSError:
        return False


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


def _log_file(cfg: StackConfig, svc: Service) -> Path:
    return cfg.state_dir / "logs" / f"{svc.name}.log"


def _start(cfg: StackConfig, svc: Service, env: dict[str, str]) -> int:
    _log_file(cfg, svc).parent.mkdir(parents=True, exist_ok=True)
    _pid_file(cfg, svc.name).parent.mkdir(parents=True, exist_ok=True)
    with open(_log_file(cfg, svc), "ab") as log:
        proc = subprocess.Popen(
            svc.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=cfg.state_dir, start_new_session=True,  # own process group: `down` kills it whole
        )
    atomic_write_text(_pid_file(cfg, svc.name), str(proc.pid))
    return proc.pid


# A service that exits while starting is started again, up to this many times in all: `ray start` gives up
# after a fixed 30 s when the machine is busy (its log says "timed out during startup").
START_ATTEMPTS = 3


class ServiceExitedError(RuntimeError):
    """A service's process ended before it answered its health check."""


def _ready(cfg: StackConfig, svc: Service, log_offset: int) -> bool:
    if not _healthy(svc.health_url, token=svc.health_token):
        return False
    if svc.ready_line is None:
        return True
    with open(_log_file(cfg, svc), "rb") as log:
        log.seek(log_offset)
        return svc.ready_line.encode() in log.read()


def _wait_healthy(cfg: StackConfig, svc: Service, pid: int, timeout: float, log_offset: int = 0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _ready(cfg, svc, log_offset):
            settled = time.monotonic() + svc.settle_s
            while time.monotonic() < settled:
                if _read_pid(cfg, svc.name) is None:
                    raise ServiceExitedError(f"{svc.name} exited just after starting; see {_log_file(cfg, svc)}")
                time.sleep(0.5)
            return
        if _read_pid(cfg, svc.name) is None:
            raise ServiceExitedError(f"{svc.name} exited during start; see {_log_file(cfg, svc)}")
        time.sleep(0.5)
    raise RuntimeError(f"{svc.name} not healthy after {timeout:.0f} s; see {_log_file(cfg, svc)}")


def _ensure_token(path: Path) -> None:
    """A random token, readable by this user only, written once (atomically) and kept across restarts."""
    if path.is_file():
        return
    with atomic_path(path) as tmp:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(secrets.token_hex(32))


def _prefect(cfg: StackConfig, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([_bin("prefect"), *args], env=env, capture_output=True, text=True, cwd=os.getcwd())


def _reschedule_orphans(env: dict[str, str], dead_worker_started: datetime | None) -> list[str]:
    """No worker of ours is alive: runs it left Running, and runs that crashed since it started, are orphans
    (`rwkv5_app.recovery`); schedule them again."""
    since = [dead_worker_started.isoformat()] if dead_worker_started else []
    done = subprocess.run([sys.executable, "-m", "rwkv5_app.recovery", WORK_POOL, *since], env=env,
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
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

    A service that cannot be started does not keep the others down (a dead Ray head must not leave the
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
    result: dict[str, str] = {}
    for svc in services(cfg):
        try:
            if svc.name == "prefect-worker":
                server_ok = not is_failure(result.get("prefect-server", ""))
                result[svc.name] = _up_worker(cfg, svc, env, prefect_ok=server_ok)
            else:
                result[svc.name] = _up_service(cfg, svc, env, timeout)
        except (RuntimeError, OSError) as exc:
            result[svc.name] = f"failed: {exc}"
    if deploy is not None and not is_failure(result.get("prefect-server", "")):
        done = _prefect(cfg, env, "--no-prompt", "deploy", "--all", "--prefect-file", str(deploy))
        if done.returncode != 0:
            result["deployments"] = f"failed: prefect deploy:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        else:
            result["deployments"] = "applied"
    (cfg.state_dir / "stack.json").write_text(json.dumps(
        {"prefect": cfg.prefect_api_url, "mlflow": cfg.mlflow_url, "ray": cfg.ray_address,
         "ray_dashboard": cfg.ray_dashboard_url}, indent=2))
    if any(map(is_failure, result.values())):
        raise StackError(result)
    return result


def _up_service(cfg: StackConfig, svc: Service, env: dict[str, str], timeout: float) -> str:
    if _healthy(svc.health_url, token=svc.health_token) or (svc.name == "ray-head" and _port_open(cfg.host, cfg.ray_port)):
        return "running"
    attempt = 1
    while True:
        log_offset = _log_file(cfg, svc).stat().st_size if _log_file(cfg, svc).is_file() else 0
        pid = _start(cfg, svc, env)
        try:
            _wait_healthy(cfg, svc, pid, timeout, log_offset)
            return "started"
        except RuntimeError as exc:  # exited while starting (retried), or not healthy in time
            # What a failed start left behind (Ray's GCS server) must not hold the port or outlive `down`.
            _kill_group(pid)
            if not isinstance(exc, ServiceExitedError) or attempt == START_ATTEMPTS:
                raise
        attempt += 1


def _up_worker(cfg: StackConfig, svc: Service, env: dict[str, str], prefect_ok: bool) -> str:
    """The process worker, after rescheduling the runs a dead worker of ours left Running."""
    if _read_pid(cfg, svc.name) is not None:
        return "running"
    if not prefect_ok:
        return "not started: the Prefect server is down"
    created = _prefect(cfg, env, "work-pool", "create", WORK_POOL, "--type", "process")
    if created.returncode != 0 and "already exists" not in (created.stdout + created.stderr):
        raise RuntimeError(f"could not create work pool {WORK_POOL}: {created.stderr.strip()}")
    _limit_milestone_queue(cfg, env)
    # The pid file of a dead worker of ours is still there: its time is when that worker started.
    stale = _pid_file(cfg, svc.name)
    started = datetime.fromtimestamp(stale.stat().st_mtime, timezone.utc) if stale.is_file() else None
    orphans = _reschedule_orphans(env, started)
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


def down(cfg: StackConfig | None = None, timeout: float = 30.0) -> dict[str, str]:
    """Stop the processes `up` started (by pid file), newest first; returns {service: state}."""
    cfg = cfg or StackConfig()
    result: dict[str, str] = {}
    for svc in reversed(services(cfg)):
        pid = _read_pid(cfg, svc.name)
        if pid is None:
            _pid_file(cfg, svc.name).unlink(missing_ok=True)
            result[svc.name] = "not started by us"
            continue
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.2)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
        _pid_file(cfg, svc.name).unlink(missing_ok=True)
        result[svc.name] = "stopped"
    return result


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as gone
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


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
