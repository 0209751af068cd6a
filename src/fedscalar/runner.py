"""One training run: set up (or resume) a run folder, loop over rounds, record everything.

The loop is the same whatever the runtime: sample clients and seeds, let the runtime
exchange messages, aggregate, append to the ledger, evaluate, checkpoint.
"""

from __future__ import annotations

import logging
import math
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedscalar import schedule
from fedscalar.algorithms import (
    ClientData,
    Diverged,
    RejectedReply,
    make_client,
    make_server,
)
from fedscalar.config import ConfigError, RunConfig
from fedscalar.evalcache import EvalCache, eval_key
from fedscalar.federation import (
    client_data,
    client_partitions,
    partition_digest,
    resolve_device,
    round_clients,
)
from fedscalar.header import BASE_COPY_LIMIT, check_header, ledger_header, load_base
from fedscalar.ledger import Ledger
from fedscalar.messages import GlobalUpdate, Message
from fedscalar.params import ParamSpace
from fedscalar.rundir import RunDir
from fedscalar.runtime.base import RoundTraffic, RunSetup, RuntimeFactory
from fedscalar.runtime.local import LocalRuntime
from fedscalar.tasks import build_task
from fedscalar.tasks.hf import MissingPackage

if TYPE_CHECKING:
    from fedscalar.privacy.accounting import Spending

log = logging.getLogger("fedscalar")


WORSE_THAN_START = 1.1
"""A run whose test loss improved and then rose 10% above its starting value diverged."""


MAX_BACKOFFS = 3
"""Divergence back-offs a run takes (its lr_scale reaching divergence_backoff**3) before a
divergence stops it."""


class BackOff(Exception):
    """A divergence the run recovers from: roll back to ``best_round``, smaller steps."""

    def __init__(self, reason: str, best_round: int):
        super().__init__(reason)
        self.best_round = best_round


class RunFailed(RuntimeError):
    """The run stopped early; its folder holds everything up to the last good round.
    ``code`` is the exit status the command line gives it (130/143 for a signal)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


class Terminated(Exception):
    """SIGTERM arrived: stop like Ctrl-C (exit status 143)."""


_CAUGHT: dict[str, str | None] = {"signal": None}
"""The stop signal that arrived while training, as the handlers recorded it."""


def _on_signal(signum: int, frame: Any) -> None:
    if signum == signal.SIGTERM:
        _CAUGHT["signal"] = "SIGTERM"
        raise Terminated()
    _CAUGHT["signal"] = "SIGINT"
    raise KeyboardInterrupt


def _raise_if_signalled() -> None:
    """Raise the exception of a stop signal whose own one was swallowed (Python drops an
    exception raised while a finaliser runs), so the run still stops, after its round."""
    caught = _CAUGHT["signal"]
    if caught == "SIGTERM":
        raise Terminated()
    if caught == "SIGINT":
        raise KeyboardInterrupt


class ShortRound(RuntimeError):
    """A round got fewer valid replies than it needs, after its retries."""

    def __init__(self, message: str, nonfinite: bool):
        super().__init__(message)
        self.nonfinite = nonfinite


RoundCallback = Callable[[dict[str, Any]], None]
"""Called with each round's metrics record once the round is recorded."""
"""Builds the runtime for a run from its server, client data and config."""


@dataclass
class RunResult:
    out: Path
    summary: dict[str, Any]


