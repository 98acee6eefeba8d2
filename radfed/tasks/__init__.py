"""Tasks radfed trains federatedly; the client and server look a task up by name."""

from radfed.tasks.classification import MODELS, build_model, evaluate, predict, train
from radfed.tasks.runtime import TrainResult, pick_device

__all__ = ["MODELS", "TrainResult", "build_model", "evaluate", "pick_device", "predict", "train"]
