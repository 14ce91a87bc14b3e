"""The local stack behind `rwkv5 up|down|status`: Prefect server and worker, MLflow server, Ray head.

Everything binds to 127.0.0.1 and keeps its state under one directory. `up` starts only what is not already
answering, records a pid file for each process it started, and `down` stops exactly those (whole process
groups, so children such as Ray's raylets go too).

- `services`: what runs, on which ports, with which environment;
- `processes`: one service process (start, pid file, health, stop);
- `supervisor`: `up`, `down`, `status` of them all;
- `recovery`: flow runs orphaned by a dead worker, scheduled again.
"""

from rwkv5_app.stack.services import MILESTONE_QUEUE, WORK_POOL, Service, StackConfig, offline_env, services
from rwkv5_app.stack.supervisor import StackError, down, is_failure, point_prefect_profile, status, up

__all__ = ["MILESTONE_QUEUE", "WORK_POOL", "StackConfig", "StackError", "is_failure", "Service", "services", "up",
           "down", "status", "offline_env", "point_prefect_profile"]
