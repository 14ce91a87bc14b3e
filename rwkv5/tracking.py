"""Experiment tracking: every call into MLflow lives here.

Training logs through `MLflowCallback` (rank 0, one MLflow run per pretraining run, found again on resume by
its tag); evaluations add their metrics to a run (`log_eval_report`), each milestone has a run of its own in
the experiment "rwkv5-milestones" (`log_milestone_evals`), a pretraining run gets its loss-curve image
(`log_run_artifact`), and releases on object storage or the Hub become registered model versions
(`register_release`). MLflow is imported inside the functions: DeepSpeed workers and flow discovery stay free
of its import cost.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rwkv5.train.callbacks import Callback, TrainContext

__all__ = ["RUN_TAG", "MILESTONE_EXPERIMENT", "MLflowCallback", "find_run_id", "log_run_artifact",
           "log_eval_report", "log_milestone_evals", "registrable", "check_registrable", "registry_name",
           "register_release"]

RUN_TAG = "rwkv5.run_name"
"""The tag naming a pretraining run's MLflow run; the run name is the resume key."""
MILESTONE_EXPERIMENT = "rwkv5-milestones"
_MILESTONE_TAG = "rwkv5.milestone"


def _client(tracking_uri: str | None = None):
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return mlflow.MlflowClient(tracking_uri=tracking_uri)


class MLflowCallback(Callback):
    """Rank 0 logs params and metrics into one MLflow run per pretraining run, found again on resume.

    The run is looked up by the tag `rwkv5.run_name` (its id is also kept in the checkpoint), so restarts
    and resumes continue the same MLflow run instead of opening a new one.

    Args:
        tracking_uri (str, optional): MLflow server. Default: MLFLOW_TRACKING_URI.
        experiment (str): experiment name. Default: "rwkv5-pretrain".
        system_metrics (bool): sample CPU/GPU/memory in the background (every
            MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds, 10 by default) and once more at the end, so a run
            shorter than the interval still records the machine it ran on. Default: True.
    """

    TAG = RUN_TAG

    def __init__(self, tracking_uri: str | None = None, experiment: str = "rwkv5-pretrain",
                 system_metrics: bool = True):
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.system_metrics = system_metrics
        self.run_id: str | None = None
        self._active = False
        self._monitor = None

    def pre_train(self, ctx: TrainContext) -> None:
        super().pre_train(ctx)
        if ctx.rank != 0:
            return
        import mlflow

        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        if self.tracking_uri:
            mlflow.set_tracking_uri(self.tracking_uri)
        exp = mlflow.set_experiment(self.experiment)
        if self.run_id is None:
            found = mlflow.search_runs(
                experiment_ids=[exp.experiment_id],
                filter_string=f"tags.`{self.TAG}` = '{ctx.run_name}'",
                output_format="list",
                max_results=1,
            )
            self.run_id = found[0].info.run_id if found else None
        fresh = self.run_id is None
        run = mlflow.start_run(
            run_id=self.run_id,
            run_name=ctx.run_name if fresh else None,
            tags={self.TAG: ctx.run_name} if fresh else None,
            log_system_metrics=False,  # our own monitor below, so that `_end` can take a closing sample
        )
        self.run_id = run.info.run_id
        self._active = True
        if self.system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=not fresh)
            self._monitor.start()
        if fresh:
            from rwkv5.wkv import default_backend

            # The WKV variant the model's layers dispatch to on this device ("cuda" = our kernel was loaded).
            mlflow.log_params(_flatten(ctx.config.model_dump())
                              | {"world_size": ctx.world_size, "wkv_backend": default_backend(ctx.device)})

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if self._active:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def on_error(self, exc: BaseException) -> None:
        self._end("FAILED")

    def close(self) -> None:
        self._end("FINISHED")

    def _end(self, status: str) -> None:
        if self._active:
            import mlflow

            self._stop_monitor()
            mlflow.end_run(status=status)
            self._active = False

    def _stop_monitor(self) -> None:
        """Stop the sampler, then log one closing sample (MLflow's own loop logs only after a full interval)."""
        monitor, self._monitor = self._monitor, None
        if monitor is None:
            return
        monitor.finish()
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()

    def state_dict(self) -> dict:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict) -> None:
        self.run_id = state.get("run_id") or self.run_id




def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= _flatten(value, f"{name}.")
        else:
            out[name] = value
    return out


def find_run_id(run_name: str, tracking_uri: str | None = None) -> str | None:
    """The MLflow run of pretraining run `run_name` in any experiment, or None."""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    found = mlflow.search_runs(search_all_experiments=True, output_format="list", max_results=1,
                               filter_string=f"tags.`{RUN_TAG}` = '{run_name}'")
    return found[0].info.run_id if found else None


def log_run_artifact(run_name: str, path: str | os.PathLike) -> bool:
    """Attach a file (the loss-curve image) to pretraining run `run_name`'s MLflow run; False if it has none."""
    run_id = find_run_id(run_name)
    if run_id is None:
        return False
    _client().log_artifact(run_id, str(path))
    return True


