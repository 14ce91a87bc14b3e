"""The pretrain flow's preflight, through Prefect (a test server): the 7b deployment's parameters stop the flow on
a CPU machine without the Hub before any download; the tiny deployment's pass. One Prefect server per module."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("prefect")

from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from flows.pretrain import pretrain, preflight_stage  # noqa: E402
from rwkv5.train.preflight import PreflightFailed  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _parameters(name: str) -> dict:
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (deployment,) = [d for d in spec["deployments"]
                     if d["name"] == name and d["entrypoint"] == "flows/pretrain.py:pretrain"]
    return dict(deployment["parameters"])


def _artifact_rows(key: str) -> list[dict]:
    import json

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        (artifact, *_) = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


def test_7b_deployment_fails_in_preflight_before_any_download(prefect_server, ray_cluster, tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{s.getsockname()[1]}")  # nothing listens there
    params = _parameters("7b")
    start = time.perf_counter()
    with pytest.raises(PreflightFailed) as raised:
        pretrain(**params, state_dir=str(tmp_path / "state"))
    took = time.perf_counter() - start
    assert took < 60
    # One line per failed check (the disk too, on a machine without ~2.2 TB free).
    lines = {line.split(":")[0]: line for line in str(raised.value).splitlines()[1:]}
    assert lines["gpus"].startswith("gpus: Ray cluster has 0 GPUs") and "needs 8 GPUs" in lines["gpus"]
    assert lines["hub"].startswith("hub: Hub not usable") and "Connection refused" in lines["hub"]
    assert "a milestone fine-tune never fits" in lines["milestones"]  # 8 fine-tune GPUs on a CPU-only Ray
    assert not (tmp_path / "state" / "data" / "cerebras-slimpajama-627b").exists()  # nothing downloaded
    rows = _artifact_rows(f"preflight-{params['run_name']}")
    assert [r["result"] for r in rows if r["check"] in ("gpus", "hub")] == ["failed", "failed"]


def test_tiny_deployment_passes_its_preflight(prefect_server, tmp_path):
    params = _parameters("tiny")
    state = tmp_path / "state"
    needs = {"workers": params["workers"], "gpus_per_worker": params["gpus_per_worker"], "source": params["source"],
             "storage": str(state / "checkpoints"), "data_dir": str(state / "data"), "state_dir": str(state)}
    needs |= {"milestone_mode": params["milestone_mode"],
              "finetune_workers": params["milestones"]["finetune_workers"]}
    assert preflight_stage(params["run_name"], needs) == "dedicated"
    rows = _artifact_rows(f"preflight-{params['run_name']}")
    assert {r["result"] for r in rows} <= {"ok", "skipped"}
    results = {r["check"]: r for r in rows}
    assert results["shared paths"]["result"] == "ok"
    assert results["milestones"]["detail"].startswith("auto -> dedicated")
