"""The whole pipeline through real services: `rwkv5 up` (Prefect server and process worker, MLflow server, Ray
head), `prefect deployment run pretrain/tiny`, its worker killed mid-pretraining and the run retried, then the
whole stack stopped by `rwkv5 down` mid-pretraining and started again, the run completed, ten milestone runs
started by the milestone events, the long-context stage started by the last release's event, a re-run that
skips finished work, and the dashboard in Chromium.

One stack and one run serve every test of the module (they run in file order): the run that survives the
killed worker is also the finished run the other tests inspect, so the ten milestone flow runs (each a new
process importing Prefect, torch and DeepSpeed) happen once. The token budget is cut to 40 steps (milestones
every 4) so the module fits CI's 2 cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("prefect")
pytest.importorskip("ray")

from flows.paths import Layout, artifact_key  # noqa: E402
from rwkv5_app.stack import StackConfig, down, up  # noqa: E402
from tests.conftest import _free_port  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.pipeline_e2e, pytest.mark.timeout(3600)]

REPO = Path(__file__).resolve().parents[2]
BUDGET = 8 * 128 * 40  # tokens: 40 optimizer steps of the tiny preset
RUN = "e2e"
PERCENTS = list(range(10, 101, 10))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    cfg = StackConfig(state_dir=tmp_path_factory.mktemp("stack"), prefect_port=_free_port(),
                      mlflow_port=_free_port(), ray_port=_free_port(), ray_dashboard_port=_free_port(),
                      ray_client_port=_free_port())
    try:
        up(cfg, deploy=REPO / "prefect.yaml")
        yield cfg
    finally:
        down(cfg)


def _env(cfg: StackConfig) -> dict[str, str]:
    return {**os.environ, **cfg.env()}


def _run_deployment(cfg: StackConfig, name: str, params: dict, timeout: float) -> None:
    """`prefect deployment run NAME --watch`, as a person would type it; fails the test if the run fails."""
    done = subprocess.run(
        [str(Path(sys.executable).parent / "prefect"), "deployment", "run", name, "--params", json.dumps(params),
         "--watch", "--watch-timeout", str(int(timeout))],
        env=_env(cfg), capture_output=True, text=True, cwd=REPO, timeout=timeout + 60,
    )
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def _client(cfg: StackConfig):
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(cfg.prefect_api_url)


def _flow_runs(cfg: StackConfig, flow_name: str) -> list:
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with _client(cfg) as client:
        return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                     sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=200)


def _milestone_runs(cfg: StackConfig, run: str) -> list:
    return [r for r in _flow_runs(cfg, "milestone") if r.parameters.get("run") == run]


def _wait_milestones(cfg: StackConfig, run: str, timeout: float) -> list:
    """Milestone runs of `run` once ten are final (or the timeout passes)."""
    deadline = time.monotonic() + timeout
    while True:
        runs = _milestone_runs(cfg, run)
        final = [r for r in runs if r.state is not None and r.state.is_final()]
        if (len(final) >= len(PERCENTS) and len(final) == len(runs)) or time.monotonic() > deadline:
            return runs
        time.sleep(5)


def _wait_longctx(cfg: StackConfig, run: str, timeout: float) -> list:
    """The longctx flow runs of `run` once one is final (or the timeout passes)."""
    deadline = time.monotonic() + timeout
    while True:
        runs = [r for r in _flow_runs(cfg, "longctx") if r.parameters.get("run") == run]
        if any(r.state is not None and r.state.is_final() for r in runs) or time.monotonic() > deadline:
            return runs
        time.sleep(5)


def _assert_ten_milestones_once_in_order(runs: list, layout: Layout) -> None:
    """One completed run per milestone, the runs ending in percent order, and the milestones released in
    percent order."""
    states = sorted((int(r.parameters["percent"]), r.state.type.value if r.state else None) for r in runs)
    assert states == [(percent, "COMPLETED") for percent in PERCENTS], states
    ends = [r.end_time for r in sorted(runs, key=lambda r: int(r.parameters["percent"]))]
    assert ends == sorted(ends), [(r.parameters["percent"], r.start_time, r.end_time) for r in runs]
    manifests = [layout.releases(RUN) / f"m{percent:03d}" / "manifest.json" for percent in PERCENTS]
    made = [path.stat().st_mtime_ns for path in manifests]
    assert made == sorted(made), list(zip(PERCENTS, made))


def _artifact(cfg: StackConfig, key: str):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with _client(cfg) as client:
        found = client.read_latest_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return found[0] if found else None


def _tree_mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _start_deployment(cfg: StackConfig, name: str, params: dict) -> None:
    """`prefect deployment run NAME` without waiting for the run."""
    started = subprocess.run(
        [str(Path(sys.executable).parent / "prefect"), "deployment", "run", name, "--params", json.dumps(params)],
        env=_env(cfg), cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]


def _wait_final(cfg: StackConfig, run: str, timeout: float):
    """The pretrain flow run of `run` once it is final; there must only ever be one."""
    deadline = time.monotonic() + timeout
    while True:
        runs = [r for r in _flow_runs(cfg, "pretrain") if r.parameters.get("run_name") == run]
        assert len(runs) == 1, [r.name for r in runs]  # a retried run, never a second one
        if runs[0].state is not None and runs[0].state.is_final():
            return runs[0]
        assert time.monotonic() < deadline, f"pretrain run {run} not finished: {runs[0].state}"
        time.sleep(5)


def _descendants(pid: int) -> list[int]:
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    found = [int(child) for child in children.split()]
    return found + [grandchild for child in found for grandchild in _descendants(child)]


@pytest.fixture(scope="module")
def finished_run(stack):
    """`pretrain/tiny` with its worker (and the flow run it started) killed mid-pretraining, a new worker from
    `rwkv5 up`, the retried run stopped by `rwkv5 down` and `rwkv5 up` again, the run completed, then its ten
    milestone runs."""
    trace = Layout(stack.state_dir).checkpoints / RUN / "trace.jsonl"
    _start_deployment(stack, "pretrain/tiny", {"run_name": RUN, "token_budget": BUDGET})
    deadline = time.monotonic() + 1500
    while not (trace.is_file() and len(trace.read_text().splitlines()) >= 14):  # past milestones 1..3
        assert time.monotonic() < deadline, "pretraining never got going"
        time.sleep(1)
    worker_pid = int((stack.state_dir / "run" / "prefect-worker.pid").read_text())
    # The worker and the flow runs it started (each in a session of its own), as when their machine dies.
    groups = set()
    for pid in [worker_pid, *_descendants(worker_pid)]:
        with contextlib.suppress(ProcessLookupError):  # ended meanwhile
            groups.add(os.getpgid(pid))
    for group in groups:
        os.killpg(group, signal.SIGKILL)
    time.sleep(5)
    restarted = up(stack)  # a new worker; the orphaned run is rescheduled and picked up again
    # Then `rwkv5 down` mid-pretraining and `up`: the run `down` stopped is scheduled again (issue 18, bug 6).
    while len(trace.read_text().splitlines()) < 24:  # the retried run is past milestone 5
        assert time.monotonic() < deadline + 1500, "the retried run never got going"
        time.sleep(1)
    down(stack)
    resumed = up(stack)
    flow_run = _wait_final(stack, RUN, timeout=1800)
    return {"restarted": restarted, "resumed": resumed, "flow_run": flow_run,
            "milestones": _wait_milestones(stack, RUN, 1800)}


def test_milestone_queue_takes_one_run_at_a_time(stack):
    from rwkv5_app.stack import MILESTONE_QUEUE, WORK_POOL

    with _client(stack) as client:
        assert client.read_work_queue_by_name(MILESTONE_QUEUE, work_pool_name=WORK_POOL).concurrency_limit == 1


def test_killed_worker_run_is_retried_without_lost_or_duplicated_milestones(stack, finished_run):
    assert "rescheduled" in finished_run["restarted"]["prefect-worker"], finished_run["restarted"]
    assert "rescheduled" in finished_run["resumed"]["prefect-worker"], finished_run["resumed"]
    flow_run = finished_run["flow_run"]
    assert flow_run.state.is_completed(), flow_run.state
    assert flow_run.run_count >= 2  # the same flow run, run again
    _assert_ten_milestones_once_in_order(finished_run["milestones"], Layout(stack.state_dir))


def test_pretrain_deployment_fires_ten_milestones_in_order(stack, finished_run):
    layout = Layout(stack.state_dir)
    _assert_ten_milestones_once_in_order(finished_run["milestones"], layout)
    for percent in PERCENTS:
        release = layout.releases(RUN) / f"m{percent:03d}"
        manifest = json.loads((release / "manifest.json").read_text())
        assert {"base/model.pth", "finetune/model.pth"} <= {f["path"] for f in manifest["files"]}
        card = (release / "README.md").read_text()
        assert "- data: the offline SlimPajama-format sample" in card and "cerebras/SlimPajama-627B" not in card
        assert re.search(r"- fine-tune: chat data, \d+ steps", card), card
    preflight = _artifact(stack, artifact_key("preflight", RUN))
    rows = json.loads(preflight.data) if isinstance(preflight.data, str) else preflight.data
    assert {row["result"] for row in rows} <= {"ok", "skipped"}, rows
    for key in ("download-sample", "tokenize-sample", f"budget-{RUN}", f"mlflow-{RUN}", f"ray-{RUN}",
                f"loss-curve-{RUN}", f"milestones-{RUN}"):
        assert _artifact(stack, artifact_key(key)) is not None, key
    budget = _artifact(stack, artifact_key("budget", RUN))
    assert budget.type == "progress" and float(budget.data) == pytest.approx(100.0)
    table = _artifact(stack, artifact_key("milestones", RUN))
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [row["percent"] for row in rows] == PERCENTS
    assert "data:image/png;base64," in _artifact(stack, artifact_key("loss-curve", RUN)).data


def test_long_context_stage_runs_once_after_the_last_release(stack, finished_run):
    """The 100% milestone run emits rwkv5.milestone.released; longctx/auto's trigger starts the tiny stage on
    that checkpoint with the settings the event carries; its release has its own card and manifest, with the
    loss at each scaled position before and after, and the plot."""
    layout = Layout(stack.state_dir)
    runs = _wait_longctx(stack, RUN, 900)
    assert len(runs) == 1, [(r.name, r.state) for r in runs]  # one event, one run
    (run,) = runs
    assert run.state.is_completed(), run.state
    checkpoint = run.parameters["checkpoint"]  # the tenth milestone's: 100% of the budget
    assert checkpoint.startswith("file://") and checkpoint.endswith(f"/{RUN}/milestones/m010/model.safetensors")
    settings = run.parameters["settings"]
    assert settings["sample_len"] == 2048 and settings["data_source"] == "sample"
    last_release = layout.releases(RUN) / "m100" / "manifest.json"
    assert run.start_time.timestamp() > last_release.stat().st_mtime  # started by the last release

    release = layout.releases(RUN) / "longctx-m100"
    manifest = json.loads((release / "manifest.json").read_text())
    assert {"base/model.safetensors", "base/model.pth", "position_loss.png", "loss_curve.png", "README.md"} <= {
        f["path"] for f in manifest["files"]}
    evals = manifest["variants"]["base"]["evals"]
    for position in settings["eval_positions"]:
        assert evals[f"loss_at_{position:06d}"] > 0 and evals[f"loss_at_{position:06d}_before"] > 0, position
    card = (release / "README.md").read_text()
    assert "![Loss against position](position_loss.png)" in card and "- stage: long-context fine-tune of m100" in card
    assert f"- long_context_steps: {settings['steps']}" in card


def test_rerun_skips_data_and_resumes_training(stack, finished_run):
    layout = Layout(stack.state_dir)
    data_before = _tree_mtimes(layout.root / "data")
    trace = layout.checkpoints / RUN / "trace.jsonl"
    steps_before = len(trace.read_text().splitlines())
    _run_deployment(stack, "pretrain/tiny", {"run_name": RUN, "token_budget": BUDGET}, timeout=900)
    assert _tree_mtimes(layout.root / "data") == data_before  # nothing downloaded or tokenized again
    assert len(trace.read_text().splitlines()) == steps_before  # resumed at the end: no step trained again
    time.sleep(10)
    _assert_ten_milestones_once_in_order(_milestone_runs(stack, RUN), layout)


def test_dashboard_shows_stages_and_artifacts(stack, finished_run):
    from tests.flows.browser import screenshot_flow_run

    pretrain_run = finished_run["flow_run"]
    shot = REPO / "docs" / "dashboard.png"
    texts = screenshot_flow_run(f"http://{stack.host}:{stack.prefect_port}", str(pretrain_run.id), shot)
    for stage in ("download", "tokenize", "pretrain"):
        assert any(stage in t for t in texts["graph"]), (stage, texts["graph"][:20])
    assert any(artifact_key("loss-curve", RUN) in t for t in texts["artifacts"]), texts["artifacts"][:20]
    assert shot.stat().st_size > 10_000


SHARED_RUN = "e2e-shared"


def test_shared_mode_pauses_pretraining_for_each_milestone(stack):
    """`pretrain/tiny` in milestone mode `shared`, as on one 8-GPU node: pretraining stops at each milestone, the
    pretrain flow runs that milestone's flow run (a subflow of the milestone deployment) and waits for it, then
    resumes; ten milestone runs completed in order, each before the steps after its milestone were trained, and
    the whole token budget trained once."""
    layout = Layout(stack.state_dir)
    # The tiny deployment with lighter milestone runs: the orchestration is under test here, and the full
    # milestone work (LAMBADA, the long-context stage) already ran in the dedicated run above.
    light = {"finetune_workers": 0, "finetune_steps": 1, "chat_heldout": 2, "eval_limit": 4}
    _run_deployment(stack, "pretrain/tiny", {"run_name": SHARED_RUN, "token_budget": BUDGET,
                                             "milestone_mode": "shared", "milestones": light}, timeout=1800)
    (pretrain_run,) = [r for r in _flow_runs(stack, "pretrain") if r.parameters.get("run_name") == SHARED_RUN]
    assert pretrain_run.state.is_completed(), pretrain_run.state
    runs = sorted(_milestone_runs(stack, SHARED_RUN), key=lambda r: int(r.parameters["percent"]))
    assert [(int(r.parameters["percent"]), r.state.type.value) for r in runs] == [
        (percent, "COMPLETED") for percent in PERCENTS]
    assert all(r.parent_task_run_id is not None for r in runs)  # started by the pretrain flow, not the event
    assert all(r.deployment_id == runs[0].deployment_id is not None for r in runs)

    rows = [json.loads(line) for line in (layout.checkpoints / SHARED_RUN / "trace.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(40))  # every step once: no step trained twice or skipped
    assert int(runs[-1].parameters["tokens_seen"]) == BUDGET  # the 100% milestone: the whole budget seen
    for run in runs:
        milestone_step = int(run.parameters["step"])  # steps finished when pretraining paused
        resumed = [row["time"] for row in rows if row["step"] >= milestone_step]
        if resumed:  # pretraining resumed only after the milestone's run had finished
            assert min(resumed) > run.end_time.timestamp(), (run.parameters["percent"], run.end_time)
    ends = [r.end_time for r in runs]
    assert ends == sorted(ends)

    preflight = _artifact(stack, artifact_key("preflight", SHARED_RUN))
    checks = {row["check"]: row for row in (json.loads(preflight.data) if isinstance(preflight.data, str)
                                            else preflight.data)}
    assert checks["milestones"]["detail"].startswith("shared -> shared")
    budget = _artifact(stack, artifact_key("budget", SHARED_RUN))
    assert float(budget.data) == pytest.approx(100.0)
    table = _artifact(stack, artifact_key("milestones", SHARED_RUN))
    assert [row["percent"] for row in (json.loads(table.data) if isinstance(table.data, str) else table.data)] == (
        PERCENTS)
