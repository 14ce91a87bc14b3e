"""The milestone flow's stage bodies, called directly (no Prefect server): the fine-tune goes through the
pretraining loop (DeepSpeed ZeRO-2 bf16, one gloo rank here) and is reused once done; evaluation reports
validation loss per source and LAMBADA. The flow around them runs in tests/flows/test_pipeline_e2e.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("prefect")
pytest.importorskip("deepspeed")

from flows.milestone import evaluate_stage, finetune_stage  # noqa: E402
from rwkv5.checkpoint import read_checkpoint, save_checkpoint  # noqa: E402
from rwkv5.config import model_preset  # noqa: E402
from rwkv5.eval.lambada import SHIPPED_LAMBADA  # noqa: E402
from rwkv5.train.milestone_settings import MilestoneSettings  # noqa: E402

LAMBADA = SHIPPED_LAMBADA


@pytest.fixture(scope="module")
def base(tmp_path_factory, random_model):
    return save_checkpoint(random_model(model_preset("tiny"), seed=3),
                           tmp_path_factory.mktemp("base") / "model.safetensors", {"step": 4})


def test_finetune_stage_trains_under_deepspeed_and_is_reused(tmp_path, base, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    settings = MilestoneSettings(finetune_steps=2, finetune_lr=1e-3, finetune_max_len=96, finetune_workers=0,
                                 gpus_per_worker=0, chat_heldout=8)  # 0 workers: in this process
    args = (str(base), str(tmp_path), "demo-m010", None, settings)
    first = finetune_stage.fn(*args)

    assert first["steps"] == 2 and first["first_loss"] > 0
    tuned, config, meta = read_checkpoint(first["checkpoint"])
    base_sd, base_config, _ = read_checkpoint(base)
    assert config == base_config and meta["step"] == 2
    assert not torch.equal(tuned["head.weight"].float(), base_sd["head.weight"].float())
    assert (tmp_path / "chat-sample.jsonl").is_file()  # the default chat data, built from local docstrings

    trace = tmp_path / "demo-m010" / "trace.jsonl"
    seen = trace.stat().st_mtime_ns
    assert finetune_stage.fn(*args) == first  # a retried flow run trains nothing again
    assert trace.stat().st_mtime_ns == seen


def test_evaluate_stage_reports_validation_per_source_lambada_and_heldout_chat(tmp_path, base):
    from data_prep.shards import write_token_dataset

    rng = np.random.default_rng(0)
    docs = (np.append(rng.integers(1, 65535, 200), 0).astype(np.uint16) for _ in range(12))
    write_token_dataset(tmp_path / "validation", docs, "test-ids", source="RedPajamaWikipedia", shard_tokens=1000)

    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {i}."},
                                                     {"role": "assistant", "content": f"{i} it is."}]}) + "\n"
                            for i in range(6)))
    settings = MilestoneSettings(eval_ctx_len=32, eval_limit=4, chat_heldout=2)
    report = evaluate_stage.fn(str(base), str(tmp_path / "validation"), str(LAMBADA), str(chat), settings)

    assert report["lambada"]["samples"] == 4 and 0.0 <= report["lambada"]["accuracy"] <= 1.0
    assert report["lambada"]["ppl"] > 1.0
    val = report["validation"]
    assert set(val["by_source"]) == {"RedPajamaWikipedia"} and val["tokens"] > 0
    assert val["loss"] == pytest.approx(val["by_source"]["RedPajamaWikipedia"]["loss"])
    assert report["chat"]["samples"] == 2 and report["chat"]["loss"] > 0  # the held-out chat samples
    json.dumps(report)  # goes into MLflow and the milestone table as JSON


def test_milestone_finetune_runs_on_the_ray_cluster(ray_cluster, tmp_path, random_model, monkeypatch):
    """The milestone flow's fine-tune stage takes the Ray Train path when given workers (here RAY_ADDRESS's
    cluster, as under `rwkv5 up`): same launch, DeepSpeed and checkpoints as pretraining, here on 1 worker."""
    import torch

    from flows.milestone import finetune_stage
    from rwkv5.checkpoint import read_checkpoint, save_checkpoint
    from rwkv5.config import model_preset

    base = save_checkpoint(random_model(model_preset("tiny"), seed=4), tmp_path / "base.safetensors")
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster.get_runtime_context().gcs_address)
    settings = MilestoneSettings(finetune_steps=2, finetune_lr=1e-3, finetune_max_len=96, finetune_workers=1,
                                 gpus_per_worker=0, chat_heldout=8)
    out = finetune_stage.fn(str(base), str(tmp_path / "ft"), "tiny-m010", None, settings)

    assert out["steps"] == 2
    assert list((tmp_path / "ft" / "tiny-m010").glob("step_*"))  # Ray Train's checkpoints of the run
    tuned, _, meta = read_checkpoint(out["checkpoint"])
    assert meta["step"] == 2
    assert not torch.equal(tuned["head.weight"].float(), read_checkpoint(base)[0]["head.weight"].float())
