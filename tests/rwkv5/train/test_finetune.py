"""Chat fine-tuning through the pretraining worker loop: DeepSpeed ZeRO-2 bf16 on one gloo rank, in this process
and on a Ray Train worker."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rwkv5.config import model_preset
from rwkv5.errors import CheckpointError
from rwkv5.train.finetune import ChatBatches, FinetuneTask, finetune, finetune_run_config
from rwkv5.model import RWKV5
from rwkv5.train.callbacks import Callback
from rwkv5.train.config import BatchConfig

DEMO = Path(__file__).resolve().parents[2] / "data" / "rwkv-lm-demo.jsonl"  # tests/data/README.md: origin
PIPPA = Path(__file__).resolve().parents[2] / "data" / "pippa-sample.jsonl"


class Record(Callback):
    def __init__(self):
        self.losses, self.first_weights = [], None

    def pre_train(self, ctx):
        super().pre_train(ctx)
        self.first_weights = {n: p.detach().float().clone() for n, p in ctx.model.named_parameters()}

    def post_step(self, info, metrics):
        self.losses.append(info.loss)


def test_chat_batches_order_is_a_function_of_the_step():
    encoded = [([1, 2, 3, i], [0, 1, 1, 1]) for i in range(5)]
    cfg = BatchConfig(ctx_len=8, micro_batch=1, global_batch=4)
    one = ChatBatches(encoded, cfg, 0, 1, torch.device("cpu"), seed=3)
    two = [ChatBatches(encoded, cfg, r, 2, torch.device("cpu"), seed=3) for r in range(2)]
    for step in range(3):
        alone = [int(mb.sample_ids) for mb in one.micro_batches(step)]
        split = [int(mb.sample_ids) for b in two for mb in b.micro_batches(step)]
        assert alone == split
    firsts = [one.sample_index(p) for p in range(5)]
    assert sorted(firsts) == list(range(5))  # each sample once per epoch


def test_chat_batches_pad_with_masked_positions():
    encoded = [([5, 6, 7, 8, 0], [0, 0, 1, 1, 1]), ([9, 0], [0, 1])]
    cfg = BatchConfig(ctx_len=8, micro_batch=2, global_batch=2)
    (mb,) = list(ChatBatches(encoded, cfg, 0, 1, torch.device("cpu")).micro_batches(0))
    short = int((mb.sample_ids == 1).nonzero())
    assert mb.inputs.shape == mb.mask.shape == (2, 4)
    assert mb.mask[short].tolist() == [1, 0, 0, 0]  # only the real target counts


def test_finetune_under_deepspeed_from_a_base_checkpoint(tmp_path, random_model):
    pytest.importorskip("deepspeed")
    from rwkv5.checkpoint import read_checkpoint, save_checkpoint

    cfg_model = model_preset("tiny")
    base = save_checkpoint(random_model(cfg_model, seed=5), tmp_path / "base.safetensors")
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(DEMO.read_text(encoding="utf-8").splitlines(keepends=True)[:6]), encoding="utf-8")
    cfg = finetune_run_config(cfg_model, steps=3, samples_per_step=2, max_len=160, lr=1e-3, final_lr=1e-4,
                              warmup_steps=0)
    cfg = cfg.model_copy(update={"metrics": cfg.metrics.model_copy(update={"system_metrics": False})})
    record = Record()
    task = FinetuneTask(chat_data=str(chat), init_checkpoint=str(base), segment_len=48)
    state = finetune(cfg, task, "ft", tmp_path / "runs", callbacks=[record])

    assert state["step"] == 3 and state["applied"] == 3
    assert len(record.losses) == 3 and all(math.isfinite(x) for x in record.losses)
    base_sd, _, _ = read_checkpoint(base)
    for name in ("blocks.0.att.key.weight", "head.weight", "blocks.1.att.time_decay"):
        assert torch.equal(record.first_weights[name], base_sd[name].bfloat16().float()), name
    (milestone,) = (tmp_path / "runs" / "ft" / "milestones").glob("m*/model.safetensors")
    tuned, config, meta = read_checkpoint(milestone)
    assert config == cfg_model and meta["step"] == 3
    assert not torch.equal(tuned["head.weight"].float(), base_sd["head.weight"].bfloat16().float())

    with pytest.raises(CheckpointError, match="differs from the fine-tune run's model config"):
        FinetuneTask(str(chat), str(base)).init_model(RWKV5(cfg_model.model_copy(update={"n_layer": 3})))



def test_a_milestone_fine_tune_runs_on_ray_train_workers(ray_cluster, tmp_path, random_model):
    """The milestone flow's fine-tune of a GPU deployment goes through Ray Train (`workers` >= 1); here on one
    CPU worker with gloo. It tunes the base and leaves the one milestone the milestone flow releases."""
    pytest.importorskip("deepspeed")
    from rwkv5.checkpoint import read_checkpoint, save_checkpoint
    from rwkv5.train.finetune import finetune_milestone

    cfg_model = model_preset("tiny")
    base = save_checkpoint(random_model(cfg_model, seed=6), tmp_path / "base.safetensors")
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(DEMO.read_text(encoding="utf-8").splitlines(keepends=True)[:4]), encoding="utf-8")
    result = finetune_milestone(str(base), tmp_path / "finetunes", "run-m010", str(chat), steps=2, max_len=160,
                                lr=1e-3, workers=1, gpus_per_worker=0, heldout=1)

    assert result["steps"] == 2 and math.isfinite(result["last_loss"])
    tuned, config, meta = read_checkpoint(result["checkpoint"])
    base_sd, _, _ = read_checkpoint(base)
    assert config == cfg_model and meta["step"] == 2
    assert not torch.equal(tuned["head.weight"].float(), base_sd["head.weight"].bfloat16().float())
    again = finetune_milestone(str(base), tmp_path / "finetunes", "run-m010", str(chat), steps=2, max_len=160,
                               workers=1, heldout=1)
    assert again == result  # a retried milestone run reuses the finished fine-tune: no second Ray launch


def test_a_milestone_fine_tune_lowers_the_heldout_chat_loss(tmp_path, random_model, monkeypatch):
    """The milestone metric: the held-out chat loss of base and fine-tune, on samples the fine-tune never saw
    (30 steps at lr 1e-4, as the milestone flow's tiny deployment trains)."""
    pytest.importorskip("deepspeed")
    from data_prep.tokenizer import load_tokenizer
    from rwkv5.checkpoint import save_checkpoint
    from rwkv5.eval.evaluate import evaluate_saved, flat_metrics
    from rwkv5.train.chat import encode_chat_samples, heldout_split, read_chat_jsonl
    from rwkv5.train.finetune import finetune_milestone

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg_model = model_preset("tiny")
    base = save_checkpoint(random_model(cfg_model, seed=7), tmp_path / "base.safetensors")
    task = FinetuneTask(chat_data=str(PIPPA), heldout=2)
    trained = task.batches(finetune_run_config(cfg_model, steps=1, max_len=1024), 0, 1, torch.device("cpu")).encoded
    _, held = heldout_split(read_chat_jsonl(PIPPA), 2)
    held_ids = [ids for ids, _ in encode_chat_samples(held, load_tokenizer().encode, 1024)]
    assert len(trained) == 6 and not any(ids in held_ids for ids, _ in trained)

    ft = finetune_milestone(str(base), tmp_path / "finetunes", "run-m010", str(PIPPA), steps=30, lr=1e-4, heldout=2)
    before = evaluate_saved(base, chat_data=ft["chat_data"], chat_heldout=ft["heldout"])
    after = evaluate_saved(ft["checkpoint"], chat_data=ft["chat_data"], chat_heldout=ft["heldout"])

    assert ft["steps"] == 30 and before["chat"]["samples"] == after["chat"]["samples"] == 2
    assert before["chat"]["tokens"] == after["chat"]["tokens"] > 50
    assert after["chat"]["loss"] < before["chat"]["loss"] - 0.1, (before["chat"], after["chat"])
    assert flat_metrics(after)["chat_loss"] == after["chat"]["loss"]
