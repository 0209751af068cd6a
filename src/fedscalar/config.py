"""Run configuration: one validated model, read from TOML and command-line flags.

Precedence: built-in defaults < ``--config`` TOML file < flags. The resolved config is
written to ``config.toml`` in the run folder and is what ``--resume`` reads back.
"""

from __future__ import annotations

import functools
import tomllib
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fedscalar import registry
from fedscalar.schedule import learning_rate

ALGORITHMS = registry.ALGORITHMS
"""Every algorithm by name (built-in and registered): `registry.AlgorithmSpec`."""
TASKS = registry.TASKS

TEXT_LR: dict[tuple[str, str, bool], float] = {
    ("zo", "minilm-l6", True): 1e-2,
    ("hiso", "minilm-l6", True): 3e-3,
    ("fo", "minilm-l6", True): 1e-1,
    ("zo", "minilm-l6", False): 1e-5,
    ("hiso", "minilm-l6", False): 1e-5,
    ("fo", "minilm-l6", False): 1e-4,
    ("zo", "smollm2-135m", True): 1e-2,
    ("hiso", "smollm2-135m", True): 1e-2,
    ("fo", "smollm2-135m", True): 5e-2,
    ("zo", "smollm2-135m", False): 1e-5,
    ("hiso", "smollm2-135m", False): 1e-5,
    ("fo", "smollm2-135m", False): 1e-4,
    ("sign", "minilm-l6", True): 3e-3,
    ("sign", "smollm2-135m", True): 1e-3,
    ("sign", "*", True): 1e-3,
    ("sign", "*", False): 1e-6,
    ("zo", "*", True): 3e-3,
    ("hiso", "*", True): 3e-3,
    ("fo", "*", True): 1e-1,
    ("zo", "*", False): 1e-5,
    ("hiso", "*", False): 1e-5,
    ("fo", "*", False): 1e-4,
}
"""Learning rates of the text tasks when ``lr`` is not given, by (family, model, LoRA);
``*`` is any other model (docs/results.md#learning-rates says how they were chosen)."""

TEXT_LORA_LAYERS: dict[str, int] = {"minilm-l6": 2, "smollm2-135m": 10}
"""LoRA's blocks when ``lora_layers`` is not given: the last third of a built-in model's
(the placement its learning rates were swept with); any other model: all of them."""


def default_lr(algorithm: str, task: str, model: str | None, lora: bool) -> float | None:
    """The learning rate a run uses when none is given (None: the algorithm names none
    for this task, so the config must give one)."""
    spec, task_spec = registry.algorithm(algorithm), registry.task(task)
    if not task_spec.text:
        return spec.lr.get(task)
    key = (spec.lr_family, model or task_spec.default_model, lora)
    return TEXT_LR.get(key, TEXT_LR.get((spec.lr_family, "*", lora)))


ALGORITHM_ONLY = ("projections", "server_lr")
"""Fields that only the algorithms naming them in `AlgorithmSpec.defaults` take."""

RESUMABLE_CHANGES = frozenset(
    {
        "rounds",
        "lr",
        "lr_schedule",
        "lr_warmup",
        "lr_decay_rounds",
        "lr_decay_to",
        "divergence_ratio",
        "divergence_backoff",
        "lr_scale",
        "eval_every",
        "out",
        "runtime",
        "min_replies",
        "short_round",
        "round_retries",
        "reply_timeout",
    }
)
"""Fields a resumed run may change; anything else would make it a different run."""


class ConfigError(ValueError):
    """A configuration problem, phrased for the user in one line."""


