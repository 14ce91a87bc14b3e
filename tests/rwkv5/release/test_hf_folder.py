"""A release's Hugging Face folder in transformers: AutoModel logits, greedy generation, the recurrent path and the
tokenizer, each against our own code (`rwkv5.model`, `rwkv5 generate`, `data_prep.tokenizer`)."""

from __future__ import annotations

import ast
import json

import pytest
import torch

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from data_prep.tokenizer import load_tokenizer
from rwkv5.checkpoint import save_checkpoint
from rwkv5.config import ModelConfig
from rwkv5.export import HF_CODE_DIR, HF_CODE_FILES, export_safetensors
from rwkv5.infer import generate
from rwkv5.release.publish import MANIFEST, build_release
from tests.rwkv5.test_export import rel_err, run_cli

# Small vocabularies where the tokenizer is not involved; 3 layers so that block 0's pre_ln and later blocks both
# count; T = 77 spans whole and partial WKV chunks.
HEAD_SIZES = {"head64": ModelConfig(n_layer=3, n_embd=128, head_size=64, vocab_size=100),
              "head32": ModelConfig(n_layer=3, n_embd=128, head_size=32, vocab_size=100)}
# The real vocabulary, for generation and the tokenizer.
WORLD = ModelConfig(n_layer=2, n_embd=64, head_size=32, vocab_size=65536)
MIXED_TEXT = [
    "Hello, world! The quick brown fox jumps over the lazy dog.\n",
    "  leading spaces,\ttabs\tand\r\nCRLF line ends\n\n\n",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code\n",
    "Numbers 3.14159 2026-05-01 1,000,000 and emoji 🤗🚀👩‍💻",
    "中文文本，日本語のテキスト、한국어 텍스트。",
    "Ünïcödé àccents, Ελληνικά, русский текст, עברית, العربية",
    "",
]


def _export(model, cfg, folder, dtype=torch.float32):
    export_safetensors(model.state_dict(), cfg, folder, dtype)
    return folder


@pytest.fixture(scope="module", params=list(HEAD_SIZES), ids=list(HEAD_SIZES))
def pair(request, random_model, tmp_path_factory):
    """Our perturbed model (every parameter non-trivial) and transformers' load of its fp32 folder."""
    cfg = HEAD_SIZES[request.param]
    ours = random_model(cfg, seed=3)
    folder = _export(ours, cfg, tmp_path_factory.mktemp(request.param))
    theirs, info = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    return ours, theirs.eval(), info, folder


@pytest.fixture(scope="module")
def world(random_model, tmp_path_factory):
    """A model with the real vocabulary: its native checkpoint and its folder."""
    root = tmp_path_factory.mktemp("world")
    ours = random_model(WORLD, seed=5)
    return ours, save_checkpoint(ours, root / "native.safetensors"), _export(ours, WORLD, root / "hf")


@pytest.fixture(scope="module")
def hf_tokenizer(world):
    return AutoTokenizer.from_pretrained(world[2], trust_remote_code=True)


def test_folder_carries_code_and_a_complete_config(pair):
    ours, _, _, folder = pair
    cfg = ours.cfg
    config = json.loads((folder / "config.json").read_text())
    assert set(config["auto_map"]) >= {"AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"}
    assert (config["head_size"], config["num_attention_heads"]) == (cfg.head_size, cfg.n_head)
    assert config["num_attention_heads"] * config["head_size"] == config["hidden_size"] == cfg.n_embd
    assert config["intermediate_size"] == cfg.ffn and config["rescale_every"] == 0
    assert (config["head_size_divisor"], config["layer_norm_epsilon"]) == (8, 1e-5)
    assert config["group_norm_epsilon"] == pytest.approx(64e-5)
    for name in HF_CODE_FILES:
        code = (folder / name).read_text()
        assert code == (HF_CODE_DIR / name).read_text()
        # Standalone: users load the folder without our package.
        imported = {n.names[0].name if isinstance(n, ast.Import) else n.module
                    for n in ast.walk(ast.parse(code)) if isinstance(n, (ast.Import, ast.ImportFrom)) and not
                    (isinstance(n, ast.ImportFrom) and n.level)}
        assert {m.split(".")[0] for m in imported} <= {"__future__", "ast", "dataclasses", "os", "torch",
                                                        "transformers"}, name
    loaded = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert type(loaded).__name__ == "Rwkv5Config" and loaded.num_attention_heads == cfg.n_head


