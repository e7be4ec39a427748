"""Task definitions (the seam between the engine and what a task means): see ``tasks.base``."""

from cnnkit.errors import CnnkitError
from cnnkit.tasks.base import Balance, Metrics, Task
from cnnkit.tasks.classification import Classification
from cnnkit.tasks.segmentation import Segmentation

TASKS: dict[str, Task] = {"classification": Classification(), "segmentation": Segmentation()}


def get(name: str) -> Task:
    if name not in TASKS:
        raise CnnkitError(f"unknown task '{name}'; choose from {', '.join(TASKS)}")
    return TASKS[name]


__all__ = ["TASKS", "Balance", "Classification", "Metrics", "Segmentation", "Task", "get"]
