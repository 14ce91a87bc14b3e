"""Exports of a trained model to formats other tools load, with the one table of key names between them.

Formats:
    "rwkv-pth": what the `rwkv` PyPI package (ChatRWKV) and RWKV-LM load: a plain `torch.save` of the state
        dict. Our model uses RWKV-LM's key names and shapes natively, so the names pass through unchanged.
    "safetensors": a Hugging Face folder: `model.safetensors` under the key names of the Hugging Face RWKV5
        port (`Rwkv5ForCausalLM`, table `HF_NAMES`), our own modeling, configuration and tokenizer code for
        `trust_remote_code` (`rwkv5/hf/`, copied in), the tokenizer's vocabulary and `tokenizer_config.json`,
        and a `config.json` with `auto_map` that also records our `ModelConfig`, so `load_safetensors_export`
        rebuilds the model exactly and transformers loads the folder:

            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)

An export reads only the checkpoint's tensors; no model is built, so it needs no more memory than the weights.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import save_file

from data_prep.atomic import atomic_path, atomic_write_text
from data_prep.tokenizer import DEFAULT_VOCAB_PATH
from rwkv5.checkpoint import model_from_state_dict, read_checkpoint
from rwkv5.config import ModelConfig
from rwkv5.errors import CheckpointError, ConfigError
from rwkv5.model import HEAD_SIZE_DIVISOR, RWKV5

__all__ = [
    "FORMATS",
    "DTYPES",
    "HF_NAMES",
    "SAFETENSORS_FILE",
    "CONFIG_FILE",
    "HF_CODE_DIR",
    "HF_CODE_FILES",
    "HF_AUTO_MAP",
    "to_format_names",
    "from_format_names",
    "export_rwkv_pth",
    "export_safetensors",
    "export_checkpoint",
    "load_safetensors_export",
]

FORMATS = ("rwkv-pth", "safetensors")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SAFETENSORS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# Code for transformers' `trust_remote_code`, kept as real modules in the package and copied into each folder.
HF_CODE_DIR = Path(__file__).parent / "hf"
HF_CODE_FILES = ("configuration_rwkv5.py", "modeling_rwkv5.py", "tokenization_rwkv5.py")
HF_AUTO_MAP = {
    "AutoConfig": "configuration_rwkv5.Rwkv5Config",
    "AutoModel": "modeling_rwkv5.Rwkv5Model",
    "AutoModelForCausalLM": "modeling_rwkv5.Rwkv5ForCausalLM",
    "AutoTokenizer": ["tokenization_rwkv5.Rwkv5Tokenizer", None],
}
# LayerNorm eps; the GroupNorm of each time mix uses it on y / HEAD_SIZE_DIVISOR (eps 64e-5 on y itself).
LAYER_NORM_EPS = 1e-5

# Our (= RWKV-LM) key prefixes and the Hugging Face RWKV5 port's. `{i}` is the block index. The first row whose
# prefix matches renames a key, in either direction, so specific rows come before general ones.
HF_NAMES: tuple[tuple[str, str], ...] = (
    ("emb.", "rwkv.embeddings."),
    ("blocks.{i}.ln0.", "rwkv.blocks.{i}.pre_ln."),
    ("blocks.{i}.att.time_mix_k", "rwkv.blocks.{i}.attention.time_mix_key"),
    ("blocks.{i}.att.time_mix_v", "rwkv.blocks.{i}.attention.time_mix_value"),
    ("blocks.{i}.att.time_mix_r", "rwkv.blocks.{i}.attention.time_mix_receptance"),
    ("blocks.{i}.att.time_mix_g", "rwkv.blocks.{i}.attention.time_mix_gate"),
    ("blocks.{i}.att.", "rwkv.blocks.{i}.attention."),
    ("blocks.{i}.ffn.time_mix_k", "rwkv.blocks.{i}.feed_forward.time_mix_key"),
    ("blocks.{i}.ffn.time_mix_r", "rwkv.blocks.{i}.feed_forward.time_mix_receptance"),
    ("blocks.{i}.ffn.", "rwkv.blocks.{i}.feed_forward."),
    ("blocks.{i}.", "rwkv.blocks.{i}."),
    ("ln_out.", "rwkv.ln_out."),
    ("head.", "head."),
)
_TABLES = {"rwkv-pth": None, "safetensors": HF_NAMES}


def _compile(prefix: str) -> re.Pattern:
    return re.compile("^" + re.escape(prefix).replace(re.escape("{i}"), r"(?P<i>\d+)"))


def _rename(name: str, rows: tuple[tuple[str, str], ...], reverse: bool) -> str:
    for ours, theirs in rows:
        src, dst = (theirs, ours) if reverse else (ours, theirs)
        m = _compile(src).match(name)
        if m:
            head = dst.replace("{i}", m.group("i")) if "i" in m.groupdict() else dst
            return head + name[m.end():]
    raise CheckpointError(f"key {name!r} has no entry in the name table")


def _table(fmt: str) -> tuple[tuple[str, str], ...] | None:
    if fmt not in _TABLES:
        raise ConfigError(f"export.format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    return _TABLES[fmt]


def to_format_names(state_dict: Mapping[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """Rename our keys to `fmt`'s (the tensors are shared, not copied)."""
    rows = _table(fmt)
    return dict(state_dict) if rows is None else {_rename(k, rows, False): v for k, v in state_dict.items()}


