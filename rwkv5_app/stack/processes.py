"""One service process: started in its own process group with a pid file and a log, checked for health."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from data_prep.atomic import atomic_path, atomic_write_text
from rwkv5_app.stack.services import Service, StackConfig

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


def _wait_healthy(cfg: StackConfig, svc: Service, pid: int, timeout: float, log_offset: int = 0,
                  on_ready: Callable[[], None] | None = None) -> None:
    """Until `svc` answers (then `on_ready()`) and has stayed alive for its `settle_s`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _ready(cfg, svc, log_offset):
            if on_ready is not None:
                on_ready()
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


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _processes() -> list[tuple[int, str, int, int]]:
    """(pid, state, parent pid, process group) of every process, read from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name (field 2) may hold spaces and parentheses: the fields we want follow its last ')'.
            state, ppid, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
            found.append((int(stat.parent.name), state, int(ppid), int(group)))
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
    return found


def _group_alive(group: int) -> bool:
    """Whether a process of this group still runs (zombies, which nothing may reap in a container, do not)."""
    return any(g == group and state != "Z" for _, state, _, g in _processes())


def _descendants(pid: int) -> list[int]:
    """Pids of every live process below `pid` (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for child, state, ppid, _ in _processes():
        if state != "Z":
            children.setdefault(ppid, []).append(child)
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found


def _flow_run_id(pid: int) -> str | None:
    """The Prefect flow run a process runs (a process worker starts each with PREFECT__FLOW_RUN_ID set)."""
    try:
        entries = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for entry in entries:
        if entry.startswith(b"PREFECT__FLOW_RUN_ID="):
            return entry.split(b"=", 1)[1].decode()
    return None


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
