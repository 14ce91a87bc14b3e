"""Configuration of an RWKV v5.2 release for Hugging Face transformers (`trust_remote_code=True`).

Written by rwkv5-pipeline and copied into every release's Hugging Face folder next to `modeling_rwkv5.py`, so it
imports only transformers: people load the folder without our package installed.

The output normalisation of each time mix is where RWKV v5 ports disagree, so the config states it three ways:
the model divides the WKV output y by `head_size_divisor` (8) and applies GroupNorm with `layer_norm_epsilon`
(1e-5), which is GroupNorm with eps `group_norm_epsilon` (64e-5) on y itself. A port that normalises y directly
must use `group_norm_epsilon`; eps 1e-5 on y gives different logits.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

__all__ = ["Rwkv5Config"]


class Rwkv5Config(PreTrainedConfig):
    """Shape and conventions of an RWKV v5.2 ("Eagle", with gate) model.

    Field names are those of the published transformers RWKV5 port where it has them, so other ports read them.

    Args:
        vocab_size (int): token ids. Default: 65536 (the RWKV World tokenizer).
        hidden_size (int): model width C.
        num_hidden_layers (int): blocks.
        attention_hidden_size (int): width of the time mix; equal to hidden_size in v5.2. Default: hidden_size.
        head_size (int): channels per WKV head N. Default: 64.
        num_attention_heads (int): heads H = attention_hidden_size / head_size. Default: derived.
        head_size_divisor (int): the WKV output is divided by this before its GroupNorm. Default: 8.
        intermediate_size (int): channel-mix width. Default: int(3.5 * hidden_size) // 32 * 32, as RWKV-LM v5.
        layer_norm_epsilon (float): eps of every LayerNorm, and of the GroupNorm of y / head_size_divisor.
            Default: 1e-5.
        group_norm_epsilon (float): the same GroupNorm stated on the undivided y:
            layer_norm_epsilon * head_size_divisor ** 2. Default: derived (64e-5).
        rescale_every (int): 0: no layer rescaling at inference (the published port defaults to 6; this model
            was trained without it). Only 0 is accepted.
    """

    model_type = "rwkv5"

    vocab_size: int = 65536
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    attention_hidden_size: int | None = None
    head_size: int = 64
    num_attention_heads: int | None = None
    head_size_divisor: int = 8
    intermediate_size: int | None = None
    layer_norm_epsilon: float = 1e-5
    group_norm_epsilon: float | None = None
    rescale_every: int = 0
    bos_token_id: int | None = 0
    eos_token_id: int | None = 0
    tie_word_embeddings: bool = False
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        if self.attention_hidden_size is None:
            self.attention_hidden_size = self.hidden_size
        if self.num_attention_heads is None:
            self.num_attention_heads = self.attention_hidden_size // self.head_size
        if self.intermediate_size is None:
            self.intermediate_size = int(3.5 * self.hidden_size) // 32 * 32
        on_y = self.layer_norm_epsilon * self.head_size_divisor**2
        if self.group_norm_epsilon is None:
            self.group_norm_epsilon = on_y
        self._check(on_y)
        super().__post_init__(**kwargs)

    def _check(self, on_y: float) -> None:
        """Refuse a config this model cannot honour, instead of computing something else."""
        if self.attention_hidden_size != self.hidden_size:
            raise ValueError(f"rwkv5 config: attention_hidden_size ({self.attention_hidden_size}) must equal "
                             f"hidden_size ({self.hidden_size}) in RWKV v5.2")
        if self.num_attention_heads * self.head_size != self.attention_hidden_size:
            raise ValueError(f"rwkv5 config: num_attention_heads ({self.num_attention_heads}) x head_size "
                             f"({self.head_size}) must equal attention_hidden_size ({self.attention_hidden_size})")
        if abs(self.group_norm_epsilon - on_y) > 1e-6 * on_y:
            raise ValueError(f"rwkv5 config: group_norm_epsilon ({self.group_norm_epsilon}) must equal "
                             f"layer_norm_epsilon x head_size_divisor^2 ({on_y})")
        if self.rescale_every != 0:
            raise ValueError(f"rwkv5 config: rescale_every is {self.rescale_every}; this model does not rescale "
                             "layers (0)")
