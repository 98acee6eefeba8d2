"""Tasks radfed trains federatedly; the client and server look a task up by name."""

from __future__ import annotations

import importlib

from radfed.errors import ConfigError
from radfed.tasks.base import CaseOutputs, SplitStats, Task
from radfed.tasks.runtime import TrainResult, pick_device

#: Task names and the module holding each task's ``TASK``.
_MODULES = {
    "classification": "radfed.tasks.classification",
    "detection": "radfed.tasks.detection",
    "segmentation": "radfed.tasks.segmentation",
}
#: Tasks this radfed version can train federatedly.
TASK_NAMES = tuple(_MODULES)


def get_task(name: str) -> Task:
    """The task registered under ``name`` (its module is imported on first use).

    Raises:
        ConfigError: no such task.
    """
    if name not in _MODULES:
        msg = f"run config 'task' must be one of {', '.join(TASK_NAMES)}, got {name!r}"
        raise ConfigError(msg)
    task: Task = importlib.import_module(_MODULES[name]).TASK
    return task


__all__ = [
    "TASK_NAMES",
    "CaseOutputs",
    "SplitStats",
    "Task",
    "TrainResult",
    "get_task",
    "pick_device",
]
