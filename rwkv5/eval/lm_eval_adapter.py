"""lm-evaluation-harness model `rwkv5`: any lm-eval task on one of our checkpoints, in RNN mode.

    rwkv5-lm-eval --model rwkv5 --model_args checkpoint=PATH --tasks lambada_openai
    python -m rwkv5.eval.lm_eval_adapter --model rwkv5 --model_args checkpoint=PATH --tasks ...

Why a wrapper instead of plain `lm_eval`: lm-eval (checked on 0.4.13) knows a model only once a module has
called `@register_model` on it; its CLI imports its own `lm_eval.models` mapping and nothing else (no
entry-point group, no plugin variable, `--include_path` is for tasks only). So this module registers
`rwkv5` when imported and `main` hands the arguments to lm-eval's own CLI unchanged. From Python,
`import rwkv5.eval.lm_eval_adapter` before `lm_eval.simple_evaluate(model="rwkv5", ...)` does the same.

How requests map onto RNN mode: every context starts after the end-of-document token (id 0), as in RWKV's own
LAMBADA evaluation and `rwkv5 eval` (`rwkv5.eval.lambada`), so `lambada_openai` here and `rwkv5 eval --lambada`
give the same numbers. A context is run once (`infer.prefill`) and the state after it is reused, both for all
continuations of one context (multiple-choice tasks send the same context several times in a row) and for the
continuation itself; a rolling log-likelihood is the whole document scored after the end-of-document token,
with no window, since the state carries all of the past.

On a machine without CUDA a CUDA device (lm-eval asks for "cuda:0" unless told `--device`) becomes the CPU,
with one warning line. A failure (a missing checkpoint, a bad model argument) is one line on stderr and exit
status 1; RWKV5_TRACEBACK=1 shows the traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from rwkv5.errors import ConfigError
from rwkv5.infer import DEFAULT_CHUNK_LEN, EOD_ID, prefill, sample_logits, step
from rwkv5.eval.lambada import score_continuation

__all__ = ["RWKV5LM", "main"]


@register_model("rwkv5")
class RWKV5LM(TemplateLM):
    """lm-eval's model interface over `RWKV5` (batch 1, RNN mode).

    Args:
        checkpoint (str): native checkpoint, or an RWKV-LM / rwkv-package `.pth`; or give `model`.
        model (RWKV5, optional): an already loaded model (tests, in-process evaluation).
        tokenizer (optional): anything with `encode`/`decode`. Default: the RWKV World tokenizer.
        device (str, optional): "cuda", "cpu", ... Default: CUDA when available (with `checkpoint`).
        dtype (str): "float32", "bfloat16" or "float16" for a loaded checkpoint. Default: "float32".
        chunk_len (int): tokens per forward call. Default: DEFAULT_CHUNK_LEN.
        max_gen_toks (int): generation limit when a task sets none. Default: 256.
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        model=None,
        tokenizer=None,
        device: str | None = None,
        dtype: str = "float32",
        chunk_len: int = DEFAULT_CHUNK_LEN,
        max_gen_toks: int = 256,
        **_lm_eval_extras,
    ):
        super().__init__()
        if (checkpoint is None) == (model is None):
            raise ConfigError("lm_eval rwkv5: give exactly one of model_args checkpoint=PATH or a model object")
        if model is None:
            from rwkv5.checkpoint import load_checkpoint, load_rwkv_pth

            dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
            if dtype not in dtypes:
                raise ConfigError(f"lm_eval rwkv5: dtype must be one of {', '.join(dtypes)}, got {dtype!r}")
            device = _usable_device(device)
            load = load_rwkv_pth if str(checkpoint).endswith(".pth") else load_checkpoint
            model = load(str(checkpoint), device, dtypes[dtype])
            model = model[0] if isinstance(model, tuple) else model
        if tokenizer is None:
            from data_prep.tokenizer import load_tokenizer

            tokenizer = load_tokenizer()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.chunk_len = int(chunk_len)
        self.max_gen_toks = int(max_gen_toks)
        self._device = next(model.parameters()).device
        self._context_cache: tuple[tuple[int, ...], tuple] | None = None

    @property
    def eot_token_id(self) -> int:
        return EOD_ID

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return list(self.tokenizer.encode(string))

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def _after(self, context: list[int]):
        """(logits, state) after `context`; the last context is cached, as choices repeat it in a row."""
        key = tuple(context)
        if self._context_cache is None or self._context_cache[0] != key:
            self._context_cache = (key, prefill(self.model, context, chunk_len=self.chunk_len))
        return self._context_cache[1]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = []
        for (text_pair, context, continuation) in tqdm(requests, disable=disable_tqdm, desc="rwkv5 loglikelihood"):
            # lm-eval sends [eot] as the context of an empty one, the bare tokens otherwise.
            logits, state = self._after(context if context[:1] == [EOD_ID] else [EOD_ID, *context])
            result = score_continuation(self.model, logits, state, continuation, self.chunk_len)
            self.cache_hook.add_partial("loglikelihood", text_pair, result)
            results.append(result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for req in tqdm(requests, disable=disable_tqdm, desc="rwkv5 loglikelihood_rolling"):
            (text,) = req.args
            ids = self.tok_encode(text)
            logits, state = self._after([self.eot_token_id])
            ll = score_continuation(self.model, logits, state, ids, self.chunk_len)[0] if ids else 0.0
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), ll)
            results.append(ll)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results = []
        for req in tqdm(requests, disable=disable_tqdm, desc="rwkv5 generate_until"):
            context, gen_kwargs = req.args
            results.append(self._generate(context, dict(gen_kwargs)))
            self.cache_hook.add_partial("generate_until", req.args, results[-1])
        return results

    def _generate(self, context: str, gen_kwargs: dict) -> str:
        """Greedy (or sampled, when the task asks) continuation of `context`, cut at the first stop string."""
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
        temperature = float(gen_kwargs.pop("temperature", 0.0)) if gen_kwargs.pop("do_sample", False) else 0.0
        top_p = float(gen_kwargs.pop("top_p", 1.0))
        logits, state = self._after([self.eot_token_id] + self.tok_encode(context))
        generator = torch.Generator().manual_seed(int(gen_kwargs.pop("seed", 0)))
        ids: list[int] = []
        text = ""
        for _ in range(max_new):
            token = sample_logits(logits, temperature, top_p, generator)
            if token == self.eot_token_id:
                break
            ids.append(token)
            text = self.tok_decode(ids)
            if any(stop in text for stop in until):
                break
            logits, state = step(self.model, token, state)
        for stop in until:
            text = text.split(stop, 1)[0]
        return text


def _usable_device(device: str | None) -> str:
    """`device`, or the CPU (with one warning line) where it names CUDA and this machine has none."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"rwkv5-lm-eval: warning: no CUDA on this machine; running on the CPU instead of {device}",
              file=sys.stderr, flush=True)
        return "cpu"
    return device


def main(argv: list[str] | None = None) -> None:
    """`lm_eval` with the `rwkv5` model registered: the same arguments as lm-eval's own CLI."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    except Exception as exc:  # one line for a person; the traceback on request
        if os.environ.get("RWKV5_TRACEBACK") == "1":
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"rwkv5-lm-eval: error: {type(exc).__name__}: {message}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
