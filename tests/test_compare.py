"""`fedscalar compare`: fair setup, measured bytes, resume, report and bad input."""

import csv
import json
import statistics

import numpy as np
import pytest
from typer.testing import CliRunner

from fedscalar import compare as cmp
from fedscalar.api import run
from fedscalar.cli import app
from fedscalar.config import ConfigError, RunConfig
from fedscalar.messages import DeltaReply, ScalarReply, SeedReply, TrainRequest, encode
from fedscalar.report import write_report
from fedscalar.rundir import RunDir

FAST = {"task": "digits", "rounds": 8, "eval_every": 4}


def _metrics(out, algorithm, seed=0):
    return RunDir(cmp.run_folder(out, algorithm, seed)).read_metrics()


def _summary(out, algorithm, seed=0):
    return json.loads(RunDir(cmp.run_folder(out, algorithm, seed)).summary.read_text())


def test_same_federation_for_every_algorithm_and_measured_bytes(tmp_path):
    algos = ["decomfl", "fedzo", "fedkseed", "mezo"]
    comparison = cmp.plan(tmp_path, algos, [0], **FAST)
    cmp.execute(comparison, jobs=2, echo=lambda _: None)
    path, rows, target = write_report(comparison, "digits")

    federated = [a for a in algos if a != "mezo"]
    digests = {_summary(tmp_path, a)["partition_digest"] for a in federated}
    assert len(digests) == 1  # one data split
    sequences = {json.dumps([m.get("clients") for m in _metrics(tmp_path, a)]) for a in federated}
    assert len(sequences) == 1  # one client sampling sequence
    evals = {
        tuple(m["round"] for m in _metrics(tmp_path, a) if "test_accuracy" in m) for a in algos
    }
    assert evals == {(0, 4, 8)}  # one evaluation schedule

    cfg = RunConfig(**FAST)
    k, p = cfg.local_steps, cfg.perturbations
    n = _summary(tmp_path, "fedzo")["num_parameters"]
    up = {a: _summary(tmp_path, a)["bytes_up_per_client_round"] for a in algos}
    assert up["decomfl"] == len(encode(ScalarReply(0, 0.0, np.zeros((k, p), np.float32))))
    assert up["fedkseed"] == len(encode(SeedReply(0, 0.0, (0,) * k, np.zeros((k, p), np.float32))))
    assert up["fedzo"] == len(encode(DeltaReply(0, 0.0, np.zeros(n, np.float32))))
    assert up["mezo"] == 0
    # DeComFL's download is the request plus the catch-up of missed rounds: far below
    # FedZO's d weights, and FedKSeed's grows with the pool's touched seeds instead.
    down = {a: _summary(tmp_path, a)["bytes_down_per_client_round"] for a in algos}
    assert len(encode(TrainRequest(1, 0.1, (1,) * k))) <= down["decomfl"] < down["fedkseed"]
    assert down["fedkseed"] < down["fedzo"]

    table = path.read_text()
    for a in algos:
        assert f"| {a} |" in table
    assert (tmp_path / "comparison.png").stat().st_size > 10_000
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
    with open(tmp_path / "results.csv") as f:
        written = {r["algorithm"]: r for r in csv.DictReader(f)}
    assert set(written) == set(algos)
    assert float(written["fedzo"]["bytes_up_per_client_round"]) == up["fedzo"]
    assert target is not None and all(r.to_target[0] is not None for r in rows)
    # the default target: 90% of the way from round 0 to the worst final mean accuracy
    start = statistics.mean(r.curves[0][0]["test_accuracy"] for r in rows)
    worst = min(statistics.mean(r.final) for r in rows)
    assert target == int((start + 0.9 * (worst - start)) * 100) / 100


