"""The library API: a user's own task and algorithm, registered from outside the
package (the modules in examples/), run, resumed, exported and compared like the
built-ins; progress callbacks; one registry behind the config and the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from examples import custom_task
from fedscalar import RunConfig, registry, run
from fedscalar.cli import app
from fedscalar.export import rebuild
from fedscalar.ledger import Ledger
from fedscalar.rundir import RunDir

VOTE = ["--plugins", "examples.vote_algorithm", "--algorithm", "decomfl-vote"]
SMALL = ["--clients", "4", "--sampled", "3", "--eval-every", "5", "--quiet"]


def _cli(*args: str):
    return CliRunner().invoke(app, list(args))


def test_a_users_own_model_data_and_metric_train_with_progress_callbacks(tmp_path):
    summary = custom_task.main(str(tmp_path / "wine"), rounds=60, quiet=True)
    history = RunDir(tmp_path / "wine").read_metrics()
    assert summary["task"] == "wine" and summary["test_examples"] == 38
    assert summary["final_test_accuracy"] >= history[0]["test_accuracy"] + 0.2  # it learns
    seen = []
    cfg = RunConfig(task="wine", lr=0.05, clients=4, sampled=2, rounds=6, eval_every=3)
    run(cfg.model_copy(update={"out": str(tmp_path / "cb")}), on_round=seen.append)
    assert [r["round"] for r in seen] == [1, 2, 3, 4, 5, 6]
    assert seen == RunDir(tmp_path / "cb").read_metrics()[1:]  # what metrics.jsonl holds


def test_an_interrupting_callback_stops_the_run_resumably(tmp_path):
    custom_task.main(str(tmp_path / "ignored"), rounds=1, quiet=True)  # registers "wine"
    cfg = RunConfig(task="wine", lr=0.05, clients=4, sampled=2, rounds=8, out=str(tmp_path / "r"))

    def stop_at_3(record):
        if record["round"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(Exception):  # noqa: B017 - RunFailed, exit code 130
        run(cfg, on_round=stop_at_3)
    assert RunDir(tmp_path / "r").read_summary()["status"] == "interrupted"
    run(resume=True, resume_overrides={"out": str(tmp_path / "r")})
    straight = run(cfg.model_copy(update={"out": str(tmp_path / "s")}))
    assert (tmp_path / "r" / "ledger.bin").read_bytes() == (
        straight.out / "ledger.bin"
    ).read_bytes()


def test_a_plugin_algorithm_runs_resumes_and_exports_like_a_built_in(tmp_path):
    out, straight = tmp_path / "vote", tmp_path / "straight"
    result = _cli("run", *VOTE, *SMALL, "--rounds", "6", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "decomfl-vote on digits: 6 rounds" in result.output
    result = _cli("run", "--resume", "--out", str(out), "--rounds", "10", "--quiet")
    assert result.exit_code == 0, result.output  # config.toml names the plugin
    assert _cli("run", *VOTE, *SMALL, "--rounds", "10", "--out", str(straight)).exit_code == 0
    assert (out / "ledger.bin").read_bytes() == (straight / "ledger.bin").read_bytes()
    # each round's update is a vote: the mean of three signs
    for update in Ledger.open(out / "ledger.bin").updates:
        assert set(np.round(update.scalars.ravel() * 3).astype(int)) <= {-3, -1, 1, 3}
    weights, rounds = rebuild(out)
    checkpoint, _ = RunDir.load_tensors(RunDir(out).checkpoint)
    assert rounds == 10 and all(torch.equal(weights[n], checkpoint[n]) for n in weights)


def test_a_comparison_puts_a_plugin_beside_the_built_ins(tmp_path):
    result = _cli(
        "compare", "--out", str(tmp_path), "--algorithms", "decomfl,decomfl-vote",
        "--plugins", "examples.vote_algorithm", "--task", "digits", "--rounds", "4",
        "--eval-every", "2",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "| decomfl-vote |" in result.output


def test_the_registry_refuses_a_taken_name_and_names_what_exists(tmp_path):
    spec = registry.ALGORITHMS["decomfl"]
    with pytest.raises(ValueError, match="registered already"):
        registry.register_algorithm(
            registry.AlgorithmSpec("decomfl", "x", spec.make_server, spec.make_client)
        )
    result = _cli("run", "--algorithm", "nope", "--out", str(tmp_path / "x"))
    assert result.exit_code == 2 and "choose from decomfl, hiso" in result.output
    result = _cli("run", "--plugins", "no_such_module", "--out", str(tmp_path / "x"))
    assert result.exit_code == 2 and "cannot import 'no_such_module'" in result.output
    assert not (tmp_path / "x").exists()


def test_what_an_algorithm_supports_comes_from_its_registry_entry(tmp_path):
    result = _cli("run", *VOTE, "--runtime", "flower-simulation", "--out", str(tmp_path / "x"))
    assert result.exit_code == 2 and "decomfl-vote runs in the local simulator" in result.output
    result = _cli("run", *VOTE, "--aggregator", "median", "--out", str(tmp_path / "x"))
    assert result.exit_code == 2 and "decomfl-vote takes mean only" in result.output
    result = _cli("run", *VOTE, "--task", "mnist", "--out", str(tmp_path / "x"))
    assert result.exit_code == 2 and "no default for mnist; give --lr" in result.output
    json.dumps(registry.ALGORITHMS["decomfl-vote"].lr)  # plain data, documented defaults


def test_a_plugin_declares_its_own_settings(tmp_path):
    plain, margin = tmp_path / "plain", tmp_path / "margin"
    assert _cli("run", *VOTE, *SMALL, "--rounds", "3", "--out", str(plain)).exit_code == 0
    args = ["run", *VOTE, *SMALL, "--rounds", "3", "--options", "margin=0.5"]
    result = _cli(*args, "--out", str(margin))
    assert result.exit_code == 0, result.output
    assert (plain / "ledger.bin").read_bytes() != (margin / "ledger.bin").read_bytes()
    assert Ledger.open(margin / "ledger.bin").header["options"] == {"margin": 0.5}
    for bad, why in (
        ("nope=1", "has no option 'nope' (it takes: margin)"),
        ("margin=abc", "margin takes a float"),
        ("margin", "expected name=value"),
    ):
        result = _cli(*args[:-1], bad, "--out", str(tmp_path / "bad"))
        assert result.exit_code == 2 and why in result.output, result.output
    # the ledger decides: an edited setting in config.toml is refused on resume
    config = margin / "config.toml"
    config.write_text(config.read_text().replace("margin = 0.5", "margin = 0.1"))
    result = _cli("run", "--resume", "--out", str(margin), "--rounds", "4", "--quiet")
    assert result.exit_code == 2 and "options" in result.output, result.output
