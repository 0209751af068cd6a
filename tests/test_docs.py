"""The README documents every CLI option (with its default)."""

import re
from pathlib import Path

import typer.main

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
    from fedscalar.config import RunConfig

    for name, info in RunConfig.model_fields.items():
        if info.default is None:
            continue
        flag = "--" + name.replace("_", "-")
        row = re.search(rf"^\| `{flag}[^|]*\| ([^|]+) \|", README, flags=re.MULTILINE)
        assert row, flag
        shown = row.group(1).strip().strip("`")
        if isinstance(info.default, bool):
            assert shown == ("on" if info.default else "off"), (flag, shown)
        else:
            assert shown == str(info.default) or float(shown) == info.default, (flag, shown)