def test_rerun_resumes_unfinished_and_skips_finished(tmp_path):
    out = tmp_path / "cmp"
    short = cmp.plan(out, ["decomfl", "fedavg"], [0], task="digits", rounds=6, eval_every=3)
    cmp.execute(short, echo=lambda _: None)
    # An interrupted run: its summary says so and it lost its last rounds.
    rd = RunDir(cmp.run_folder(out, "decomfl", 0))
    rd.truncate_metrics(4)
    summary = json.loads(rd.summary.read_text())
    rd.write_summary({**summary, "status": "interrupted", "rounds": 4})
    longer = cmp.plan(out, ["decomfl", "fedavg"], [0], task="digits", rounds=9, eval_every=3)
    said: list[str] = []
    cmp.execute(longer, echo=said.append)
    assert any("decomfl seed 0: resuming" in s for s in said)
    assert any("fedavg seed 0: resuming" in s for s in said)  # more rounds asked

    for algo in ("decomfl", "fedavg"):
        direct = run(
            RunConfig(
                algorithm=algo, task="digits", rounds=9, eval_every=3, out=str(tmp_path / algo)
            )
        )
        resumed = RunDir(cmp.run_folder(out, algo, 0))
        assert json.loads(resumed.summary.read_text())["rounds"] == 9
        if algo == "decomfl":
            assert resumed.ledger.read_bytes() == RunDir(direct.out).ledger.read_bytes()
        a, _ = RunDir.load_tensors(resumed.checkpoint)
        b, _ = RunDir.load_tensors(RunDir(direct.out).checkpoint)
        assert all((a[n] == b[n]).all() for n in b)

    before = {
        a: RunDir(cmp.run_folder(out, a, 0)).metrics.stat().st_mtime_ns
        for a in ("decomfl", "fedavg")
    }
    said.clear()
    cmp.execute(longer, echo=said.append)
    assert sorted(said) == [
        "decomfl seed 0: finished earlier, skipped",
        "fedavg seed 0: finished earlier, skipped",
    ]
    after = {
        a: RunDir(cmp.run_folder(out, a, 0)).metrics.stat().st_mtime_ns
        for a in ("decomfl", "fedavg")
    }
    assert before == after


