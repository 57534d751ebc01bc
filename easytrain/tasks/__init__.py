"""Tasks: the registry behind `easytrain train --task NAME`, and the built-in arithmetic data.

The arithmetic helpers are imported on first use, so that the registry (read by the CLI before it
knows which task runs) does not pull in `datasets` and `transformers`.
"""

from typing import Any

from easytrain.tasks.registry import (
    ENTRY_POINT_GROUP,
    Task,
    available_tasks,
    register_task,
    resolve_task,
    task_names,
    unregister_task,
)

_ARITHMETIC = ("answer_text", "build_arithmetic_tokenizer", "make_arithmetic_dataset", "make_arithmetic_splits",
               "split_problem")


def __getattr__(name: str) -> Any:
    if name in _ARITHMETIC:
        from easytrain.tasks import arithmetic

        return getattr(arithmetic, name)
    raise AttributeError(f"module 'easytrain.tasks' has no attribute {name!r}")


__all__ = [
    "ENTRY_POINT_GROUP", "Task", "answer_text", "available_tasks", "build_arithmetic_tokenizer",
    "make_arithmetic_dataset", "make_arithmetic_splits", "register_task", "resolve_task", "split_problem", "task_names",
    "unregister_task",
]
