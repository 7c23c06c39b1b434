"""The task registry: `@register_task("key")` on a task class, `get_task(key, **options)` to build one.

Like lm-eval's `@register_model`: each task module registers its own class(es), so a new task is a
new module under `t2eval/tasks/` with the decorator (plus its names in `t2eval.constants` and its
lm-eval YAMLs); nothing here changes. A class registered under several keys (ARC: arc_easy and
arc_challenge) is built as `cls(key, **options)`; a class with one key as `cls(**options)`, and the
decorator sets its `key`.

The task modules are imported on the first lookup, not with `t2eval.tasks` (every public module of
the package except the infrastructure in `_NOT_TASK_MODULES`): `t2eval --help` imports none of them,
and importing all five costs a few tens of ms (`python -X importtime`).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable, TypeVar

from ..constants import TASK_KEYS, VLM_TASKS, check_task
from ..errors import T2EvalError
from .base import Task

__all__ = ["TASK_KEYS", "get_task", "known_tasks", "register_task", "task_class"]

T = TypeVar("T", bound=type)
# key -> (class, whether the key is passed to the constructor)
_REGISTRY: dict[str, tuple[type[Task], bool]] = {}
# modules of this package that define no task
_NOT_TASK_MODULES = frozenset({"base", "registry", "sandbox"})
_imported = False


def register_task(*keys: str) -> Callable[[T], T]:
    """Class decorator: make `get_task(key)` build this class for each of `keys`."""
    if not keys or not all(isinstance(k, str) and k for k in keys):
        raise T2EvalError(f"register_task needs one or more task keys, got {keys!r}")

    def decorate(cls: T) -> T:
        if len(keys) == 1:
            own = cls.__dict__.get("key") or keys[0]
            if own != keys[0]:
                raise T2EvalError(f"{cls.__qualname__} has key {own!r} but is registered as {keys[0]!r}")
            cls.key = keys[0]
        for k in keys:
            old = _REGISTRY.get(k)
            # re-importing the same module (importlib.reload) re-registers the same class: allowed
            if old is not None and (old[0].__module__, old[0].__qualname__) != (cls.__module__, cls.__qualname__):
                raise T2EvalError(f"task {k!r} is registered twice: {old[0].__module__}.{old[0].__qualname__} "
                                  f"and {cls.__module__}.{cls.__qualname__}")
            _REGISTRY[k] = (cls, len(keys) > 1)
        return cls

    return decorate


def _import_task_modules() -> None:
    global _imported
    if _imported:
        return
    # a directory listing, not pkgutil.iter_modules (which imports `inspect`: ~15 ms more)
    for path in sorted(Path(__file__).parent.glob("*.py")):
        if not path.stem.startswith("_") and path.stem not in _NOT_TASK_MODULES:
            importlib.import_module(f"{__package__}.{path.stem}")
    _imported = True


def known_tasks() -> tuple[str, ...]:
    """Every registered task key: the protocol's (`constants.TASK_KEYS`) in their order, the vision-language
    ones (`constants.VLM_TASKS`), then any others."""
    _import_task_modules()
    ordered = TASK_KEYS + VLM_TASKS
    return tuple(k for k in ordered if k in _REGISTRY) + tuple(k for k in _REGISTRY if k not in ordered)


def task_class(key: str) -> type[Task]:
    """The class registered for `key` (clear error listing the known keys if none)."""
    return _REGISTRY[check_task(key, known_tasks())][0]


def get_task(key: str, protocol: str | None = None, **options: Any) -> Task:
    """A fresh task object under `protocol` (release | corrected; None: $T2EVAL_PROTOCOL, else release):
    the protocol's task options (`t2eval.protocol.task_options`) and data options (`data_options`, used by
    `Task.docs`), then explicit `options`, which win."""
    from .. import protocol as proto

    cls = task_class(key)
    opts = {**proto.task_options(key, protocol), **options}
    task = cls(key, **opts) if _REGISTRY[key][1] else cls(**opts)
    task.protocol = proto.check(protocol) if protocol else proto.default_protocol()
    task.data_options = proto.data_options(protocol)
    return task
