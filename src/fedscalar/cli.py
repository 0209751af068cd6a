"""The ``fedscalar`` command line: ``run`` and ``export``.

Every ``run`` option can also come from a TOML file (``--config``); flags override the
file. Configuration problems print one line and exit with code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from fedscalar.config import ConfigError, RunConfig, build_config
from fedscalar.ledger import LedgerError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    pretty_exceptions_enable=False,
    help="Federated training where clients and server exchange seeds and scalars.",
)


def _help(field: str) -> str:
    info = RunConfig.model_fields[field]
    default = info.default
    shown = "" if default is None else f" (default: {default})"
    return f"{info.description}{shown}"


def _opt(field: str, flag: str | None = None):
    flag = flag or "--" + field.replace("_", "-")
    return typer.Option(flag, help=_help(field), show_default=False)


LISTED = ("verbalizers", "lora_targets")
"""Options given as comma-separated strings on the command line and lists in TOML."""


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@app.command()
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
    algorithm: Annotated[str | None, _opt("algorithm")] = None,
    task: Annotated[str | None, _opt("task")] = None,
    model: Annotated[str | None, _opt("model")] = None,
    clients: Annotated[int | None, _opt("clients")] = None,
    sampled: Annotated[int | None, _opt("sampled")] = None,
    rounds: Annotated[int | None, _opt("rounds")] = None,
    local_steps: Annotated[int | None, _opt("local_steps")] = None,
    perturbations: Annotated[int | None, _opt("perturbations")] = None,
    lr: Annotated[float | None, _opt("lr")] = None,
    lr_schedule: Annotated[str | None, _opt("lr_schedule")] = None,
    lr_warmup: Annotated[int | None, _opt("lr_warmup")] = None,
    lr_decay_rounds: Annotated[int | None, _opt("lr_decay_rounds")] = None,
    lr_decay_to: Annotated[float | None, _opt("lr_decay_to")] = None,
    divergence_ratio: Annotated[float | None, _opt("divergence_ratio")] = None,
    divergence_backoff: Annotated[float | None, _opt("divergence_backoff")] = None,
    lr_scale: Annotated[float | None, _opt("lr_scale")] = None,
    mu: Annotated[float | None, _opt("mu")] = None,
    difference: Annotated[str | None, _opt("difference")] = None,
    batch_size: Annotated[int | None, _opt("batch_size")] = None,
    partition: Annotated[str | None, _opt("partition")] = None,
    alpha: Annotated[float | None, _opt("alpha")] = None,
    seed: Annotated[int | None, _opt("seed")] = None,
    eval_every: Annotated[int | None, _opt("eval_every")] = None,
    hiso_beta: Annotated[float | None, _opt("hiso_beta")] = None,
    hiso_eps: Annotated[float | None, _opt("hiso_eps")] = None,
    hiso_curvature_update: Annotated[str | None, _opt("hiso_curvature_update")] = None,
    dataset: Annotated[str | None, _opt("dataset")] = None,
    text_column: Annotated[str | None, _opt("text_column")] = None,
    label_column: Annotated[str | None, _opt("label_column")] = None,
    template: Annotated[str | None, _opt("template")] = None,
    verbalizers: Annotated[str | None, _opt("verbalizers")] = None,
    max_length: Annotated[int | None, _opt("max_length")] = None,
    eval_examples: Annotated[int | None, _opt("eval_examples")] = None,
    pack_tokens: Annotated[int | None, _opt("pack_tokens")] = None,
    lora: Annotated[bool | None, _opt("lora", "--lora/--no-lora")] = None,
    lora_rank: Annotated[int | None, _opt("lora_rank")] = None,
    lora_alpha: Annotated[float | None, _opt("lora_alpha")] = None,
    lora_targets: Annotated[str | None, _opt("lora_targets")] = None,
    lora_layers: Annotated[int | None, _opt("lora_layers")] = None,
    dtype: Annotated[str | None, _opt("dtype")] = None,
    device: Annotated[str | None, _opt("device")] = None,
    arithmetic: Annotated[str | None, _opt("arithmetic")] = None,
    catch_up: Annotated[str | None, _opt("catch_up")] = None,
    runtime: Annotated[str | None, _opt("runtime")] = None,
    min_replies: Annotated[int | None, _opt("min_replies")] = None,
    short_round: Annotated[str | None, _opt("short_round")] = None,
    round_retries: Annotated[int | None, _opt("round_retries")] = None,
    reply_timeout: Annotated[float | None, _opt("reply_timeout")] = None,
    out: Annotated[str | None, _opt("out")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Train. With no options, runs the demo: DeComFL on digits with 10 clients."""
    from fedscalar.runner import RunFailed
    from fedscalar.runner import run as run_training

    flags = {k: v for k, v in locals().items() if k in RunConfig.model_fields and v is not None}
    for listed in LISTED:
        if listed in flags:
            flags[listed] = flags[listed].split(",")
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
def compare(
    out: Annotated[
        Path,
        typer.Option("--out", help="Comparison folder (re-run to resume).", show_default=False),
    ],
    algorithms: Annotated[
        str | None,
        typer.Option(
            "--algorithms", help="Comma-separated algorithms to compare.", show_default=False
        ),
    ] = None,
    seeds: Annotated[
        str | None, typer.Option("--seeds", help="Comma-separated run seeds (default: 0).")
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
            help="Accuracy for 'rounds to target' (default: the lowest final mean accuracy).",
            show_default=False,
        ),
    ] = None,
    jobs: Annotated[int, typer.Option("--jobs", help="Runs trained at once.", min=1)] = 1,
    task: Annotated[str | None, _opt("task")] = None,
    model: Annotated[str | None, _opt("model")] = None,
    rounds: Annotated[int | None, _opt("rounds")] = None,
    clients: Annotated[int | None, _opt("clients")] = None,
    sampled: Annotated[int | None, _opt("sampled")] = None,
    local_steps: Annotated[int | None, _opt("local_steps")] = None,
    perturbations: Annotated[int | None, _opt("perturbations")] = None,
    batch_size: Annotated[int | None, _opt("batch_size")] = None,
    partition: Annotated[str | None, _opt("partition")] = None,
    alpha: Annotated[float | None, _opt("alpha")] = None,
    eval_every: Annotated[int | None, _opt("eval_every")] = None,
    attack: Annotated[str | None, _opt("attack")] = None,
    attackers: Annotated[int | None, _opt("attackers")] = None,
    attack_scale: Annotated[float | None, _opt("attack_scale")] = None,
    aggregator: Annotated[str | None, _opt("aggregator")] = None,
) -> None:
    """Train several algorithms on the same clients, data split and evaluation; tabulate."""
    from fedscalar import compare as cmp
    from fedscalar.report import write_report

    shared = {
        k: v
        for k, v in locals().items()
        if k in RunConfig.model_fields and k != "out" and v is not None
    }
    try:
        names = cmp.parse_list(algorithms, "algorithms") if algorithms else None
        seed_list = cmp.parse_list(seeds, "seeds", int) if seeds else None
        comparison = cmp.plan(out, names, seed_list, config, target, **shared)
    except (ConfigError, LedgerError) as e:
        raise _fail(str(e)) from None
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
    path, _, _ = write_report(comparison, _title(comparison))
    typer.echo(path.read_text())
    failed = [f"{a} seed {s}" for (a, s), r in results.items() if r.get("status") == "error"]
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
        Path, typer.Option("--output", "-o", help="Safetensors file to write.")
    ] = Path("model.safetensors"),
) -> None:
    """Rebuild the trained weights from the base model and the ledger."""
    from fedscalar.export import export as export_weights

    try:
        rounds = export_weights(run_dir, output)
    except (ConfigError, LedgerError, FileNotFoundError, ValueError) as e:
        raise _fail(str(e)) from None
    typer.echo(f"wrote {output} (weights after round {rounds})")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