@pytest.mark.parametrize(
    "args, message",
    [
        (["--algorithms", "decomfl,sgd"], "unknown algorithm 'sgd'"),
        (["--algorithms", "decomfl,decomfl"], "listed twice"),
        (["--algorithms", "decomfl", "--seeds", "0,x"], "seeds"),
        (["--algorithms", "decomfl,mezo", "--attack", "gaussian", "--attackers", "2"], "mezo"),
        (["--algorithms", "fedkseed", "--aggregator", "median"], "fedkseed takes mean only"),
        (["--algorithms", "decomfl", "--attackers", "2"], "--attack"),
        (["--algorithms", "fedavg", "--sampled", "20"], "sampled"),
        (["--algorithms", "decomfl", "--aggregator", "mode"], "aggregator"),
        (["--algorithms", "decomfl", "--target", "1.5"], "target"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_before_anything_runs(tmp_path, args, message):
    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, ["compare", "--out", str(out), "--task", "digits", *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: ") or "Invalid value" in result.output
    assert message in result.output
    assert not out.exists()


def test_per_algorithm_tables_and_their_limits(tmp_path):
    spec = tmp_path / "cmp.toml"
    spec.write_text(
        'algorithms = ["decomfl", "fedavg"]\n[run]\ntask = "digits"\nrounds = 5\n'
        "[algorithm.fedavg]\nlr = 0.1\n"
    )
    comparison = cmp.plan(tmp_path / "out", file=spec)
    assert comparison.runs["fedavg", 0].lr == 0.1
    assert comparison.runs["decomfl", 0].lr == 0.03  # the tuned default
    assert comparison.runs["decomfl", 0].rounds == comparison.runs["fedavg", 0].rounds == 5
    spec.write_text('algorithms = ["decomfl"]\n[algorithm.decomfl]\nclients = 4\n')
    with pytest.raises(ConfigError, match="clients must be the same for every algorithm"):
        cmp.plan(tmp_path / "out", file=spec)
    spec.write_text('algorithms = ["decomfl"]\n[algorithm.hiso]\nlr = 1.0\n')
    with pytest.raises(
        ConfigError, match=r"algorithm\.hiso: a table for an algorithm not compared"
    ):
        cmp.plan(tmp_path / "out", file=spec)


def test_a_changed_setting_on_an_existing_comparison_is_refused(tmp_path):
    comparison = cmp.plan(tmp_path, ["decomfl"], [0], task="digits", rounds=2, eval_every=1)
    cmp.execute(comparison, echo=lambda _: None)
    with pytest.raises(ConfigError, match=r"was run with mu=0\.001"):
        cmp.plan(tmp_path, ["decomfl"], [0], task="digits", rounds=2, eval_every=1, mu=0.01)
    with pytest.raises(ConfigError, match=r"was run with lr=0\.03"):  # no mixed runs
        cmp.plan(tmp_path, ["decomfl"], [0], task="digits", rounds=2, eval_every=1, lr=0.1)
    cmp.plan(tmp_path, ["decomfl"], [0], task="digits", rounds=4, eval_every=1)  # extends


def test_an_algorithm_may_run_on_fewer_seeds(tmp_path):
    spec = tmp_path / "c.toml"
    spec.write_text(
        'algorithms = ["decomfl", "mezo"]\nseeds = [0, 1]\n[run]\ntask = "digits"\n'
        "rounds = 4\neval_every = 2\n[algorithm.mezo]\nseeds = [1]\n"
    )
    comparison = cmp.plan(tmp_path / "out", file=spec)
    assert sorted(comparison.runs) == [("decomfl", 0), ("decomfl", 1), ("mezo", 1)]
    cmp.execute(comparison, echo=lambda _: None)
    _, rows, _ = write_report(comparison, "digits")
    assert {r.algorithm: r.runs for r in rows} == {"decomfl": 2, "mezo": 1}
    spec.write_text(spec.read_text().replace("seeds = [1]", "seeds = [3]"))
    with pytest.raises(ConfigError, match=r"algorithm\.mezo: seeds must be a subset"):
        cmp.plan(tmp_path / "out2", file=spec)


def test_flags_narrow_a_comparison_file_with_per_algorithm_tables(tmp_path):
    spec = tmp_path / "c.toml"
    spec.write_text(
        'algorithms = ["decomfl", "mezo", "fedavg"]\nseeds = [0, 1, 2]\n[run]\n'
        'task = "digits"\nrounds = 4\n[algorithm.mezo]\nseeds = [0]\n'
        "[algorithm.fedavg]\nrounds = 2\n"
    )
    # one algorithm of the file: the other tables stay out of it
    only = cmp.plan(tmp_path / "a", ["fedavg"], [1], file=spec)
    assert list(only.runs) == [("fedavg", 1)] and only.runs["fedavg", 1].rounds == 2
    # seeds narrowed past an algorithm's own seeds: that algorithm has no run
    narrowed = cmp.plan(tmp_path / "b", ["decomfl", "mezo"], [1, 2], file=spec)
    assert sorted(narrowed.runs) == [("decomfl", 1), ("decomfl", 2)]
    assert narrowed.algorithms == ("decomfl",)
    with pytest.raises(ConfigError, match=r"seeds: no algorithm has a run among the seeds \[1\]"):
        cmp.plan(tmp_path / "c", ["mezo"], [1], file=spec)
    # a seed beyond the file's list is the user's to add
    assert list(cmp.plan(tmp_path / "d", ["decomfl"], [5], file=spec).runs) == [("decomfl", 5)]


def test_a_run_that_backed_off_keeps_its_smaller_steps_when_the_comparison_resumes(tmp_path):
    comparison = cmp.plan(tmp_path, ["decomfl"], [0], **FAST)
    cmp.execute(comparison, echo=lambda _: None)
    folder = cmp.run_folder(tmp_path, "decomfl", 0)
    # what a divergence back-off leaves: the run rolled back, its rate halved
    run(resume=True, resume_overrides={"out": str(folder), "lr_scale": 0.5}, from_round=4)
    longer = cmp.plan(tmp_path, ["decomfl"], [0], **{**FAST, "rounds": 12})  # not refused
    assert longer.runs["decomfl", 0].lr_scale == 0.5
    cmp.execute(longer, echo=lambda _: None)
    assert "lr_scale = 0.5" in (folder / "config.toml").read_text()
    from fedscalar.ledger import Ledger

    lrs = [u.lr for u in Ledger.open(folder / "ledger.bin").updates]
    base = RunConfig(**FAST).resolved().lr
    assert lrs[:4] == [float(np.float32(base))] * 4
    assert lrs[4:] == [float(np.float32(base * 0.5))] * 8


def test_the_command_prints_the_table_and_where_the_files_are(tmp_path):
    args = ["compare", "--out", str(tmp_path), "--algorithms", "decomfl,hiso"]
    args += ["--task", "digits", "--rounds", "4", "--eval-every", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "| decomfl |" in result.output and "| hiso |" in result.output
    assert "![" not in result.output  # no markdown image line on a terminal
    assert str(tmp_path / "comparison.png") in result.output
    assert str(tmp_path / "frontier.png") in result.output


def test_report_only_tabulates_the_runs_as_they_stand_and_trains_nothing(tmp_path):
    out = tmp_path / "cmp"
    common = ["--task", "digits", "--rounds", "8", "--eval-every", "4", "--seeds", "0,1"]
    args = ["compare", "--out", str(out), "--algorithms", "decomfl,hiso", *common]
    missing = CliRunner().invoke(app, [*args, "--report-only"])
    assert missing.exit_code == 2 and "no comparison" in missing.output and not out.exists()
    cmp.execute(cmp.plan(out, ["decomfl"], [0], **FAST), jobs=1, echo=lambda _: None)
    cmp.execute(cmp.plan(out, ["decomfl"], [1], **{**FAST, "rounds": 4}), 1, echo=lambda _: None)
    before = sorted(p.relative_to(out) for p in out.rglob("*") if "runs" in p.parts)
    result = CliRunner().invoke(app, [*args, "--report-only"])
    assert result.exit_code == 0, result.output
    assert "not counted, unfinished: seed 1 at round 4" in result.output
    assert "| hiso |" not in result.output  # not started: no row, and still not started
    assert sorted(p.relative_to(out) for p in out.rglob("*") if "runs" in p.parts) == before
    assert (out / "results.md").read_text().count("| decomfl |") == 1
    assert _metrics(out, "decomfl", 1)[-1]["round"] == 4  # resumed by nothing


def test_an_algorithm_only_option_reaches_only_the_algorithms_that_take_it(tmp_path):
    comparison = cmp.plan(
        tmp_path / "out",
        algorithms=["decomfl", "ferret", "fedavg"],
        task="digits",
        projections=16,
        perturbations=3,
    )
    assert comparison.runs["ferret", 0].projections == 16
    assert comparison.runs["decomfl", 0].projections is None
    assert comparison.runs["decomfl", 0].perturbations == 3
    assert comparison.runs["fedavg", 0].perturbations == 5  # P is not fedavg's
    comparison = cmp.plan(tmp_path / "out1", algorithms=["decomfl", "feedsign"], task="digits")
    assert comparison.runs["feedsign", 0].perturbations == 1  # its own default P
    spec = tmp_path / "cmp.toml"
    spec.write_text('algorithms = ["decomfl"]\n[algorithm.decomfl]\nserver_lr = 0.5\n')
    with pytest.raises(ConfigError, match="server_lr: only for ferret, not decomfl"):
        cmp.plan(tmp_path / "out2", file=spec)


def test_records_rebuild_the_report_once_the_run_folders_are_gone(tmp_path):
    from fedscalar.report import RECORD_DROPS, collect, restore_records, write_records

    comparison = cmp.plan(tmp_path / "cmp", ["decomfl", "fedavg"], [0, 1], **FAST)
    cmp.execute(comparison, jobs=2, echo=lambda _: None)
    rows, _ = collect(comparison, target=0.5)
    assert write_records(comparison, tmp_path / "records") == 4
    record = cmp.run_folder(tmp_path / "records", "decomfl", 0)
    assert sorted(p.name for p in record.iterdir()) == [
        "config.toml",
        "metrics.jsonl",
        "summary.json",
    ]
    assert [m["round"] for m in RunDir(record).read_metrics()] == [0, 4, 8]  # evaluated rounds

    # the folders are lost; a fresh plan restores the records, and nothing trains again
    again = cmp.plan(tmp_path / "new", ["decomfl", "fedavg"], [0, 1], **FAST)
    assert restore_records(again, tmp_path / "records", echo=lambda _: None) == 4
    assert {cmp.state_of(again.folder(n, s), c) for (n, s), c in again.runs.items()} == {"done"}
    restored, _ = collect(cmp.plan(tmp_path / "new", ["decomfl", "fedavg"], [0, 1], **FAST), 0.5)
    for a, b in zip(rows, restored, strict=True):
        assert (a.final, a.best, a.to_target, a.bytes_up, a.bytes_down, a.rounds, a.hours) == (
            b.final,
            b.best,
            b.to_target,
            b.bytes_up,
            b.bytes_down,
            b.rounds,
            b.hours,
        )
        thinned = [
            [{k: v for k, v in h.items() if k not in RECORD_DROPS} for h in c] for c in a.curves
        ]
        assert b.curves == thinned  # every evaluated round, all but the sampled ids

    # a record of other settings or of fewer rounds is left out: that run trains again
    said: list[str] = []
    other = cmp.plan(tmp_path / "other", ["decomfl"], [0], **{**FAST, "lr": 0.5})
    longer = cmp.plan(tmp_path / "longer", ["decomfl"], [0], **{**FAST, "rounds": 12})
    assert restore_records(other, tmp_path / "records", echo=said.append) == 0
    assert restore_records(longer, tmp_path / "records", echo=said.append) == 0
    assert "lr=" in said[0] and "not finished" in said[1]
    assert not other.folder("decomfl", 0).exists()


def test_a_row_is_about_finished_runs_and_names_the_unfinished_ones(tmp_path):
    from fedscalar.report import collect, markdown

    out = tmp_path / "cmp"
    cmp.execute(cmp.plan(out, ["decomfl"], [0], **FAST), jobs=1, echo=lambda _: None)
    cmp.execute(cmp.plan(out, ["decomfl"], [1], **{**FAST, "rounds": 4}), 1, echo=lambda _: None)
    seed0 = [m for m in _metrics(out, "decomfl", 0) if "test_accuracy" in m]
    seed1 = [m for m in _metrics(out, "decomfl", 1) if "test_accuracy" in m]
    assert seed1[-1]["round"] == 4 and seed1[-1]["test_accuracy"] != seed0[-1]["test_accuracy"]

    (row,), _ = collect(cmp.plan(out, ["decomfl"], [0, 1], **FAST), target=0.5)
    assert (row.runs, row.seeds, row.pending) == (1, [0], {1: 4})
    assert row.final == [seed0[-1]["test_accuracy"]] and row.statuses == ["completed"]
    assert "1 (ok); not counted, unfinished: seed 1 at round 4 |" in markdown([row], 0.5)

    # with no finished run, the row shows the unfinished ones as they stand
    (row,), _ = collect(cmp.plan(out, ["decomfl"], [1], **FAST), target=0.5)
    assert (row.seeds, row.pending, row.statuses) == ([1], {}, ["unfinished"])
    assert row.final == [seed1[-1]["test_accuracy"]]


def test_an_unfinished_run_resumes_from_its_record_on_a_fresh_folder(tmp_path):
    from fedscalar.report import restore_records, write_records

    whole = cmp.plan(tmp_path / "whole", ["decomfl"], [0], **FAST)
    cmp.execute(whole, jobs=1, echo=lambda _: None)

    # the first half of the runs, then the comparison asks for all 8 rounds
    half = cmp.plan(tmp_path / "cmp", ["decomfl", "fedavg"], [0], **{**FAST, "rounds": 4})
    cmp.execute(half, jobs=1, echo=lambda _: None)
    longer = cmp.plan(tmp_path / "cmp", ["decomfl", "fedavg"], [0], **FAST)
    assert write_records(longer, tmp_path / "records") == 1  # fedavg keeps no ledger of updates
    record = cmp.run_folder(tmp_path / "records", "decomfl", 0)
    assert sorted(p.name for p in record.iterdir()) == [
        "config.toml",
        "ledger.bin",
        "metrics.jsonl",
    ]
    assert not cmp.run_folder(tmp_path / "records", "fedavg", 0).exists()

    # on another machine: no base copy, no checkpoint; the run resumes from round 4
    said: list[str] = []
    fresh = cmp.plan(tmp_path / "fresh", ["decomfl"], [0], **FAST)
    assert restore_records(fresh, tmp_path / "records", echo=said.append) == 1
    assert said == ["decomfl seed 0: resumes from its record at round 4"]
    assert cmp.state_of(fresh.folder("decomfl", 0), fresh.runs["decomfl", 0]) == "resume"
    cmp.execute(cmp.plan(tmp_path / "fresh", ["decomfl"], [0], **FAST), 1, echo=lambda _: None)
    a, b = RunDir(whole.folder("decomfl", 0)), RunDir(fresh.folder("decomfl", 0))
    assert a.ledger.read_bytes() == b.ledger.read_bytes()
    assert a.checkpoint.read_bytes() == b.checkpoint.read_bytes()
    keys = ("round", "test_accuracy", "test_loss", "bytes_up_cumulative", "bytes_down_cumulative")
    assert [{k: m.get(k) for k in keys} for m in a.read_metrics()] == [
        {k: m.get(k) for k in keys} for m in b.read_metrics()
    ]

    # once finished, its record is the usual few kB and the ledger is gone from it
    assert write_records(fresh, tmp_path / "records") == 1
    assert sorted(p.name for p in record.iterdir()) == [
        "config.toml",
        "metrics.jsonl",
        "summary.json",
    ]


def test_progress_says_how_long_the_runs_in_flight_have_left(tmp_path):
    from fedscalar.compare import _left, _progress

    history = [{"round": 0}] + [{"round": r, "round_seconds": 2.0} for r in range(1, 11)]
    assert _left(history, 100) == " (about 3 min left)"  # 90 rounds at 2 s
    assert _left(history, 40) == " (about 60 s left)"
    history[-1]["round_seconds"] = 500.0  # one slow round (an evaluation) moves no median
    assert _left(history, 4000) == " (about 2.2 h left)"
    assert _left(history[:1], 100) == ""  # round 0 only: no pace yet
    comparison = cmp.plan(tmp_path, ["decomfl", "fedavg"], [0], **FAST)
    folder = RunDir(comparison.folder("decomfl", 0))
    folder.path.mkdir(parents=True)
    for record in history[:5]:
        folder.append_metrics(record)
    runs = [("decomfl", 0, "new"), ("fedavg", 0, "new")]
    assert _progress(comparison, runs) == (
        "decomfl seed 0 4/8 (about 8 s left), fedavg seed 0 starting"
    )
