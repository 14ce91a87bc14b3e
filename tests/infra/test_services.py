"""infra/services: the production settings of docker-compose.yml, run for real without Docker: a PostgreSQL
from Debian's packages, the compose file's database init script, Prefect's migration and server, and MLflow
with its backend on PostgreSQL and artifacts on S3 (moto). A flow run logs an MLflow run through both, and the
tiny pipeline (sample, download, tokenize, pretrain) runs through them.

Both servers and a Ray head with the cluster configs' token authentication refuse requests without
credentials; with them, a flow run, an MLflow run and a Ray job work, and no credential ends up in a log,
a database row (artifacts, parameters) or the run's files.

Redis is not available here, so the Prefect server runs as one process with in-memory messaging: the
compose file's Redis settings and `--workers 4 --no-services` are the only parts not exercised.
"""

from __future__ import annotations

import glob
import base64
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

SERVICES = Path(__file__).resolve().parents[2] / "infra" / "services"
RAY_LAUNCHER = SERVICES.parent / "ray" / "cluster-aws.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))[-1:]
    return found[0] if isinstance(found, list) and found else (found or None)


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} substitution."""

    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3) or ""
        value = env.get(name, "")
        if op == ":?" and not value:
            raise KeyError(f"{name} must be set: {arg}")
        return value if value or op != ":-" else arg

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", sub, text)


def _compose(env: dict[str, str]) -> dict:
    return yaml.safe_load(interpolate((SERVICES / "docker-compose.yml").read_text(), env))


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=3)
            return
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                _stop(proc)
                raise RuntimeError(f"{url} did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(1)


def _start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Own process group, so `_stop` also ends the server's workers."""
    with open(log, "w") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL cluster on 127.0.0.1 (password auth over TCP), run as the `postgres` user when we are root."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries not installed (.ci/run installs Debian's postgresql)")
    import tempfile

    # Not under pytest's tmp folder: that is private to root, and the server may run as `postgres`.
    root = Path(tempfile.mkdtemp(prefix="rwkv5-pg-"))
    data, port = root / "data", _free_port()
    superpw = secrets.token_hex(8)
    (root / "pw").write_text(superpw)
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        as_user = ["runuser", "-u", "postgres", "--"]
        for path in (root, root / "pw"):
            shutil.chown(path, "postgres")
    subprocess.run([*as_user, initdb, "-D", str(data), "-U", "postgres", "--auth-local=trust",
                    "--auth-host=scram-sha-256", f"--pwfile={root / 'pw'}", "-E", "UTF8", "--no-sync"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(root / "pg.log"), "-w", "-t", "120", "-o",
                    f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                   check=True, capture_output=True)
    try:
        yield {"host": "127.0.0.1", "port": port, "socket_dir": str(root), "password": superpw}
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(postgres, s3_bucket, s3_server, tmp_path_factory):
    """The compose file's databases, Prefect server and MLflow server, with test values for its variables."""
    root = tmp_path_factory.mktemp("services")
    env = {
        "POSTGRES_HOST": postgres["host"], "POSTGRES_PORT": str(postgres["port"]),
        "POSTGRES_PASSWORD": postgres["password"], "PREFECT_DB_PASSWORD": secrets.token_hex(8),
        "MLFLOW_DB_PASSWORD": secrets.token_hex(8), "RWKV5_IMAGE": "unused-here",
        "MLFLOW_ARTIFACTS": f"s3://{s3_bucket}/mlflow", "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_S3_ENDPOINT_URL": s3_server["client_kwargs"]["endpoint_url"], "REDIS_HOST": "unused-here",
        "PREFECT_SERVER_API_AUTH_STRING": f"rwkv5:{secrets.token_hex(12)}", "MLFLOW_ADMIN_PASSWORD": secrets.token_hex(12),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
    }
    compose = _compose(env)["services"]
    # The postgres image runs init-databases.sh once over its local socket; so do we.
    subprocess.run(["bash", str(SERVICES / "init-databases.sh")], check=True, capture_output=True,
                   env=os.environ | env | {"PGHOST": postgres["socket_dir"], "PGPORT": str(postgres["port"])})

    base = os.environ | {"PREFECT_HOME": str(root / "prefect-home"), "DO_NOT_TRACK": "1"}
    prefect_env = {k: str(v) for k, v in compose["prefect-api"]["environment"].items()}
    assert prefect_env["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://prefect:")
    local_prefect = {k: v for k, v in prefect_env.items() if "redis" not in v}  # no Redis here (module doc)
    migrate = shlex.split(compose["prefect-migrate"]["command"])
    subprocess.run(migrate, check=True, capture_output=True, env=base | local_prefect, timeout=600)

    procs = []
    prefect_port, mlflow_port = _free_port(), _free_port()
    api = shlex.split(compose["prefect-api"]["command"])
    assert api[:3] == ["prefect", "server", "start"] and "--workers" in api
    api = api[:3] + ["--host", "127.0.0.1", "--port", str(prefect_port)]
    log = root / "prefect.log"
    procs.append(_start(api, base | local_prefect, log))
    prefect_url = f"http://127.0.0.1:{prefect_port}/api"

    ml = compose["mlflow"]
    cmd = shlex.split(ml["command"])
    for flag, value in (("--host", "127.0.0.1"), ("--port", str(mlflow_port)), ("--workers", "1")):
        cmd[cmd.index(flag) + 1] = value
    assert cmd[cmd.index("--backend-store-uri") + 1].startswith("postgresql+psycopg2://mlflow:")
    mlog = root / "mlflow.log"
    assert cmd[:4] == ["mlflow", "server", "--app-name", "basic-auth"]
    # The compose file's bind mounts (the auth app's settings), at their paths in this checkout.
    mounted = {dest: str(SERVICES / src) for src, dest, *_ in (v.split(":") for v in ml["volumes"])}
    ml_env = {k: mounted.get(str(v), str(v)) for k, v in ml["environment"].items()}
    # Job execution spawns a dozen consumer processes this test does not need on a 2-core CI box.
    ml_env = base | ml_env | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    procs.append(_start(cmd, ml_env, mlog))
    mlflow_url = f"http://127.0.0.1:{mlflow_port}"
    try:
        _wait_http(f"{prefect_url}/health", procs[0], log)
        _wait_http(f"{mlflow_url}/health", procs[1], mlog)
        # What stack.env / the rwkv5-stack-credentials Secret give every pipeline process (docs/scale-out.md).
        credentials = {"PREFECT_API_AUTH_STRING": env["PREFECT_SERVER_API_AUTH_STRING"],
                       "MLFLOW_TRACKING_USERNAME": ml_env["MLFLOW_AUTH_ADMIN_USERNAME"],
                       "MLFLOW_TRACKING_PASSWORD": env["MLFLOW_ADMIN_PASSWORD"]}
        yield {"prefect": prefect_url, "mlflow": mlflow_url, "env": env, "root": root, "credentials": credentials}
    finally:
        for proc in procs:
            _stop(proc)


def _client_env(stack: dict) -> dict[str, str]:
    return os.environ | stack["credentials"] | {
        "PREFECT_API_URL": stack["prefect"], "MLFLOW_TRACKING_URI": stack["mlflow"],
        "PREFECT_HOME": str(stack["root"] / "client-home"), "MLFLOW_DISABLE_TELEMETRY": "true"}


@pytest.fixture(scope="module")
def ray_head(stack):
    """A Ray head with token authentication as infra/ray/cluster-aws.yaml sets it on every node (RAY_AUTH_MODE,
    the token file of the mounted secrets folder), and the stack's credentials in its environment as stack.env
    gives them; its dashboard on 127.0.0.1. Yields the dashboard URL and the environment a client needs."""
    import tempfile

    options = [tok for opt in yaml.safe_load(RAY_LAUNCHER.read_text())["docker"]["run_options"]
               for tok in shlex.split(opt)]
    node_env = dict(options[i + 1].split("=", 1) for i, t in enumerate(options) if t == "--env")
    # Ray's socket paths must stay short: not under pytest's deep tmp folder. The token's folder stands for the
    # mounted secrets folder, apart from Ray's files (which are checked for leaks).
    temp, secrets_dir = Path(tempfile.mkdtemp(prefix="rwkv5-ray-")), Path(tempfile.mkdtemp(prefix="rwkv5-secrets-"))
    token = secrets_dir / Path(node_env["RAY_AUTH_TOKEN_PATH"]).name
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    auth = {"RAY_AUTH_MODE": node_env["RAY_AUTH_MODE"], "RAY_AUTH_TOKEN_PATH": str(token)}
    assert auth["RAY_AUTH_MODE"] == "token"
    ports = {name: _free_port() for name in ("port", "dashboard-port", "ray-client-server-port",
                                             "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                             "metrics-export-port", "runtime-env-agent-port")}
    argv = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--num-cpus=1", f"--temp-dir={temp}",
            "--disable-usage-stats", *(f"--{name}={port}" for name, port in ports.items())]
    env = {k: v for k, v in _client_env(stack).items() if k != "RAY_ADDRESS"} | auth | {
        "RAY_USAGE_STATS_ENABLED": "0", "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "600",
        "RAY_enable_worker_prestart": "0", "RAY_prestart_worker_first_driver": "0"}
    log = temp / "head.log"
    proc = _start(argv, env, log)
    dashboard = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        _wait_http(f"{dashboard}/api/gcs_healthz", proc, log)  # public, like every health probe
        deadline = time.time() + 300
        while "Ray runtime started." not in log.read_text():
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"Ray head did not start:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        client = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | auth | {"RAY_USAGE_STATS_ENABLED": "0"}
        yield {"dashboard": dashboard, "client_env": client, "temp": temp, "token": token.read_text()}
    finally:
        _stop(proc)
        for folder in (temp, secrets_dir):
            shutil.rmtree(folder, ignore_errors=True)


FLOW = '''
import os, sys
import mlflow
from prefect import flow, task

@task
def log_run(value: float) -> str:
    mlflow.set_experiment("services-smoke")
    with mlflow.start_run(run_name="smoke") as run:
        mlflow.log_param("source", "prefect")
        mlflow.log_metric("loss", value, step=1)
        mlflow.log_text("hello from the flow", "notes/hello.txt")
    return run.info.run_id

@flow(name="services-smoke")
def smoke(value: float) -> str:
    return log_run(value)

print("RUN_ID", smoke(1.25))
'''


def test_flow_and_mlflow_run_land_in_postgres_and_s3(stack, postgres, s3_bucket, s3_server):
    import boto3
    import psycopg2

    script = stack["root"] / "smoke.py"
    script.write_text(FLOW)
    done = subprocess.run([sys.executable, str(script)], env=_client_env(stack), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_no_secret(stack, done.stdout + done.stderr)
    run_id = re.search(r"RUN_ID (\w+)", done.stdout).group(1)

    def query(db: str, password: str, sql: str, *args):
        with psycopg2.connect(host="127.0.0.1", port=postgres["port"], dbname=db, user=db,
                              password=password) as conn, conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()

    # The flow run and its task run are rows of Prefect's PostgreSQL database, in a final Completed state.
    rows = query("prefect", stack["env"]["PREFECT_DB_PASSWORD"],
                 "SELECT fr.state_type, fr.id FROM flow_run fr JOIN flow f ON f.id = fr.flow_id WHERE f.name = %s",
                 "services-smoke")
    assert [r[0] for r in rows] == ["COMPLETED"]
    tasks = query("prefect", stack["env"]["PREFECT_DB_PASSWORD"],
                  "SELECT state_type FROM task_run WHERE flow_run_id = %s", rows[0][1])
    assert [t[0] for t in tasks] == ["COMPLETED"]

    # The MLflow run and its metric are in MLflow's PostgreSQL database; the artifact went to S3 via the server.
    ml = query("mlflow", stack["env"]["MLFLOW_DB_PASSWORD"],
               "SELECT r.status, m.value FROM runs r JOIN metrics m ON m.run_uuid = r.run_uuid "
               "WHERE r.run_uuid = %s AND m.key = 'loss'", run_id)
    assert ml == [("FINISHED", 1.25)]
    s3 = boto3.client("s3", endpoint_url=s3_server["client_kwargs"]["endpoint_url"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="mlflow/").get("Contents", [])]
    hello = [k for k in keys if k.endswith(f"{run_id}/artifacts/notes/hello.txt")]
    assert hello, keys
    assert s3.get_object(Bucket=s3_bucket, Key=hello[0])["Body"].read() == b"hello from the flow"


TINY_STEPS = 6


def test_tiny_pipeline_runs_through_the_postgres_services(stack, tmp_path):
    """The `pretrain` flow of `pretrain/tiny` (a few steps, trained in the flow's process) against the
    PostgreSQL-backed servers: its stages are Prefect task runs and its loss curve an MLflow run, both in
    PostgreSQL."""
    import psycopg2

    from rwkv5.train.config import run_preset

    batch = run_preset("tiny").batch
    budget = TINY_STEPS * batch.global_batch * batch.ctx_len
    env = _client_env(stack) | {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "600"}
    code = ("from flows.pretrain import pretrain; "
            f"pretrain(run_name='pg-tiny', preset='tiny', workers=0, token_budget={budget}, "
            f"tokenize_workers=1, state_dir={str(tmp_path / 'state')!r})")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1200,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # Its artifacts, logs, parameters and files hold none of the credentials it ran with.
    _assert_no_secret(stack, done.stdout + done.stderr, tmp_path / "state")

    def query(db: str, sql: str, *args):
        password = stack["env"]["PREFECT_DB_PASSWORD" if db == "prefect" else "MLFLOW_DB_PASSWORD"]
        with psycopg2.connect(host="127.0.0.1", port=int(stack["env"]["POSTGRES_PORT"]), dbname=db, user=db,
                              password=password) as conn, conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()

    (flow_run,) = query("prefect", "SELECT fr.id, fr.state_type FROM flow_run fr JOIN flow f ON f.id = fr.flow_id "
                                   "WHERE f.name = 'pretrain'")
    assert flow_run[1] == "COMPLETED"
    tasks = dict(query("prefect", "SELECT name, state_type FROM task_run WHERE flow_run_id = %s", flow_run[0]))
    stages = {key.split("-")[0] for key, state in tasks.items() if state == "COMPLETED"}
    assert {"build", "download", "tokenize", "pretrain"} <= stages, tasks
    artifacts = {row[0] for row in query("prefect", "SELECT key FROM artifact WHERE flow_run_id = %s", flow_run[0])}
    assert {"budget-pg-tiny", "loss-curve-pg-tiny", "tokenize-sample"} <= artifacts, artifacts

    losses = query("mlflow", "SELECT m.step FROM metrics m JOIN tags t ON t.run_uuid = m.run_uuid "
                             "WHERE t.key = 'rwkv5.run_name' AND t.value = 'pg-tiny' AND m.key = 'loss'")
    assert sorted(step for (step,) in losses) == list(range(TINY_STEPS))
    system = query("mlflow", "SELECT count(*) FROM metrics m JOIN tags t ON t.run_uuid = m.run_uuid "
                             "WHERE t.key = 'rwkv5.run_name' AND t.value = 'pg-tiny' AND m.key LIKE 'system/%%'")
    assert system[0][0] > 0


def _status(url: str, data: bytes | None = None, headers: dict | None = None) -> int:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _basic(user_password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(user_password.encode()).decode()}


def test_services_refuse_requests_without_credentials(stack, ray_head):
    from rwkv5.train.preflight import stack_credentials

    prefect, mlflow, dashboard = stack["prefect"], stack["mlflow"], ray_head["dashboard"]
    user = stack["credentials"]["MLFLOW_TRACKING_USERNAME"]
    refused = {
        "prefect anonymous": _status(f"{prefect}/flows/filter", b"{}"),
        "prefect wrong string": _status(f"{prefect}/flows/filter", b"{}", _basic("rwkv5:wrong")),
        "prefect run from deployment": _status(f"{prefect}/deployments/00000000-0000-0000-0000-000000000000/"
                                               "create_flow_run", b"{}"),
        "mlflow anonymous read": _status(f"{mlflow}/api/2.0/mlflow/experiments/search?max_results=1"),
        "mlflow anonymous write": _status(f"{mlflow}/api/2.0/mlflow/experiments/create", b'{"name": "x"}'),
        "mlflow wrong password": _status(f"{mlflow}/api/2.0/mlflow/experiments/search?max_results=1",
                                         headers=_basic(f"{user}:wrong")),
        "ray job anonymous": _status(f"{dashboard}/api/jobs/", b'{"entrypoint": "echo owned"}'),
        "ray job wrong token": _status(f"{dashboard}/api/jobs/", b'{"entrypoint": "echo owned"}',
                                       {"Authorization": "Bearer wrong"}),
    }
    assert all(code in (401, 403) for code in refused.values()), refused
    # The health probes stay open (load balancers, Kubernetes), and the preflight sees all three as closed.
    assert _status(f"{prefect}/health") == _status(f"{mlflow}/health") == _status(f"{dashboard}/api/gcs_healthz") == 200
    check = stack_credentials({"Prefect API": prefect, "MLflow": mlflow, "Ray dashboard": dashboard},
                              exempt_loopback=False)
    assert check.status == "ok" and check.detail.count("refuses anonymous requests") == 3, check.detail


JOB = '''
import mlflow
import ray

@ray.remote(num_cpus=0)
def log_run() -> str:
    # A Ray worker: the MLflow credentials come from its node's environment, not from a runtime_env.
    mlflow.set_experiment("ray-job")
    with mlflow.start_run(run_name="from-a-ray-worker") as run:
        mlflow.log_metric("answer", 42.0)
    return run.info.run_id

print("RUN_ID", ray.get(log_run.remote()))
'''


def test_ray_job_with_the_token_logs_an_mlflow_run_from_a_worker(stack, ray_head, postgres):
    import psycopg2

    script = stack["root"] / "ray_job.py"
    script.write_text(JOB)
    submit = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_head["dashboard"],
              "--", sys.executable, str(script)]
    done = subprocess.run(submit, env=ray_head["client_env"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_id = re.search(r"RUN_ID (\w+)", done.stdout).group(1)
    with psycopg2.connect(host="127.0.0.1", port=postgres["port"], dbname="mlflow", user="mlflow",
                          password=stack["env"]["MLFLOW_DB_PASSWORD"]) as conn, conn.cursor() as cur:
        cur.execute("SELECT r.status, m.value FROM runs r JOIN metrics m ON m.run_uuid = r.run_uuid "
                    "WHERE r.run_uuid = %s", (run_id,))
        assert cur.fetchall() == [("FINISHED", 42.0)]
    # Ray's own logs on the node (job driver, workers, runtime env agent) hold none of the credentials.
    _assert_no_secret(stack, done.stdout + done.stderr, ray_head["temp"], extra=[ray_head["token"]])


def _assert_no_secret(stack: dict, output: str, *folders: Path, extra: list[str] = ()) -> None:
    """No credential (as itself or as the basic-auth header value) in `output`, the servers' logs, a dump of
    the Prefect and MLflow databases (artifacts, logs, parameters, tags) or any file under `folders`."""
    values = [stack["env"]["PREFECT_SERVER_API_AUTH_STRING"], stack["env"]["MLFLOW_ADMIN_PASSWORD"],
              stack["env"]["MLFLOW_FLASK_SERVER_SECRET_KEY"], *extra]
    user = stack["credentials"]["MLFLOW_TRACKING_USERNAME"]
    needles = values + [base64.b64encode(v.encode()).decode() for v in
                        (values[0], f"{user}:{values[1]}")]
    texts = {"output": output}
    pg_dump = _pg_bin("pg_dump")
    for db, password in (("prefect", "PREFECT_DB_PASSWORD"), ("mlflow", "MLFLOW_DB_PASSWORD")):
        texts[f"database {db}"] = subprocess.run(
            [pg_dump, "-h", "127.0.0.1", "-p", stack["env"]["POSTGRES_PORT"], "-U", db, "--data-only", db],
            env=os.environ | {"PGPASSWORD": stack["env"][password]}, capture_output=True, text=True,
            check=True).stdout
    paths = [p for p in stack["root"].glob("*.log")] + [p for f in folders for p in f.rglob("*") if p.is_file()]
    for path in paths:
        texts[str(path)] = path.read_bytes().decode("utf-8", "replace")
    leaks = [(where, v[:6] + "...") for where, text in texts.items() for v in needles if v in text]
    assert not leaks, leaks


def test_compose_requires_its_secrets_and_wires_redis_for_several_workers():
    required = ("POSTGRES_PASSWORD", "PREFECT_DB_PASSWORD", "MLFLOW_DB_PASSWORD", "RWKV5_IMAGE", "MLFLOW_ARTIFACTS",
                "PREFECT_SERVER_API_AUTH_STRING", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")
    for missing in required:
        with pytest.raises(KeyError, match=missing):
            _compose({k: "v" for k in required if k != missing})
    env = {k: "v" for k in required}
    services = _compose(env)["services"]
    api = services["prefect-api"]
    workers = int(shlex.split(api["command"])[shlex.split(api["command"]).index("--workers") + 1])
    assert workers > 1 and "--no-services" in api["command"] and "prefect-services" in services
    for key, module in (("PREFECT_MESSAGING_BROKER", "prefect_redis.messaging"),
                        ("PREFECT_SERVER_EVENTS_CAUSAL_ORDERING", "prefect_redis.ordering"),
                        ("PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE", "prefect_redis.lease_storage")):
        assert api["environment"][key] == module
        __import__(module)  # the [services] extra installs prefect-redis
    assert api["environment"]["PREFECT_SERVER_DOCKET_URL"] == "redis://redis:6379/1"
    # Every Prefect server process checks the auth string; MLflow runs its basic-auth app.
    for name in ("prefect-api", "prefect-services"):
        assert services[name]["environment"]["PREFECT_SERVER_API_AUTH_STRING"] == "v"
    assert "--app-name basic-auth" in services["mlflow"]["command"]


def test_no_credential_is_committed():
    """The example files hold placeholders only, and the filled-in .env cannot be committed."""
    example = dict(line.split("=", 1) for line in (SERVICES / "services.env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    for key, value in example.items():
        if any(word in key for word in ("PASSWORD", "AUTH_STRING", "TOKEN", "SECRET")):
            assert "change-me" in value, key
    ignored = subprocess.run(["git", "check-ignore", "-q", "infra/services/.env"], cwd=SERVICES.parents[1])
    assert ignored.returncode == 0
    auth_ini = (SERVICES / "mlflow-auth.ini").read_text()
    assert "admin_password" not in auth_ini and "@" not in auth_ini.split("database_uri", 1)[1].splitlines()[0]
