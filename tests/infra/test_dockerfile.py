"""infra/docker/Dockerfile, checked without a Docker engine: its stages and build arguments, and that what it
copies, installs and runs exists in this repository and in the pinned DeepSpeed."""

from __future__ import annotations

import importlib.util
import re
import shlex
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with backslash continuations joined and comments dropped."""
    out, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _stages(instrs):
    """{stage name: [(instruction, args), ...]} plus the FROM image of each stage."""
    stages, images, current = {}, {}, None
    for word, args in instrs:
        if word == "FROM":
            parts = args.split()
            current = parts[parts.index("AS") + 1] if "AS" in parts else f"stage{len(stages)}"
            images[current] = parts[0]
            stages[current] = []
        elif current is not None:
            stages[current].append((word, args))
    return stages, images


@pytest.fixture(scope="module")
def parsed():
    instrs = _instructions(DOCKERFILE.read_text())
    global_args = {}
    for word, args in instrs:
        if word == "FROM":
            break
        if word == "ARG":
            name, _, default = args.partition("=")
            global_args[name] = default.strip('"')
    stages, images = _stages(instrs)
    return global_args, stages, images


def _args(stage) -> dict[str, str]:
    out = {}
    for word, args in stage:
        if word == "ARG":
            name, _, default = args.partition("=")
            out[name] = default.strip('"')
    return out


def test_stages_and_cuda_base(parsed):
    global_args, stages, images = parsed
    assert list(stages) == ["base", "build", "runtime"]
    assert images == {"base": "${CUDA_IMAGE}", "build": "base", "runtime": "base"}
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-cudnn-devel-ubuntu\d\d\.04", global_args["CUDA_IMAGE"])


def test_arch_list_build_arg_defaults_to_sm90(parsed):
    _, stages, _ = parsed
    for name in ("build", "runtime"):
        arch = _args(stages[name])["TORCH_CUDA_ARCH_LIST"]
        # "9.0a" would break DeepSpeed's op builder, which parses the entries as numbers.
        assert arch == "9.0" and all(re.fullmatch(r"\d+\.\d", a) for a in arch.split(";"))
        env = " ".join(args for word, args in stages[name] if word == "ENV")
        assert "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST}" in env  # the kernel cache key sees the same list
        assert "RWKV5_KERNEL_CACHE=/opt/rwkv5-kernels" in env


def test_copies_exist_and_runtime_takes_the_build(parsed):
    _, stages, _ = parsed
    for word, args in stages["build"]:
        if word == "COPY":
            *sources, _dest = args.split()
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    from_build = [a.split()[1] for w, a in stages["runtime"] if w == "COPY" and a.startswith("--from=build")]
    assert {"/opt/venv", "/opt/rwkv5-kernels", "/opt/rwkv5"} <= set(from_build)


def test_installs_our_extras_and_prebuilds_deepspeed_ops_and_the_wkv_kernel(parsed):
    _, stages, _ = parsed
    runs = [args for word, args in stages["build"] if word == "RUN"]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installs = [m.group(1) for r in runs for m in re.finditer(r'"\.\[([a-z0-9,]+)\]"', r)]
    assert installs and {"train", "orchestrate"} <= set(installs[0].split(","))
    assert set(installs[0].split(",")) <= set(extras)
    pins = dict(re.findall(r"ARG (TORCH_VERSION|DEEPSPEED_VERSION)=(\S+)", DOCKERFILE.read_text()))
    assert f"deepspeed=={pins['DEEPSPEED_VERSION']}" in extras["train"]  # the image and pyproject agree

    # Every DS_BUILD_* flag names a CUDA op builder of the installed (pinned) DeepSpeed.
    flags = {f for r in runs for f in re.findall(r"\b(DS_BUILD_[A-Z_]+)=1", r)}
    assert {"DS_BUILD_FUSED_ADAM", "DS_BUILD_UTILS"} <= flags
    spec = importlib.util.find_spec("deepspeed")
    if spec is None:
        pytest.skip("deepspeed not installed")
    builders = Path(spec.origin).parent / "ops" / "op_builder"
    known = {m for f in builders.glob("*.py") for m in re.findall(r'BUILD_VAR = "(DS_BUILD_\w+)"', f.read_text())}
    assert flags <= known, f"unknown DeepSpeed ops: {flags - known}"
    assert any("--no-build-isolation" in r and "deepspeed==" in r for r in runs)  # the ops build against torch

    # The kernel prebuild runs kernels/build.py's entry point, which exists and builds with these env vars.
    prebuild = [shlex.split(r) for r in runs if "kernels.build" in r]
    assert prebuild and any(t[t.index("-m") + 1] == "kernels.build" for t in prebuild if "-m" in t)
    source = (ROOT / "kernels" / "build.py").read_text()
    assert 'if __name__ == "__main__":' in source and "RWKV5_KERNEL_CACHE" in source
    assert "TORCH_CUDA_ARCH_LIST" in source


def test_ignore_file_keeps_the_context_small():
    ignored = (ROOT / "infra" / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".state", "tests"} <= set(ignored)
