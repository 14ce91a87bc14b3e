"""MLflowCallback against the session's MLflow server: one run per run name, system metrics even when short."""

from __future__ import annotations

import torch

from rwkv5.tracking import MLflowCallback
from rwkv5.train.callbacks import TrainContext
from rwkv5.train.config import run_preset


def _context(run_name: str, tmp_path) -> TrainContext:
    return TrainContext(run_name=run_name, rank=0, world_size=1, device=torch.device("cpu"),
                        config=run_preset("tiny"), matmul_params=0, run_dir=tmp_path)


def _open_and_close(server: str, run_name: str, tmp_path) -> str:
    callback = MLflowCallback(server, experiment="callback-test", system_metrics=True)
    callback.pre_train(_context(run_name, tmp_path))
    callback.log_metrics(0, {"loss": 1.0})
    callback.close()
    return callback.run_id


def test_a_run_shorter_than_the_sampling_interval_still_logs_system_metrics(mlflow_server, tmp_path, monkeypatch):
    """MLflow's own sampler logs only after a full interval (10 s by default); a short run or a short resume
    still gets one sample per session, at consecutive steps, in the one run of its name."""
    import mlflow

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "600")
    first = _open_and_close(mlflow_server, "short", tmp_path)
    second = _open_and_close(mlflow_server, "short", tmp_path)
    assert first == second

    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(first)
    assert run.info.status == "FINISHED"
    system = sorted(k for k in run.data.metrics if k.startswith("system/"))
    assert "system/cpu_utilization_percentage" in system
    history = client.get_metric_history(first, "system/cpu_utilization_percentage")
    assert sorted(m.step for m in history) == [0, 1]


def test_a_run_records_the_wkv_backend_its_device_dispatches_to(mlflow_server, tmp_path, monkeypatch):
    """The run's params say which WKV variant trained it; RWKV5_WKV_BACKEND (the override) shows it is read
    from the dispatch, not written as a constant."""
    import mlflow

    from rwkv5.wkv import default_backend

    monkeypatch.delenv("RWKV5_WKV_BACKEND", raising=False)
    run_id = _open_and_close(mlflow_server, "backend-default", tmp_path)
    assert mlflow.MlflowClient(mlflow_server).get_run(run_id).data.params["wkv_backend"] == \
        default_backend("cpu") == "chunk"
    monkeypatch.setenv("RWKV5_WKV_BACKEND", "naive")
    run_id = _open_and_close(mlflow_server, "backend-forced", tmp_path)
    assert mlflow.MlflowClient(mlflow_server).get_run(run_id).data.params["wkv_backend"] == "naive"


def test_milestone_evals_log_the_chat_loss_before_and_after(mlflow_server, monkeypatch):
    import mlflow

    from rwkv5.tracking import log_milestone_evals

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    evals = {variant: {"chat": {"loss": loss, "samples": 32, "tokens": 4000}}
             for variant, loss in (("base", 7.74), ("finetune", 7.33))}
    run_id = log_milestone_evals("tracking-test", "m010", evals)
    metrics = mlflow.MlflowClient(mlflow_server).get_run(run_id).data.metrics
    assert metrics["chat_loss_before"] == 7.74 and metrics["chat_loss_after"] == 7.33
    assert metrics["eval.base.chat_loss"] == 7.74 and metrics["eval.finetune.chat_loss"] == 7.33


def test_stage_evals_and_their_plot_go_into_the_stage_s_own_run(mlflow_server, tmp_path, monkeypatch):
    """The long-context stage's before/after per-position losses as `eval.<variant>.loss_at_<p>` and its plot
    as an artifact of run `<run>-longctx-m100` (experiment rwkv5-milestones), found again on a second call."""
    import mlflow

    from rwkv5.eval.long_context import save_position_loss_plot
    from rwkv5.tracking import log_milestone_evals

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    evals = {"before": {"long_context": {"positions": {16: 6.0, 2048: 5.9}}},
             "after": {"long_context": {"positions": {16: 5.5, 2048: 5.0}}}}
    plot = save_position_loss_plot(tmp_path / "position_loss.png",
                                   {k: v["long_context"]["positions"] for k, v in evals.items()}, "demo")
    run_id = log_milestone_evals("demo", "longctx-m100", evals, figures=[plot])
    assert log_milestone_evals("demo", "longctx-m100", evals, figures=[plot]) == run_id

    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.run_name == "demo-longctx-m100"
    assert run.data.metrics["eval.before.loss_at_002048"] == 5.9 and run.data.metrics["eval.after.loss_at_000016"] == 5.5
    assert "position_loss.png" in {f.path for f in client.list_artifacts(run_id)}
