"""prefect.yaml against the flows it deploys: a broken file only shows at `rwkv5 up` (`prefect deploy --all`)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

pytest.importorskip("prefect")

from flows.milestone import milestone  # noqa: E402
from flows.pretrain import pretrain  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FLOWS = {"flows/pretrain.py:pretrain": pretrain, "flows/milestone.py:milestone": milestone}


@pytest.fixture(scope="module")
def deployments() -> dict[str, dict]:
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    return {d["name"]: d for d in spec["deployments"]}


def _signature(deployment: dict) -> inspect.Signature:
    return inspect.signature(FLOWS[deployment["entrypoint"]].fn)


def test_every_deployment_points_at_a_flow_with_parameters_it_takes(deployments):
    assert set(deployments) == {"tiny", "7b", "auto"}
    for name, d in deployments.items():
        params = _signature(d).parameters
        unknown = set(d.get("parameters", {})) - set(params)
        assert not unknown, (name, unknown)


def test_pretrain_deployments_run_as_typed_with_a_default_run_name(deployments):
    """`prefect deployment run pretrain/7b` needs no -p: the default name is the reference run, and a re-run of
    the same name resumes it (the flow passes resume=True when the run has checkpoints)."""
    for name in ("tiny", "7b"):
        sig = _signature(deployments[name])
        required = {p for p, v in sig.parameters.items() if v.default is inspect.Parameter.empty}
        assert required == {"run_name"}
        assert deployments[name]["parameters"]["run_name"], name
    assert deployments["7b"]["parameters"]["run_name"] != deployments["tiny"]["parameters"]["run_name"]
    assert deployments["tiny"]["parameters"]["finetune_workers"] == 0  # in-process fine-tunes on the demo
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