def log_eval_report(
    report: dict,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    experiment: str = "rwkv5-eval",
    prefix: str = "eval.",
    artifact_file: str = "eval/report.json",
) -> str:
    """Log an evaluation report's metrics (and the report as an artifact) to MLflow; returns the run id.

    Args:
        report (dict): from `rwkv5.eval.evaluate_checkpoint`.
        run_id (str, optional): an existing run (the milestone's); otherwise a new run in `experiment`.
        tracking_uri (str, optional): MLflow server. Default: MLFLOW_TRACKING_URI.
        experiment (str): experiment of a new run. Default: "rwkv5-eval".
        prefix (str): put before every metric name (keeps them apart from training metrics). Default: "eval.".
        artifact_file (str): where the JSON goes in the run's artifacts. Default: "eval/report.json".
    """
    from rwkv5.eval.evaluate import flat_metrics

    client = _client(tracking_uri)
    finish = run_id is None
    if run_id is None:
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
        run_id = client.create_run(exp_id).info.run_id
    for name, value in flat_metrics(report).items():
        client.log_metric(run_id, prefix + name, float(value))
    client.log_dict(run_id, report, artifact_file)
    if finish:
        client.set_terminated(run_id)
    return run_id


def log_milestone_evals(run_name: str, tag: str, evals: Mapping[str, dict],
                        figures: Sequence[str | os.PathLike] = ()) -> str:
    """Each variant's eval report into the milestone's own run (experiment "rwkv5-milestones", one run per
    milestone, found again by its tag when a milestone is evaluated again), and `figures` (image files) as its
    artifacts; returns the run id.

    Metrics are `eval.<variant>.<name>` (`rwkv5.eval.evaluate.flat_metrics`); when base and fine-tune both
    hold the held-out chat loss, it is also logged as `chat_loss_before` and `chat_loss_after`, the milestone
    table's names for the fine-tune's effect."""
    client = _client()
    exp = client.get_experiment_by_name(MILESTONE_EXPERIMENT)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(MILESTONE_EXPERIMENT)
    key = f"{run_name}-{tag}"
    found = client.search_runs([exp_id], f"tags.`{_MILESTONE_TAG}` = '{key}'", max_results=1)
    run_id = found[0].info.run_id if found else client.create_run(
        exp_id, run_name=key, tags={_MILESTONE_TAG: key, RUN_TAG: run_name}).info.run_id
    for variant, report in evals.items():
        log_eval_report(report, run_id=run_id, prefix=f"eval.{variant}.", artifact_file=f"eval/{variant}.json")
    if "chat" in evals.get("base", {}) and "chat" in evals.get("finetune", {}):
        client.log_metric(run_id, "chat_loss_before", float(evals["base"]["chat"]["loss"]))
        client.log_metric(run_id, "chat_loss_after", float(evals["finetune"]["chat"]["loss"]))
    for path in figures:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id)
    return run_id


def registrable(uri: str) -> bool:
    """Whether MLflow's server takes `uri` as a model version source: it refuses local paths."""
    return "://" in uri and not uri.startswith("file://")


def check_registrable(uri: str, model_name: str) -> None:
    """Raise `ReleaseError` before anything is uploaded if `uri` could not be registered."""
    from rwkv5.release.targets import ReleaseError

    if not registrable(uri):
        raise ReleaseError(f"MLflow registry: cannot register {uri} as {model_name!r}: MLflow's server takes no "
                           "local path as a model version source; release to object storage or the Hub to register")


def registry_name(run_name: str, target: str) -> str | None:
    """The registered model of run `run_name`'s releases, or None where there is no registry to use: no
    tracking server configured, or a release to a local folder (MLflow's server refuses local sources; the
    milestone's run holds its eval metrics and the milestone table its location)."""
    if not os.environ.get("MLFLOW_TRACKING_URI") or not registrable(target):
        return None
    return f"rwkv5-{run_name}"


def register_release(uri: str, model_name: str, *, tracking_uri: str | None = None, run_id: str | None = None,
                     tags: Mapping[str, str] | None = None, description: str | None = None):
    """Make `uri` a version of registered model `model_name` (created if needed); returns the ModelVersion.

    Registration is by URI only: the weights stay where the release put them. A URI that is already a version
    of the model is returned as it is, so re-running a release does not add versions.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from rwkv5.release.targets import ReleaseError

    check_registrable(uri, model_name)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        client.create_registered_model(model_name, description="RWKV v5.2 releases of rwkv5-pipeline")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise ReleaseError(f"MLflow registry: cannot create model {model_name!r}: {exc.message}") from None
    for version in client.search_model_versions(f"name='{model_name}'"):
        if version.source == uri:
            return version
    try:
        return client.create_model_version(model_name, source=uri, run_id=run_id, tags=dict(tags or {}),
                                           description=description)
    except MlflowException as exc:
        raise ReleaseError(f"MLflow registry: cannot register {uri} as {model_name!r}: {exc.message}") from None
