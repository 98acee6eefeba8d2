"""Tasks radfed trains federatedly: one interface (``protocol``), one local training loop
(``training``), one module per task, and the registry the client and server look them up in."""

from radfed.tasks.protocol import CaseOutputs, SplitStats, StatsValue, Task, merge_stats
from radfed.tasks.registry import get_task
from radfed.tasks.training import TrainResult, pick_device

__all__ = [
    "CaseOutputs",
    "SplitStats",
    "StatsValue",
    "Task",
    "TrainResult",
    "get_task",
    "merge_stats",
    "pick_device",
]
