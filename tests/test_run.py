"""End-to-end runs through `fedscalar.run` and the CLI: files, resume, export, failures."""

import json

import pytest
import torch
from typer.testing import CliRunner

from fedscalar import RunConfig, run
from fedscalar.cli import app
from fedscalar.export import rebuild
from fedscalar.ledger import Ledger
from fedscalar.rundir import RunDir

SMALL = dict(task="digits", clients=4, sampled=2, eval_every=5, batch_size=16)
SUMMARY_KEYS = {
    "algorithm",
    "task",
    "rounds",
    "num_parameters",
    "final_test_accuracy",
    "best_test_accuracy",
    "bytes_up_total",
    "bytes_down_total",
    "bytes_up_per_client_round",
    "bytes_down_per_client_round",
    "wall_seconds",
}


def _weights(path):
    tensors, meta = RunDir.load_tensors(RunDir(path).checkpoint)
    return tensors, int(meta["round"])


def test_run_folder_contents(tmp_path):
    out = tmp_path / "r"
    summary = run(RunConfig(algorithm="decomfl", rounds=12, out=str(out), **SMALL)).summary
    assert summary.keys() >= SUMMARY_KEYS
    for name in (
        "config.toml",
        "metrics.jsonl",
        "summary.json",
        "ledger.bin",
        "curves.png",
        "run.log",
    ):
        assert (out / name).exists(), name
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == list(range(13))
    assert {"train_loss", "bytes_up", "bytes_down", "bytes_up_cumulative", "wall_seconds"} <= lines[
        1
    ].keys()
    assert "test_accuracy" in lines[5] and "test_accuracy" not in lines[4]
    clock = [m["wall_seconds"] for m in lines]  # round 0's evaluation is on the clock
    assert 0 < clock[0] < clock[1] and clock == sorted(clock)
    # bytes: K=1, P=5 -> 31 B up per client; down 14 B request + catch-up (11 + 28/round)
    assert all(m["bytes_up"] == 2 * 31 for m in lines[1:])
    assert summary["bytes_up_per_client_round"] == 31
    assert lines[1]["bytes_down"] == 2 * 14  # round 1: nothing to catch up
    assert sum(m["bytes_up"] for m in lines) == summary["bytes_up_total"]
    ledger = Ledger.open(out / "ledger.bin")
    assert len(ledger) == 12 and ledger.bytes_per_round() == 43  # a few dozen bytes per round
    assert json.loads((out / "summary.json").read_text())["rounds"] == 12


@pytest.mark.parametrize("algorithm", ["decomfl", "hiso", "fedavg", "feedsign", "ferret"])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, algorithm):
    lr = {"fedavg": 0.1}.get(algorithm, 0.03)
    full = tmp_path / "full"
    run(RunConfig(algorithm=algorithm, rounds=16, lr=lr, out=str(full), **SMALL))
    part = tmp_path / "part"
    run(RunConfig(algorithm=algorithm, rounds=7, lr=lr, out=str(part), **SMALL))
    run(resume=True, resume_overrides={"out": str(part), "rounds": 16})
    (a, ra), (b, rb) = _weights(full), _weights(part)
    assert ra == rb == 16 and a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert (full / "ledger.bin").read_bytes() == (part / "ledger.bin").read_bytes()
    metrics_full = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    metrics_part = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    keys = ("round", "train_loss", "bytes_up", "bytes_down", "bytes_down_cumulative")
    assert [[m.get(k) for k in keys] for m in metrics_full] == [
        [m.get(k) for k in keys] for m in metrics_part
    ]
    # the interrupted run also evaluated at its stop (round 7); the scheduled evals agree
    scheduled = [m.get("test_accuracy") for m in metrics_full if m["round"] % 5 == 0]
    assert scheduled == [m.get("test_accuracy") for m in metrics_part if m["round"] % 5 == 0]


