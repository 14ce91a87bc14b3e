"""The model card says what happened: the data the run read, and the fine-tune's own step count."""

from __future__ import annotations

import numpy as np

from rwkv5.checkpoint import save_checkpoint
from rwkv5.config import ModelConfig
from rwkv5.release.milestones import data_description
from rwkv5.release.publish import build_release

CFG = ModelConfig(n_layer=1, n_embd=32, head_size=16, vocab_size=300)


def test_data_description_names_the_source_and_counts_its_tokens(tmp_path):
    from data_prep.shards import write_token_dataset

    docs = [np.array([5, 6, 7, 0], dtype=np.uint16), np.array([8, 9, 0], dtype=np.uint16)]
    write_token_dataset(tmp_path / "train", docs, "test-tokenizer", source="RedPajamaGithub")
    sample = data_description("sample", tmp_path / "train")
    assert "offline SlimPajama-format sample" in sample and "train split: 7 tokens in 2 documents from 1 sets" in sample
    assert "cerebras/SlimPajama-627B" not in sample
    hub = data_description("cerebras/SlimPajama-627B", tmp_path / "missing")
    assert hub == "cerebras/SlimPajama-627B from the Hugging Face Hub"
    assert data_description("s3://bucket/slimpajama").startswith("SlimPajama-layout files from s3://")


def test_card_gives_the_data_and_the_finetune_steps(random_model, tmp_path):
    base = save_checkpoint(random_model(CFG, seed=1), tmp_path / "base.safetensors", {"step": 40})
    # The fine-tune's milestone records its own last step; the release's extra meta carries pretraining's step.
    ft = save_checkpoint(random_model(CFG, seed=2), tmp_path / "ft.safetensors", {"step": 7})
    meta = {"run": "tiny-demo", "step": 40, "tokens_seen": 1000, "data": data_description("sample")}
    out = build_release(tmp_path / "release", base, name="tiny-demo-m010", finetune=ft, extra_meta=meta)
    card = (out / "README.md").read_text()
    assert "- data: the offline SlimPajama-format sample" in card
    assert "- fine-tune: chat data, 7 steps" in card
    assert "- step: 40" in card  # the base's facts stay pretraining's


def test_card_gives_the_heldout_chat_loss_before_and_after(random_model, tmp_path):
    base = save_checkpoint(random_model(CFG, seed=1), tmp_path / "base.safetensors", {"step": 40})
    ft = save_checkpoint(random_model(CFG, seed=2), tmp_path / "ft.safetensors", {"step": 30})
    evals = {"base": {"val_loss": 5.25, "chat_loss": 7.7412}, "finetune": {"val_loss": 5.5, "chat_loss": 7.3321}}
    card = (build_release(tmp_path / "release", base, name="m", finetune=ft, evals=evals) / "README.md").read_text()
    assert ("- fine-tune: chat data, 30 steps, loss on assistant turns only; held-out chat loss (per assistant "
            "token) 7.741 before, 7.332 after\n") in card
    assert "| chat_loss | 7.741 | 7.332 |" in card


def test_card_without_recorded_data_does_not_claim_slimpajama(random_model, tmp_path):
    base = save_checkpoint(random_model(CFG, seed=1), tmp_path / "base.safetensors", {"step": 3})
    card = (build_release(tmp_path / "release", base, name="x") / "README.md").read_text()
    assert "- data: not recorded" in card and "SlimPajama-627B" not in card
