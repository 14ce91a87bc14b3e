"""Model checkpoints on disk: our native safetensors file, and RWKV-LM `.pth` state dicts.

Native format: one safetensors file holding the state dict under RWKV-LM's key names, with the
`ModelConfig` as JSON in the file's metadata, so a file alone rebuilds its model. Loading never unpickles
arbitrary objects: safetensors has no code in it, and `.pth` files go through `torch.load(weights_only=True)`.
Every failure raises `CheckpointError` naming the file and, where it applies, the key.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import save_file

from data_prep.atomic import atomic_path
from rwkv5.config import ModelConfig
from rwkv5.errors import CheckpointError, ConfigError
from rwkv5.model import RWKV5

__all__ = [
    "FORMAT",
    "save_checkpoint",
    "save_state_dict",
    "read_checkpoint",
    "read_checkpoint_config",
    "load_checkpoint",
    "load_rwkv_pth",
    "config_from_state_dict",
    "model_from_state_dict",
]

# Written into every native checkpoint's metadata; bump the number when the layout changes.
FORMAT = "rwkv5-pipeline/1"
# How many offending key names an error message lists before it only counts the rest.
_MAX_LISTED = 8


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    config: ModelConfig,
    path: str | os.PathLike,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write a native checkpoint atomically.

    Args:
        state_dict: tensors under RWKV-LM key names (as `RWKV5.state_dict()` returns them).
        config (ModelConfig): the model's shape, stored so the file alone rebuilds the model.
        path: target file; parent folders are created.
        metadata (Mapping, optional): JSON-serialisable free-form facts (tokens seen, run name, ...).

    Returns:
        The path written.
    """
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    try:
        extra = json.dumps(dict(metadata or {}), sort_keys=True)
    except TypeError as exc:
        raise CheckpointError(f"{path}: checkpoint metadata is not JSON-serialisable: {exc}") from None
    header = {"format": FORMAT, "model_config": config.model_dump_json(), "metadata": extra}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return Path(path)