class RunConfig(BaseModel):
    """Everything that defines a run. Field names are the CLI option names."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    plugins: list[str] | None = Field(
        None,
        description="Python modules imported first: they register their own algorithms "
        "and tasks (docs/api.md).",
    )
    options: dict[str, str | bool | int | float] | None = Field(
        None,
        description="Settings a plug-in algorithm or task declares, as name=value pairs "
        "(comma-separated on the command line); unknown names are refused.",
    )
    algorithm: str = Field(
        "decomfl",
        description="Training algorithm: "
        + "; ".join(f"{name}: {spec.help}" for name, spec in registry.ALGORITHMS.items())
        + "; or one a plugin registers.",
    )
    task: str = Field(
        "digits",
        description="Task: "
        + "; ".join(f"{name}: {spec.help}" for name, spec in registry.TASKS.items())
        + "; or one a plugin registers.",
    )
    model: str | None = Field(
        None,
        description="Model. digits/mnist: linear, mlp, mlp16, mlp64, mlp128 or cnn (default "
        "mlp); text tasks: smollm2-135m, minilm-l6 (default), a hub id or a local folder.",
    )
    clients: int = Field(10, ge=1, description="Number of clients the data is split over.")
    sampled: int = Field(5, ge=1, description="Clients sampled per round.")
    rounds: int = Field(600, ge=1, description="Total number of rounds.")
    local_steps: int = Field(1, ge=1, le=255, description="Local steps K per round.")
    perturbations: int = Field(
        5, ge=1, le=255, description="Perturbations P per ZO step (feedsign: default 1)."
    )
    projections: int | None = Field(
        None,
        ge=1,
        le=255,
        description="ferret: random directions the local update is projected on per round "
        "(default 64).",
    )
    server_lr: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="ferret: step of the rebuilt update, x += server-lr x update (default 0.3).",
    )
    lr: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Learning rate; default per algorithm, task, model and LoRA "
        "(config.default_lr, listed in docs/results.md).",
    )
    lr_schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant",
        description="Learning rate over rounds: constant, or a cosine or linear decay to "
        "lr-decay-to x lr at round lr-decay-rounds.",
    )
    lr_warmup: int = Field(
        0, ge=0, description="Rounds of linear warm-up from lr/lr-warmup to lr (0: none)."
    )
    lr_decay_rounds: int | None = Field(
        None,
        ge=1,
        description="Round at which a decaying schedule reaches its end (default: rounds, "
        "fixed when the run starts, so extending a run keeps its schedule).",
    )
    lr_decay_to: float = Field(
        0.1, ge=0, le=1, description="Final learning rate of a decay, as a fraction of lr."
    )
    divergence_ratio: float = Field(
        1.5,
        ge=0,
        allow_inf_nan=False,
        description="Stop the run as diverged when an evaluation's test loss exceeds this "
        "multiple of the best so far, or rises 10% above its start after improving (0: never; "
        "a non-finite loss or weight always stops it).",
    )
    divergence_backoff: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="On a divergence, roll the run back to its best evaluated round and go on "
        "with the learning rate times this factor, at most 3 times (0: stop the run instead; "
        "DeComFL, HiSo and the other replayable methods).",
    )
    lr_scale: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Multiplier of the learning rate, set by divergence back-offs (kept on "
        "resume).",
    )
    mu: float = Field(1e-3, gt=0, allow_inf_nan=False, description="ZO smoothing radius.")
    difference: Literal["forward", "central"] = Field(
        "forward", description="Finite difference: forward (P+1 forwards) or central (2P)."
    )
    batch_size: int = Field(32, ge=1, description="Minibatch size per local step.")
    partition: Literal["iid", "dirichlet"] = Field(
        "iid", description="How examples are split over clients: iid or dirichlet (over labels)."
    )
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (partition=dirichlet).")
    seed: int = Field(0, ge=0, lt=2**32, description="Run seed: data split, sampling, seeds.")
    eval_every: int = Field(25, ge=1, description="Evaluate on the test set every N rounds.")
    hiso_beta: float = Field(0.95, gt=0, lt=1, description="HiSo curvature EMA factor.")
    hiso_eps: float = Field(1e-8, gt=0, description="HiSo: directions use 1/sqrt(H + eps).")
    hiso_curvature_update: Literal["last", "all"] = Field(
        "last", description="HiSo with K>1: update H from the last local step or all of them."
    )
    dataset: str | None = Field(
        None, description="text-classification: HF dataset name, or a local folder or file."
    )
    text_column: str = Field("text", description="text-classification: the text column.")
    label_column: str = Field("label", description="text-classification: the label column.")
    template: str | None = Field(
        None,
        description="Causal LMs: prompt with one {text}; default sentiment '{text} It was', "
        "otherwise '{text}\\nAnswer:'.",
    )
    verbalizers: list[str] | None = Field(
        None,
        description="One phrase per label, in label order. Causal LMs: a single-token word "
        "each (default sentiment ' terrible,great', otherwise ' <label name>'); encoders: any "
        "phrase, whose embedding starts the head (default 'This text is about <label name>.').",
    )
    max_length: int = Field(128, ge=2, description="Text tasks: tokens per example at most.")
    eval_examples: int = Field(
        500, ge=0, description="Text tasks: fixed test subset evaluated (0: the whole test set)."
    )
    pack_tokens: int = Field(
        256,
        ge=0,
        description="Text tasks: examples are packed without padding into rows of at most "
        "this many tokens (0: one padded example per row).",
    )
    lora: bool = Field(False, description="Text tasks: train LoRA adapters (PEFT) only.")
    lora_rank: int = Field(8, ge=1, description="LoRA rank.")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA alpha (scale alpha/rank).")
    lora_targets: list[str] | None = Field(
        None, description="LoRA target modules; default: attention query and value projections."
    )
    lora_layers: int | None = Field(
        None,
        ge=1,
        description="LoRA on the last N transformer blocks only (default: the last third, "
        "minilm-l6 2 and smollm2-135m 10; other models all). The blocks below hold no "
        "trainable weight, so a ZO step computes them once, not P+1 times.",
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Text tasks: weights dtype."
    )
    device: Literal["cpu", "cuda", "auto"] = Field("cpu", description="cpu, cuda or auto.")
    arithmetic: Literal["v1", "v2"] = Field(
        "v2",
        description="How global updates are computed: v2, bit-identical on every IEEE-754 "
        "device (docs/protocol.md); v1, the arithmetic of runs started before it (read from "
        "their ledger on resume and export).",
    )
    catch_up: Literal["replay", "auto"] = Field(
        "replay",
        description="How a client that missed rounds gets up to date: replay the missed "
        "updates, or auto: receive the current state instead when that is fewer bytes.",
    )
    runtime: Literal["local", "flower-simulation", "flower"] = Field(
        "local",
        description="local: the in-process simulator; flower-simulation: Flower's simulation "
        "engine (needs fedscalar[flower-sim]); flower: a Flower deployment (set by the "
        "fedscalar Flower app under `flwr run`, not by `fedscalar run`).",
    )
    min_replies: int = Field(
        1, ge=1, description="Valid client replies a round needs before it is applied."
    )
    short_round: Literal["retry", "skip"] = Field(
        "retry",
        description="A round with fewer than min-replies valid replies: retry asks the "
        "missing clients again (round-retries times, then the run stops, resumable); skip "
        "records the round as a no-op update.",
    )
    round_retries: int = Field(2, ge=0, description="Retries of a short round (short-round=retry).")
    reply_timeout: float = Field(
        120.0, gt=0, description="Flower runtimes: seconds a round waits for client replies."
    )
    topk_fraction: float = Field(
        0.01, gt=0, le=1, description="fedavg-topk: fraction of the weight change uploaded."
    )
    qsgd_bits: int = Field(4, ge=2, le=16, description="fedavg-qsgd: bits per uploaded value.")
    seed_pool: int = Field(
        1024, ge=1, le=1 << 20, description="fedkseed(-pro): number of candidate seeds."
    )
    aggregator: Literal["mean", "median", "trimmed-mean", "krum"] = Field(
        "mean",
        description="How the server combines replies: mean, median, trimmed-mean or krum "
        "(on the scalars for scalar-only methods, on the weight change otherwise).",
    )
    trim_fraction: float = Field(
        0.2, ge=0, lt=0.5, description="trimmed-mean: fraction cut from each end."
    )
    krum_f: int | None = Field(
        None, ge=0, description="krum: faulty replies tolerated; default (sampled - 3) // 2."
    )
    attack: Literal["none", "gaussian", "sign-flip"] = Field(
        "none",
        description="Byzantine clients' attack: none, gaussian (values replaced by "
        "N(0, attack-scale^2)) or sign-flip (values times -attack-scale).",
    )
    attackers: int = Field(0, ge=0, description="Number of Byzantine clients (fixed ids).")
    attack_scale: float = Field(10.0, gt=0, description="Strength of the attack.")
    dp_epsilon: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Differential privacy: the whole run's client-level budget epsilon; the "
        "noise is calibrated to it before training (decomfl, hiso, fedavg, fedzo; default: "
        "no DP).",
    )
    dp_delta: float = Field(
        1e-5, gt=0, lt=1, description="DP: the budget's delta (keep it below 1/clients)."
    )
    dp_clip: float = Field(
        1.0,
        gt=0,
        allow_inf_nan=False,
        description="DP: L2 bound of one client's reply (its K x P scalars, or its weight "
        "change); longer replies are scaled down to it.",
    )
    dp_mode: Literal["central", "local"] = Field(
        "central",
        description="DP: central (the server noises the sum of the clipped replies) or local "
        "(each client noises its own reply, trusting no server; far more noise).",
    )
    dp_noise_multiplier: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="DP: noise standard deviation over the sensitivity (2 x dp-clip); set "
        "from dp-epsilon when the run starts, or given instead (epsilon is then reported).",
    )
    dp_seed: int | None = Field(
        None,
        ge=0,
        lt=2**63,
        description="DP: seed of the noise; default a secret kept in the run folder "
        "(dp-secret). Set it only to reproduce a run: whoever knows it can remove the noise.",
    )
    secure_aggregation: bool = Field(
        False,
        description="Secure aggregation: the sampled clients mask their replies so the "
        "server learns only their sum (decomfl, hiso; at least 3 sampled).",
    )
    out: str | None = Field(None, description="Run folder; default: a new folder under runs/.")

    @model_validator(mode="before")
    @classmethod
    def _plugins_first(cls, values: Any, info: ValidationInfo) -> Any:
        """Import the plugins before the names they register are checked; fill in the
        algorithm's and (for a new run, not a run folder's stored config) the task's and
        the model's own defaults of the fields not given."""
        if not isinstance(values, dict):
            return values
        if values.get("plugins"):
            registry.load_plugins(list(values["plugins"]))
        if values.get("algorithm", "decomfl") in registry.ALGORITHMS:
            defaults = registry.algorithm(values.get("algorithm", "decomfl")).defaults
            values = {**values, **{k: v for k, v in defaults.items() if values.get(k) is None}}
        stored = bool(info.context and info.context.get("stored"))
        task = values.get("task", cls.model_fields["task"].default)
        if not stored and task in registry.TASKS:
            spec = registry.task(task)
            given = {k: v for k, v in values.items() if v is not None}
            values = {**values, **{k: v for k, v in spec.defaults.items() if k not in given}}
            model = values.get("model") or spec.default_model
            if values.get("lora") is True and "lora_layers" not in values:  # None: all blocks
                values["lora_layers"] = TEXT_LORA_LAYERS.get(model)
        return values

    @field_validator("options", mode="before")
    @classmethod
    def _options_from_pairs(cls, value: Any) -> Any:
        """``["a=1", "b=x"]`` (the command line's form) as ``{"a": "1", "b": "x"}``."""
        if isinstance(value, list | tuple):
            pairs = {}
            for item in value:
                name, sep, text = str(item).partition("=")
                if not sep or not name.strip():
                    raise ValueError(f"expected name=value, got {item!r}")
                pairs[name.strip()] = text.strip()
            return pairs
        return value

    @field_validator("algorithm", "task")
    @classmethod
    def _registered(cls, name: str, info: ValidationInfo) -> str:
        table = registry.ALGORITHMS if info.field_name == "algorithm" else registry.TASKS
        if name not in table:
            raise ValueError(f"unknown {info.field_name}; choose from {', '.join(table)}")
        return name

    @property
    def spec(self) -> registry.AlgorithmSpec:
        """The algorithm's registry entry: what it supports."""
        return registry.algorithm(self.algorithm)

    @property
    def task_spec(self) -> registry.TaskSpec:
        return registry.task(self.task)

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        spec, task_spec = self.spec, self.task_spec
        if not task_spec.text:
            for name in ("dataset", "template", "verbalizers", "lora_targets", "lora_layers"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}: only for text tasks, not {self.task}")
            if self.lora:
                raise ValueError(f"lora: only for text tasks, not {self.task}")
            if self.dtype != "float32":
                raise ValueError(f"dtype: {self.task} models train in float32 only")
        if self.lora_layers is not None and not self.lora:
            raise ValueError("lora_layers: only with --lora")
        if self.task == "text-classification" and self.dataset is None:
            raise ValueError("dataset: text-classification needs --dataset")
        if self.sampled > self.clients:
            raise ValueError(
                f"sampled: {self.sampled} clients per round but only {self.clients} clients"
            )
        if self.runtime not in spec.runtimes:
            carried = [a for a, s in registry.ALGORITHMS.items() if self.runtime in s.runtimes]
            raise ValueError(
                f"runtime: {self.runtime} carries {', '.join(carried)}; "
                f"{self.algorithm} runs in the local simulator"
            )
        if (self.attack == "none") != (self.attackers == 0):
            raise ValueError(
                "attack: give both --attack and --attackers (or neither)"
                if self.attackers == 0
                else f"attackers: {self.attackers} attackers need --attack gaussian|sign-flip"
            )
        if self.attackers >= self.clients:
            raise ValueError(
                f"attackers: {self.attackers} attackers among {self.clients} clients leave "
                "no honest one"
            )
        if spec.pooled and (self.attackers or self.aggregator != "mean"):
            raise ValueError(
                f"{self.algorithm}: one party trains on the pooled data; no attackers or aggregator"
            )
        if self.attackers and not spec.attackable:
            raise ValueError(f"attackers: {self.algorithm} has no simulated attackers")
        if self.aggregator not in spec.aggregators:
            raise ValueError(
                f"aggregator: {self.algorithm} takes {', '.join(spec.aggregators)} only"
                + (
                    " (its clients measure along different pool seeds, so their scalars are "
                    "not coordinates of one vector)"
                    if self.algorithm.startswith("fedkseed")
                    else " (the majority vote is its rule, robust already: one reply moves a "
                    "vote by at most one)"
                    if self.algorithm == "feedsign"
                    else ""
                )
            )
        default_p = RunConfig.model_fields["perturbations"].default
        if not spec.perturbs and self.perturbations != default_p:
            raise ValueError(
                f"perturbations: {self.algorithm} measures no ZO perturbations"
                + (
                    " (it projects on --projections directions)"
                    if "projections" in spec.defaults
                    else ""
                )
            )
        for name in ALGORITHM_ONLY:
            if getattr(self, name) is not None and name not in spec.defaults:
                takers = [a for a, sp in registry.ALGORITHMS.items() if name in sp.defaults]
                raise ValueError(f"{name}: only for {', '.join(takers)}, not {self.algorithm}")
        self._check_options(spec.options | task_spec.options)
        if spec.check is not None:
            spec.check(self)
        if self.lr is None and self.effective_lr is None:
            raise ValueError(f"lr: {self.algorithm} has no default for {self.task}; give --lr")
        if (
            self.aggregator == "krum"
            and self.krum_f is not None
            and self.sampled <= 2 * self.krum_f + 2
        ):
            raise ValueError(
                f"krum_f: Krum with f={self.krum_f} needs more than {2 * self.krum_f + 2} "
                f"replies per round, {self.sampled} clients are sampled"
            )
        if 0 < self.divergence_ratio <= 1:
            raise ValueError(
                f"divergence_ratio: {self.divergence_ratio} would stop a run whose test loss "
                "merely stops improving; use a value above 1 (or 0 to never stop)"
            )
        self._check_privacy()
        self._check_secure_aggregation()
        if self.min_replies > self.sampled:
            raise ValueError(
                f"min_replies: {self.min_replies} valid replies needed but only "
                f"{self.sampled} clients sampled per round"
            )
        return self

    @property
    def private(self) -> bool:
        """Whether the run is differentially private."""
        return self.dp_epsilon is not None or self.dp_noise_multiplier is not None

    def _check_privacy(self) -> None:
        if not self.private:
            for name in ("dp_delta", "dp_clip", "dp_mode", "dp_seed"):
                if getattr(self, name) != RunConfig.model_fields[name].default:
                    raise ValueError(f"{name}: only with --dp-epsilon or --dp-noise-multiplier")
            return
        if not self.spec.private:
            takers = [a for a, sp in registry.ALGORITHMS.items() if sp.private]
            raise ValueError(
                f"dp_epsilon: differential privacy covers {', '.join(takers)}, not {self.algorithm}"
            )
        if self.aggregator != "mean":
            raise ValueError(
                f"aggregator: a DP run takes the mean only (the noise is calibrated to the "
                f"sum of the clipped replies; {self.aggregator} is not covered)"
            )

    def _check_secure_aggregation(self) -> None:
        if not self.secure_aggregation:
            return
        if self.algorithm not in SECURE:
            raise ValueError(
                f"secure_aggregation: for {', '.join(SECURE)} (replies of scalars the "
                f"server averages), not {self.algorithm}"
            )
        if self.sampled < 3:
            raise ValueError(
                f"secure_aggregation: needs at least 3 sampled clients a round, got "
                f"{self.sampled} (with 2, each would learn the other's reply from the sum)"
            )
        if self.aggregator != "mean":
            raise ValueError(
                f"secure_aggregation: the server sees only the sum of the replies, so it "
                f"cannot take the {self.aggregator} of them; use the mean"
            )
        if self.private and self.dp_mode == "central":
            raise ValueError(
                "secure_aggregation: central DP clips each reply on the server, which "
                "secure aggregation hides from it; use --dp-mode local"
            )

    def privacy_accounting(self):
        """The run's `fedscalar.privacy.accounting.Federation` (None without DP)."""
        if not self.private:
            return None
        from fedscalar.privacy.accounting import Federation

        return Federation(self.dp_mode, self.clients, self.sampled)

    def _check_options(self, declared: dict[str, Any]) -> None:
        """Each option is one the algorithm or task declares; its value takes the type of
        the declared default (set in place, without re-validating)."""
        if not self.options:
            return
        typed = {}
        for name, value in self.options.items():
            if name not in declared:
                takes = ", ".join(declared) or "none"
                raise ValueError(
                    f"options: {self.algorithm} on {self.task} has no option {name!r} "
                    f"(it takes: {takes})"
                )
            typed[name] = _as_type_of(declared[name], value, name)
        object.__setattr__(self, "options", typed)

    def option(self, name: str) -> Any:
        """A plug-in setting: the value given in ``options``, or its declared default."""
        declared = self.spec.options | self.task_spec.options
        if name not in declared:
            raise KeyError(f"{self.algorithm} on {self.task} declares no option {name!r}")
        return (self.options or {}).get(name, declared[name])

    @property
    def effective_lr(self) -> float | None:
        if self.lr is not None:
            return self.lr
        return default_lr(self.algorithm, self.task, self.model, self.lora)

    def resolved(self) -> RunConfig:
        """A copy with defaults that depend on other fields filled in (DP: the noise
        multiplier calibrated to the budget; `ConfigError` if none meets it)."""
        update: dict[str, Any] = {
            "lr": self.effective_lr,
            "lr_decay_rounds": self.lr_decay_rounds or self.rounds,
        }
        if self.dp_epsilon is not None and self.dp_noise_multiplier is None:
            update["dp_noise_multiplier"] = _calibrated(
                self.dp_mode,
                self.clients,
                self.sampled,
                self.dp_epsilon,
                self.dp_delta,
                self.rounds,
            )
        return self.model_copy(update=update)

    def describe_data(self) -> str:
        """The task, its data and its model, for logs and plot titles."""
        spec = self.task_spec
        data = self.dataset if self.task == "text-classification" else spec.data
        return f"{self.task} ({data}), model {self.model or spec.default_model}"

    def lr_at(self, rnd: int) -> float:
        """The learning rate of round ``rnd`` under the schedule."""
        lr = self.effective_lr
        assert lr is not None  # a config without a default rate must give one (validated)
        return self.lr_scale * learning_rate(
            lr,
            rnd,
            kind=self.lr_schedule,
            warmup=self.lr_warmup,
            decay_rounds=self.lr_decay_rounds or self.rounds,
            decay_to=self.lr_decay_to,
        )

    def to_toml(self) -> str:
        return tomli_w.dumps(self.model_dump(exclude_none=True))