def from_format_names(state_dict: Mapping[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """Rename `fmt`'s keys back to ours."""
    rows = _table(fmt)
    return dict(state_dict) if rows is None else {_rename(k, rows, True): v for k, v in state_dict.items()}


def _cast(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in state_dict.items()}


def export_rwkv_pth(
    state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16
) -> Path:
    """Write the `.pth` that the `rwkv` package and RWKV-LM load. Default dtype bf16, as RWKV releases are."""
    tensors = _cast(to_format_names(state_dict, "rwkv-pth"), dtype)
    with atomic_path(path) as tmp:
        torch.save(tensors, tmp)
    return Path(path)


def _hf_config(config: ModelConfig, dtype: torch.dtype) -> dict:
    """config.json in the vocabulary of the Hugging Face RWKV5 port (`rwkv5/hf/configuration_rwkv5.py` reads it),
    plus our own config under `rwkv5_pipeline`.

    The time mix's normalisation is stated for every reading: `head_size_divisor` with `layer_norm_epsilon` (y / 8,
    eps 1e-5, as RWKV-LM and our model) and `group_norm_epsilon` (the same on y itself, 64e-5). The published
    port's defaults differ where it reads a missing field (`rescale_every` 6), so every field is written.
    """
    return {
        "architectures": ["Rwkv5ForCausalLM"],
        "model_type": "rwkv5",
        "auto_map": HF_AUTO_MAP,
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "num_hidden_layers": config.n_layer,
        "attention_hidden_size": config.n_embd,
        "head_size": config.head_size,
        "num_attention_heads": config.n_head,
        "head_size_divisor": HEAD_SIZE_DIVISOR,
        "intermediate_size": config.ffn,
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "group_norm_epsilon": LAYER_NORM_EPS * HEAD_SIZE_DIVISOR**2,
        "rescale_every": 0,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "rwkv5_pipeline": {"model_config": config.model_dump()},
    }


def _tokenizer_config(config: ModelConfig) -> dict:
    return {
        "tokenizer_class": "Rwkv5Tokenizer",
        "auto_map": {"AutoTokenizer": HF_AUTO_MAP["AutoTokenizer"]},
        "vocab_size": config.vocab_size,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2**63 - 1,  # an RNN: no context limit
    }


def _write_hf_code(out_dir: Path, config: ModelConfig, vocab_path: Path) -> None:
    """The remote code, the vocabulary and tokenizer_config.json, for transformers' Auto classes."""
    for name in HF_CODE_FILES:
        with atomic_path(out_dir / name) as tmp:
            shutil.copyfile(HF_CODE_DIR / name, tmp)
    with atomic_path(out_dir / vocab_path.name) as tmp:
        shutil.copyfile(vocab_path, tmp)
    atomic_write_text(out_dir / TOKENIZER_CONFIG_FILE,
                      json.dumps(_tokenizer_config(config), indent=2) + "\n")


def export_safetensors(
    state_dict: Mapping[str, torch.Tensor],
    config: ModelConfig,
    out_dir: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    vocab_path: str | os.PathLike = DEFAULT_VOCAB_PATH,
) -> Path:
    """Write the Hugging Face folder `out_dir`: weights, remote code, tokenizer, then `config.json`.

    config.json is written last, so a folder that has it is complete.

    Args:
        state_dict: our (RWKV-LM) key names.
        config: the model's shape.
        out_dir: the folder (created if needed).
        dtype: the weights' dtype. Default: bf16.
        vocab_path: the tokenizer vocabulary copied in. Default: the shipped RWKV World vocabulary.
    """
    out_dir = Path(out_dir)
    vocab_path = Path(vocab_path)
    if not vocab_path.is_file():
        raise CheckpointError(f"{vocab_path}: tokenizer vocabulary not found")
    if vocab_path.name != DEFAULT_VOCAB_PATH.name:
        raise CheckpointError(f"{vocab_path}: the transformers tokenizer (rwkv5/hf/tokenization_rwkv5.py) reads "
                              f"the RWKV World vocabulary {DEFAULT_VOCAB_PATH.name}, not another file")
    tensors = _cast(to_format_names(state_dict, "safetensors"), dtype)
    with atomic_path(out_dir / SAFETENSORS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    _write_hf_code(out_dir, config, vocab_path)
    atomic_write_text(out_dir / CONFIG_FILE, json.dumps(_hf_config(config, dtype), indent=2) + "\n")
    return out_dir


def export_checkpoint(
    ckpt_path: str | os.PathLike, fmt: str, out: str | os.PathLike, dtype: torch.dtype = torch.bfloat16
) -> Path:
    """Export a native checkpoint file to `fmt` ("rwkv-pth": a file; "safetensors": a folder) at `out`."""
    _table(fmt)
    state_dict, config, _ = read_checkpoint(ckpt_path)
    if fmt == "rwkv-pth":
        return export_rwkv_pth(state_dict, out, dtype)
    return export_safetensors(state_dict, config, out, dtype)


def load_safetensors_export(
    out_dir: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> RWKV5:
    """Rebuild the model from a folder written by `export_safetensors`."""
    out_dir = Path(out_dir)
    config_path, weights_path = out_dir / CONFIG_FILE, out_dir / SAFETENSORS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file; not a complete safetensors export")
    try:
        config = ModelConfig.model_validate(json.loads(config_path.read_text())["rwkv5_pipeline"]["model_config"])
    except (KeyError, TypeError, ValueError, ValidationError, ConfigError) as exc:
        raise CheckpointError(f"{config_path}: holds no valid rwkv5_pipeline.model_config: {exc}") from None
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            hf_state = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # safetensors' own error types differ by version
        raise CheckpointError(f"{weights_path}: not a readable safetensors file (corrupt or truncated?): {exc}") from None
    try:
        state_dict = from_format_names(hf_state, "safetensors")
    except CheckpointError as exc:
        raise CheckpointError(f"{weights_path}: {exc}") from None
    return model_from_state_dict(state_dict, config, weights_path, device, dtype)
