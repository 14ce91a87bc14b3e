"""Builds the C extension `data_prep._world_tokenizer` (the native RWKV World tokenizer); everything else about
the package is in pyproject.toml. `pip install -e .` builds it in place.

The extension is optional: without a C compiler the install still succeeds and `data_prep.tokenizer` falls back
to the Rust package pyrwkv-tokenizer (slower; it says so in a log line).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "data_prep._world_tokenizer",
            sources=["data_prep/_world_tokenizer.c"],
            extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
            optional=True,
        )
    ]
)
