"""Tokenizers shared by the tokenizer tests: one of each implementation per session (building one parses the
vocabulary)."""

from __future__ import annotations

import importlib

import pytest

from data_prep import tokenizer as tokenizer_module
from data_prep.tokenizer import load_tokenizer


@pytest.fixture(scope="session")
def reference():
    return load_tokenizer(impl="reference")


@pytest.fixture(scope="session")
def fast():
    return load_tokenizer(impl="fast")


@pytest.fixture(scope="session")
def native():
    """The C extension's tokenizer; a test that uses it fails (not skips) when the extension is not built."""
    try:
        importlib.import_module(tokenizer_module.NATIVE_MODULE)
    except ImportError as exc:
        pytest.fail(f"the C extension is not built ({exc}): run `pip install -e . --no-deps`")
    return load_tokenizer(impl="native")
