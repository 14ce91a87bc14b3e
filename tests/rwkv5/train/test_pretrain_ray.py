"""Pretraining through Ray Train with 2 CPU workers (gloo, DeepSpeed's CPU accelerator): loss falls, exact
resume (N+N steps == 2N straight, also on another worker count), a killed worker, MLflow and milestones.

One straight reference run per module; every other run is compared with its per-step sample ids and losses.
Five launches in all: each starts fresh worker processes (torch, DeepSpeed and Ray imports), the cost that
dominates on a 2-core CI box, so runs are shared between tests where the checks do not interfere.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time

import pytest

from rwkv5.errors import ConfigError
from rwkv5.train.callbacks import Callback, TraceCallback
from rwkv5.train.config import with_overrides

pytestmark = [pytest.mark.slow, pytest.mark.train_e2e]

N = 3  # steps per half


def _trace(path) -> dict[int, dict]:
    """Rows by step; a step re-run after a restart replaces the earlier row."""
    rows = {}
    for line in open(path):
        row = json.loads(line)
        rows[row["step"]] = row
    return rows


class PidFiles(Callback):
    """Each rank writes its process id, so a test can kill one worker."""

    def __init__(self, folder):
        self.folder = str(folder)

    def pre_train(self, ctx):
        super().pre_train(ctx)
        os.makedirs(self.folder, exist_ok=True)
        with open(os.path.join(self.folder, f"rank{ctx.rank}.pid"), "w") as f:
            f.write(str(os.getpid()))


@pytest.fixture(scope="module", autouse=True)
def _pickle_test_callbacks_by_value():
    """Ray workers cannot import this test module; ship its callback classes by value."""
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def cfg():
    from tests.rwkv5.train.conftest import TEST_VOCAB  # noqa: F401  (documents the shrunken head)
    from rwkv5.train.config import run_preset

    return with_overrides(run_preset("tiny"), {
        "model.vocab_size": 512, "batch.ctx_len": 32, "batch.micro_batch": 2, "batch.global_batch": 4,
        "token_budget": 2 * N * 4 * 32, "optim.warmup_steps": 2, "optim.lr": 3e-3, "optim.final_lr": 3e-4,
        "checkpoint.every_steps": 2, "checkpoint.keep_last": 2, "milestones.fraction": 0.5,
        "metrics.system_metrics": True,
    })


@pytest.fixture(scope="module")
def reference(ray_cluster, token_data, storage, cfg):
    """2N steps straight on 2 workers."""
    from rwkv5.train.launch import launch

    path = storage / "straight.jsonl"
    result = launch(cfg, "straight", token_data, storage, workers=2, callbacks=[TraceCallback(path)])
    assert result.error is None
    return _trace(path)


def _same_run(got: dict, want: dict, loss_tol: float) -> None:
    assert sorted(got) == sorted(want) == list(range(2 * N))
    for step in want:
        assert got[step]["ids"] == want[step]["ids"], f"step {step} read other samples"
        assert abs(got[step]["loss"] - want[step]["loss"]) <= loss_tol, (step, got[step]["loss"], want[step]["loss"])


def test_loss_falls_and_order_is_global(reference, token_data, cfg):
    from data_prep.loader import PackedDataset
    from rwkv5.train.data import global_positions

    ds = PackedDataset(token_data, cfg.batch.ctx_len, seed=cfg.seed)
    for step, row in reference.items():
        assert row["ids"] == [ds.sample_id(p) for p in global_positions(step, cfg.batch)]
    # Below the first step and below a uniform guess over the 512 ids (ln 512 = 6.24) within 6 steps.
    assert reference[2 * N - 1]["loss"] < min(reference[0]["loss"] - 0.25, math.log(512) - 0.15)


@pytest.fixture(scope="module")
def first_half(ray_cluster, mlflow_server, token_data, storage, cfg):
    """Steps 0..N-1 of run "split" on 2 workers, tracked in MLflow; the run folder is then also copied to
    "shrink", so two resume tests share one launch (each launch costs minutes of worker start-up on CI)."""
    import shutil

    from rwkv5.train.launch import launch

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
        first = launch(cfg.model_copy(update={"stop_at_step": N}), "split", token_data, storage, workers=2,
                       callbacks=[TraceCallback(storage / "split.jsonl")])
    assert first.error is None
    shutil.copytree(storage / "split", storage / "shrink")
    shutil.copy(storage / "split.jsonl", storage / "shrink.jsonl")
    return {"milestone_1_mtime": (storage / "split" / "milestones" / "m001" / "done.json").stat().st_mtime_ns}


def test_exact_resume_milestones_and_one_mlflow_run(reference, first_half, mlflow_server, token_data, storage, cfg,
                                                    monkeypatch):
    """N steps, stop, resume for N more == 2N straight; milestones fire once; MLflow keeps one run."""
    import mlflow
    from safetensors import safe_open

    from rwkv5.checkpoint import FORMAT
    from rwkv5.train.launch import launch

    path = storage / "split.jsonl"
    with pytest.raises(ConfigError, match="--resume"):
        launch(cfg, "split", token_data, storage, workers=2)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    second = launch(cfg, "split", token_data, storage, workers=2, resume=True, callbacks=[TraceCallback(path)])
    assert second.error is None
    _same_run(_trace(path), reference, loss_tol=1e-6)

    # Milestones at 50% and 100%: each fired once (the first survives the restart untouched).
    marker = storage / "split" / "milestones" / "m001" / "done.json"
    assert marker.stat().st_mtime_ns == first_half["milestone_1_mtime"]
    for index, step in ((1, N), (2, 2 * N)):
        done = json.loads((storage / "split" / "milestones" / f"m{index:03d}" / "done.json").read_text())
        assert done["step"] == step
        with safe_open(done["path"], "pt") as f:
            assert f.metadata()["format"] == FORMAT  # our native checkpoint, readable by `rwkv5 generate`
            assert json.loads(f.metadata()["model_config"])["vocab_size"] == 512
            assert f.get_tensor("head.weight").dtype.is_floating_point
            assert str(f.get_tensor("emb.weight").dtype) == "torch.bfloat16"

    # One MLflow run across the restart, with every metric and one loss point per step.
    client = mlflow.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name(cfg.metrics.mlflow_experiment)
    runs = client.search_runs([exp.experiment_id], "tags.`rwkv5.run_name` = 'split'")
    assert len(runs) == 1
    metrics = set(runs[0].data.metrics)
    assert {"loss", "lr", "grad_norm", "tokens_seen", "tokens_per_s", "tokens_per_s_per_device", "mfu",
            "data_wait_s", "cpu_rss_gb"} <= metrics
    assert any(m.startswith("system/") for m in metrics)
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    assert sorted({m.step for m in history}) == list(range(2 * N))


def test_resume_on_one_worker_through_universal_checkpoint(reference, first_half, token_data, storage, cfg):
    from rwkv5.train.launch import launch

    path = storage / "shrink.jsonl"
    second = launch(cfg, "shrink", token_data, storage, workers=1, resume=True, callbacks=[TraceCallback(path)])
    assert second.error is None
    # Same samples; losses differ only by the reduction order of 1 vs 2 ranks.
    _same_run(_trace(path), reference, loss_tol=2e-2)


def test_killed_worker_resumes_from_last_checkpoint(reference, token_data, storage, cfg):
    from rwkv5.train.launch import launch

    path, pids = storage / "kill.jsonl", storage / "kill-pids"
    killed = {}

    def kill_rank1_mid_run():
        deadline = time.time() + 900
        while time.time() < deadline:
            if path.exists() and len(path.read_text().splitlines()) >= N + 1 and (pids / "rank1.pid").exists():
                pid = int((pids / "rank1.pid").read_text())
                os.kill(pid, signal.SIGKILL)
                killed["pid"] = pid
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_rank1_mid_run, daemon=True)
    killer.start()
    result = launch(cfg, "kill", token_data, storage, workers=2, max_failures=2,
                    callbacks=[TraceCallback(path), PidFiles(pids)])
    killer.join(timeout=5)
    assert result.error is None and "pid" in killed
    assert int((pids / "rank1.pid").read_text()) != killed["pid"]  # a new worker group ran
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) > 2 * N  # steps after the last checkpoint were read again
    _same_run(_trace(path), reference, loss_tol=1e-6)
