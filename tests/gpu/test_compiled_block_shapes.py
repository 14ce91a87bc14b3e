"""A compiled Block under activation policy "none" returns every gradient in its parameter's shape at sizes
where inductor's mix-order reduction fuses LayerNorm's backward with a (1, 1, C) mix gradient (B*T >= 4096,
>= 2 C, B*T*C >= 5*2^20). Up to torch 2.11 that fusion returned (C,): "CompiledFunctionBackward returned an
invalid gradient ... got [4096] but expected shape compatible with [1, 1, 4096]" at 7b width (issue 28);
`rwkv5.model._inductor_options` turns the fusion off where the installed inductor has the bug."""

from __future__ import annotations

import torch

from rwkv5.config import ModelConfig
from rwkv5.model import Block, _inductor_options


def test_compiled_block_none_grads_keep_parameter_shapes():
    # C=512, B*T=16384: past all three of the fusion's thresholds, small enough to compile in seconds.
    cfg = ModelConfig(n_layer=2, n_embd=512, head_size=64, vocab_size=1024)
    torch.manual_seed(0)
    block = Block(cfg, 1, "none").cuda().to(torch.bfloat16).train()
    ref = Block(cfg, 1, "none").cuda().to(torch.bfloat16).train()
    ref.load_state_dict(block.state_dict())
    block.compile(fullgraph=True, dynamic=False)
    x = torch.randn(1, 16384, cfg.n_embd, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    block(x)[0].backward(dy)
    ref(x)[0].backward(dy)
    print(f"torch {torch.__version__}, inductor options {_inductor_options()}")
    for (name, p), q in zip(block.named_parameters(), ref.parameters()):
        assert p.grad.shape == p.shape, name
        err = (p.grad.float() - q.grad.float()).norm() / q.grad.float().norm().clamp(min=1e-12)
        assert err < 5e-2, (name, float(err))
