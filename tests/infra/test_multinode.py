"""Two Ray nodes on one machine (`ray.cluster_utils.Cluster`, one CPU each, so Ray Train must put one worker
on each) pretrain the tiny model from shards and checkpoints on S3 (moto); the worker on the second node is
killed mid-run and the group resumes from the checkpoint on S3, reading exactly the global sample order."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
from ray import cloudpickle  # noqa: E402

from rwkv5.train.callbacks import Callback, TraceCallback  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.train_e2e, pytest.mark.multinode]

STEPS = 6


class WhereAmI(Callback):
    """Each rank records its process id and Ray node id, so the test can see placement and kill one worker."""

    def __init__(self, folder):
        self.folder = Path(folder)

    def pre_train(self, ctx):
        super().pre_train(ctx)
        import ray

        self.folder.mkdir(parents=True, exist_ok=True)
        row = {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}
        (self.folder / f"rank{ctx.rank}.json").write_text(json.dumps(row))


# Ray workers cannot import this test module: its callback class travels by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def two_nodes(s3_bucket, tmp_path_factory):
    """A head and a second node, one CPU each; S3 settings are in the environment the raylets inherit."""
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    # The raylet aborts when its dashboard agent is slow to report its ports (under heavy load): wait longer.
    env = {"RAY_TRAIN_V2_ENABLED": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_agent_register_timeout_ms": "600000",
           "RWKV5_SHARD_CACHE": str(tmp_path_factory.mktemp("shard-cache"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    for attempt in range(3):  # a raylet has 30 s to register with the GCS; a loaded 2-core box can miss it
        cluster = Cluster()
        try:
            cluster.add_node(num_cpus=1, include_dashboard=False, resources={"node_a": 1})
            second = cluster.add_node(num_cpus=1, resources={"node_b": 1})
            cluster.wait_for_nodes()
            cluster.connect()
            break
        except Exception:
            cluster.shutdown()
            if attempt == 2:
                raise
    yield {"cluster": cluster, "head": cluster.head_node.node_id, "second": second.node_id}
    ray.shutdown()
    cluster.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_two_nodes_train_from_s3_and_resume_after_a_node_loses_its_worker(two_nodes, s3_bucket, s3_server,
                                                                          local_tokens, tmp_path):
    import boto3

    from data_prep.loader import PackedDataset
    from data_prep.remote import upload_dataset
    from rwkv5.train.config import run_preset, with_overrides
    from rwkv5.train.data import global_positions
    from rwkv5.train.launch import launch

    data = f"s3://{s3_bucket}/multinode/tokens"
    storage = f"s3://{s3_bucket}/multinode/runs"
    upload_dataset(local_tokens, data)
    cfg = with_overrides(run_preset("tiny"), {
        "model.vocab_size": 512, "batch.ctx_len": 32, "batch.micro_batch": 2, "batch.global_batch": 4,
        "token_budget": STEPS * 4 * 32, "optim.warmup_steps": 2, "optim.lr": 3e-3, "optim.final_lr": 3e-4,
        "checkpoint.every_steps": 2, "checkpoint.keep_last": 2, "milestones.fraction": 1.0,
        "metrics.system_metrics": False,
    })
    trace, where = tmp_path / "trace.jsonl", tmp_path / "where"
    killed = {}

    def kill_second_node_worker():
        deadline = time.time() + 1500
        while time.time() < deadline:
            rows = trace.read_text().splitlines() if trace.exists() else []
            if len(rows) >= 3 and len(list(where.glob("rank*.json"))) == 2:
                for f in where.glob("rank*.json"):
                    info = json.loads(f.read_text())
                    if info["node"] == two_nodes["second"]:
                        os.kill(info["pid"], signal.SIGKILL)
                        killed.update(info, rank=f.stem)
                        return
            time.sleep(0.3)

    killer = threading.Thread(target=kill_second_node_worker, daemon=True)
    killer.start()
    result = launch(cfg, "two-nodes", data, storage, workers=2, max_failures=2, local_dir=tmp_path / "local",
                    callbacks=[TraceCallback(trace), WhereAmI(where)])
    killer.join(timeout=5)
    assert result.error is None and "pid" in killed

    # One worker per node, and after the kill a new worker took the same node's place.
    nodes = {json.loads(f.read_text())["node"] for f in where.glob("rank*.json")}
    assert nodes == {two_nodes["head"], two_nodes["second"]}
    assert json.loads((where / f"{killed['rank']}.json").read_text())["pid"] != killed["pid"]

    # Every step read the global order's samples (from S3 through the shard cache), steps after the last
    # checkpoint were trained again, and the loss fell.
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len(rows) > STEPS
    by_step = {r["step"]: r for r in rows}
    assert sorted(by_step) == list(range(STEPS))
    ds = PackedDataset(local_tokens, cfg.batch.ctx_len, seed=cfg.seed)
    for step, row in by_step.items():
        assert row["ids"] == [ds.sample_id(p) for p in global_positions(step, cfg.batch)]
    assert math.isfinite(by_step[STEPS - 1]["loss"]) and by_step[STEPS - 1]["loss"] < by_step[0]["loss"]

    # Checkpoints live on S3, complete (trainer state written), with the final step among them.
    s3 = boto3.client("s3", endpoint_url=s3_server["client_kwargs"]["endpoint_url"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="multinode/runs/two-nodes/")["Contents"]]
    states = sorted(k for k in keys if k.endswith("/trainer_state.json"))
    assert states and states[-1].endswith(f"step_{STEPS:08d}/trainer_state.json")
    assert any("/ds/" in k for k in keys)
