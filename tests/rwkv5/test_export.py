"""Exports: the name table, round trips of each format, and the `rwkv` package reproducing our logits."""

from __future__ import annotations

import json

import pytest
import torch

from rwkv5.checkpoint import load_rwkv_pth, save_checkpoint
from rwkv5.config import ModelConfig, model_preset
from rwkv5.errors import CheckpointError, ConfigError
from rwkv5.export import (
    export_checkpoint,
    export_rwkv_pth,
    export_safetensors,
    from_format_names,
    load_safetensors_export,
    to_format_names,
)
from rwkv5.infer import step

SMALL = ModelConfig(n_layer=3, n_embd=64, head_size=16, vocab_size=100)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def assert_same_weights(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def small(random_model):
    return random_model(SMALL)


def test_hf_names_round_trip_and_spot_checks(small):
    ours = small.state_dict()
    hf = to_format_names(ours, "safetensors")
    assert len(hf) == len(ours)
    assert from_format_names(hf, "safetensors").keys() == ours.keys()
    for a, b in [
        ("emb.weight", "rwkv.embeddings.weight"),
        ("blocks.0.ln0.bias", "rwkv.blocks.0.pre_ln.bias"),
        ("blocks.2.ln1.weight", "rwkv.blocks.2.ln1.weight"),
        ("blocks.1.att.time_mix_g", "rwkv.blocks.1.attention.time_mix_gate"),
        ("blocks.1.att.time_faaaa", "rwkv.blocks.1.attention.time_faaaa"),
        ("blocks.2.att.ln_x.weight", "rwkv.blocks.2.attention.ln_x.weight"),
        ("blocks.0.ffn.time_mix_r", "rwkv.blocks.0.feed_forward.time_mix_receptance"),
        ("blocks.0.ffn.value.weight", "rwkv.blocks.0.feed_forward.value.weight"),
        ("ln_out.weight", "rwkv.ln_out.weight"),
        ("head.weight", "head.weight"),
    ]:
        assert hf[b] is ours[a]
    assert to_format_names(ours, "rwkv-pth").keys() == ours.keys()


def test_name_table_rejects_unknown_keys_and_formats():
    with pytest.raises(CheckpointError, match="no entry"):
        to_format_names({"blocks.0.att.mystery": torch.zeros(1), "extra.weight": torch.zeros(1)}, "safetensors")
    with pytest.raises(ConfigError, match="export.format"):
        to_format_names({}, "gguf")


def test_rwkv_pth_round_trip(small, tmp_path):
    path = export_rwkv_pth(small.state_dict(), tmp_path / "m.pth", dtype=torch.float32)
    assert_same_weights(small.state_dict(), load_rwkv_pth(path).state_dict())


def test_rwkv_pth_bf16_is_a_plain_state_dict(small, tmp_path):
    path = export_rwkv_pth(small.state_dict(), tmp_path / "m.pth")
    raw = torch.load(path, weights_only=True)
    assert type(raw) is dict and raw.keys() == small.state_dict().keys()
    assert {v.dtype for v in raw.values()} == {torch.bfloat16}
    assert torch.equal(raw["head.weight"], small.head.weight.bfloat16())


def test_safetensors_round_trip(small, tmp_path):
    out = export_safetensors(small.state_dict(), SMALL, tmp_path / "hf", dtype=torch.float32)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "rwkv5"
    assert (config["hidden_size"], config["num_hidden_layers"], config["head_size"]) == (64, 3, 16)
    assert config["intermediate_size"] == SMALL.ffn and config["vocab_size"] == 100
    loaded = load_safetensors_export(out)
    assert loaded.cfg == SMALL
    assert_same_weights(small.state_dict(), loaded.state_dict())


def test_safetensors_export_incomplete_folder(small, tmp_path):
    out = export_safetensors(small.state_dict(), SMALL, tmp_path / "hf")
    (out / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: no such file"):
        load_safetensors_export(out)


def test_export_checkpoint_from_native_file(small, tmp_path):
    native = save_checkpoint(small, tmp_path / "native.safetensors")
    pth = export_checkpoint(native, "rwkv-pth", tmp_path / "out.pth", torch.float32)
    assert_same_weights(small.state_dict(), torch.load(pth, weights_only=True))
    folder = export_checkpoint(native, "safetensors", tmp_path / "hf", torch.float32)
    assert_same_weights(small.state_dict(), load_safetensors_export(folder).state_dict())
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        export_checkpoint(tmp_path / "absent.safetensors", "rwkv-pth", tmp_path / "x.pth")


@pytest.fixture(scope="module")
def rwkv_package():
    """ChatRWKV's `rwkv.model.RWKV`, pure PyTorch on CPU (env read at import and in forward)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RWKV_JIT_ON", "0")
        mp.setenv("RWKV_CUDA_ON", "0")
        from rwkv.model import RWKV

        yield RWKV


@pytest.fixture(scope="module")
def interop(random_model, rwkv_package, tmp_path_factory):
    """Our tiny-preset model with random weights, and the `rwkv` package's load of its fp32 export."""
    ours = random_model(model_preset("tiny"))
    path = export_rwkv_pth(ours.state_dict(), tmp_path_factory.mktemp("interop") / "tiny.pth", torch.float32)
    return ours, rwkv_package(model=str(path), strategy="cpu fp32")


PROMPT = [11, 65529, 3, 1000, 42, 42, 7, 30000, 5, 0, 123, 64000, 9]


def test_rwkv_package_detects_v5_2(interop):
    ours, theirs = interop
    assert theirs.version == 5.2
    assert (theirs.args.n_layer, theirs.args.n_embd, theirs.args.n_head) == (2, 128, 4)


def test_rwkv_package_sequence_mode_matches(interop):
    ours, theirs = interop
    with torch.no_grad():
        logits, state = ours(torch.tensor([PROMPT]), return_state=True)
    their_logits, their_state = theirs.forward(PROMPT, None, full_output=True)
    assert rel_err(their_logits, logits[0]) < 1e-5
    last, _ = theirs.forward(PROMPT, None)
    assert rel_err(last, logits[0, -1]) < 1e-5
    for i in range(ours.cfg.n_layer):
        assert rel_err(their_state[3 * i], state.att_shift[i, 0]) < 1e-5
        assert rel_err(their_state[3 * i + 1], state.wkv[i, 0]) < 1e-5
        assert rel_err(their_state[3 * i + 2], state.ffn_shift[i, 0]) < 1e-5


def test_rwkv_package_token_mode_matches(interop):
    ours, theirs = interop
    with torch.no_grad():
        parallel = ours(torch.tensor([PROMPT]))[0]
    their_state, our_state, theirs_rows, ours_rows = None, None, [], []
    for token in PROMPT:
        out, their_state = theirs.forward([token], their_state)
        theirs_rows.append(out)
        out, our_state = step(ours, token, our_state)
        ours_rows.append(out)
    assert rel_err(torch.stack(theirs_rows), parallel) < 1e-5
    assert rel_err(torch.stack(theirs_rows), torch.stack(ours_rows)) < 1e-5


def test_interop_is_not_trivially_satisfied(interop):
    """The comparison means something only if different inputs give clearly different logits."""
    ours, _ = interop
    with torch.no_grad():
        a = ours(torch.tensor([PROMPT]))[0, -1]
        b = ours(torch.tensor([PROMPT[::-1]]))[0, -1]
    assert rel_err(a, b) > 1e-2


def run_cli(*args):
    from typer.testing import CliRunner

    from rwkv5_app.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_export_both_formats(small, tmp_path):
    native = save_checkpoint(small, tmp_path / "native.safetensors")
    result = run_cli("export", "--ckpt", native, "--format", "rwkv-pth", "--out", tmp_path / "m.pth", "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    assert_same_weights(small.state_dict(), torch.load(tmp_path / "m.pth", weights_only=True))
    result = run_cli("export", "--ckpt", native, "--format", "safetensors", "--out", tmp_path / "hf")
    assert result.exit_code == 0, result.output
    loaded = load_safetensors_export(tmp_path / "hf")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}  # the release default


@pytest.mark.parametrize(
    "args, message",
    [
        (["--format", "gguf"], "export.format"),
        (["--format", "rwkv-pth", "--dtype", "int8"], "export.dtype"),
    ],
    ids=["format", "dtype"],
)
def test_cli_export_rejects_bad_options(small, tmp_path, args, message):
    native = save_checkpoint(small, tmp_path / "native.safetensors")
    result = run_cli("export", "--ckpt", native, "--out", tmp_path / "out", *args)
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and message in result.stderr


def test_cli_export_missing_checkpoint(tmp_path):
    result = run_cli("export", "--ckpt", tmp_path / "nope.safetensors", "--format", "rwkv-pth", "--out", tmp_path / "o.pth")
    assert result.exit_code == 1
    assert "nope.safetensors: no such checkpoint file" in result.stderr
