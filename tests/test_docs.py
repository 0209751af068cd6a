"""The README, `--help` and the config model agree on every option and default."""

import re
import subprocess
import sys
from pathlib import Path

import typer.main
from typer.testing import CliRunner

from fedscalar.cli import app

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_every_cli_option_is_in_the_readme():
    command = typer.main.get_command(app)
    documented = set(re.findall(r"^\| `(--[a-z-]+)", README, flags=re.MULTILINE))
    for sub in command.commands.values():
        for param in sub.params:
            flags = [o for o in param.opts if o.startswith("--") and o != "--help"]
            for flag in flags:
                assert flag in documented, f"{sub.name} {flag} missing from README"


def test_readme_defaults_match_the_config():
    from fedscalar.config import ALGORITHM_ONLY, ALGORITHMS, TASKS, RunConfig

    def cell(name: str) -> str:
        flag = "--" + name.replace("_", "-")
        row = re.search(rf"^\| `{flag}[^|]*\| ([^|]+) \|", README, flags=re.MULTILINE)
        assert row, flag
        return row.group(1).strip()

    def same(shown: str, value) -> bool:
        shown = shown.strip("`")
        return shown == str(value) or float(shown) == value

    for name, info in RunConfig.model_fields.items():
        if info.default is None:
            continue
        shown = cell(name).split(" (")[0]
        if isinstance(info.default, bool):
            assert shown == ("on" if info.default else "off"), (name, shown)
        else:
            assert same(shown, info.default), (name, shown)
    # a task's own defaults: "32 (text tasks: 16)", "128 (sentiment: 64)"
    from fedscalar.cli import task_defaults

    changed = {name for spec in TASKS.values() for name in spec.defaults}
    assert {"lora", "batch_size", "max_length"} <= changed
    for name in changed:
        assert f"({task_defaults(name)})" in cell(name), (name, cell(name))
    # an algorithm's own defaults: "5 (`feedsign`: 1)", or the cell of a field only it takes
    for algorithm, spec in ALGORITHMS.items():
        for name, value in spec.defaults.items():
            shown = cell(name)
            if name in ALGORITHM_ONLY:
                assert same(shown, value), (algorithm, name, shown)
            else:
                assert f"`{algorithm}`: {value}" in shown, (algorithm, name, shown)


def _commands():
    return typer.main.get_command(app).commands


def _flags(command) -> set[str]:
    return {o for p in command.params for o in p.opts if o.startswith("--") and o != "--help"}


def _table(heading: str) -> set[str]:
    """The ``--flags`` of the README's option table under ``heading``."""
    section = README.split(heading, 1)[1].split("\n### ", 1)[0]
    return {f.split("/")[0] for f in re.findall(r"^\| `(--[a-z-]+)", section, re.MULTILINE)}


def test_readme_tables_name_only_real_options():
    """The other direction: every option the README lists is one the command takes."""
    commands = _commands()
    assert _table("### `fedscalar run` options") <= _flags(commands["run"])
    assert _table("### Comparing methods") <= _flags(commands["compare"])


def test_run_and_compare_take_every_config_field():
    from fedscalar.cli import NOT_SHARED
    from fedscalar.config import RunConfig

    fields = {"--" + f.replace("_", "-") for f in RunConfig.model_fields}
    commands = _commands()
    own_run = {"--config", "--resume", "--from-round", "--quiet"}
    assert _flags(commands["run"]) == fields | own_run
    shared = fields - {"--" + f for f in NOT_SHARED}
    own_compare = {"--out", "--algorithms", "--seeds", "--config", "--target", "--jobs"}
    own_compare |= {"--report-only"}
    assert _flags(commands["compare"]) == shared | own_compare


def test_help_gives_each_default_of_the_config():
    from fedscalar.cli import task_defaults
    from fedscalar.config import RunConfig

    helps = {p.name: p.help for p in _commands()["run"].params}
    for name, info in RunConfig.model_fields.items():
        if info.default is None:
            continue
        shown = info.default
        if isinstance(shown, bool):
            shown = "on" if shown else "off"
        tasks = task_defaults(name)
        assert f"(default: {shown}{'; ' + tasks if tasks else ''})" in helps[name], name
    assert "(default: 32; text tasks: 16)" in helps["batch_size"]


def test_help_text_is_not_eaten_as_markup():
    result = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "300"})
    assert "fedscalar[flower-sim]" in result.output


def test_the_command_line_loads_no_heavy_library_for_help():
    code = (
        "import sys, fedscalar, fedscalar.cli, fedscalar.config\n"
        "heavy = [m for m in ('torch', 'datasets', 'flwr', 'transformers') if m in sys.modules]\n"
        "print(heavy)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
