"""Text environments behind one protocol (see `fedse.envs.base`).

>>> env = make_env("maze")
>>> env.reset(0)
'The goal is at position 8, 6. Your current position is at position 1, 1. There are walls to your left, above you, below you.'
>>> env.step("Thought: The way right is open.\\nAction: move right").action
'move right'
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from functools import cache, partial
from importlib.metadata import entry_points

from fedse.envs.babyai import BabyAIEnv
from fedse.envs.base import ACK, EnvError, StepResult, TextEnv, replay
from fedse.envs.maze import MazeEnv
from fedse.envs.remote import EnvBackend, EnvServerError, RemoteEnv, ServedGame
from fedse.envs.textcraft import TextCraftEnv
from fedse.envs.webshop import WebShopEnv
from fedse.envs.wordle import WordleEnv

ENTRY_POINTS = "fedse.envs"
"""The entry-point group an installed package registers its environments in:
`[project.entry-points."fedse.envs"] tickets = "acme_envs:TicketEnv"`."""

BUILT_IN_ENVS: dict[str, Callable[..., TextEnv]] = {
    "maze": MazeEnv,
    "wordle": WordleEnv,
    "textcraft": TextCraftEnv,
    "babyai": BabyAIEnv,
    "webshop": WebShopEnv,
}
_MISSING = object()
_ATTRIBUTES = {
    "instruction": (str, "a string"),
    "max_turns": (int, "an integer >= 1"),
    "num_tasks": (int | None, "an integer or None"),
}
"""What fedse reads of every environment, with the type it must have."""
_REGISTERED: dict[str, Callable[..., TextEnv]] = {}
"""Environments a run configuration named by class (`register_env`), for this process."""


@cache
def _installed() -> dict[str, object]:
    """Name -> entry point, for every environment an installed package registers."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINTS)}


def list_envs() -> list[str]:
    return list(dict.fromkeys([*BUILT_IN_ENVS, *_REGISTERED, *_installed()]))


def env_class(name: str, path: str) -> type[TextEnv]:
    """The class `path` ("package.module:ClassName") names for environment `name`, checked to be
    a `TextEnv` that implements its methods; a mistake is one EnvError line naming the
    environment and what to do."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise EnvError(f"environment {name!r}: class = {path!r} is not 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise EnvError(
            f"environment {name!r}: cannot import {module_name!r} ({error}); is its package installed?"
        ) from None
    cls = module
    for part in attribute.split("."):
        cls = getattr(cls, part, None)
        if cls is None:
            raise EnvError(f"environment {name!r}: {module_name!r} has no {attribute!r}")
    if not (inspect.isclass(cls) and issubclass(cls, TextEnv)):
        raise EnvError(f"environment {name!r}: {path} is not a subclass of fedse.envs.TextEnv")
    if inspect.isabstract(cls):
        methods = ", ".join(sorted(cls.__abstractmethods__))
        raise EnvError(f"environment {name!r}: {path} does not implement {methods}")
    return cls


def register_env(name: str, path: str, options: dict | None = None) -> None:
    """Make `name` the environment class `path` names, built with `options`, in this process
    (what a run configuration's `[env.<name>] class = ...` does). Checked by building one."""
    if name in BUILT_IN_ENVS:
        raise EnvError(f"environment {name!r} is built in; give yours another name")
    factory = partial(env_class(name, path), **(options or {}))
    check_env(name, factory)
    _REGISTERED[name] = factory


def register_served_env(name: str, table: EnvBackend) -> None:
    """Make `name` a game that runs only on its server, described by its `[env.<name>]` table
    (`fedse.envs.remote.ServedGame`), in this process."""
    if name in BUILT_IN_ENVS:
        raise EnvError(f"environment {name!r} is built in; give yours another name")
    factory = partial(ServedGame, name, table)
    check_env(name, factory)
    _REGISTERED[name] = factory


def register_node_env(name: str) -> None:
    """Make `name` known in this process as an environment that the Flower node holding it
    defines (`[env.<name>] backend = "node"`): a server's run configuration names it, and only
    that node's own configuration (`fedse flower node --env-config`, `--env-class`, or a package
    installed there) says what it is. A definition this process already has is kept."""
    if name in BUILT_IN_ENVS:
        raise EnvError(f"environment {name!r} is built in; give yours another name")
    if name not in _REGISTERED and name not in _installed():
        _REGISTERED[name] = partial(_defined_on_its_node, name)


def _defined_on_its_node(name: str, **options) -> TextEnv:
    raise EnvError(
        f"environment {name!r} is defined on its Flower node only ([env.{name}] backend = 'node'): run the "
        "federation with `fedse flower`, the node holding it defining it (--env-config, --env-class or its installed package)"
    )


def defined_on_its_node(name: str) -> bool:
    """Whether this process knows `name` only as an environment its Flower node defines."""
    factory = _REGISTERED.get(name)
    return isinstance(factory, partial) and factory.func is _defined_on_its_node


def check_env(name: str, factory: Callable[..., TextEnv]) -> TextEnv:
    """Build one instance and check what fedse needs of it: its instruction, turn limit, task
    count and splits (as attributes of the class or set by its constructor)."""
    try:
        env = factory()
    except TypeError as error:
        raise EnvError(f"environment {name!r}: cannot build it with its options ({error})") from None
    if not isinstance(env, TextEnv):
        raise EnvError(f"environment {name!r}: it built a {type(env).__name__}, not a fedse.envs.TextEnv")
    _named(env, name)
    for attribute, (kind, wanted) in _ATTRIBUTES.items():
        value = getattr(env, attribute, _MISSING)
        if value is _MISSING:
            raise EnvError(f"environment {name!r}: it has no {attribute!r}; set it (see fedse.envs.TextEnv)")
        if isinstance(value, bool) or not isinstance(value, kind) or (attribute == "max_turns" and value < 1):
            raise EnvError(f"environment {name!r}: {attribute} = {value!r}; it must be {wanted}")
    splits = env.splits
    for split in ("train", "test"):
        ids = splits.get(split) if isinstance(splits, dict) else None
        if not ids:
            raise EnvError(f"environment {name!r}: its splits name no {split} task ids; return them from `splits`")
        if not isinstance(ids, list | tuple | range):
            raise EnvError(
                f"environment {name!r}: its {split} split is a {type(ids).__name__}; give the ids in order, as a list"
            )
        bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or i < 0]
        if not bad and env.num_tasks is not None:
            bad = [i for i in ids if i >= env.num_tasks]
        if bad:
            raise EnvError(f"environment {name!r}: {split} task id {bad[0]!r} is out of range ({env.valid_ids_text()})")
    return env


