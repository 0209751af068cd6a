"""The ``fedscalar`` command line: ``run`` and ``export``.

Every ``run`` option can also come from a TOML file (``--config``); flags override the
file. Configuration problems print one line and exit with code 2.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from fedscalar import registry
from fedscalar.config import ConfigError, RunConfig, build_config, read_toml
from fedscalar.ledger import LedgerError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    pretty_exceptions_enable=False,
    help="Federated training where clients and server exchange seeds and scalars.",
)


LISTED = ("verbalizers", "lora_targets", "plugins", "options")
"""Options given as comma-separated strings on the command line and lists in TOML."""

NOT_SHARED = ("algorithm", "seed", "out")
"""Run options a comparison sets per run (``--algorithms``, ``--seeds``, its own ``--out``)."""


def _shown(field: str, value: Any) -> str:
    if field in LISTED and value is not None:
        return ",".join(value)
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def task_defaults(field: str) -> str:
    """The tasks that change ``field``'s default, with theirs: ``text tasks: 16``, or
    ``sentiment: 64`` for a default only some text tasks change ("" when none does)."""
    text = [name for name, spec in registry.TASKS.items() if spec.text]
    by_value: dict[str, list[str]] = {}
    for name, spec in registry.TASKS.items():
        if field in spec.defaults:
            by_value.setdefault(_shown(field, spec.defaults[field]), []).append(name)
    return "; ".join(
        f"{'text tasks' if names == text else ', '.join(names)}: {value}"
        for value, names in by_value.items()
    )


def _help(field: str) -> str:
    info = RunConfig.model_fields[field]
    if info.default is None:
        return escape(info.description)  # "[flower-sim]" is text, not markup
    tasks = task_defaults(field)
    shown = _shown(field, info.default) + (f"; {tasks}" if tasks else "")
    return escape(f"{info.description} (default: {shown})")


def _flag_type(field: str) -> type:
    """The command-line type of a config field: its scalar type (choices are strings that
    the config validates, lists are comma-separated strings)."""
    annotation = RunConfig.model_fields[field].annotation
    for kind in (bool, int, float):
        if annotation in (kind, kind | None):
            return kind
    return str


def _option(field: str) -> inspect.Parameter:
    flag = "--" + field.replace("_", "-")
    kind = _flag_type(field)
    if kind is bool:
        flag = f"{flag}/--no-{flag[2:]}"
    option = typer.Option(None, flag, help=_help(field), show_default=False)
    return inspect.Parameter(
        field, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind | None
    )


def with_config_options(exclude: tuple[str, ...] = ()):
    """Give a command one option per `RunConfig` field (except ``exclude``), with the
    field's description and default as help. The command receives the options that were
    given as ``flags`` (lists split at commas). The config model is the single source:
    a new field is a new flag of every command that takes the run options."""

    def wrap(func):
        signature = inspect.signature(func, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != "flags"]
        fields = [f for f in RunConfig.model_fields if f not in exclude]

        @functools.wraps(func)
        def command(**kwargs):
            given = {f: kwargs.pop(f) for f in fields}
            flags = {f: v for f, v in given.items() if v is not None}
            for listed in LISTED:
                if listed in flags:
                    flags[listed] = flags[listed].split(",")
            return func(**kwargs, flags=flags)

        params = [*own, *(_option(f) for f in fields)]
        command.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return wrap


def quiet_libraries() -> None:
    """Silence the progress bars of the libraries a run loads (datasets, the hub, any
    tqdm); set before they are imported, and inherited by a comparison's processes."""
    for name in (
        "TQDM_DISABLE",
        "HF_DATASETS_DISABLE_PROGRESS_BARS",
        "HF_HUB_DISABLE_PROGRESS_BARS",
    ):
        os.environ[name] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@app.command()
