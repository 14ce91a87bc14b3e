"""RWKV v5.2 model, training, inference, evaluation and release: the library under the pipeline."""

from rwkv5.config import MODEL_PRESETS, ModelConfig, count_parameters, model_preset
from rwkv5.errors import CheckpointError, ConfigError, PipelineError, Rwkv5Error
from rwkv5.model import RWKV5, RWKVState

__all__ = [
    "MODEL_PRESETS",
    "ModelConfig",
    "count_parameters",
    "model_preset",
    "RWKV5",
    "RWKVState",
    "PipelineError",
    "Rwkv5Error",
    "ConfigError",
    "CheckpointError",
]
