"""Tasks: the names `easytrain train --task NAME` builds, each with its own argument dataclasses.

One table, three ways in:

- `@register_task("name", arguments=(MyArgs,), description="...")` on a trainer class or a factory;
- `register_task("name", "package.module:Class")`, imported only when the task runs (the built-in
  'lm' is registered so, which keeps importing the CLI free of the trainer);
- the `easytrain.tasks` entry-point group of installed packages, read only when a name is not
  registered and when tasks are listed, so a broken plugin cannot break `easytrain train`.

A task is built as `factory(training_arguments, *task_arguments)`, one instance per dataclass in
`arguments`, in order. A factory whose signature cannot take them is refused before it is called (a wrong
--task: `ArgumentError`, exit status 2), and so is a `--task module:attribute` that plainly is no trainer (a
built-in function, a class with none of the trainer's methods); a TypeError raised inside a factory is its own bug and
keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import inspect
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from easytrain.arguments import TrainingArguments
from easytrain.errors import ArgumentError
from easytrain.suggestions import closest

ENTRY_POINT_GROUP = "easytrain.tasks"
RESERVED_FLAGS = {"--config": "the config-file flag", "--help": "the help flag"}
#: What --task takes, closing each message that refuses a --task.
TASK_TAKES = ("--task takes a task name, a trainer class implementing easytrain.TrainerProtocol, or a "
              "factory(training_arguments, *task_arguments) returning one.")

T = TypeVar("T")


@dataclass(frozen=True)
class Task:
    """A registered task. `target` is the factory, or a 'module:attribute' string not yet imported."""

    name: str
    target: str | Callable[..., Any]
    arguments: tuple[type, ...] = ()
    description: str = ""
    origin: str = "registered"

    @property
    def loaded(self) -> bool:
        return not isinstance(self.target, str)

    def default_arguments(self) -> tuple[Any, ...]:
        """One instance of each argument dataclass from its defaults (for `cli.run` without a command line)."""
        instances = []
        for cls in self.arguments:
            required = [f.name for f in dataclasses.fields(cls)
                        if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
            if required:
                raise ArgumentError(required[0], f"task {self.name!r} needs a value for it ({cls.__name__} has "
                                                 f"no default); pass --{required[0]} or give the field a default.")
            instances.append(cls())
        return tuple(instances)

    def build(self, arguments: TrainingArguments, task_arguments: Sequence[Any] | None = None) -> Any:
        """`factory(arguments, *task_arguments)`; defaults for the task's dataclasses when not given. A trainer
        with a `task_arguments` attribute (every `BaseTrainer`) records them, for its arguments.json."""
        task = self if self.loaded else _load(self)
        values = task.default_arguments() if task_arguments is None else tuple(task_arguments)
        if len(values) != len(task.arguments):
            raise ArgumentError("task", f"task {self.name!r} takes {len(task.arguments)} argument dataclass(es) "
                                        f"({_names(task.arguments)}), got {len(values)}.")
        _check_call(task, (arguments, *values))
        _check_plainly_a_trainer(task)
        try:
            trainer = task.target(arguments, *values)
        except TypeError as error:  # raised inside the call: a bug in the task's code, unless no trainer at all
            if not _ad_hoc_function(task):
                raise
            raise ArgumentError("task", f"{task.name!r} is not a trainer: calling it with the training arguments "
                                        f"raised TypeError: {error}. {TASK_TAKES}") from error
        if values and hasattr(trainer, "task_arguments"):  # a BaseTrainer saves them in arguments.json
            trainer.task_arguments = values
        return trainer


_REGISTRY: dict[str, Task] = {}


def register_task(name: str, target: str | Callable[..., Any] | None = None, *,
                  arguments: type | Sequence[type] = (), description: str = "", replace: bool = False) -> Any:
    """Make `easytrain train --task name` build `target(training_arguments, *task_arguments)`.

    As a decorator (no `target`) it registers the class or factory below it and returns it unchanged.
    `target` may also be a 'package.module:Class' string, imported lazily. `arguments` are dataclasses
    whose fields become command-line flags next to `TrainingArguments`; no flag may be declared twice.
    Registering another target under a taken name raises unless `replace=True`.
    """
    classes = tuple(arguments) if isinstance(arguments, (tuple, list)) else (arguments,)
    _check_name(name)
    check_argument_dataclasses(classes, task=name)
    if target is None:
        def decorate(obj: T) -> T:
            _add(Task(name, obj, classes, description or _doc_line(obj)), replace)
            _mark(obj, _REGISTRY[name])
            return obj
        return decorate
    if isinstance(target, str):
        _check_target(target)
    elif not callable(target):
        raise ArgumentError("task", f"target of task {name!r} must be callable or a 'package.module:Class' "
                                    f"string, got {target!r}.")
    _add(Task(name, target, classes, description or _doc_line(target)), replace)
    return target


def unregister_task(name: str) -> None:
    """Forget a registered task (tests, notebooks); entry points stay discoverable."""
    _REGISTRY.pop(name, None)


def resolve_task(name: str) -> Task:
    """The loaded task for `--task name`: registered, then entry points, then 'package.module:Class'."""
    task = _REGISTRY.get(name)
    if task is not None:
        if not task.loaded:
            task = _REGISTRY[name] = _load(task)
        return task
    task = _from_entry_point(name)
    if task is not None:
        return task
    if ":" in name:
        return _load(Task(name, name, origin="import path"))  # not cached: the path is its own name
    close = closest(name, task_names())
    hint = f" Did you mean {close!r}?" if close else ""
    raise ArgumentError("task", f"unknown task {name!r}; available: {', '.join(task_names())} "
                                f"(see `easytrain tasks`), or pass 'package.module:Class'.{hint}")


def task_names() -> list[str]:
    """Registered and entry-point names, without importing any plugin."""
    return sorted(set(_REGISTRY) | {ep.name for ep in _entry_points()})


def available_tasks() -> list[Task]:
    """Every task, plugins imported for their descriptions; one that fails to import says why, so a
    broken plugin cannot hide the others."""
    broken: dict[str, Task] = {}
    for entry_point in _entry_points():
        if entry_point.name not in _REGISTRY:
            try:
                _from_entry_point(entry_point.name)
            except Exception as error:  # noqa: BLE001 - any plugin bug: list it, do not crash
                broken[entry_point.name] = Task(entry_point.name, entry_point.value, origin=_origin(entry_point),
                                                description=f"(cannot load: {error})")
    tasks = dict(broken)
    for name, task in _REGISTRY.items():
        if not (task.loaded or task.description):  # a lazy target with no description: its docstring
            try:
                task = _REGISTRY[name] = _load(task)
            except Exception as error:  # noqa: BLE001
                task = dataclasses.replace(task, description=f"(cannot load: {error})")
        tasks[name] = task
    return [tasks[name] for name in sorted(tasks)]


def tasks_declaring(field: str, *, besides: str) -> list[str]:
    """The tasks other than `besides` whose argument dataclasses declare `field`, so that an argument unknown
    to the chosen task can name the task it belongs to. Read on that error only: a task (or plugin) that
    cannot be loaded is skipped."""
    owners = []
    for name in task_names():
        if name == besides:
            continue
        try:
            task = resolve_task(name)
        except Exception:  # noqa: BLE001 - a broken plugin must not hide the error being reported
            continue
        if any(f.name == field for cls in task.arguments for f in dataclasses.fields(cls) if f.init):
            owners.append(name)
    return owners


def check_argument_dataclasses(classes: Sequence[type], *, task: str) -> None:
    """Each class must be a dataclass, and no flag may be declared twice (with TrainingArguments included)."""
    owners: dict[str, str] = dict(RESERVED_FLAGS)
    for cls in (TrainingArguments, *classes):
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise ArgumentError("task", f"arguments of task {task!r} must be dataclass classes, got {cls!r}; "
                                        f"decorate it with @dataclasses.dataclass and pass the class.")
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            for flag in _flags(f):
                if flag in owners:
                    raise ArgumentError(f.name, f"{flag} is declared by both {owners[flag]} and {cls.__name__} "
                                                f"(task {task!r}); rename the field in {cls.__name__}: "
                                                f"each flag may be declared once.")
                owners[flag] = cls.__name__


# ----------------------------------------------------------------------------- helpers


def _flags(f: dataclasses.Field) -> list[str]:
    """The option strings `HfArgumentParser` makes of a field: `--a_b`, `--a-b`, `--no_a_b` for True bools."""
    names = [f.name]
    if f.default is True:
        names.append(f"no_{f.name}")
    aliases = f.metadata.get("aliases", [])
    flags = [alias for alias in ([aliases] if isinstance(aliases, str) else aliases)]
    for name in names:
        flags += [f"--{name}", f"--{name.replace('_', '-')}"]
    return list(dict.fromkeys(flags))


def _names(classes: Sequence[type]) -> str:
    return ", ".join(cls.__name__ for cls in classes) or "none"


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or ":" in name or any(c.isspace() for c in name):
        raise ArgumentError("task", f"task name {name!r} must be a non-empty word without ':' or spaces "
                                    f"(':' marks a 'package.module:Class' path).")


def _check_target(target: str) -> None:
    module, _, attribute = target.partition(":")
    if not module or not attribute:
        raise ArgumentError("task", f"target {target!r} must read 'package.module:Class'.")


def _identity(target: str | Callable[..., Any]) -> str:
    """'module:qualname' for an object, so a re-executed module re-registers its own task silently."""
    if isinstance(target, str):
        return target
    return f"{getattr(target, '__module__', '?')}:{getattr(target, '__qualname__', repr(target))}"


def _add(task: Task, replace: bool) -> None:
    existing = _REGISTRY.get(task.name)
    if existing is not None and not replace and _identity(existing.target) != _identity(task.target):
        raise ArgumentError("task", f"task {task.name!r} is already registered to {_identity(existing.target)}; "
                                    f"choose another name, or pass replace=True to override it.")
    _REGISTRY[task.name] = task


def _mark(obj: Any, task: Task) -> None:
    """Remember the registration on the object, so loading it by entry point or path finds its arguments."""
    try:
        obj.__easytrain_task__ = task
    except (AttributeError, TypeError):  # builtins, slotted objects: only the registry knows them
        pass


def _doc_line(obj: Any) -> str:
    """First line of obj's own docstring (`__doc__`, not inherited: a subclass must not borrow its base's)."""
    doc = None if isinstance(obj, str) else getattr(obj, "__doc__", None)
    if not isinstance(doc, str) or not doc.strip() or (isinstance(obj, type) and doc.startswith(f"{obj.__name__}(")):
        return ""  # dataclasses make up a docstring from their signature
    return inspect.cleandoc(doc).splitlines()[0]


def _import(target: str) -> Any:
    module_name, _, attribute = target.partition(":")
    try:
        obj = importlib.import_module(module_name)
        for part in filter(None, attribute.split(".")):
            obj = getattr(obj, part)
        return obj
    except (ImportError, AttributeError) as error:
        raise ArgumentError("task", f"cannot import {target!r} ({error}); check the module path and class name.")


def _check_call(task: Task, values: tuple[Any, ...]) -> None:
    """Refuse a target that cannot take `(training_arguments, *task_arguments)` before calling it: that TypeError
    is a wrong --task (fixed on the command line), while one raised inside the call is the task's own (kept, with
    its traceback). A target without a readable signature (a builtin) is simply called."""
    try:
        signature = inspect.signature(task.target)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*values)
    except TypeError as error:
        name = getattr(task.target, "__name__", "target")
        expected = ", ".join(["training_arguments", *(cls.__name__ for cls in task.arguments)])
        raise ArgumentError("task", f"{task.name!r} cannot be built as {name}({expected}): it takes {name}{signature} "
                                    f"({error}). --task takes a trainer class or factory whose first argument is the "
                                    f"TrainingArguments, then one instance of each argument dataclass of the task "
                                    f"(@register_task(..., arguments=...)).") from None


def _check_plainly_a_trainer(task: Task) -> None:
    """Refuse, before calling it, a `--task module:attribute` that no `@register_task` vouches for and that cannot
    be a trainer: a built-in function (`builtins:print` would print the arguments, then return None), or a class
    with none of the methods of `TrainerProtocol` (`collections:OrderedDict` raised a bare TypeError). A class with
    some is built, and `check_implements` names what it lacks (a trainer may set members on the instance); so is one
    whose own `__new__` may return something else, a trainer factory written as a class (`_makes_its_own`)."""
    if not _ad_hoc(task):
        return
    if isinstance(task.target, types.BuiltinFunctionType):
        raise ArgumentError("task", f"{task.name!r} is a built-in function, not a trainer factory. {TASK_TAKES}")
    if isinstance(task.target, type) and not _makes_its_own(task.target):
        from easytrain.protocol import TrainerProtocol, missing_members, protocol_members  # jax: a --task path only

        methods = [name for name in protocol_members() if callable(getattr(TrainerProtocol, name))]
        if set(methods) <= set(missing_members(task.target)):
            raise ArgumentError("task", f"{task.name!r} is a class but not a trainer: it has none of the methods "
                                        f"of easytrain.TrainerProtocol ({', '.join(methods)}; subclass "
                                        f"easytrain.BaseTrainer to have them). {TASK_TAKES}")


def _makes_its_own(cls: type) -> bool:
    """Whether `cls` or a base defines `__new__` in Python: calling it may return a trainer of another class."""
    return any(isinstance(vars(base).get("__new__"), (staticmethod, types.FunctionType)) for base in cls.__mro__)


def _ad_hoc(task: Task) -> bool:
    """A `--task package.module:attribute` that no `@register_task` vouches for."""
    return task.origin == "import path" and not isinstance(getattr(task.target, "__easytrain_task__", None), Task)


def _ad_hoc_function(task: Task) -> bool:
    """A `--task package.module:function` that no `@register_task` vouches for (`json:dumps`): a TypeError
    from calling it most likely says it is no trainer factory. Classes and registered targets raise their own."""
    return _ad_hoc(task) and not isinstance(task.target, type)


def _load(task: Task) -> Task:
    """Import a string target; arguments and description come from its `@register_task` when it has one."""
    obj = _import(task.target) if isinstance(task.target, str) else task.target
    if isinstance(obj, types.ModuleType):  # an entry point naming a module whose decorators register tasks
        registered = _REGISTRY.get(task.name)
        if registered is None or not registered.loaded:
            raise ArgumentError("task", f"{task.target!r} was imported but registers no task named {task.name!r}; "
                                        f"decorate its trainer with @easytrain.register_task({task.name!r}).")
        return dataclasses.replace(registered, origin=task.origin)
    if not callable(obj):
        raise ArgumentError("task", f"{task.target!r} is not callable (a {type(obj).__name__}). {TASK_TAKES}")
    marked = getattr(obj, "__easytrain_task__", None)  # inherited by subclasses: same constructor arguments
    marked = marked if isinstance(marked, Task) else None
    arguments = task.arguments or (marked.arguments if marked else ())
    described = marked.description if marked and marked.target is obj else _doc_line(obj)
    return Task(task.name, obj, arguments, task.description or described, task.origin)


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def _origin(entry_point: importlib.metadata.EntryPoint) -> str:
    dist = getattr(entry_point, "dist", None)
    return f"entry point of {dist.name}" if dist is not None else "entry point"


def _from_entry_point(name: str) -> Task | None:
    """Load (and cache) the entry point called `name`, if an installed package declares one."""
    entry_point = next((ep for ep in _entry_points() if ep.name == name), None)
    if entry_point is None:
        return None
    task = _REGISTRY[name] = _load(Task(name, entry_point.value, origin=_origin(entry_point)))
    return task


_REGISTRY["lm"] = Task("lm", "easytrain.trainers.base:BaseTrainer", (),
                       "Causal language modelling with BaseTrainer on any text dataset (the default).", "built-in")
_REGISTRY["sft"] = Task("sft", "easytrain.trainers.sft:SFTTrainer", (),
                        "Supervised fine-tuning on text, prompt-completion or chat data (packing optional).",
                        "built-in")
_REGISTRY["dpo"] = Task("dpo", "easytrain.trainers.dpo:DPOTrainer", (),
                        "Preference optimisation (DPO, IPO, SimPO, ORPO, ...) on prompt/chosen/rejected pairs.",
                        "built-in")
