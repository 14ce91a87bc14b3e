"""Import DeepSpeed without the MLflow import it drags in.

DeepSpeed's autotuner (imported by `import deepspeed`, used by nothing here) imports MLflow whenever it is
installed, and MLflow's import (its GenAI and gateway modules pull in FastAPI) is most of DeepSpeed's import
time (figures in bench/NOTES.md). Every training worker would pay that at start, although only rank 0 logs to MLflow. The autotuner tolerates a
failed MLflow import (it only disables its own MLflow logging), so hide MLflow for the duration of the
import and leave it importable afterwards.
"""

from __future__ import annotations

import sys
from types import ModuleType


def import_deepspeed() -> ModuleType:
    """`import deepspeed`, skipping its optional MLflow import unless MLflow is already loaded."""
    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    hide = "mlflow" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None  # makes `import mlflow` raise ImportError
    try:
        import deepspeed
    finally:
        if hide and sys.modules.get("mlflow", 0) is None:
            del sys.modules["mlflow"]
    return deepspeed