def _factory(name: str) -> Callable[..., TextEnv]:
    if name in BUILT_IN_ENVS:
        return BUILT_IN_ENVS[name]
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in _installed():
        try:
            loaded = _installed()[name].load()
        except Exception as error:  # a third-party package's import may raise anything
            raise EnvError(f"environment {name!r}: its package's entry point failed to load ({error})") from None
        if inspect.isclass(loaded):
            factory = env_class(name, f"{loaded.__module__}:{loaded.__qualname__}")
        elif callable(loaded):  # a function that builds one
            factory = loaded
        else:
            raise EnvError(f"environment {name!r}: its entry point names {loaded!r}, not a TextEnv class or a function")
        check_env(name, factory)
        _REGISTERED[name] = factory
        return factory
    raise EnvError(f"unknown environment {name!r}; choose one of: {', '.join(list_envs())}")


def make_env(name: str, backend: EnvBackend | None = None, **options) -> TextEnv:
    """A fresh environment by name; an unknown name raises EnvError listing the valid ones.

    With an http `backend` the games run on that AgentGym-compatible server (`RemoteEnv`);
    `options` configure the in-process copy that supplies the instruction and the expert.
    """
    local = _named(_factory(name)(**options), name)
    if backend is None or backend.backend != "http":  # "node": this process holds the node's definition
        return local
    return RemoteEnv(local, backend.url, timeout=backend.timeout, retries=backend.retries, dialect=backend.dialect)


def _named(env: TextEnv, name: str) -> TextEnv:
    """`env` playing as `name`: a class registered under another name plays under that one."""
    if getattr(env, "name", None) != name:
        try:
            env.name = name
        except AttributeError:
            raise EnvError(
                f"environment {name!r}: its class names itself {env.name!r}; register it under that name"
            ) from None
    return env


def has_expert(name: str) -> bool:
    """Whether environment `name` has a scripted expert to seed buffers with (False where this
    process does not know its class: `defined_on_its_node`)."""
    if defined_on_its_node(name):
        return False
    return type(_factory(name)()).expert is not TextEnv.expert


__all__ = [
    "ACK",
    "BUILT_IN_ENVS",
    "ENTRY_POINTS",
    "EnvBackend",
    "EnvError",
    "EnvServerError",
    "RemoteEnv",
    "StepResult",
    "TextEnv",
    "check_env",
    "defined_on_its_node",
    "env_class",
    "has_expert",
    "list_envs",
    "make_env",
    "register_env",
    "register_node_env",
    "register_served_env",
    "replay",
]
