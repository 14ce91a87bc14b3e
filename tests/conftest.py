"""Fixtures shared by the whole suite. Keep generic ones here; area-specific ones live next to their tests."""

from __future__ import annotations

import os

# One intra-op thread per process. The suite's tensors are tiny, and on a 2-core CI box shared with servers and
# Ray workers, two OpenMP threads per process spend far more time waiting on each other than computing
# (bench/NOTES.md). Child processes inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # in case torch was imported before this file (by a plugin)


# The two tests that run last, in this order.
LATE_MARKERS = ("multinode", "pipeline_e2e")


def pytest_collection_modifyitems(config, items):
    """The two-node Ray test and the whole-pipeline e2e run last: the first shuts down the session's Ray
    cluster to build its own, the second wants the machine to itself."""

    def lateness(item) -> int:
        return next((i + 1 for i, name in enumerate(LATE_MARKERS) if item.get_closest_marker(name)), 0)

    items.sort(key=lateness)  # stable: the order within each group is kept


@pytest.fixture(autouse=True)
def _fixed_seeds():
    """Every test starts from the same RNG state, so a failure reproduces when run alone."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def random_model():
    """Factory `(cfg, seed=0) -> RWKV5` in eval mode whose every parameter matters.

    A fresh model has zero output projections and unit LayerNorms, so two code paths can agree on it while
    one of them ignores those weights. Here zero matrices get random values and vectors some noise.
    """
    from rwkv5.model import RWKV5

    def build(cfg, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        model = RWKV5(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "time_" in name or "ln" in name.split(".")[-2]:  # schedules and norms
                    p.add_(torch.randn(p.shape, generator=gen) * 0.1)
                elif not p.any():  # zero-initialised projections
                    p.copy_(torch.randn(p.shape, generator=gen) * p.shape[1] ** -0.5)
        return model.eval()

    return build


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real `mlflow server` (SQLite backend, proxied artifacts) on 127.0.0.1 for the session; yields its URI."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    env = os.environ | {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
           "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600  # minutes on a loaded 2-core machine (imports alone)
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield uri
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster (4 logical CPUs, no dashboard) shared by every test that needs Ray."""
    import os

    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # No idle worker processes kept ready: each one polls at ~8% of a core, and 2 cores are all CI has.
    os.environ.setdefault("RAY_enable_worker_prestart", "0")
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    # Each Ray Train launch starts helper actors, each a process importing Ray Train (tens of CPU seconds here).
    # The preemption watcher (cloud preemption notices) and the Prometheus metrics hooks serve no test.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
    env = {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
    import psutil

    for attempt in range(3):  # the raylet has a fixed 30 s to register; a loaded 2-core CI box can miss it
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        try:
            # "local": always a new cluster of our own, never one a `ray start` on this machine left running.
            ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": env})
            break
        except Exception:
            ray.shutdown()
            # A failed start leaves its GCS server running, and it would load the box for the next attempt.
            for leftover in psutil.Process().children(recursive=True):
                if leftover.pid not in before:
                    leftover.kill()
            if attempt == 2:
                raise
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server (a real HTTP API) on 127.0.0.1 for the session; yields fsspec storage options.

    Test credentials are set in the environment for the session (pyarrow, boto3 and Ray workers read them
    there); the endpoint is in the options, and tests that go through pyarrow set AWS_ENDPOINT_URL themselves.
    """
    import os

    from moto.server import ThreadedMotoServer

    keys = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": f"http://{host}:{port}"}}
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def s3_bucket(s3_server):
    """A fresh bucket on the moto server, with AWS_ENDPOINT_URL pointing pyarrow (and Ray workers) at it."""
    import uuid

    import boto3

    endpoint = s3_server["client_kwargs"]["endpoint_url"]
    saved = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    name = f"rwkv5-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    yield name
    if saved is None:
        os.environ.pop("AWS_ENDPOINT_URL", None)
    else:
        os.environ["AWS_ENDPOINT_URL"] = saved


def _documents(n_docs: int, seed: int):
    """Arithmetic id sequences below 400 (learnable in a few steps), each ending with the end-of-document id."""
    rng = np.random.default_rng(seed)
    for _ in range(n_docs):
        start, step, length = rng.integers(1, 300), rng.integers(1, 4), rng.integers(40, 400)
        yield np.append((start + step * np.arange(length)) % 400 + 1, 0).astype(np.uint16)


@pytest.fixture(scope="session")
def local_tokens(tmp_path_factory):
    """~90k tokens in shards of ~10k tokens (about 20 KiB each), written by data_prep's writer."""
    from data_prep.shards import write_token_dataset

    out = tmp_path_factory.mktemp("tokens")
    write_token_dataset(out, _documents(400, seed=0), "synthetic-test", shard_tokens=10_000)
    return out
