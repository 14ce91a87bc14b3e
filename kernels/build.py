"""Builds the CUDA extensions of `kernels/` with torch.utils.cpp_extension (JIT, ninja), cached by source hash.

The first call compiles into `$RWKV5_KERNEL_CACHE` (default `~/.cache/rwkv5/kernels`) under a name that
includes a hash of the sources and the build flags, so an edited kernel is rebuilt and an unchanged one is
loaded from disk. Container images prebuild it:

    RWKV5_KERNEL_CACHE=/opt/rwkv5-kernels TORCH_CUDA_ARCH_LIST="8.0;9.0" python -m kernels.build

Nothing here runs at import time; importing this module needs neither CUDA nor nvcc.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path
from types import ModuleType

__all__ = ["load_wkv5", "source_hash", "cache_dir", "WKV5_SOURCES"]

_CSRC = Path(__file__).resolve().parent / "wkv5" / "csrc"
WKV5_SOURCES = ("wkv5_ops.cpp", "wkv5_fwd.cu", "wkv5_bwd.cu")
_WKV5_HEADERS = ("wkv5_common.cuh",)
_CUDA_FLAGS = ("-O3", "-std=c++17")
_loaded: dict[str, ModuleType] = {}


def cache_dir() -> Path:
    """Where built extensions live: `$RWKV5_KERNEL_CACHE`, else `~/.cache/rwkv5/kernels`."""
    return Path(os.environ.get("RWKV5_KERNEL_CACHE", Path.home() / ".cache" / "rwkv5" / "kernels"))


def _arch_list() -> str:
    """Target architectures: `TORCH_CUDA_ARCH_LIST` if set, else the visible GPU's, else Ampere and Hopper."""
    forced = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if forced:
        return forced
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    return "8.0;9.0"


def source_hash(arch: str | None = None) -> str:
    """Hash of the WKV5 sources, headers, flags and target architectures (12 hex digits)."""
    digest = hashlib.sha256()
    for name in WKV5_SOURCES + _WKV5_HEADERS:
        digest.update(name.encode())
        digest.update((_CSRC / name).read_bytes())
    digest.update(" ".join(_CUDA_FLAGS).encode())
    digest.update((arch or _arch_list()).encode())
    return digest.hexdigest()[:12]


def load_wkv5(verbose: bool = False) -> ModuleType:
    """The compiled WKV5 extension (functions `forward`, `backward`), built on first use.

    Raises:
        RuntimeError: nvcc or ninja is missing, or compilation failed (torch's message names the step).
    """
    arch = _arch_list()
    name = f"rwkv5_wkv5_{source_hash(arch)}"
    if name in _loaded:
        return _loaded[name]
    from torch.utils.cpp_extension import load

    build_dir = cache_dir() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    previous = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    try:
        module = load(
            name=name,
            sources=[str(_CSRC / s) for s in WKV5_SOURCES],
            extra_cflags=["-O3", "-std=c++17"],
            extra_cuda_cflags=list(_CUDA_FLAGS),
            build_directory=str(build_dir),
            verbose=verbose,
        )
    finally:
        if previous is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = previous
    _loaded[name] = module
    return module


def _main() -> None:
    parser = argparse.ArgumentParser(description="Prebuild the CUDA kernels into the cache directory.")
    parser.add_argument("--verbose", action="store_true", help="show the compiler's commands and output")
    args = parser.parse_args()
    module = load_wkv5(verbose=args.verbose)
    print(f"built {module.__name__} in {cache_dir()}")


if __name__ == "__main__":
    _main()
