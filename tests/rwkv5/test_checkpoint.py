"""Native checkpoints and RWKV-LM .pth loading: exact round trips, and errors that name file and key."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import rwkv5.checkpoint as ckpt
from rwkv5.checkpoint import (load_checkpoint, load_rwkv_pth, read_checkpoint, read_checkpoint_config, save_checkpoint,
                              save_state_dict)
from rwkv5.config import ModelConfig
from rwkv5.errors import CheckpointError
from rwkv5.model import RWKV5

CFG = ModelConfig(n_layer=2, n_embd=64, head_size=16, vocab_size=100)


@pytest.fixture(scope="module")
def model():
    return RWKV5(CFG)


@pytest.fixture
def saved(model, tmp_path):
    return save_checkpoint(model, tmp_path / "model.safetensors", {"tokens_seen": 1234, "run": "t"})


def assert_same_weights(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_round_trip_is_exact(model, saved):
    loaded, metadata = load_checkpoint(saved)
    assert loaded.cfg == CFG
    assert metadata == {"tokens_seen": 1234, "run": "t"}
    assert not loaded.training
    assert_same_weights(model.state_dict(), loaded.state_dict())
    assert os.listdir(saved.parent) == ["model.safetensors"]  # no temporary file left behind


def test_dtype_is_kept_or_cast(model, tmp_path):
    path = save_state_dict({k: v.bfloat16() for k, v in model.state_dict().items()}, CFG, tmp_path / "bf16.st")
    as_stored, _ = load_checkpoint(path)
    assert {p.dtype for p in as_stored.parameters()} == {torch.bfloat16}
    cast, _ = load_checkpoint(path, dtype=torch.float32)
    assert {p.dtype for p in cast.parameters()} == {torch.float32}


def test_failed_save_keeps_the_previous_file(model, saved, monkeypatch):
    before = saved.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, saved)
    assert saved.read_bytes() == before
    assert os.listdir(saved.parent) == [saved.name]


def test_metadata_must_be_json(model, tmp_path):
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(model, tmp_path / "m.st", {"bad": object()})
    assert not (tmp_path / "m.st").exists()


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path):
    path.write_bytes(b"this is not a checkpoint at all")


def _foreign_safetensors(path):
    save_file({"x": torch.zeros(2)}, str(path))


def _bad_config(path):
    state_dict, _, _ = read_checkpoint(path)
    save_file(state_dict, str(path), metadata={"format": ckpt.FORMAT, "model_config": '{"n_layer": -1}'})


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.unlink(), "no such checkpoint file"),
        (_truncate, "corrupt or truncated"),
        (_garbage, "corrupt or truncated"),
        (_foreign_safetensors, "not an rwkv5 checkpoint"),
        (_bad_config, "no valid model config"),
    ],
    ids=["missing", "truncated", "garbage", "foreign", "bad-config"],
)
def test_unreadable_files_raise_checkpoint_error_naming_the_file(saved, damage, message):
    damage(saved)
    for reader in (load_checkpoint, read_checkpoint_config):
        with pytest.raises(CheckpointError, match=message) as info:
            reader(saved)
        assert str(saved) in str(info.value)


def test_config_is_read_from_the_header_alone(saved):
    _, want_config, want_meta = read_checkpoint(saved)
    assert read_checkpoint_config(saved) == (want_config, want_meta)


def test_directory_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a file"):
        load_checkpoint(tmp_path)


def _rewrite(path, edit):
    state_dict, config, _ = read_checkpoint(path)
    edit(state_dict)
    save_state_dict(state_dict, config, path)


def test_missing_and_unexpected_keys_are_listed(saved):
    def edit(sd):
        del sd["blocks.1.att.gate.weight"]
        sd["blocks.1.att.extra"] = torch.zeros(3)

    _rewrite(saved, edit)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(saved)
    msg = str(info.value)
    assert str(saved) in msg
    assert "missing keys: blocks.1.att.gate.weight" in msg
    assert "unexpected keys: blocks.1.att.extra" in msg


def test_shape_mismatch_names_key_and_both_shapes(saved):
    _rewrite(saved, lambda sd: sd.update({"blocks.0.ffn.key.weight": torch.zeros(192, 32)}))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(saved)
    msg = str(info.value)
    assert str(saved) in msg and "'blocks.0.ffn.key.weight'" in msg
    assert "(192, 32)" in msg and "(224, 64)" in msg


def test_rwkv_pth_round_trip_infers_config(tmp_path):
    cfg = ModelConfig(n_layer=3, n_embd=96, head_size=32, vocab_size=50, dim_ffn=128)
    original = RWKV5(cfg)
    path = tmp_path / "rwkv.pth"
    torch.save(original.state_dict(), path)
    loaded = load_rwkv_pth(path)
    assert loaded.cfg == cfg
    assert_same_weights(original.state_dict(), loaded.state_dict())


def test_rwkv_pth_default_ffn_is_not_recorded(model, tmp_path):
    path = tmp_path / "rwkv.pth"
    torch.save(model.state_dict(), path)
    assert load_rwkv_pth(path).cfg.dim_ffn is None


class NotATensor:
    pass


@pytest.mark.parametrize(
    "content, message",
    [
        ({"emb.weight": NotATensor()}, "refused to load"),
        ([torch.zeros(2)], "expected a state dict"),
        ({"_strategy": "cpu fp32", "emb.weight": torch.zeros(2)}, "converted by the rwkv package"),
        ({"emb.weight": torch.zeros(10, 8), "blocks.0.att.time_decay": torch.zeros(8)}, "v5.2"),
        ({"emb.weight": torch.zeros(10, 8)}, "missing key 'blocks.0.att.time_decay'"),
    ],
    ids=["pickled-object", "not-a-dict", "converted", "v5.1", "incomplete"],
)
def test_rwkv_pth_errors(tmp_path, content, message):
    path = tmp_path / "bad.pth"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=message) as info:
        load_rwkv_pth(path)
    assert str(path) in str(info.value)


def test_rwkv_pth_truncated(model, tmp_path):
    path = tmp_path / "cut.pth"
    torch.save(model.state_dict(), path)
    _truncate(path)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_rwkv_pth(path)


def test_metadata_is_stored_as_json(saved):
    from safetensors import safe_open

    with safe_open(str(saved), framework="pt") as f:
        header = f.metadata()
    assert json.loads(header["model_config"])["n_embd"] == CFG.n_embd
    assert header["format"] == ckpt.FORMAT
