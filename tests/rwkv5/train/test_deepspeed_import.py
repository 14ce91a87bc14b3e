"""import_deepspeed hides MLflow from DeepSpeed's optional import, and only for that import.

A stand-in `deepspeed` package on a temporary path records whether its `import mlflow` succeeded, the way
DeepSpeed's autotuner does; the real import is seconds to minutes on CI, and its effect is measured, not tested.
"""

from __future__ import annotations

import sys

import pytest

from rwkv5.train.deepspeed_import import import_deepspeed

STAND_IN = """
try:
    import mlflow
    has_mlflow = True
except ImportError:
    has_mlflow = False
"""


@pytest.fixture
def stand_in_deepspeed(tmp_path, monkeypatch):
    (tmp_path / "deepspeed").mkdir()
    (tmp_path / "deepspeed" / "__init__.py").write_text(STAND_IN)
    (tmp_path / "mlflow").mkdir()
    (tmp_path / "mlflow" / "__init__.py").write_text("STAND_IN = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("deepspeed", "mlflow"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield
    for name in ("deepspeed", "mlflow"):  # monkeypatch restores the real modules, if any, after this
        sys.modules.pop(name, None)


def test_mlflow_is_hidden_during_the_import_and_importable_after(stand_in_deepspeed):
    ds = import_deepspeed()
    assert ds.has_mlflow is False
    assert "mlflow" not in sys.modules
    import mlflow

    assert mlflow.STAND_IN
    assert import_deepspeed() is ds  # a second call is the cached module


def test_an_already_loaded_mlflow_is_left_alone(stand_in_deepspeed):
    import mlflow

    ds = import_deepspeed()
    assert ds.has_mlflow is True
    assert sys.modules["mlflow"] is mlflow
