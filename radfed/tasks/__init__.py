"""Tasks radfed trains federatedly; the client and server look a task up by name."""

from radfed.tasks.classification import MODELS, build_model, evaluate, predict, train
from radfed.tasks.runtime import TrainResult, pick_device

#: Tasks this radfed version can train federatedly.
TRAINABLE_TASKS = ("classification",)

__all__ = [
    "MODELS",
    "TRAINABLE_TASKS",
    "TrainResult",
    "build_model",
    "evaluate",
    "pick_device",
    "predict",
    "train",
]
