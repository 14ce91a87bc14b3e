"""`rwkv5.model._inductor_options` (CPU): the mix-order-reduction workaround is chosen from the installed
inductor's source, and fails safe (fusion off) when that source cannot be read."""

from __future__ import annotations

import inspect

import pytest

from rwkv5 import model


@pytest.fixture(autouse=True)
def _fresh_cache():
    model._inductor_options.cache_clear()
    yield
    model._inductor_options.cache_clear()


@pytest.fixture
def mix_order_inductor():
    """Only a torch whose inductor has the mix-order reduction has anything to choose."""
    simd = pytest.importorskip("torch._inductor.codegen.simd").SIMDScheduling
    if not hasattr(simd, "_codegen_mix_order_reduction"):
        pytest.skip("this torch's inductor has no mix-order reduction (added in torch 2.10)")


def test_fixed_inductor_needs_no_option(monkeypatch, mix_order_inductor):
    monkeypatch.setattr(inspect, "getsource", lambda obj: "final_shape = [...]")
    assert model._inductor_options() == {}


def test_unfixed_or_unreadable_inductor_turns_fusion_off(monkeypatch, mix_order_inductor):
    monkeypatch.setattr(inspect, "getsource", lambda obj: "buf = ws.view(n, c).sum(dim=0)")
    assert model._inductor_options() == {"triton.mix_order_reduction": False}
    model._inductor_options.cache_clear()

    def unreadable(obj):
        raise OSError("could not get source code")

    monkeypatch.setattr(inspect, "getsource", unreadable)
    assert model._inductor_options() == {"triton.mix_order_reduction": False}