@pytest.mark.parametrize("algorithm", ["decomfl", "hiso", "feedsign", "ferret"])
def test_crash_recovery_and_export_replay_the_ledger(tmp_path, algorithm):
    full = tmp_path / "full"
    run(RunConfig(algorithm=algorithm, rounds=14, lr=0.03, out=str(full), **SMALL))
    crashed = tmp_path / "crashed"
    run(RunConfig(algorithm=algorithm, rounds=9, lr=0.03, out=str(crashed), **SMALL))
    (crashed / "checkpoint.safetensors").unlink()  # only base + ledger survive
    metrics = crashed / "metrics.jsonl"  # round 9 reached the ledger but not the metrics
    metrics.write_text("".join(metrics.read_text().splitlines(keepends=True)[:-1]))
    with open(crashed / "ledger.bin", "ab") as f:
        f.write(b"\x27\x00\x00\x00\x03\x0a")  # a record cut short by the crash
    run(resume=True, resume_overrides={"out": str(crashed), "rounds": 14})
    rounds = [json.loads(x)["round"] for x in metrics.read_text().splitlines()]
    assert rounds == list(range(15))
    a, _ = _weights(full)
    b, _ = _weights(crashed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    weights, rounds = rebuild(full)  # from base.safetensors + ledger.bin alone
    assert rounds == 14 and all(torch.equal(weights[n], a[n]) for n in weights)


def test_export_cli_writes_the_replayed_weights(tmp_path):
    out = tmp_path / "r"
    run(RunConfig(algorithm="decomfl", rounds=5, lr=0.03, out=str(out), **SMALL))
    target = tmp_path / "model.safetensors"
    result = CliRunner().invoke(app, ["export", str(out), "--output", str(target)])
    assert result.exit_code == 0, result.output
    exported, _ = RunDir.load_tensors(target)
    final, _ = _weights(out)
    assert all(torch.equal(exported[n], final[n]) for n in final)
    hf = CliRunner().invoke(app, ["export", str(out), "--hf", str(tmp_path / "hf")])
    assert hf.exit_code == 2 and "only language-model runs" in hf.output
    both = CliRunner().invoke(app, ["export", str(out), "--hf", str(tmp_path / "hf"), "-o", "m"])
    assert both.exit_code == 2 and "not both" in both.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "r"]  # no temp


def test_verify_replays_the_ledger_to_the_checkpoint_and_names_a_changed_value(tmp_path):
    out = tmp_path / "h"
    run(RunConfig(algorithm="hiso", rounds=7, out=str(out), **SMALL))
    ok = CliRunner().invoke(app, ["verify", str(out)])
    assert ok.exit_code == 0, ok.output
    tensors, _ = _weights(out)
    assert f"all {sum(t.numel() for t in tensors.values()):,} values" in ok.output  # and H
    assert "round 7" in ok.output
    name = next(n for n in tensors if n.startswith("curvature::"))
    flat = tensors[name].reshape(-1)
    flat[3] = torch.nextafter(flat[3], torch.tensor(float("inf")))  # one unit in one value
    RunDir.save_tensors(RunDir(out).checkpoint, tensors, {"round": "7"})
    bad = CliRunner().invoke(app, ["verify", str(out), "--device", "cpu"])
    assert bad.exit_code == 1, bad.output
    assert " 1 of " in bad.output and name in bad.output


@pytest.mark.parametrize("case", ["fedavg", "no checkpoint", "no run", "bad device"])
def test_verify_refuses_what_it_cannot_replay_in_one_line(tmp_path, case):
    out = tmp_path / "r"
    if case != "no run":
        algorithm = "fedavg" if case == "fedavg" else "decomfl"
        run(RunConfig(algorithm=algorithm, rounds=3, lr=0.1, out=str(out), **SMALL))
    if case == "no checkpoint":
        RunDir(out).checkpoint.unlink()
    device = "gpu" if case == "bad device" else "cpu"
    result = CliRunner().invoke(app, ["verify", str(out), "--device", device])
    assert result.exit_code == 2, result.output
    expected = {
        "fedavg": "nothing to replay",
        "no checkpoint": "missing",
        "no run": "no run",
        "bad device": "device: unknown device 'gpu'",
    }
    assert expected[case] in result.output


