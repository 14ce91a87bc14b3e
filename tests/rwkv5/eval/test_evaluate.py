"""Where a saved checkpoint is evaluated: the GPU when it has room, else the CPU."""

from __future__ import annotations

import torch

from rwkv5.config import model_preset
from rwkv5.eval import evaluate
from rwkv5.eval.lambada import SHIPPED_LAMBADA


def test_eval_device_is_the_gpu_only_with_room_for_twice_the_model(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert evaluate.eval_device(10).type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (30 * 2**30, 80 * 2**30))
    assert evaluate.eval_device(1 * 2**30).type == "cuda"  # a small model beside training
    assert evaluate.eval_device(28 * 2**30).type == "cpu"  # a 7B in float32 beside a training worker


def test_evaluate_saved_scores_lambada_and_says_where(random_model, tmp_path):
    from rwkv5.checkpoint import save_checkpoint

    saved = save_checkpoint(random_model(model_preset("tiny"), seed=3), tmp_path / "m.safetensors")
    report = evaluate.evaluate_saved(saved, lambada=str(SHIPPED_LAMBADA), limit=3)
    assert report["lambada"]["samples"] == 3 and 0 <= report["lambada"]["accuracy"] <= 1
    model_bytes = sum(p.numel() * 4 for p in random_model(model_preset("tiny"), seed=3).parameters())
    assert report["device"] == evaluate.eval_device(model_bytes).type
