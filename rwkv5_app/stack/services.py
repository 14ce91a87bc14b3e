"""What the local stack runs: its services, their ports and the environment every process gets."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["WORK_POOL", "MILESTONE_QUEUE", "SERVICE_ENV", "StackConfig", "Service", "services", "offline_env",
           "visible_gpus"]

WORK_POOL = "local-process"
MILESTONE_QUEUE = "milestones"
"""The milestone deployment's work queue. Its limit of one makes the worker take only the earliest waiting
milestone run, so runs start in the order the milestone events created them. The deployment's own ENQUEUE
limit alone refuses the others with a new, later start time each, which reorders them."""


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
# server) and Ray's idle worker processes started ahead of any task (each polls the CPU while idle);
# and Ray Train's patience with slow worker start-up.
SERVICE_ENV = {
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "RAY_enable_worker_prestart": "0",
    "RAY_prestart_worker_first_driver": "0",
    # Ray Train gives a worker group 60 s to start; on 2 busy cores importing torch and DeepSpeed in each
    # worker can take longer, and every retry starts the imports over.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "900",
    # Ray Train's preemption watcher is one more actor process per worker group (seconds of imports) that
    # only acts on cloud node preemption notices; a one-machine stack never gets any.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Prefect server loops the pipeline has no use for: no deployment has a schedule, no flow pauses, and
    # a "Late" label on an enqueued milestone run changes nothing. Each loop queries the database every few
    # seconds.
    "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_PAUSE_EXPIRATIONS_ENABLED": "false",
    # A milestone run that finds the milestone deployment's one slot taken is told to try again this much later
    # (Prefect's default: 30 s, during which a freed slot stays unused); a try costs the server one state
    # transition.
    "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "10",
}


# torch.distributed's rendezvous variables. A shell or process that ran a distributed job keeps them; a flow
# run that inherited them through the worker would join that stale group (and listen on a port it still holds).
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
    gpus: int | None = None
    """GPUs the Ray head offers; None counts this machine's (`visible_gpus`)."""

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
    starts_after: str | None = None  # the service that must answer first (`up` starts the others at once)


def visible_gpus() -> int:
    """CUDA devices this machine shows (CUDA_VISIBLE_DEVICES applies); 0 without torch's CUDA build or a GPU."""
    import torch

    return torch.cuda.device_count()


def _bin(name: str) -> str:
    """A console script of this interpreter's environment (works without activating a venv)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def services(cfg: StackConfig) -> list[Service]:
    """The stack's long-running processes; `up` starts each once its `starts_after` answers, the rest at once.

    Ray's head goes first, alone: its raylet must register with its GCS within a fixed 30 s, which fails on a
    2-core machine while a Prefect server is starting beside it. Once the head answers, the Prefect and MLflow
    servers start side by side (while the head settles), and the worker once the Prefect server answers.
    """
    ml = cfg.state_dir / "mlflow"
    gpus = visible_gpus() if cfg.gpus is None else cfg.gpus
    # Said, not left to Ray's own detection, so the head offers exactly the GPUs torch sees (the pretraining and
    # milestone workers ask Ray for them); a CPU machine's head is started as before.
    gpu_args = [f"--num-gpus={gpus}"] if gpus > 0 else []
    return [
        Service(
            "ray-head",
            [
                # --block, not Ray's background mode: `ray stop` stops every Ray process of this user on the
                # machine, not only this head, and --block keeps the head one process group `down` can stop.
                _bin("ray"), "start", "--head", "--block", f"--node-ip-address={cfg.host}",
                f"--port={cfg.ray_port}", "--include-dashboard=true", f"--dashboard-host={cfg.host}",
                f"--dashboard-port={cfg.ray_dashboard_port}", f"--temp-dir={cfg.state_dir / 'ray'}",
                f"--ray-client-server-port={cfg.ray_client_port}", *gpu_args,
            ],
            f"{cfg.ray_dashboard_url}/api/version",
            cfg.ray_port,
            cfg.ray_dashboard_url,
            cfg.ray_token_file,
            # The dashboard answers before the raylet has registered, which can still time out.
            "Ray runtime started.",
            # Ray's client server gives up when the raylet has not registered within its own 30 s (counted from
            # before the raylet starts), and `ray start --block` then stops the whole head, possibly just after
            # "Ray runtime started.". Past that line the raylet is registered, so the client server either finds
            # it at its next 1 s retry or has already given up.
            settle_s=10.0,
        ),
        Service(
            "prefect-server",
            # Not `prefect server start --background`: it leaves the server writing into pipes nobody reads (no
            # log file), in the caller's process group, and `prefect server stop` sends one SIGTERM to one pid.
            [_bin("prefect"), "server", "start", "--host", cfg.host, "--port", str(cfg.prefect_port)],
            f"{cfg.prefect_api_url}/health",
            cfg.prefect_port,
            f"http://{cfg.host}:{cfg.prefect_port}",
            starts_after="ray-head",
        ),
        Service(  # `mlflow server` has no background mode
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
            starts_after="ray-head",
        ),
        Service(  # `prefect worker start` has no background mode
            "prefect-worker",
            [_bin("prefect"), "worker", "start", "--pool", WORK_POOL, "--type", "process"],
            None,
            0,
            f"http://{cfg.host}:{cfg.prefect_port}/work-pools/work-pool/{WORK_POOL}",
            starts_after="prefect-server",
        ),
    ]