@pytest.mark.parametrize(
    "args,field",
    [
        (["--lr", "-1"], "lr"),
        (["--sampled", "20", "--clients", "10"], "sampled"),
        (["--algorithm", "sgd"], "algorithm"),
        (["--task", "imagenet"], "task"),
        (["--alpha", "0"], "alpha"),
        (["--config", "no/such/file.toml"], "file not found"),
        (["--model", "resnet"], "model"),
        (["--algorithm", "decomfl", "--projections", "8"], "projections: only for ferret"),
        (["--algorithm", "hiso", "--server-lr", "2"], "server_lr: only for ferret"),
        (["--algorithm", "ferret", "--perturbations", "3"], "perturbations: ferret"),
        (["--algorithm", "ferret", "--projections", "300"], "projections"),
        (["--algorithm", "feedsign", "--aggregator", "krum"], "majority vote is its rule"),
    ],
)
def test_bad_config_exits_2_with_one_line(tmp_path, args, field):
    result = CliRunner().invoke(app, ["run", "--out", str(tmp_path / "x"), "--quiet", *args])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and "Traceback" not in result.output


def test_config_file_and_flags(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('algorithm = "hiso"\nrounds = 3\nclients = 4\nsampled = 2\nlr = 0.01\n')
    out = tmp_path / "r"
    result = CliRunner().invoke(
        app, ["run", "--config", str(cfg), "--lr", "0.02", "--out", str(out), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    resolved = (out / "config.toml").read_text()
    assert 'algorithm = "hiso"' in resolved and "lr = 0.02" in resolved and "rounds = 3" in resolved


def test_divergence_stops_cleanly_and_resumes_with_smaller_lr(tmp_path, monkeypatch):
    from fedscalar.tasks.vision import ArrayTask

    real_loss = ArrayTask.loss
    calls = {"n": 0}

    def blows_up(self, model, batch):  # finite for 10 rounds (2 clients x 6 forwards), then NaN
        calls["n"] += 1
        return real_loss(self, model, batch) * (float("nan") if calls["n"] > 120 else 1.0)

    monkeypatch.setattr(ArrayTask, "loss", blows_up)
    out = tmp_path / "r"
    args = [
        "run",
        "--lr",
        "0.5",
        "--rounds",
        "30",
        "--out",
        str(out),
        "--quiet",
        "--clients",
        "4",
        "--sampled",
        "2",
        "--eval-every",
        "4",
        "--divergence-ratio",  # the test loss check would stop it first (round 8)
        "0",
        "--divergence-backoff",
        "0",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert (
        "round 11: 0 valid replies" in result.stderr
        and "the client loss is not finite" in result.stderr
        and "--resume" in result.stderr
    )
    assert "Traceback" not in result.output
    ledger = Ledger.open(out / "ledger.bin")
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(ledger) == 10 and metrics[-1]["round"] == 10
    assert json.loads((out / "summary.json").read_text())["status"] == "diverged"
    monkeypatch.setattr(ArrayTask, "loss", real_loss)
    result = CliRunner().invoke(
        app, ["run", "--resume", "--out", str(out), "--lr", "0.01", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["rounds"] == 30
    assert Ledger.open(out / "ledger.bin").updates[10].lr == pytest.approx(0.01)


def test_resume_refuses_to_change_the_run(tmp_path):
    out = tmp_path / "r"
    run(RunConfig(rounds=2, out=str(out), **SMALL))
    result = CliRunner().invoke(app, ["run", "--resume", "--out", str(out), "--clients", "9"])
    assert result.exit_code == 2 and "clients" in result.stderr


def test_auto_catch_up_saves_bytes_and_changes_nothing_else(tmp_path):
    common = dict(task="digits", model="linear", clients=300, sampled=2, rounds=150, eval_every=150)
    replay = run(RunConfig(out=str(tmp_path / "replay"), **common)).summary
    auto = run(RunConfig(out=str(tmp_path / "auto"), catch_up="auto", **common)).summary
    # 650 weights: the state (2,610 B) beats replaying more than 93 missed rounds
    assert auto["bytes_down_total"] < replay["bytes_down_total"]
    assert auto["bytes_up_total"] == replay["bytes_up_total"]
    a, _ = _weights(tmp_path / "replay")
    b, _ = _weights(tmp_path / "auto")
    assert all(torch.equal(a[n], b[n]) for n in a)
