"""The loop's guards, run in this process without Ray (one gloo rank, checkpoints in the local store):
non-finite steps and loss spikes never reach the weights, rollback restores the last checkpoint and skips
the offending data, and model surgery initialises missing parameters fresh."""

from __future__ import annotations

import json

import pytest
import torch

from rwkv5.errors import CheckpointError
from rwkv5.train.callbacks import Callback, TraceCallback
from rwkv5.train.worker import TrainJob, train

WATCHED = ("blocks.0.att.key.weight", "blocks.1.ffn.value.weight", "head.weight")


class Snapshots(Callback):
    """Copies of a few parameters after every step, by step."""

    def __init__(self):
        self.after = {}
        self.at_start = None

    def pre_train(self, ctx):
        super().pre_train(ctx)
        params = dict(ctx.model.named_parameters())
        self.at_start = {n: p.detach().clone() for n, p in params.items()}

    def post_step(self, info, metrics):
        params = dict(self.ctx.model.named_parameters())
        self.after[info.step] = {n: params[n].detach().clone() for n in WATCHED}

    def post_rollback(self, bad_step, restored_step):
        params = dict(self.ctx.model.named_parameters())
        self.rolled_back = (bad_step, restored_step, {n: params[n].detach().clone() for n in WATCHED})


def _poison(monkeypatch, bad_calls: set[int], factor: float):
    """Scale the loss of the given micro-step calls (0-based, over the whole run) by `factor`."""
    import rwkv5.model

    real = rwkv5.model.chunked_lm_loss  # what the model's forward(targets=...) computes the loss with
    calls = {"n": 0}

    def loss(*args, **kwargs):
        value = real(*args, **kwargs)
        i = calls["n"]
        calls["n"] += 1
        return value * factor if i in bad_calls else value

    monkeypatch.setattr(rwkv5.model, "chunked_lm_loss", loss)


def _same(a, b):
    return all(torch.equal(a[n], b[n]) for n in WATCHED)


def test_nonfinite_step_is_skipped(monkeypatch, token_data, small_run, tmp_path):
    cfg = small_run(5)
    _poison(monkeypatch, {4}, float("nan"))  # step 2, first of its 2 micro-steps
    snaps = Snapshots()
    state = train(TrainJob(cfg, "nan", str(token_data), str(tmp_path),
                           callbacks=[snaps, TraceCallback(tmp_path / "trace.jsonl")]))
    assert state.skipped_nonfinite == 1 and state.applied == 4 and state.step == 5
    assert _same(snaps.after[1], snaps.after[2])
    assert not _same(snaps.after[2], snaps.after[3])
    rows = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert [r["nonfinite"] for r in rows] == [False, False, True, False, False]
    assert all(torch.isfinite(p).all() for p in snaps.after[4].values())


@pytest.mark.train_e2e
def test_spike_rollback_restores_checkpoint_and_skips_data(monkeypatch, token_data, small_run, tmp_path):
    cfg = small_run(9, **{"stability.spike_action": "rollback", "stability.spike_window": 4,
                          "stability.spike_min_history": 3, "stability.spike_sigma": 3.0,
                          "checkpoint.every_steps": 2, "milestones.fraction": 1.0})
    _poison(monkeypatch, {10, 11}, 100.0)  # step 5
    snaps = Snapshots()
    state = train(TrainJob(cfg, "spike", str(token_data), str(tmp_path),
                           callbacks=[snaps, TraceCallback(tmp_path / "trace.jsonl")]))
    rows = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(9))
    assert rows[5]["spike"] and not rows[5]["applied"]
    assert state.rollbacks == 1 and state.skipped_spikes == 1
    # The spike step itself is not applied; then the weights go back to the checkpoint of step 4 (saved
    # after step index 3), and training continues with global batch 6: the data since then is skipped.
    assert _same(snaps.after[4], snaps.after[5])
    bad, restored, weights = snaps.rolled_back
    assert (bad, restored) == (5, 4)
    assert _same(weights, snaps.after[3]) and not _same(weights, snaps.after[4])


@pytest.mark.train_e2e
def test_init_missing_surgery(monkeypatch, token_data, small_run, tmp_path):
    import rwkv5.model

    cfg = small_run(4, **{"milestones.fraction": 1.0})
    real_init = rwkv5.model.RWKV5.__init__

    def without_gate(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        gate = self.blocks[1].att.gate
        weight = gate.weight.detach().clone()
        del gate.weight
        # The old model has no such parameter. DeepSpeed casts parameters to bf16, not buffers: cast it here.
        gate.register_buffer("weight", weight.to(torch.bfloat16), persistent=False)

    monkeypatch.setattr(rwkv5.model.RWKV5, "__init__", without_gate)
    train(TrainJob(cfg.model_copy(update={"stop_at_step": 2}), "surgery", str(token_data), str(tmp_path)))
    monkeypatch.setattr(rwkv5.model.RWKV5, "__init__", real_init)

    with pytest.raises(CheckpointError, match=r"blocks\.1\.att\.gate\.weight"):
        train(TrainJob(cfg, "surgery", str(token_data), str(tmp_path)))

    snaps = Snapshots()
    state = train(TrainJob(cfg, "surgery", str(token_data), str(tmp_path), init_missing=True, callbacks=[snaps]))
    assert state.step == 4
    torch.manual_seed(cfg.seed)
    fresh = rwkv5.model.RWKV5(cfg.model)
    gate = "blocks.1.att.gate.weight"
    assert torch.equal(snaps.at_start[gate], fresh.state_dict()[gate].to(torch.bfloat16))
    # Every other parameter kept its trained value, not the fresh one.
    assert not torch.equal(snaps.at_start["blocks.0.att.key.weight"],
                           fresh.state_dict()["blocks.0.att.key.weight"].to(torch.bfloat16))