SECURE = ("decomfl", "hiso")
"""Algorithms that take secure aggregation (a mean of scalar replies)."""


@functools.lru_cache(maxsize=64)
def _calibrated(
    mode: str, clients: int, sampled: int, epsilon: float, delta: float, rounds: int
) -> float:
    from fedscalar.privacy.accounting import BudgetError, Federation

    try:
        return Federation(mode, clients, sampled).calibrate(epsilon, delta, rounds)
    except BudgetError as e:
        raise ConfigError(str(e)) from None


def _as_type_of(default: Any, value: Any, name: str) -> Any:
    """``value`` (a string from the command line, or a TOML value) as ``default``'s type."""
    kind = type(default)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    text = str(value).strip()
    try:
        if kind is bool:
            if text.lower() in ("true", "1", "yes", "on"):
                return True
            if text.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        return kind(text)
    except ValueError:
        raise ValueError(f"options: {name} takes a {kind.__name__}, got {value!r}") from None


def _format(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first["loc"]) or "config"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"unknown option '{loc}'"
    value = first.get("input")
    shown = f" (got {value!r})" if loc != "config" and not isinstance(value, dict) else ""
    return msg if loc == "config" else f"{loc}: {msg}{shown}"


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: file not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config: {path} is not valid TOML: {e}") from e


def _validated(values: dict[str, Any], stored: bool = False) -> RunConfig:
    try:
        return RunConfig.model_validate(values, context={"stored": stored})
    except ValidationError as e:
        raise ConfigError(_format(e)) from None


def build_config(file: str | Path | None = None, **overrides: Any) -> RunConfig:
    """Defaults, then the TOML ``file``, then the ``overrides`` that are not None."""
    values: dict[str, Any] = read_toml(file) if file is not None else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return _validated(values)


def stored_config(file: str | Path, **overrides: Any) -> RunConfig:
    """A run folder's ``config.toml`` (with ``overrides`` that are not None), as the run
    was configured: a field it leaves out (``lora_layers`` on all blocks) keeps the
    field's own default, whatever the task's or model's default is now."""
    values = read_toml(file)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return _validated(values, stored=True)


def build_config_text(text: str, stored: bool = True) -> RunConfig:
    """A config from TOML text: as `RunConfig.to_toml` writes it (``stored``), or a new
    run's settings (``stored=False``: task and model defaults fill in what it omits)."""
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config: not valid TOML: {e}") from e
    return _validated(values, stored=stored)
