"""Importing the kernels needs no CUDA and no nvcc, and builds nothing: the CUDA op compiles on first use."""

from __future__ import annotations

import importlib
import subprocess
import sys

import torch


def test_imports_build_nothing():
    """In a fresh interpreter where building would fail loudly, every import still succeeds."""
    code = (
        "import torch.utils.cpp_extension as ce\n"
        "def refuse(*a, **k): raise SystemExit('built at import time')\n"
        "ce.load = refuse\n"
        "import kernels, kernels.wkv5, kernels.build, kernels.wkv5.cuda, rwkv5.wkv\n"
        "import torch\n"
        "assert hasattr(torch.ops.rwkv5, 'wkv5_fwd') and hasattr(torch.ops.rwkv5, 'wkv5_bwd')\n"
        "assert not kernels.build._loaded\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_source_hash_tracks_sources_and_arch(tmp_path, monkeypatch):
    """The cache key changes with the target architectures and with any byte of the sources."""
    build = importlib.import_module("kernels.build")
    assert build.source_hash("9.0") != build.source_hash("8.0;9.0")
    assert build.source_hash("9.0") == build.source_hash("9.0")

    csrc = tmp_path / "csrc"
    csrc.mkdir()
    for name in build.WKV5_SOURCES + build._WKV5_HEADERS:
        (csrc / name).write_bytes((build._CSRC / name).read_bytes())
    monkeypatch.setattr(build, "_CSRC", csrc)
    before = build.source_hash("9.0")
    (csrc / "wkv5_fwd.cu").write_bytes((csrc / "wkv5_fwd.cu").read_bytes() + b"\n")
    assert build.source_hash("9.0") != before


def test_fake_kernels_give_shapes_for_compile():
    """torch.compile traces the ops through their fake kernels (also run for meta tensors): shapes must be right."""
    importlib.import_module("kernels.wkv5.cuda")

    B, T, H, N = 2, 7, 3, 32
    r = torch.empty(B, T, H, N, dtype=torch.bfloat16, device="meta")
    w = torch.empty(H, N, device="meta")
    y, s = torch.ops.rwkv5.wkv5_fwd(r, r, r, w, w, None, 64)
    grads = torch.ops.rwkv5.wkv5_bwd(r, r, r, w, w, None, r, None, 64)
    assert (y.shape, y.dtype, s.shape, s.dtype) == ((B, T, H, N), torch.bfloat16, (B, H, N, N), torch.float32)
    assert [tuple(g.shape) for g in grads] == [(B, T, H, N)] * 3 + [(H, N)] * 2 + [(B, H, N, N)]
    assert [g.dtype for g in grads[3:]] == [torch.float32] * 3
