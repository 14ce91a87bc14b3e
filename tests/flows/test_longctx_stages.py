"""The longctx flow's stage bodies, called directly (no Prefect server), in the flow's order on a tiny model:
long samples packed from shards, per-position losses before, the segmented full-BPTT fine-tune under DeepSpeed
ZeRO-2 (one gloo rank), after, the plot, and a release whose card and manifest carry them. The flow around
them runs in tests/flows/test_pipeline_e2e.py, started by the last milestone's event."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("prefect")
pytest.importorskip("deepspeed")

from flows.longctx import evaluate_stage, finetune_stage, pack_stage, plot_stage, release_stage  # noqa: E402
from rwkv5.checkpoint import read_checkpoint, save_checkpoint  # noqa: E402
from rwkv5.config import model_preset  # noqa: E402
from rwkv5.train.long_context_settings import LongContextSettings  # noqa: E402

SETTINGS = LongContextSettings(sample_len=64, steps=2, samples_per_step=1, lr=1e-3, segment_len=24,
                               heldout_samples=2, eval_positions=(4, 16, 64), scan_tokens=None, workers=0,
                               gpus_per_worker=0)


def test_stages_pack_evaluate_finetune_and_release_the_long_context_model(tmp_path, random_model, monkeypatch):
    from data_prep.shards import write_token_dataset

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    rng = np.random.default_rng(0)
    docs = (np.append(rng.integers(1, 65535, n), 0).astype(np.uint16) for n in (150, 90, 120, 60, 200, 30))
    write_token_dataset(tmp_path / "train", docs, "test-ids", source="RedPajamaBook", shard_tokens=300)
    base = save_checkpoint(random_model(model_preset("tiny"), seed=7), tmp_path / "m100" / "model.safetensors",
                           {"run_name": "demo", "percent": 100, "step": 40, "tokens_seen": 40960})

    samples = pack_stage.fn(str(tmp_path / "train"), str(tmp_path / "samples"), SETTINGS)
    before = evaluate_stage.fn(str(base), samples["heldout"], SETTINGS)
    first = finetune_stage.fn(str(base), samples["train"], str(tmp_path / "ft"), "demo-longctx-m100", SETTINGS)
    after = evaluate_stage.fn(first["checkpoint"], samples["heldout"], SETTINGS)

    assert samples["train_documents"] >= 1 and samples["heldout_documents"] >= 1
    assert first["steps"] == 2 and first["first_loss"] > 0
    tuned, config, meta = read_checkpoint(first["checkpoint"])
    assert config == model_preset("tiny") and meta["step"] == 2
    assert not torch.equal(tuned["head.weight"].float(), read_checkpoint(base)[0]["head.weight"].float())
    assert list(before["long_context"]["positions"]) == [4, 16, 64]
    assert before["long_context"]["positions"] != after["long_context"]["positions"]
    trace = tmp_path / "ft" / "demo-longctx-m100" / "trace.jsonl"
    seen = trace.stat().st_mtime_ns
    assert finetune_stage.fn(str(base), samples["train"], str(tmp_path / "ft"), "demo-longctx-m100",
                             SETTINGS) == first  # a retried flow run trains nothing again
    assert trace.stat().st_mtime_ns == seen

    figure = plot_stage.fn(str(tmp_path / "position_loss.png"), {"before": before, "after": after}, "demo")
    url = release_stage.fn(first["checkpoint"], str(tmp_path / "release"), "demo-longctx-m100",
                           {"loss_at_000064": 5.0, "loss_at_000064_before": 6.0}, {"run": "demo"},
                           [(0, 7.0), (1, 6.5)], figure, None)

    manifest = json.loads((tmp_path / "release" / "manifest.json").read_text())
    assert {"position_loss.png", "base/model.safetensors", "loss_curve.png"} <= {f["path"] for f in manifest["files"]}
    assert manifest["variants"]["base"]["evals"]["loss_at_000064_before"] == 6.0
    card = (tmp_path / "release" / "README.md").read_text()
    assert "## Loss against position\n\n![Loss against position](position_loss.png)" in card
    assert "| loss_at_000064 | 5 |" in card and url.endswith("release")
