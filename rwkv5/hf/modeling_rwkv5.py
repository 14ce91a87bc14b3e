"""RWKV v5.2 ("Eagle", with gate) for Hugging Face transformers, read top to bottom: state, WKV, time mix,
channel mix, block, model, causal LM.

Written by rwkv5-pipeline and copied into every release's Hugging Face folder, so that

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

gives the pipeline's own logits. It imports only torch and transformers (people load the folder without our
package); parameter names are those of the folder's `model.safetensors`.

The model is an RNN: `forward(input_ids, state=...)` continues from the state after earlier tokens and returns
the state after its own (`output.state`), so a prompt of any length can be fed in pieces with memory that does
not grow with it, and `generate` feeds one token per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_rwkv5 import Rwkv5Config

__all__ = ["Rwkv5State", "Rwkv5Model", "Rwkv5ForCausalLM", "Rwkv5PreTrainedModel"]

# Steps per chunk of the WKV: within a chunk the recurrence is one batch of products, across chunks only the
# (N, N) state is carried.
WKV_CHUNK = 32


@dataclass
class Rwkv5State:
    """All the model remembers after a sequence; its size does not depend on the sequence's length.

    att_shift (Tensor): `(L, B, C)` last input of each time mix (token shift).
    wkv (Tensor): `(L, B, H, N, N)` float32 WKV state, [key channel, value channel] (float32: the decay is near 1).
    ffn_shift (Tensor): `(L, B, C)` last input of each channel mix.
    """

    att_shift: torch.Tensor
    wkv: torch.Tensor
    ffn_shift: torch.Tensor

    @classmethod
    def zeros(cls, config: Rwkv5Config, batch: int, device=None, dtype=torch.float32) -> "Rwkv5State":
        L, C = config.num_hidden_layers, config.hidden_size
        H, N = config.num_attention_heads, config.head_size
        return cls(torch.zeros(L, batch, C, device=device, dtype=dtype),
                   torch.zeros(L, batch, H, N, N, device=device, dtype=torch.float32),
                   torch.zeros(L, batch, C, device=device, dtype=dtype))


def wkv5(r, k, v, time_decay, time_faaaa, state):
    """The WKV5 recurrence in float32, a chunk of steps at a time.

    Per head, with w = exp(-exp(time_decay)) and u = time_faaaa:
        y_t = r_t (diag(u) k_t^T v_t + S_{t-1}),  S_t = diag(w) S_{t-1} + k_t^T v_t.
    Every decay factor is formed as exp(of a non-positive number), so strong decays underflow to 0 instead of
    overflowing.

    Args:
        r, k, v (Tensor): `(B, H, T, N)` float32.
        time_decay, time_faaaa (Tensor): `(H, N)` float32.
        state (Tensor): `(B, H, N, N)` float32.

    Returns:
        y `(B, H, T, N)` and the state after the last step `(B, H, N, N)`.
    """
    log_w = -torch.exp(time_decay)  # (H, N), log of the per-step decay
    ys = []
    for start in range(0, r.shape[2], WKV_CHUNK):
        rc, kc, vc = (x[:, :, start:start + WKV_CHUNK] for x in (r, k, v))
        steps = rc.shape[2]
        pos = torch.arange(steps, device=r.device, dtype=torch.float32)
        lag = pos[:, None] - pos[None, :] - 1  # (T, T): steps of decay from key position j to query position i
        decay = torch.exp(lag.clamp(min=0)[None, :, :, None] * log_w[:, None, None, :])  # (H, T, T, N)
        decay = decay * (lag >= 0)[None, :, :, None]
        scores = torch.einsum("bhin,bhjn,hijn->bhij", rc, kc, decay)
        bonus = torch.einsum("bhin,bhin,hn->bhi", rc, kc, time_faaaa)
        y = scores @ vc + bonus[..., None] * vc
        y = y + (rc * torch.exp(pos[:, None] * log_w[:, None, :])) @ state  # the state before the chunk
        k_to_end = kc * torch.exp((steps - 1 - pos)[:, None] * log_w[:, None, :])
        state = torch.exp(steps * log_w)[..., None] * state + k_to_end.transpose(-1, -2) @ vc
        ys.append(y)
    return torch.cat(ys, dim=2), state


def _time_shift(x, last):
    """x `(B, T, C)` one step back in time, with `last` `(B, C)` in front."""
    return torch.cat([last[:, None].to(x.dtype), x[:, :-1]], dim=1)


def _mix(x, shifted, weight):
    return x * weight + shifted * (1 - weight)


class Rwkv5SelfAttention(nn.Module):
    """Time mix: token shift, receptance/key/value/gate projections, WKV5, GroupNorm, gate, output."""

    def __init__(self, config: Rwkv5Config):
        super().__init__()
        C, H, N = config.hidden_size, config.num_attention_heads, config.head_size
        self.n_head, self.head_size = H, N
        self.head_size_divisor = config.head_size_divisor
        self.time_mix_key = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_value = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_receptance = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_gate = nn.Parameter(torch.empty(1, 1, C))
        self.time_decay = nn.Parameter(torch.empty(H, N))
        self.time_faaaa = nn.Parameter(torch.empty(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.gate = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        # Applied to y / head_size_divisor, as RWKV-LM: the same as eps group_norm_epsilon on y.
        self.ln_x = nn.GroupNorm(H, C, eps=config.layer_norm_epsilon)

    def forward(self, x, shift, wkv_state):
        """x `(B, T, C)` -> (out `(B, T, C)`, last input `(B, C)`, WKV state `(B, H, N, N)`)."""
        B, T, C = x.shape
        xx = _time_shift(x, shift)
        heads = (B, T, self.n_head, self.head_size)
        r = self.receptance(_mix(x, xx, self.time_mix_receptance)).view(heads).transpose(1, 2)
        k = self.key(_mix(x, xx, self.time_mix_key)).view(heads).transpose(1, 2)
        v = self.value(_mix(x, xx, self.time_mix_value)).view(heads).transpose(1, 2)
        g = F.silu(self.gate(_mix(x, xx, self.time_mix_gate)))
        y, wkv_state = wkv5(r.float(), k.float(), v.float(), self.time_decay.float(), self.time_faaaa.float(),
                            wkv_state)
        y = y.transpose(1, 2).reshape(B * T, C).to(x.dtype)
        y = self.ln_x(y / self.head_size_divisor).view(B, T, C)
        # The last input as a copy: a view would keep all of x `(B, T, C)` alive in the returned state.
        return self.output(y * g), x[:, -1].clone(), wkv_state


class Rwkv5FeedForward(nn.Module):
    """Channel mix: token shift, squared-ReLU key, value, sigmoid receptance gate."""

    def __init__(self, config: Rwkv5Config):
        super().__init__()
        C = config.hidden_size
        self.time_mix_key = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_receptance = nn.Parameter(torch.empty(1, 1, C))
        self.key = nn.Linear(C, config.intermediate_size, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(config.intermediate_size, C, bias=False)

    def forward(self, x, shift):
        """x `(B, T, C)` -> (out `(B, T, C)`, last input `(B, C)`)."""
        xx = _time_shift(x, shift)
        k = torch.relu(self.key(_mix(x, xx, self.time_mix_key))).square()
        return torch.sigmoid(self.receptance(_mix(x, xx, self.time_mix_receptance))) * self.value(k), x[:, -1].clone()


class Rwkv5Block(nn.Module):
    """Time mix then channel mix, each on a LayerNorm of the residual stream; block 0 first normalises the
    embedding (pre_ln)."""

    def __init__(self, config: Rwkv5Config, layer_id: int):
        super().__init__()
        C, eps = config.hidden_size, config.layer_norm_epsilon
        if layer_id == 0:
            self.pre_ln = nn.LayerNorm(C, eps=eps)
        self.ln1 = nn.LayerNorm(C, eps=eps)
        self.ln2 = nn.LayerNorm(C, eps=eps)
        self.attention = Rwkv5SelfAttention(config)
        self.feed_forward = Rwkv5FeedForward(config)

    def forward(self, x, att_shift, wkv_state, ffn_shift):
        if hasattr(self, "pre_ln"):
            x = self.pre_ln(x)
        dx, att_shift, wkv_state = self.attention(self.ln1(x), att_shift, wkv_state)
        x = x + dx
        dx, ffn_shift = self.feed_forward(self.ln2(x), ffn_shift)
        return x + dx, att_shift, wkv_state, ffn_shift


class Rwkv5PreTrainedModel(PreTrainedModel):
    config: Rwkv5Config
    config_class = Rwkv5Config
    base_model_prefix = "rwkv"
    _no_split_modules = ["Rwkv5Block"]
    # generate must not try to rewind the state (assisted decoding) or build a key/value cache.
    _is_stateful = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def _init_weights(self, module: nn.Module):
        """Neutral values for a model built from a config alone (shape checks, tests); releases load theirs."""
        super()._init_weights(module)
        if isinstance(module, (Rwkv5SelfAttention, Rwkv5FeedForward)):
            for name, p in module.named_parameters(recurse=False):
                if name.startswith("time_mix"):
                    init.constant_(p, 0.5)
        if isinstance(module, Rwkv5SelfAttention):
            init.constant_(module.time_decay, -1.0)
            init.zeros_(module.time_faaaa)


@dataclass
class Rwkv5Output(ModelOutput):
    """last_hidden_state `(B, T, C)` after ln_out; state after the last token; hidden states when asked."""

    last_hidden_state: torch.Tensor | None = None
    state: Rwkv5State | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class Rwkv5CausalLMOutput(ModelOutput):
    """loss (with labels); logits `(B, T, V)`; state after the last token; hidden states when asked."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    state: Rwkv5State | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class Rwkv5Model(Rwkv5PreTrainedModel):
    """Embedding, blocks, final LayerNorm."""

    _input_embed_layer = "embeddings"

    def __init__(self, config: Rwkv5Config):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Rwkv5Block(config, i) for i in range(config.num_hidden_layers))
        self.ln_out = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, state: Rwkv5State | None = None,
                use_cache: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **kwargs):
        """Token ids `(B, T)` (or embeddings `(B, T, C)`) after `state` -> hidden states and the new state.

        Args:
            input_ids (LongTensor): `(B, T)`.
            attention_mask: accepted for generate's sake; it must be all ones (an RNN cannot skip padding).
            inputs_embeds (Tensor): `(B, T, C)` instead of input_ids.
            state (Rwkv5State): the state after earlier tokens. Default: the empty state (a fresh sequence).
            use_cache (bool): return the state after the last token. Default: config.use_cache.
            output_hidden_states (bool): also return each block's input and the final output.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("rwkv5: pass exactly one of input_ids and inputs_embeds")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("rwkv5: attention_mask has zeros; the model cannot skip padding, so feed sequences "
                             "without padding (one at a time, or of equal length)")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        return_dict = self.config.return_dict if return_dict is None else return_dict
        x = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        if state is None:
            state = Rwkv5State.zeros(self.config, x.shape[0], x.device, x.dtype)
        shifts, wkvs, ffns, hidden = [], [], [], []
        for i, block in enumerate(self.blocks):
            if output_hidden_states:
                hidden.append(x)
            x, a, s, f = block(x, state.att_shift[i], state.wkv[i], state.ffn_shift[i])
            shifts.append(a)
            wkvs.append(s)
            ffns.append(f)
        x = self.ln_out(x)
        new_state = Rwkv5State(torch.stack(shifts), torch.stack(wkvs), torch.stack(ffns)) if use_cache else None
        hidden_states = (*hidden, x) if output_hidden_states else None
        if not return_dict:
            return tuple(v for v in (x, new_state, hidden_states) if v is not None)
        return Rwkv5Output(last_hidden_state=x, state=new_state, hidden_states=hidden_states)


class Rwkv5ForCausalLM(Rwkv5PreTrainedModel, GenerationMixin):
    """The model and its (untied) output head."""

    def __init__(self, config: Rwkv5Config):
        super().__init__(config)
        self.rwkv = Rwkv5Model(config)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.head

    def set_output_embeddings(self, value):
        self.head = value

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, state: Rwkv5State | None = None,
                labels=None, use_cache: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, logits_to_keep: int | torch.Tensor = 0, **kwargs):
        """As `Rwkv5Model.forward`, plus the head: logits `(B, T, V)` and, with labels `(B, T)`, the loss.

        Args:
            labels (LongTensor): `(B, T)` the input ids (shifted inside); -100 is ignored.
            logits_to_keep (int | Tensor): compute logits only for the last n positions (0: all), or for the
                positions a 1-D tensor lists; generate asks for 1 while prefilling.
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        out = self.rwkv(input_ids, attention_mask, inputs_embeds, state, use_cache, output_hidden_states,
                        return_dict=True)
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.head(hidden[:, keep])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        if not return_dict:
            return tuple(v for v in (loss, logits, out.state, out.hidden_states) if v is not None)
        return Rwkv5CausalLMOutput(loss=loss, logits=logits, state=out.state, hidden_states=out.hidden_states)

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False,
                                            num_new_tokens=1):
        # The state is this model's cache, under its own name: carry it to the next step.
        model_kwargs["state"] = outputs.state
        return super()._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder,
                                                           num_new_tokens)
