"""prefect.yaml against the flows it deploys: a broken file only shows at `rwkv5 up` (`prefect deploy --all`)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

pytest.importorskip("prefect")

from flows.longctx import longctx  # noqa: E402
from flows.milestone import milestone  # noqa: E402
from flows.pretrain import pretrain  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
LONGCTX = "flows/longctx.py:longctx"
FLOWS = {"flows/pretrain.py:pretrain": pretrain, "flows/milestone.py:milestone": milestone, LONGCTX: longctx}


def _spec() -> list[dict]:
    return yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]


@pytest.fixture(scope="module")
def deployments() -> dict[str, dict]:
    """The pretrain and milestone deployments by name."""
    return {d["name"]: d for d in _spec() if d["entrypoint"] != LONGCTX}


@pytest.fixture(scope="module")
def longctx_deployments() -> dict[str, dict]:
    return {d["name"]: d for d in _spec() if d["entrypoint"] == LONGCTX}


def _signature(deployment: dict) -> inspect.Signature:
    return inspect.signature(FLOWS[deployment["entrypoint"]].fn)


def test_every_deployment_points_at_a_flow_with_parameters_it_takes(deployments):
    assert set(deployments) == {"tiny", "1gpu", "7b", "auto"}
    for name, d in deployments.items():
        params = _signature(d).parameters
        unknown = set(d.get("parameters", {})) - set(params)
        assert not unknown, (name, unknown)


def test_pretrain_deployments_run_as_typed_with_a_default_run_name(deployments):
    """`prefect deployment run pretrain/7b` needs no -p: the default name is the reference run, and a re-run of
    the same name resumes it (the flow passes resume=True when the run has checkpoints)."""
    for name in ("tiny", "1gpu", "7b"):
        sig = _signature(deployments[name])
        required = {p for p, v in sig.parameters.items() if v.default is inspect.Parameter.empty}
        assert required == {"run_name"}
        assert deployments[name]["parameters"]["run_name"], name
    names = [deployments[name]["parameters"]["run_name"] for name in ("tiny", "1gpu", "7b")]
    assert len(set(names)) == 3  # each deployment resumes its own run
    assert deployments["tiny"]["parameters"]["milestones"]["finetune_workers"] == 0  # in-process on the demo
    src = inspect.getsource(pretrain.fn)
    assert "preflight_stage(" in src and src.index("preflight_stage(") < src.index("download_stage(")


def test_milestone_deployment_is_triggered_in_order_by_the_event(deployments):
    from flows.events import MILESTONE_EVENT

    from rwkv5_app.stack import MILESTONE_QUEUE, WORK_POOL

    auto = deployments["auto"]
    assert auto["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    # A queue of its own, which `rwkv5 up` limits to one run: the worker takes the waiting runs in order.
    assert auto["work_pool"] == {"name": WORK_POOL, "work_queue_name": MILESTONE_QUEUE}
    assert all(d["work_pool"]["work_queue_name"] != MILESTONE_QUEUE for n, d in deployments.items() if n != "auto")
    (trigger,) = auto["triggers"]
    assert trigger["expect"] == [MILESTONE_EVENT]
    sig = _signature(auto)
    given = set(trigger["parameters"])
    required = {p for p, v in sig.parameters.items() if v.default is inspect.Parameter.empty}
    assert required <= given <= set(sig.parameters)
    for param, template in trigger["parameters"].items():
        assert template == f"{{{{ event.payload.{param} }}}}", param
    assert "settings" in given  # every milestone setting travels as one object


def test_every_deployment_s_milestone_settings_validate(deployments):
    """One settings object per deployment, checked as the flow checks it; the 7b fine-tunes on PIPPA."""
    from rwkv5.train.milestone_settings import MILESTONE_MODES, settings_from

    for name in ("tiny", "1gpu", "7b"):
        params = deployments[name]["parameters"]
        settings_from(params["milestones"])
        assert params["milestone_mode"] in MILESTONE_MODES
    assert settings_from(deployments["7b"]["parameters"]["milestones"]).chat_data == (
        "hf://datasets/PygmalionAI/PIPPA/pippa_deduped.jsonl")


def test_the_one_gpu_deployment_fits_one_80gb_gpu_and_shares_it_with_its_milestones(deployments):
    """pretrain/1gpu: one Ray Train worker with the whole GPU; the milestone fine-tune (in the milestone flow's
    process, on the GPU) would need it too, so auto resolves to shared on a one-GPU cluster; the preset's plan
    fits 80 GB; ten milestones fall on distinct steps."""
    from rwkv5.train.config import run_preset, with_overrides
    from rwkv5.train.memory_plan import plan_memory
    from rwkv5.train.milestone_settings import place_milestones, settings_from
    from rwkv5.train.preflight import cluster_resources

    p = deployments["1gpu"]["parameters"]
    settings = settings_from(p["milestones"]).for_run("sample", p["gpus_per_worker"])
    assert p["workers"] == 1 and p["gpus_per_worker"] == 1 and settings.finetune_workers == 0
    assert settings.gpus_per_worker == 1  # the fine-tune trains on the GPU
    one_gpu = {"GPU": 1.0, "CPU": 16.0}
    assert cluster_resources(p["workers"], p["gpus_per_worker"], total=one_gpu).status == "ok"
    placement = place_milestones(p["milestone_mode"], p["workers"], p["gpus_per_worker"], settings.finetune_workers,
                                 settings.gpus_per_worker, cluster_gpus=1, cluster_cpus=16)
    assert placement.mode == "shared"
    config = with_overrides(run_preset(p["preset"]), {"token_budget": p["token_budget"]})
    assert config.batch.ctx_len == 4096 and p["source"] == "sample" and settings.lambada == "shipped"
    steps = config.total_steps
    assert steps >= 10 and steps % round(1 / config.milestones.fraction) == 0  # ten milestones, equally spaced
    plan = plan_memory(config, gpus=1, gpu_memory_gb=80)
    assert plan.peak < 0.9 * 80e9


def test_longctx_deployments_take_their_parameters_and_settings(deployments, longctx_deployments):
    """`longctx/auto` (the event's), `longctx/tiny` and `longctx/7b` (by hand on a checkpoint); the pretrain
    deployments carry the same settings for the stage after their last milestone, the tiny one scaled down."""
    from rwkv5.train.long_context_settings import long_context_settings_from
    from rwkv5.train.milestone_settings import settings_from

    assert set(longctx_deployments) == {"auto", "tiny", "7b"}
    params = inspect.signature(longctx.fn).parameters
    assert {p for p, v in params.items() if v.default is inspect.Parameter.empty} == {"checkpoint"}
    for name, d in longctx_deployments.items():
        assert set(d.get("parameters", {})) <= set(params), name
        long_context_settings_from(d.get("parameters", {}).get("settings"))
    for name in ("tiny", "7b"):
        carried = settings_from(deployments[name]["parameters"]["milestones"]).long_context
        assert carried == long_context_settings_from(longctx_deployments[name]["parameters"]["settings"]), name
    tiny = settings_from(deployments["tiny"]["parameters"]["milestones"]).long_context
    assert tiny.workers == 0 and tiny.sample_len <= 4096 and tiny.eval_positions[-1] == tiny.sample_len
    assert len(tiny.eval_positions) == 5 and tiny.train_samples <= 4  # the demo's stage: seconds of CPU work
    real = long_context_settings_from(longctx_deployments["7b"]["parameters"]["settings"])
    assert real.sample_len == 131072 and real.eval_positions == (1024, 4096, 16384, 65536, 131072)
    assert settings_from(deployments["1gpu"]["parameters"]["milestones"]).long_context is None


def test_longctx_runs_when_the_last_milestone_is_released(longctx_deployments):
    """The milestone flow emits RELEASED_EVENT after its 100% release when the run has a long-context stage;
    `longctx/auto`'s trigger reads the flow's parameters from that event's payload."""
    from flows.events import RELEASED_EVENT, long_context_parameters
    from flows.milestone import _release_milestone
    from rwkv5.train.long_context_settings import long_context_settings_from
    from rwkv5.train.milestone_settings import MilestoneSettings

    auto = longctx_deployments["auto"]
    assert "parameters" not in auto  # all from the event
    assert auto["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    (trigger,) = auto["triggers"]
    assert trigger["expect"] == [RELEASED_EVENT] and trigger["match"] == {"prefect.resource.id": "rwkv5.run.*"}
    for param, template in trigger["parameters"].items():
        assert template == f"{{{{ event.payload.{param} }}}}", param
    settings = MilestoneSettings(data_source="cerebras/SlimPajama-627B",
                                 long_context={"sample_len": 4096, "eval_positions": [64, 4096]})
    payload = long_context_parameters("rwkv5-7b", "file:///runs/m010/model.safetensors", settings)
    assert set(trigger["parameters"]) == set(payload) and set(payload) <= set(inspect.signature(longctx.fn).parameters)
    stage = long_context_settings_from(payload["settings"])  # as the flow validates the event's settings
    assert stage.sample_len == 4096 and stage.data_source == "cerebras/SlimPajama-627B"
    source = inspect.getsource(_release_milestone)
    assert 'info["percent"] >= 100 and settings.long_context is not None' in source
    assert source.index("table.write(") < source.index("emit_last_release(")  # after the release is recorded
