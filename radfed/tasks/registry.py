"""The task registry: the client and server look a task up by name and never branch on it."""

from __future__ import annotations

from radfed.config import TaskName, as_choice
from radfed.tasks import classification, detection, segmentation
from radfed.tasks.protocol import Task

__all__ = ["get_task"]

_TASKS: dict[TaskName, Task] = {
    TaskName.CLASSIFICATION: classification.TASK,
    TaskName.DETECTION: detection.TASK,
    TaskName.SEGMENTATION: segmentation.TASK,
}


def get_task(name: str) -> Task:
    """The task registered under ``name`` (a ``TaskName`` value).

    Raises:
        ConfigError: no such task.
    """
    return _TASKS[as_choice("task", name, TaskName)]