def save_checkpoint(model: RWKV5, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write `model` (weights and config) as a native checkpoint; see `save_state_dict`."""
    return save_state_dict(model.state_dict(), model.cfg, path, metadata)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ModelConfig, dict[str, Any]]:
    """Read a native checkpoint without building a model.

    Returns:
        (state_dict, config, metadata).

    Raises:
        CheckpointError: the file is missing, is not a safetensors file, is truncated or corrupt, or lacks
            our metadata.
    """
    header, state_dict = _open_native(Path(path), with_tensors=True)
    return state_dict, *_config_and_metadata(Path(path), header)


def read_checkpoint_config(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """The model config and metadata of a native checkpoint from its header: no tensor is read (a 7B's
    config without 15 GB of reads). Raises CheckpointError as `read_checkpoint` does."""
    header, _ = _open_native(Path(path), with_tensors=False)
    return _config_and_metadata(Path(path), header)


def _open_native(path: Path, with_tensors: bool) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    _check_is_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            if header.get("format") != FORMAT:
                found = header.get("format")
                raise CheckpointError(
                    f"{path}: not an rwkv5 checkpoint (safetensors metadata format={found!r}, "
                    f"expected {FORMAT!r}); for an exported model use the loader of its format"
                )
            state_dict = {key: f.get_tensor(key) for key in f.keys()} if with_tensors else {}
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises its own error types, OSError or ValueError by version
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint (corrupt or truncated?): {exc}") from None
    return header, state_dict


def _config_and_metadata(path: Path, header: dict[str, str]) -> tuple[ModelConfig, dict[str, Any]]:
    try:
        return ModelConfig.model_validate_json(header["model_config"]), json.loads(header.get("metadata") or "{}")
    except (KeyError, ValueError, ValidationError, ConfigError) as exc:
        raise CheckpointError(f"{path}: checkpoint metadata holds no valid model config: {exc}") from None


def load_checkpoint(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[RWKV5, dict[str, Any]]:
    """Build the model stored in a native checkpoint.

    Args:
        path: the checkpoint file.
        device: where the model goes. Default: "cpu".
        dtype (torch.dtype, optional): cast floating weights to this. Default: as stored.

    Returns:
        (model, metadata): the model in eval mode, and the free-form metadata saved with it.
    """
    state_dict, config, metadata = read_checkpoint(path)
    return model_from_state_dict(state_dict, config, path, device, dtype), metadata


def load_rwkv_pth(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> RWKV5:
    """Build a model from an RWKV-LM / `rwkv`-package `.pth` state dict (v5.2), inferring its config.

    Raises:
        CheckpointError: missing or unreadable file, pickled objects other than tensors, a file already
            converted by the `rwkv` package, or weights that are not an RWKV v5.2 model.
    """
    path = Path(path)
    _check_is_file(path)
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refused to load: it pickles objects other than tensors ({exc})") from None
    except Exception as exc:  # truncated zip, not a torch file at all, ...
        raise CheckpointError(f"{path}: not a readable .pth state dict (corrupt or truncated?): {exc}") from None
    if isinstance(state_dict, Mapping) and "_strategy" in state_dict:
        raise CheckpointError(
            f"{path}: this file was converted by the rwkv package for strategy "
            f"{state_dict['_strategy']!r}; load the original .pth instead"
        )
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{path}: expected a state dict (str -> Tensor), got {type(state_dict).__name__}")
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: key {key!r} holds a {type(value).__name__}, expected a tensor")
    config = config_from_state_dict(state_dict, path)
    return model_from_state_dict(state_dict, config, path, device, dtype)


def config_from_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike = "<state dict>") -> ModelConfig:
    """Infer the ModelConfig of an RWKV v5.2 state dict from its tensor shapes."""

    def need(key: str) -> torch.Tensor:
        if key not in state_dict:
            raise CheckpointError(f"{path}: missing key {key!r}; not an RWKV v5.2 state dict")
        return state_dict[key]

    vocab_size, n_embd = need("emb.weight").shape
    decay = need("blocks.0.att.time_decay")
    if decay.ndim != 2 or decay.shape[1] == 1:
        raise CheckpointError(
            f"{path}: blocks.0.att.time_decay has shape {tuple(decay.shape)}; RWKV v5.2 stores it as "
            "[n_head, head_size] (older v5 and v4 models are not supported)"
        )
    n_layer = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    dim_ffn = need("blocks.0.ffn.key.weight").shape[0]
    try:
        config = ModelConfig(n_layer=n_layer, n_embd=n_embd, head_size=decay.shape[1], vocab_size=vocab_size)
        if config.ffn != dim_ffn:
            config = config.model_copy(update={"dim_ffn": dim_ffn})
    except (ValidationError, ConfigError) as exc:
        raise CheckpointError(f"{path}: tensor shapes give no valid model config: {exc}") from None
    return config


def model_from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    config: ModelConfig,
    path: str | os.PathLike = "<state dict>",
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> RWKV5:
    """Build `RWKV5(config)` holding exactly these weights, after checking every key and shape.

    The model is built on the meta device and then takes the tensors over, so no time goes into an
    initialisation that would be overwritten: orthogonal init of the 65536-row head alone takes seconds
    of CPU for the tiny preset, minutes for the 7B.
    """
    with torch.device("meta"):
        model = RWKV5(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    _check_keys_and_shapes(state_dict, expected, path)
    model.load_state_dict(dict(state_dict), assign=True)
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model.to(device).eval()


def _check_is_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: is not a file")


def _listing(keys: list[str]) -> str:
    shown = ", ".join(sorted(keys)[:_MAX_LISTED])
    more = len(keys) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def _check_keys_and_shapes(
    state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], path: str | os.PathLike
) -> None:
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if problems:
        raise CheckpointError(f"{path}: does not match the model ({'; '.join(problems)})")
    for key, shape in expected.items():
        found = tuple(state_dict[key].shape)
        if found != shape:
            raise CheckpointError(f"{path}: key {key!r} has shape {found} in the file, the model expects {shape}")
        if not state_dict[key].is_floating_point():
            raise CheckpointError(f"{path}: key {key!r} has dtype {state_dict[key].dtype}, expected floating point")