def test_automodel_loads_every_key_and_gives_our_logits(pair):
    ours, theirs, info, _ = pair
    assert type(theirs).__name__ == "Rwkv5ForCausalLM"
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert theirs.dtype == torch.float32
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 77))
    with torch.no_grad():
        ref, got = ours(ids), theirs(ids).logits
    assert rel_err(got, ref) < 1e-5
    # The bound is tight enough to see the normalisation convention: GroupNorm eps 1e-5 on y itself (what the
    # published port does) is off by far more.
    with torch.no_grad():
        for block in theirs.rwkv.blocks:
            block.attention.head_size_divisor, block.attention.ln_x.eps = 1, 1e-5
        wrong = theirs(ids).logits
        for block in theirs.rwkv.blocks:
            block.attention.head_size_divisor, block.attention.ln_x.eps = 8, 1e-5
    assert rel_err(wrong, ref) > 1e-4


def test_recurrent_path_equals_the_full_forward(pair):
    ours, theirs, _, _ = pair
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 77))
    with torch.no_grad():
        full = theirs(ids).logits
        _, our_state = ours(ids, return_state=True)
        state, pieces, sizes = None, [], []
        for a, b in [(0, 1), (1, 34), (34, 41), (41, 76), (76, 77)]:
            out = theirs(ids[:, a:b], state=state)
            state = out.state
            pieces.append(out.logits)
            sizes.append(sum(t.numel() for t in (state.att_shift, state.wkv, state.ffn_shift)))
    assert rel_err(torch.cat(pieces, dim=1), full) < 1e-5
    assert len(set(sizes)) == 1  # constant memory: the state does not grow with the tokens fed
    for name in ("att_shift", "wkv", "ffn_shift"):
        assert rel_err(getattr(state, name), getattr(our_state, name)) < 1e-5, name


def test_greedy_generate_equals_rwkv5_generate(world, hf_tokenizer):
    ours, native, folder = world
    prompt, n = "The capital of France is", 24
    result = run_cli("generate", "--ckpt", native, "--prompt", prompt, "--max-tokens", n, "--temperature", 0)
    assert result.exit_code == 0, result.output
    ref_ids = list(generate(ours, load_tokenizer(), prompt, n, temperature=0))
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    inputs = hf_tokenizer(prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    new = new[:new.index(0)] if 0 in new else new  # both stop at the end of document (id 0)
    assert new == ref_ids and len(set(new)) > 1
    assert hf_tokenizer.decode(new) + "\n" == result.stdout


def test_tokenizer_encodes_and_decodes_like_ours(hf_tokenizer):
    ours = load_tokenizer()
    for text in MIXED_TEXT + ["".join(MIXED_TEXT) * 3]:
        ids = hf_tokenizer.encode(text)
        assert ids == ours.encode(text), text
        assert hf_tokenizer.decode(ids) == ours.decode(ids) == text
    assert hf_tokenizer(MIXED_TEXT[:2])["input_ids"] == [ours.encode(t) for t in MIXED_TEXT[:2]]
    # Ids that stand for no bytes (end of document, unused padding) and half a character decode as ours do.
    odd = [0] + ours.encode("é🤗")[:-1] + [65530, 65535] + ours.encode(" ok")
    assert hf_tokenizer.decode(odd) == ours.decode(odd)
    with pytest.raises(ValueError, match="lone surrogate"):
        hf_tokenizer.encode("bad \ud800")


def test_release_folders_load_in_transformers(random_model, tmp_path):
    cfg = HEAD_SIZES["head32"]
    base = save_checkpoint(random_model(cfg, seed=7), tmp_path / "base.safetensors")
    folder = build_release(tmp_path / "rel", base, name="hf-m010")
    manifest = {f["path"] for f in json.loads((folder / MANIFEST).read_text())["files"]}
    assert {f"base/{name}" for name in HF_CODE_FILES} | {"base/tokenizer_config.json"} <= manifest
    model = AutoModelForCausalLM.from_pretrained(folder / "base", trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(folder / "base", trust_remote_code=True)
    assert model.dtype == torch.bfloat16 and tokenizer.encode("Hello") == load_tokenizer().encode("Hello")
    card = (folder / "README.md").read_text()
    assert 'AutoModelForCausalLM.from_pretrained("<release>/base", trust_remote_code=True)' in card
    assert "eps 64e-5 on y itself (`group_norm_epsilon`" in card and "`rescale_every: 0`" in card