def default_out(cfg: RunConfig) -> Path:
    """``runs/<algorithm>-<task>-<time>``: where a run without ``out`` goes."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.algorithm}-{cfg.task}-{stamp}"


def _setup_logging(rd: RunDir) -> logging.Handler:
    handler = logging.FileHandler(rd.log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def execute(
    cfg: RunConfig,
    *,
    resume: bool,
    progress: bool,
    runtime: RuntimeFactory | None,
    from_round: int | None = None,
    on_round: RoundCallback | None = None,
    eval_cache: EvalCache | None = None,
) -> RunResult:
    """Run the resolved ``cfg`` in its folder ``cfg.out`` with the given runtime."""
    rd = RunDir(cfg.out or default_out(cfg))
    with rd.writing(), _signals_stop():
        if not resume and rd.exists():
            raise ConfigError(f"out: {rd.path} already holds a run; use --resume or another --out")
        return _execute_locked(cfg, rd, resume, progress, runtime, from_round, on_round, eval_cache)


@contextmanager
def _signals_stop() -> Iterator[None]:
    """While training, SIGINT (Ctrl-C) and SIGTERM stop the run (main thread only; a
    SIGINT the process ignores stays ignored). The handlers also record the signal, which
    the loop checks after every round (`_raise_if_signalled`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _CAUGHT["signal"] = None
    stops = [signal.SIGTERM]
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        stops.append(signal.SIGINT)
    previous = {s: signal.signal(s, _on_signal) for s in stops}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _CAUGHT["signal"] = None


def _execute_locked(
    cfg: RunConfig,
    rd: RunDir,
    resume: bool,
    progress: bool,
    runtime: RuntimeFactory | None,
    from_round: int | None,
    on_round: RoundCallback | None = None,
    eval_cache: EvalCache | None = None,
) -> RunResult:
    handler = _setup_logging(rd)
    try:
        while True:
            try:
                run = _Run(cfg, rd, resume, progress, runtime, on_round, eval_cache)
                return run.execute(from_round)
            except BackOff as b:
                scale = cfg.lr_scale * cfg.divergence_backoff
                log.warning(
                    "%s; rolling back to round %d and continuing with the learning rate "
                    "scaled by %g (back-off %d of %d)",
                    b,
                    b.best_round,
                    scale,
                    _backoffs(cfg) + 1,
                    MAX_BACKOFFS,
                )
                cfg = cfg.model_copy(update={"lr_scale": scale})
                resume, from_round = True, b.best_round
    finally:
        log.removeHandler(handler)
        handler.close()


def _backoffs(cfg: RunConfig) -> int:
    """How many divergence back-offs ``cfg`` has taken (from its lr_scale)."""
    if cfg.divergence_backoff <= 0 or cfg.lr_scale >= 1:
        return 0
    return round(math.log(cfg.lr_scale) / math.log(cfg.divergence_backoff))


def contributors(record: dict[str, Any]) -> list[int]:
    """The clients whose replies a round's metrics record says were aggregated. Records
    written before the field existed name only the sampled clients: all of them when every
    one replied, otherwise none (the server then sends a longer catch-up than needed, which
    clients skip; never a shorter one)."""
    if "contributors" in record:
        return list(record["contributors"])
    complete = record.get("train_loss") is not None and record.get("rejected", 0) == 0
    clients = record.get("clients", [])
    return list(clients) if complete and record.get("replies") == len(clients) else []


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


class _Run:
    def __init__(
        self,
        cfg: RunConfig,
        rd: RunDir,
        resume: bool,
        progress: bool,
        runtime: RuntimeFactory | None = None,
        on_round: RoundCallback | None = None,
        eval_cache: EvalCache | None = None,
    ):
        self.cfg, self.rd, self.progress, self.on_round = cfg, rd, progress, on_round
        self.eval_cache = eval_cache
        self._said: list[str] = []  # into run.log once the folder has passed its checks
        if resume:  # a corrupted or disagreeing folder stops here, nothing written
            self.ledger = Ledger.open(rd.ledger)
            cfg = self.cfg = check_header(rd, cfg, self.ledger.header)
        self.spending = self._privacy(cfg)  # a budget overrun stops before any loading
        try:
            self._say(f"loading data: {cfg.describe_data()}")
            self.task = build_task(cfg)
            self.parts = client_partitions(cfg, self.task)
            sizes = [len(p) for p in self.parts]
            split = "iid" if cfg.partition == "iid" else f"dirichlet(alpha={cfg.alpha:g})"
            self._say(
                f"partition: {split} over {len(sizes)} "
                f"{'party' if len(sizes) == 1 else 'clients'}, {min(sizes)}-{max(sizes)} "
                f"training examples each; {self.task.eval_size()} test examples evaluated"
            )
            self._say(f"loading model: {self.task.model_name}")
            model = self.task.build_model(cfg.seed)
        except (ValueError, MissingPackage) as e:
            raise ConfigError(str(e)) from None
        self.space = ParamSpace(model.to(resolve_device(cfg.device)))
        self._say(
            f"{cfg.algorithm}: {self.space.numel:,} trained parameters on {cfg.device}, "
            f"{cfg.rounds} rounds, {cfg.sampled} of {cfg.clients} clients per round"
        )
        if resume:
            load_base(rd, self.space, self.ledger.header)
            if self.ledger.torn_bytes:
                torn = self.ledger.torn_bytes
                self.ledger = Ledger.open(rd.ledger, repair=True)
                log.warning(
                    "%s: cut an incomplete last record (%d bytes after round %d), left by a "
                    "crash while appending",
                    rd.ledger,
                    torn,
                    len(self.ledger),
                )
            rd.write_atomic(rd.config, cfg.to_toml())  # what a later --resume continues
        else:
            rd.write_atomic(rd.config, cfg.to_toml())
            if self.space.numel * 4 <= BASE_COPY_LIMIT:
                RunDir.save_tensors(rd.base, self.space.state(), {"format": "fedscalar-base"})
            self.ledger = Ledger.create(rd.ledger, ledger_header(cfg, self.space))
        keyed = (  # the DP noise's secret, kept out of config.toml
            cfg.model_copy(update={"dp_seed": rd.secret()})
            if cfg.private and cfg.dp_seed is None
            else cfg
        )
        self.server = make_server(keyed, self.space, self.ledger.updates)
        self.client = make_client(keyed, self.space, self.server)
        self.resume = resume
        self.runtime = (
            runtime(RunSetup(cfg, self.server, self.client, self.client_data))
            if runtime
            else LocalRuntime(
                self.server,
                self.client,
                self.client_data,
                count_bytes=not cfg.spec.pooled,
                secure=cfg.secure_aggregation,
            )
        )

    def _privacy(self, cfg: RunConfig) -> Spending | None:
        """A DP run's privacy spending over rounds; `ConfigError` if its rounds spend
        more than the budget (a run extended past the rounds its noise was set for)."""
        accounting = cfg.privacy_accounting()
        if accounting is None:
            return None
        noise = cfg.dp_noise_multiplier
        if noise is None:
            raise ConfigError("dp_noise_multiplier: not set (run the resolved config)")
        spending = accounting.spending(noise)
        spent = spending.epsilon(cfg.rounds, cfg.dp_delta)
        if cfg.dp_epsilon is not None and spent > cfg.dp_epsilon * (1 + 1e-6):
            raise ConfigError(
                f"rounds: {cfg.rounds} rounds at noise multiplier {noise:.4g} spend epsilon "
                f"{spent:.3g}, over the budget of {cfg.dp_epsilon:g}: a DP run cannot be "
                "extended past the rounds its noise was calibrated for"
            )
        self._say(
            f"differential privacy ({cfg.dp_mode}): replies clipped to {cfg.dp_clip:g}, "
            f"noise multiplier {noise:.4g}; epsilon {spent:.3g} at delta {cfg.dp_delta:g} "
            f"after {cfg.rounds} rounds"
        )
        return spending

    def client_data(self, cid: int) -> ClientData:
        return client_data(self.cfg, self.task, self.parts[cid], cid)

    def _log_said(self) -> None:
        """The start-up lines into run.log, once the folder has passed every check (a
        refused resume leaves the folder as it was)."""
        for message in self._said:
            log.info(message)

    def _tell(self, message: str) -> None:
        """A step after start-up: into run.log, and on the terminal when progress is shown."""
        log.info(message)
        if self.progress:
            print(message, file=sys.stderr, flush=True)

    def _say(self, message: str) -> None:
        """A start-up step: on the terminal when progress is shown, and into run.log."""
        self._said.append(message)
        if self.progress:
            print(message, file=sys.stderr, flush=True)

    # -- restoring state ------------------------------------------------------------------
    def _restore(self, from_round: int | None = None) -> int:
        """Bring the server to the last round the run folder vouches for (or back to
        ``from_round``); return it.

        Each round is written ledger first, then metrics, then (at evaluations) the
        checkpoint, so checkpoint <= metrics <= ledger; a ledger record without its
        metrics line (a crash in between) is dropped and the round is run again.
        """
        rd, cfg = self.rd, self.cfg
        logged = rd.read_metrics()
        last = logged[-1]["round"] if logged else 0
        if from_round is not None:
            self._check_rollback(from_round, last)
            if from_round < last:
                log.warning("rolled back from round %d to round %d", last, from_round)
            last = from_round
        self.ledger.truncate(last)
        start = 0
        # a checkpoint follows every evaluation's metrics line: one missing after that is lost
        written = any("test_accuracy" in m and m["round"] > 0 for m in logged[:-1])
        if not rd.checkpoint.exists() and not cfg.spec.replayable and last and written:
            raise ConfigError(
                f"{rd.checkpoint} is missing: {cfg.algorithm} keeps its weights only there (its "
                f"ledger records no updates), so rounds 1-{last} cannot be rebuilt; restore the "
                "file, or start again from the base weights with --from-round 0"
            )
        if rd.checkpoint.exists():
            tensors, meta = RunDir.load_tensors(rd.checkpoint)
            ck_round = int(meta["round"])
            if ck_round <= last and ck_round <= len(self.ledger):
                self.server.load_state_tensors(tensors, ck_round)
                self.client.load_state_tensors(tensors)
                start = ck_round
        if cfg.spec.replayable:
            for update in self.ledger.updates[start:]:
                self.server.apply(update)
            start = len(self.ledger)
        else:
            self.ledger.truncate(start)
        for record in logged:
            if 1 <= record["round"] <= start:
                self.server.note_contributors(record["round"], contributors(record))
        return start

    def _check_rollback(self, target: int, last: int) -> None:
        if not 0 <= target <= last:
            raise ConfigError(f"from_round: the run holds rounds 0 to {last}, not {target}")
        if not self.cfg.spec.replayable and target not in (0, last):
            ck = (
                int(RunDir.load_tensors(self.rd.checkpoint)[1]["round"])
                if self.rd.checkpoint.exists()
                else None
            )
            if ck != target:
                raise ConfigError(
                    f"from_round: {self.cfg.algorithm} keeps no history of its weights; it can "
                    f"go back only to its checkpoint (round {ck})"
                )

    def _exchange(
        self, rnd: int, lr: float, seeds: tuple[int, ...], clients: list[int]
    ) -> tuple[GlobalUpdate, float | None, dict[str, Any]]:
        """One round: gather valid replies (retrying the missing ones), then aggregate.

        A reply that is missing, malformed, oversized, stale, of the wrong shape or
        non-finite is logged with its reason and left out; the round is applied with the
        rest if at least ``min_replies`` remain, and never half-done otherwise.
        """
        cfg = self.cfg
        valid: dict[int, Message] = {}
        problems: dict[int, RejectedReply] = {}
        counts = {"bytes_up": 0, "bytes_down": 0}
        pending = clients
        attempts = 1 + (cfg.round_retries if cfg.short_round == "retry" else 0)
        for attempt in range(attempts):
            traffic = self.runtime.run_round(rnd, lr, seeds, pending)
            counts["bytes_up"] += traffic.bytes_up
            counts["bytes_down"] += traffic.bytes_down
            if traffic.summed is not None:  # a secure sum is all or nothing: ask everyone
                short = len(traffic.summed.contributors) < cfg.min_replies
                if not short or attempt + 1 == attempts:
                    return self._secure_round(rnd, lr, seeds, traffic, counts)
                log.warning(
                    "round %d: %d clients in the secure sum, %d needed (%s); asking clients "
                    "%s again",
                    rnd,
                    len(traffic.summed.contributors),
                    cfg.min_replies,
                    "; ".join(f"client {c}: {r}" for c, r in sorted(traffic.missing.items())),
                    clients,
                )
                continue
            for cid, reason in traffic.missing.items():
                problems[cid] = RejectedReply(reason)
            for cid, wire in traffic.replies.items():
                try:
                    valid[cid] = self.server.accept(rnd, seeds, wire)
                    problems.pop(cid, None)
                except RejectedReply as e:
                    problems[cid] = e
            for cid in pending:
                if cid in problems:
                    log.warning("round %d: client %d left out: %s", rnd, cid, problems[cid])
            if len(valid) >= cfg.min_replies:
                break
            pending = [c for c in clients if c not in valid]
            if attempt + 1 < attempts:
                log.warning(
                    "round %d: %d valid replies, %d needed; asking clients %s again",
                    rnd,
                    len(valid),
                    cfg.min_replies,
                    pending,
                )
        counts.update(replies=len(valid), rejected=len(problems))
        if len(valid) >= cfg.min_replies:
            update, loss = self.server.aggregate(rnd, lr, seeds, valid)
            return update, loss, {**counts, "contributors": sorted(valid)}
        why = "; ".join(f"client {c}: {e}" for c, e in sorted(problems.items()))
        short = f"round {rnd}: {len(valid)} valid replies, {cfg.min_replies} needed ({why})"
        if cfg.short_round == "skip":
            log.warning("%s; skipped (recorded as a no-op update)", short)
            return self.server.skip(rnd, seeds), None, {**counts, "contributors": []}
        raise ShortRound(short, nonfinite=all(e.nonfinite for e in problems.values()))

    def _secure_round(
        self, rnd: int, lr: float, seeds: tuple[int, ...], traffic: RoundTraffic, counts
    ) -> tuple[GlobalUpdate, float | None, dict[str, Any]]:
        """A round under secure aggregation: the server has the contributors' sum only."""
        assert traffic.summed is not None
        contributors = sorted(traffic.summed.contributors)
        for cid, reason in sorted(traffic.missing.items()):
            log.warning("round %d: client %d left out of the secure sum: %s", rnd, cid, reason)
        counts.update(replies=len(contributors), rejected=len(traffic.missing))
        if len(contributors) < self.cfg.min_replies and self.cfg.short_round == "skip":
            log.warning(
                "round %d: %d clients in the secure sum, %d needed; skipped (recorded as a "
                "no-op update)",
                rnd,
                len(contributors),
                self.cfg.min_replies,
            )
            return self.server.skip(rnd, seeds), None, {**counts, "contributors": []}
        if len(contributors) < self.cfg.min_replies:
            raise ShortRound(
                f"round {rnd}: {len(contributors)} clients in the secure sum, "
                f"{self.cfg.min_replies} needed",
                nonfinite=False,
            )
        try:
            update, loss = self.server.aggregate_sum(
                rnd, lr, seeds, traffic.summed.total, contributors
            )
        except RejectedReply as e:
            raise ShortRound(
                f"round {rnd}: the secure sum was refused: {e}", nonfinite=e.nonfinite
            ) from None
        return update, loss, {**counts, "contributors": contributors}

    def _checkpoint(self, rnd: int) -> None:
        tensors = {**self.server.state_tensors(), **self.client.state_tensors()}
        RunDir.save_tensors(self.rd.checkpoint, tensors, {"round": str(rnd)})

    def _sync(self) -> None:
        """Force the ledger and metrics to disk (at evaluations and at exit): a power loss
        then costs at most the rounds since the last evaluation."""
        self.ledger.sync()
        RunDir.fsync(self.rd.metrics)

    # -- the loop -------------------------------------------------------------------------
    def _evaluate(self, rnd: int, record: dict[str, Any]) -> None:
        """Metrics on the evaluation subset; on the whole test split too at round 0 and at
        the last round."""
        record.update(self.task.evaluate(self.space.model))
        if rnd in (0, self.cfg.rounds):
            record.update(self.task.evaluate_full(self.space.model))

    def _evaluate_start(self, record: dict[str, Any]) -> None:
        """Round 0's `_evaluate`, from the evaluation cache when it holds this model's."""
        digest = self.task.eval_digest() if self.eval_cache is not None else None
        key = None if digest is None else eval_key(self.space.model, digest, self.cfg.device)
        metrics = None if key is None else self.eval_cache.get(key)
        if metrics is not None:
            self._tell("round 0: evaluated earlier on the same model, read from the cache")
        else:
            self._tell("round 0: evaluating the model before training")  # minutes for an LLM
            metrics = {}
            self._evaluate(0, metrics)
            if key is not None:
                self.eval_cache.put(key, metrics)
        record.update(metrics)

    def _check_divergence(self, history: list[dict[str, Any]]) -> None:
        """Raise `Diverged` when the latest test loss is ``divergence_ratio`` times the best
        so far, or (having improved) is back above the starting loss by more than
        `WORSE_THAN_START`: the model is then worse than the one training started from."""
        ratio = self.cfg.divergence_ratio
        evals = [h for h in history if "test_loss" in h]
        if ratio <= 0 or len(evals) < 2:
            return
        start, best = evals[0], min(evals[:-1], key=lambda h: h["test_loss"])
        now = evals[-1]
        loss, low = now["test_loss"], best["test_loss"]
        at = f"round {best['round']}, accuracy {best.get('test_accuracy', float('nan')):.3f}"
        if low > 0 and loss > ratio * low:
            why = f"{loss / low:.1f}x its best ({low:.4g} at {at})"
        elif low < start["test_loss"] and loss > WORSE_THAN_START * start["test_loss"]:
            why = f"above its starting {start['test_loss']:.4g} after a best of {low:.4g} ({at})"
        else:
            return
        self.best_round = best["round"]
        raise Diverged(
            f"round {now['round']}: the test loss rose to {loss:.4g}, {why}: the learning rate "
            "is too large"
        )

    def execute(self, from_round: int | None = None) -> RunResult:
        """Train from where the folder stands to ``cfg.rounds``; record, summarise."""
        start, history = self._start(from_round)
        status, error, code = "completed", None, 0
        clock = (history[-1]["wall_seconds"], time.perf_counter())
        bar = _ProgressBar(self.cfg.rounds, start) if self.progress else None
        try:
            with bar or nullcontext():
                for rnd in range(start + 1, self.cfg.rounds + 1):
                    record = self._round(rnd, history[-1], clock)
                    history.append(record)
                    for observe in (bar, self.on_round):
                        if observe is not None:
                            observe(dict(record))
                    _raise_if_signalled()
                    if "test_loss" in record:
                        self._check_divergence(history)
        except Diverged as e:
            status, error = "diverged", str(e)
        except ShortRound as e:
            status, error = ("diverged" if e.nonfinite else "short-round"), str(e)
        except (KeyboardInterrupt, Terminated) as e:
            signalled = "SIGTERM" if isinstance(e, Terminated) else "SIGINT (Ctrl-C)"
            code = 143 if isinstance(e, Terminated) else 130
            status, error = "interrupted", f"interrupted by {signalled}"
            log.warning(
                "%s during round %d: that round was not recorded; --resume runs it again",
                signalled,
                history[-1]["round"] + 1,
            )
        return self._finish(history, status, error, code)

    def _start(self, from_round: int | None) -> tuple[int, list[dict[str, Any]]]:
        """Restore (or start) the run; its metrics so far, round 0 evaluated."""
        cfg, rd = self.cfg, self.rd
        self.best_round: int | None = None
        if self.resume:
            start = self._restore(from_round)
            self._log_said()
            history = rd.truncate_metrics(start)
            next_lr = cfg.lr_at(start + 1)
            log.info("resumed at round %d (target %d, lr %g)", start, cfg.rounds, next_lr)
            held = rd.checkpoint_round()
            if start > 0 and (held is None or (start >= cfg.rounds and held != start)):
                self._checkpoint(start)  # replayed from base + ledger: nothing else to train
                what = "missing" if held is None else f"round-{held}"
                log.warning("rebuilt the %s %s at round %d", what, rd.checkpoint.name, start)
        else:
            self._log_said()
            start, history = 0, []
            log.info("started %s on %s: %d parameters", cfg.algorithm, cfg.task, self.space.numel)
        if not history:
            record = {
                "round": 0,
                "bytes_up": 0,
                "bytes_down": 0,
                "bytes_up_cumulative": 0,
                "bytes_down_cumulative": 0,
                "wall_seconds": 0.0,
            }
            t0 = time.perf_counter()
            self._evaluate_start(record)
            record["wall_seconds"] = time.perf_counter() - t0  # the run's clock starts here
            rd.append_metrics(record)
            history = [record]
        return start, history

    def _round(self, rnd: int, last: dict[str, Any], clock: tuple[float, float]) -> dict[str, Any]:
        """Round ``rnd``: exchange, then record it (ledger first, then metrics, then at
        evaluations the checkpoint, synced to disk); its metrics record."""
        cfg, t_round = self.cfg, time.perf_counter()
        clients = round_clients(cfg, rnd)
        seeds = schedule.round_seeds(cfg.seed, rnd, cfg.local_steps)
        lr = cfg.lr_at(rnd)
        update, train_loss, counts = self._exchange(rnd, lr, seeds, clients)
        self.ledger.append(update)
        record = {
            "round": rnd,
            "train_loss": train_loss,
            "clients": clients,
            **counts,
            "bytes_up_cumulative": last["bytes_up_cumulative"] + counts["bytes_up"],
            "bytes_down_cumulative": last["bytes_down_cumulative"] + counts["bytes_down"],
            "round_seconds": time.perf_counter() - t_round,
        }
        if cfg.private and cfg.dp_mode == "local":
            del record["train_loss"]  # clients keep their loss: it depends on their data
        if cfg.lr_schedule != "constant" or cfg.lr_warmup:
            record["lr"] = lr
        if self.spending is not None:
            record["dp_epsilon"] = self.spending.epsilon(rnd, cfg.dp_delta)
        evaluate = rnd % cfg.eval_every == 0 or rnd == cfg.rounds
        if evaluate:
            self._evaluate(rnd, record)
        wall0, t0 = clock
        record["wall_seconds"] = wall0 + time.perf_counter() - t0
        self.rd.append_metrics(record)
        if evaluate:
            self._checkpoint(rnd)
            self._sync()
        return record

    def _finish(
        self, history: list[dict[str, Any]], status: str, error: str | None, code: int
    ) -> RunResult:
        """Sync, back off or summarise and plot; `RunFailed` if the run stopped early."""
        rd = self.rd
        self._sync()
        if status == "diverged":
            self._maybe_back_off(error or "diverged", history)
        summary = self._summary(history, status)
        rd.write_summary(summary)
        _plot(rd, history, self.cfg)
        if error is not None:
            done = history[-1]["round"]
            log.error("%s; stopped after round %d", error, done)
            hint = " with a smaller --lr" if status == "diverged" else ""
            back = (
                f" --from-round {self.best_round}"
                if self.best_round is not None and self.best_round < done
                else ""
            )
            raise RunFailed(
                f"{error}. The run stopped after round {done}; ledger and metrics are intact. "
                f"Continue{hint}: fedscalar run --resume --out {rd.path}{back}"
                + (" --lr SMALLER" if status == "diverged" else ""),
                code=code if status == "interrupted" else 1,
            )
        log.info("finished round %d", self.cfg.rounds)
        return RunResult(rd.path, summary)

    def _maybe_back_off(self, reason: str, history: list[dict[str, Any]]) -> None:
        """Raise `BackOff` when the run can recover from this divergence: back-offs are on,
        not used up, the algorithm can replay its ledger to an earlier round, and an
        evaluation before the last round was better."""
        cfg = self.cfg
        if cfg.divergence_backoff <= 0 or _backoffs(cfg) >= MAX_BACKOFFS:
            return
        if not cfg.spec.replayable:
            return
        if self.best_round is None:  # a non-finite round: back to the best evaluation
            evals = [h for h in history if "test_loss" in h]
            if evals:
                self.best_round = min(evals, key=lambda h: h["test_loss"])["round"]
        if self.best_round is not None and self.best_round < history[-1]["round"]:
            raise BackOff(reason, self.best_round)

    def _summary(self, history: list[dict[str, Any]], status: str) -> dict[str, Any]:
        cfg = self.cfg
        rounds = history[-1]["round"]
        evals = [h["test_accuracy"] for h in history if "test_accuracy" in h]
        last = history[-1]
        contacts = max(1, rounds * cfg.sampled)
        trained = [h for h in history if h["round"] > 0]
        evaluated = [h for h in history if "test_accuracy" in h]
        ended = bool(evaluated) and evaluated[-1]["round"] == rounds
        return {
            "status": status,
            "algorithm": cfg.algorithm,
            "task": cfg.task,
            "model": self.task.model_name,
            "rounds": rounds,
            "num_parameters": self.space.numel,
            "final_test_accuracy": evals[-1] if ended else None,
            "last_evaluated_round": evaluated[-1]["round"] if evaluated else None,
            "last_test_accuracy": evals[-1] if evals else None,
            "best_test_accuracy": max(evals) if evals else None,
            "final_test_loss": next(
                (h["test_loss"] for h in reversed(history) if "test_loss" in h), None
            ),
            "test_examples": self.task.eval_size(),
            **self._full_summary(history),
            "bytes_counted": "payload: encoded fedscalar messages, without transport framing",
            "bytes_up_total": last["bytes_up_cumulative"],
            "bytes_down_total": last["bytes_down_cumulative"],
            "bytes_up_per_client_round": last["bytes_up_cumulative"] / contacts,
            "bytes_down_per_client_round": last["bytes_down_cumulative"] / contacts,
            "ledger_bytes_per_round": self.ledger.bytes_per_round(),
            "replies_rejected": sum(h.get("rejected", 0) for h in trained),
            "rounds_skipped": sum(1 for h in trained if h.get("train_loss", 0.0) is None),
            "wall_seconds": last["wall_seconds"],
            "seconds_per_round": sum(h["round_seconds"] for h in trained) / max(1, len(trained)),
            "peak_rss_mb": peak_rss_mb(),
            "partition_digest": partition_digest(self.parts),
            "clients": cfg.clients,
            "attack": cfg.attack,
            "attackers": cfg.attackers,
            "aggregator": cfg.aggregator,
            "lr_scale": cfg.lr_scale,
            **self._privacy_summary(rounds),
        }

    def _privacy_summary(self, rounds: int) -> dict[str, Any]:
        cfg = self.cfg
        if self.spending is None:
            return {}
        return {
            "dp_mode": cfg.dp_mode,
            "dp_clip": cfg.dp_clip,
            "dp_noise_multiplier": cfg.dp_noise_multiplier,
            "dp_delta": cfg.dp_delta,
            "dp_epsilon_budget": cfg.dp_epsilon,
            "dp_epsilon_spent": self.spending.epsilon(rounds, cfg.dp_delta),
            "dp_accountant": "RDP (dp-accounting), "
            + (
                "sampled without replacement, replace-one client"
                if cfg.dp_mode == "central" and cfg.sampled < cfg.clients
                else "every round in full"
            ),
        }

    @staticmethod
    def _full_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
        """Round 0's and the last round's accuracy on the whole test split, when the
        evaluations during training use a subset."""
        full = [h for h in history if "full_test_accuracy" in h]
        if not full:
            return {}
        first, last = full[0], full[-1]
        ended = last["round"] == history[-1]["round"]
        return {
            "full_test_examples": last["full_test_examples"],
            "initial_full_test_accuracy": first["full_test_accuracy"]
            if first["round"] == 0
            else None,
            "final_full_test_accuracy": last["full_test_accuracy"] if ended else None,
            "final_full_test_loss": last["full_test_loss"] if ended else None,
        }


class _ProgressBar:
    """The terminal's progress bar: a round observer like ``on_round``."""

    def __init__(self, rounds: int, start: int):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("[bold]round"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]}"),
            TimeRemainingColumn(),
            transient=False,
        )
        self.task = self.bar.add_task(
            "rounds", total=rounds, completed=start, loss=float("nan"), acc="-"
        )
        self.acc = "-"

    def __enter__(self) -> _ProgressBar:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def __call__(self, record: dict[str, Any]) -> None:
        if "test_accuracy" in record:
            self.acc = f"{record['test_accuracy']:.3f}"
        loss = record.get("train_loss")
        self.bar.update(
            self.task,
            completed=record["round"],
            loss=loss if loss is not None else float("nan"),
            acc=self.acc,
        )


def _plot(rd: RunDir, history: list[dict[str, Any]], cfg: RunConfig) -> None:
    from fedscalar.plots import plot_curves

    try:
        plot_curves({cfg.algorithm: history}, rd.curves, title=cfg.describe_data())
    except Exception as e:  # a plot must never cost the run its results
        log.warning("could not draw %s: %s", rd.curves, e)
