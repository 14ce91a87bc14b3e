"""Model configuration and the named model presets (`tiny` .. `7b`).

Parameter counts are computed from the config alone, so `rwkv5 params --preset 7b` needs no memory.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, model_validator

from rwkv5.errors import ConfigError

__all__ = ["ModelConfig", "MODEL_PRESETS", "model_preset", "count_parameters", "count_matmul_parameters"]


class ModelConfig(BaseModel):
    """Shape of an RWKV v5.2 model. Field names follow RWKV-LM where it has one."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    n_layer: int
    """Number of blocks."""
    n_embd: int
    """Model width C."""
    head_size: int = 64
    """Channels per WKV head N; the number of heads is n_embd // head_size."""
    vocab_size: int = 65536
    """Vocabulary size. 65536 = the RWKV World tokenizer (ids fit uint16 exactly)."""
    dim_ffn: int | None = None
    """Channel-mix hidden width. Default: int(3.5 * n_embd) // 32 * 32, as RWKV-LM v5."""

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        for name in ("n_layer", "n_embd", "head_size", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be > 0, got {getattr(self, name)}")
        if self.n_embd % self.head_size:
            raise ConfigError(
                f"model.n_embd ({self.n_embd}) must be a multiple of model.head_size ({self.head_size})"
            )
        if self.dim_ffn is not None and self.dim_ffn <= 0:
            raise ConfigError(f"model.dim_ffn must be > 0, got {self.dim_ffn}")
        return self

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    @property
    def ffn(self) -> int:
        """The channel-mix width actually used."""
        return self.dim_ffn if self.dim_ffn is not None else int(3.5 * self.n_embd) // 32 * 32


MODEL_PRESETS: dict[str, ModelConfig] = {
    # Fast on 2 CPU cores; the vocabulary stays real so shards and tokenizer are the production ones.
    "tiny": ModelConfig(n_layer=2, n_embd=128, head_size=32),
    "169m": ModelConfig(n_layer=12, n_embd=768),
    "430m": ModelConfig(n_layer=24, n_embd=1024),
    "1b5": ModelConfig(n_layer=24, n_embd=2048),
    "3b": ModelConfig(n_layer=32, n_embd=2560),
    "7b": ModelConfig(n_layer=32, n_embd=4096, dim_ffn=14336),
}


def model_preset(name: str) -> ModelConfig:
    """Look up a model preset by name, with an error that lists the valid ones."""
    try:
        return MODEL_PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(MODEL_PRESETS)}") from None


def count_matmul_parameters(cfg: ModelConfig) -> int:
    """Weights that take part in a matrix product per token (blocks + head; not the embedding lookup).

    This is the N in the 6*N*tokens FLOP estimate used for MFU.
    """
    c, f = cfg.n_embd, cfg.ffn
    per_block = 5 * c * c + c * c + 2 * c * f  # att r,k,v,g,o; ffn receptance; ffn key + value
    return cfg.n_layer * per_block + cfg.vocab_size * c


def count_parameters(cfg: ModelConfig) -> int:
    """Exact number of parameters of `RWKV5(cfg)`, computed without building it."""
    c = cfg.n_embd
    per_block_vectors = (
        4 * c  # ln1, ln2 (weight + bias)
        + 4 * c  # att.time_mix_{k,v,r,g}
        + 2 * c  # att.time_decay, att.time_faaaa (H, N)
        + 2 * c  # att.ln_x
        + 2 * c  # ffn.time_mix_{k,r}
    )
    vectors = cfg.n_layer * per_block_vectors + 2 * c + 2 * c  # ln0 (block 0) and ln_out
    embeddings = cfg.vocab_size * c  # emb; head is a matmul and counted there
    return count_matmul_parameters(cfg) + embeddings + vectors