@with_config_options()
def run(
    config: Annotated[
        Path | None, typer.Option("--config", help="TOML file with run options.")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out.")] = False,
    from_round: Annotated[
        int | None,
        typer.Option(
            "--from-round",
            help="With --resume: roll the run back to this round first (its later rounds "
            "are discarded), e.g. to continue from before a divergence with a smaller --lr.",
            show_default=False,
        ),
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", help="No progress bars (ours or the libraries').")
    ] = False,
    *,
    flags: dict[str, Any],
) -> None:
    """Train. With no options, runs the demo: DeComFL on digits with 10 clients."""
    if quiet:
        quiet_libraries()
    from fedscalar.api import run as run_training
    from fedscalar.runner import RunFailed

    try:
        if resume:
            if config is not None:
                raise ConfigError("config: --resume reads the run's own config.toml; drop --config")
            result = run_training(
                resume=True, resume_overrides=flags, progress=not quiet, from_round=from_round
            )
        else:
            if from_round is not None:
                raise ConfigError("from_round: only with --resume (it rolls a run back)")
            cfg = build_config(config, **flags)
            result = run_training(cfg, progress=not quiet)
    except (ConfigError, LedgerError) as e:
        raise _fail(str(e)) from None
    except RunFailed as e:
        raise _fail(str(e), code=e.code) from None
    s = result.summary
    acc = f"{s['final_test_accuracy']:.4f} (best {s['best_test_accuracy']:.4f})"
    traffic = (
        f"{s['bytes_up_per_client_round']:.1f} B up / "
        f"{s['bytes_down_per_client_round']:.1f} B down per client per round"
    )
    typer.echo(
        f"{s['algorithm']} on {s['task']}: {s['rounds']} rounds, test accuracy {acc}, "
        f"{traffic}, {s['wall_seconds']:.1f} s -> {result.out}"
    )


@app.command()
@with_config_options(exclude=(*NOT_SHARED, "dp_epsilon"))
def compare(
    out: Annotated[
        Path,
        typer.Option("--out", help="Comparison folder (re-run to resume).", show_default=False),
    ],
    algorithms: Annotated[
        str | None,
        typer.Option(
            "--algorithms",
            help="Comma-separated algorithms to compare (default: the --config file's; a "
            "subset of them runs just those).",
            show_default=False,
        ),
    ] = None,
    seeds: Annotated[
        str | None,
        typer.Option(
            "--seeds",
            help="Comma-separated run seeds (default: the --config file's, else 0; an "
            "algorithm's own seeds are cut to these).",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="TOML comparison file: shared options in a run table, "
            "per-algorithm ones in algorithm.NAME tables.",
        ),
    ] = None,
    target: Annotated[
        float | None,
        typer.Option(
            "--target",
            help="Accuracy for 'rounds to target' (default: 90% of the way from round 0's "
            "accuracy to the lowest final mean accuracy).",
            show_default=False,
        ),
    ] = None,
    jobs: Annotated[int, typer.Option("--jobs", help="Runs trained at once.", min=1)] = 1,
    report_only: Annotated[
        bool,
        typer.Option(
            "--report-only",
            help="Write the table, CSV and plots from the runs as they stand (finished, "
            "stopped, or training in another process); train nothing.",
        ),
    ] = False,
    dp_epsilon: Annotated[
        str | None,
        typer.Option(
            "--dp-epsilon",
            help="Privacy budget of every run; several (e.g. 1,3,8,none; none: no DP) "
            "compare the algorithms once per budget, in OUT/epsilon-<e>, and tabulate "
            "accuracy against epsilon (default: no DP).",
            show_default=False,
        ),
    ] = None,
    *,
    flags: dict[str, Any],
) -> None:
    """Train several algorithms on the same clients, data split and evaluation; tabulate."""
    from fedscalar import compare as cmp
    from fedscalar.report import markdown, write_report

    try:
        names = cmp.parse_list(algorithms, "algorithms") if algorithms else None
        seed_list = cmp.parse_list(seeds, "seeds", int) if seeds else None
        budgets = cmp.parse_budgets(dp_epsilon) if dp_epsilon else None
        in_file = config is not None and "dp_epsilon" in read_toml(config)
        if in_file or (budgets is not None and len(budgets) > 1):
            parts = cmp.plan_budgets(out, budgets, names, seed_list, config, target, **flags)
            if report_only and not out.is_dir():
                raise ConfigError(f"out: no comparison at {out} yet (nothing to report)")
            _compare_budgets(out, parts, jobs, report_only)
            return
        if budgets is not None and budgets[0] is not None:
            flags["dp_epsilon"] = budgets[0]
        comparison = cmp.plan(out, names, seed_list, config, target, **flags)
        if report_only and not comparison.out.is_dir():
            raise ConfigError(f"out: no comparison at {comparison.out} yet (nothing to report)")
    except (ConfigError, LedgerError) as e:
        raise _fail(str(e)) from None
    if report_only:
        path, rows, target = write_report(comparison, _title(comparison))
        typer.echo(markdown(rows, target))
        typer.echo(f"written: {path} (nothing trained)")
        return
    total = len(comparison.runs)
    typer.echo(
        f"comparing {', '.join(comparison.algorithms)} over seeds "
        f"{', '.join(map(str, comparison.seeds))}: {total} runs in {comparison.out}"
    )
    try:
        results = cmp.execute(comparison, jobs, echo=typer.echo)
    except KeyboardInterrupt:
        write_report(comparison, _title(comparison))
        typer.echo("interrupted; run the same command again to resume", err=True)
        raise typer.Exit(130) from None
    path, rows, target = write_report(comparison, _title(comparison))
    typer.echo(markdown(rows, target))
    pngs = ", ".join(str(path.parent / f) for f in ("comparison.png", "frontier.png"))
    typer.echo(f"written: {path}, {path.with_suffix('.csv')}, {pngs}")
    failed = [f"{a} seed {s}" for (a, s), r in results.items() if r.get("status") == "error"]
    if failed:
        raise _fail(f"runs failed: {', '.join(failed)} (see their run.log)", code=1)


def _compare_budgets(out: Path, parts, jobs: int, report_only: bool = False) -> None:
    """A privacy comparison: each budget's comparison in turn (none with
    ``report_only``), then the table of accuracy against epsilon."""
    from fedscalar import compare as cmp
    from fedscalar.report import write_privacy_report

    title = _title(parts[0][1])
    if report_only:
        present = [(e, c) for e, c in parts if c.out.is_dir()]  # budgets not started: none
        if not present:
            raise _fail(f"out: no budget of {out} has started yet (nothing to report)")
        path, table = write_privacy_report(out, present, title)
        typer.echo(table)
        typer.echo(f"written: {path} (nothing trained)")
        return
    total = sum(len(c.runs) for _, c in parts)
    budgets = ", ".join("none" if e is None else f"{e:g}" for e, _ in parts)
    typer.echo(f"comparing over privacy budgets {budgets}: {total} runs in {out}")
    failed = []
    try:
        for epsilon, comparison in parts:
            typer.echo(f"epsilon {'none' if epsilon is None else f'{epsilon:g}'}:")
            results = cmp.execute(comparison, jobs, echo=typer.echo)
            failed += [
                f"{a} seed {s} (epsilon {epsilon})"
                for (a, s), r in results.items()
                if r.get("status") == "error"
            ]
    except KeyboardInterrupt:
        write_privacy_report(out, parts, title)
        typer.echo("interrupted; run the same command again to resume", err=True)
        raise typer.Exit(130) from None
    path, table = write_privacy_report(out, parts, title)
    typer.echo(table)
    typer.echo(f"written: {path}, {path.with_suffix('.png')}, and each budget's results.md")
    if failed:
        raise _fail(f"runs failed: {', '.join(failed)} (see their run.log)", code=1)


def _title(comparison) -> str:
    cfg = next(iter(comparison.runs.values()))
    extra = f", {cfg.attack} attack by {cfg.attackers}, {cfg.aggregator}" if cfg.attackers else ""
    return f"{cfg.task}, {cfg.clients} clients ({cfg.sampled} per round){extra}"


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="Run folder (the --out of `fedscalar run`).")],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Safetensors file to write [default: model.safetensors]."
        ),
    ] = None,
    hf: Annotated[
        Path | None,
        typer.Option(
            "--hf",
            help="Instead, write a language-model run's whole model to this new folder in "
            "Hugging Face format (LoRA merged in, tokenizer, fedscalar.json).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Rebuild the trained weights from the base model and the ledger."""
    from fedscalar.export import export as export_weights
    from fedscalar.export import export_hf

    if hf and output:
        raise _fail("export: give --output (the trained weights) or --hf (a whole model), not both")
    written = hf or output or Path("model.safetensors")
    try:
        rounds = export_hf(run_dir, hf) if hf else export_weights(run_dir, written)
    except (ConfigError, LedgerError, FileNotFoundError, ValueError) as e:
        raise _fail(str(e)) from None
    typer.echo(f"wrote {written} (weights after round {rounds})")


@app.command()
def verify(
    run_dir: Annotated[Path, typer.Argument(help="Run folder (the --out of `fedscalar run`).")],
    device: Annotated[str, typer.Option(help="Device to replay on: cpu, cuda or auto.")] = "cpu",
) -> None:
    """Replay the ledger on DEVICE and check that it gives the run's own weights (and
    HiSo's H) at its checkpoint, bit for bit. Exit 0 if so, 1 if not."""
    from fedscalar.export import verify as verify_run

    try:
        found = verify_run(run_dir, device)
    except (ConfigError, LedgerError, FileNotFoundError, ValueError) as e:
        raise _fail(str(e)) from None
    where = f"{run_dir}: replayed on {found.device}, round {found.round}"
    if found.identical:
        typer.echo(f"{where}: all {found.values:,} values equal the run's checkpoint bit for bit")
        return
    typer.echo(
        f"{where}: {found.differing:,} of {found.values:,} values differ from the run's "
        f"checkpoint (largest {found.largest:.3g}, in {found.worst})"
    )
    raise typer.Exit(1)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
