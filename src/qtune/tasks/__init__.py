"""The task registry: one line per task. Everything else asks it (`get`, `TASKS`), never a task's name.

    >>> from qtune.tasks import get, load_model
    >>> get("pair-cls").config          # the training settings dataclass
    >>> load_model("runs/x/best")       # a qtune folder names its own task
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from qtune.errors import QtuneError
from qtune.modeling.loading import register_saved_settings
from qtune.tasks.base import Command, Endpoint, Task, TrainedRun, resolve

if TYPE_CHECKING:
    from qtune.modeling.loading import LoadedModel


BUILT_IN = (
    "qtune.tasks.pair_cls:PairClsTask",
    "qtune.tasks.embedding:EmbeddingTask",
    "qtune.tasks.reranker:RerankerTask",
    "qtune.tasks.extraction:ExtractionTask",
    "qtune.tasks.classify:ClassifyTask",
)
# Tasks from elsewhere: a package's entry points in the group "qtune.tasks" (name = "module:Class"),
# or the "module:Class" list of the QTUNE_TASKS variable (comma-separated); they come after the
# built-in ones, and a name taken already is an error.
ENTRY_POINT_GROUP = "qtune.tasks"
TASKS_VARIABLE = "QTUNE_TASKS"


def added_task_paths() -> list[str]:
    """The "module:Class" of every task an installed package or QTUNE_TASKS adds."""
    from importlib.metadata import entry_points

    paths = [point.value for point in entry_points(group=ENTRY_POINT_GROUP)]
    return paths + [p.strip() for p in os.environ.get(TASKS_VARIABLE, "").split(",") if p.strip()]


def _registry() -> dict[str, Task]:
    tasks: dict[str, Task] = {}
    for path in (*BUILT_IN, *added_task_paths()):
        try:
            task = resolve(path)()
        except (ImportError, AttributeError, ValueError) as error:
            raise ImportError(f"qtune task {path!r} (from the {ENTRY_POINT_GROUP!r} entry points or "
                              f"{TASKS_VARIABLE}) cannot be loaded: {error}") from error
        if not isinstance(task, Task):
            raise ImportError(f"qtune task {path!r} is not a qtune.tasks.Task")
        if task.name in tasks:
            raise ImportError(f"qtune task {path!r}: the task name {task.name!r} is taken")
        try:
            register_saved_settings(task.name, task.saved_settings)
        except TypeError as error:
            raise ImportError(f"qtune task {path!r}: {error}") from None
        tasks[task.name] = task
    return tasks


TASKS: dict[str, Task] = _registry()

__all__ = ["TASKS", "Command", "Endpoint", "Task", "TrainedRun", "get", "load_model", "serve_roles", "shares_role",
           "task_of"]


def get(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise QtuneError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None


# The order of `qtune serve`'s model flags, which is also the order models are served and listed
# in; a role a new task brings and this tuple lacks comes after these.
SERVE_ROLE_ORDER = ("embedding", "classifier", "reranker", "extractor")


def serve_roles() -> dict[str, Task]:
    """`qtune serve`'s model flags: role -> the task a folder without a qtune.json given under it
    loads as (the role's first registered task)."""
    roles: dict[str, Task] = {}
    for task in TASKS.values():
        if task.serve_role is not None:
            roles.setdefault(task.serve_role, task)
    rank = {role: i for i, role in enumerate(SERVE_ROLE_ORDER)}
    return dict(sorted(roles.items(), key=lambda item: rank.get(item[0], len(rank))))


def shares_role(task: Task) -> bool:
    """Whether another registered task is served under `task`'s role."""
    return sum(other.serve_role == task.serve_role for other in TASKS.values()) > 1


def task_of(name_or_path: str | os.PathLike, task: str | None = None) -> Task:
    """The task of a model: the one its qtune.json names (which must agree with `task`), else `task`."""
    from qtune.modeling.loading import read_meta

    meta = read_meta(name_or_path)
    if meta is not None:
        if task is not None and meta.task != task:
            raise QtuneError(f"'{name_or_path}' was trained for {meta.task}, not {task}")
        return get(meta.task)
    if task is None:
        raise QtuneError(f"'{name_or_path}' is not a qtune folder: say which task it is for")
    return get(task)


def load_model(name_or_path: str | os.PathLike, task: str | None = None, **kwargs) -> "LoadedModel":
    """`qtune.modeling.loading.load_model` with the task's model settings taken from the registry."""
    from qtune.modeling.loading import load_model as load_with_spec

    return load_with_spec(name_or_path, task_of(name_or_path, task), **kwargs)
