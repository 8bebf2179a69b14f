"""Tasks: the registry of the 26-task pool, loaders for the benchmark files, prompts and answer parsing."""

from dlp_lora.tasks.prompts import parse_answer
from dlp_lora.tasks.registry import EXTRA_TASKS, TASKS, get_task, load_examples, load_splits, pool_table, task_names
from dlp_lora.tasks.types import Example, Splits, Task

__all__ = [
    "EXTRA_TASKS",
    "TASKS",
    "Example",
    "Splits",
    "Task",
    "get_task",
    "load_examples",
    "load_splits",
    "parse_answer",
    "pool_table",
    "task_names",
]
