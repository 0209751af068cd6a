"""Fault injection: torn writes, flipped bytes, edited files, concurrent writers, kills
and signals. A run folder never loses or silently changes a round."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedscalar import RunConfig, run
from fedscalar.cli import app
from fedscalar.export import rebuild
from fedscalar.ledger import Ledger, LedgerCorrupted, LedgerError
from fedscalar.rundir import FolderLocked, RunDir

SMALL = dict(task="digits", clients=4, sampled=2, eval_every=2, batch_size=16)
RECORD = 43  # bytes of one DeComFL ledger record (K=1, P=5)


def _run(out: Path, rounds: int = 5, **kw) -> Path:
    run(RunConfig(**{**SMALL, "algorithm": "decomfl", **kw}, rounds=rounds, out=str(out)))
    return out


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def _one_line_exit_2(code: int, output: str, *needles: str) -> None:
    assert code == 2, output
    lines = [x for x in output.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


# --- torn tails and corruption ---------------------------------------------------------


def test_a_torn_last_record_at_every_byte_is_ignored_by_readers_and_cut_by_resume(tmp_path):
    out = _run(tmp_path / "r")
    full = (out / "ledger.bin").read_bytes()
    four = len(full) - RECORD
    for cut in range(1, RECORD):
        (out / "ledger.bin").write_bytes(full[: four + cut])
        ledger = Ledger.open(out / "ledger.bin")
        assert len(ledger) == 4 and ledger.torn_bytes == cut
        assert (out / "ledger.bin").read_bytes() == full[: four + cut]  # read only
    (out / "ledger.bin").write_bytes(full[: four + 7])
    before = _snapshot(out)
    _, rounds = rebuild(out)  # exports the four intact rounds, changes nothing
    assert rounds == 4 and _snapshot(out) == before
    run(resume=True, resume_overrides={"out": str(out)})
    assert (out / "ledger.bin").read_bytes() == full  # cut, then round 5 again, bit for bit
    assert "cut an incomplete last record (7 bytes after round 4)" in (out / "run.log").read_text()


def test_zeros_a_crash_leaves_after_the_last_write_are_a_torn_tail(tmp_path):
    out = _run(tmp_path / "r", rounds=3)
    with open(out / "ledger.bin", "ab") as f:
        f.write(bytes(4096))
    assert len(Ledger.open(out / "ledger.bin")) == 3


def test_a_flip_anywhere_in_any_record_or_the_header_is_corruption(tmp_path):
    out = _run(tmp_path / "r", rounds=3)
    path = out / "ledger.bin"
    clean = path.read_bytes()
    first = len(clean) - 3 * RECORD
    for offset in range(len(clean)):
        _flip(path, offset)
        flipped = path.read_bytes()
        expected = LedgerCorrupted if offset >= 10 else LedgerError  # magic, version: not ours
        with pytest.raises(expected) as e:
            Ledger.open(path, repair=True)
        assert path.read_bytes() == flipped  # nothing changed, even asked to repair
        if offset >= first:
            assert f"record {(offset - first) // RECORD + 1} " in str(e.value)
        elif offset >= 14:
            assert "header" in str(e.value)
        path.write_bytes(clean)


def test_corruption_stops_export_and_resume_with_one_line_and_changes_nothing(tmp_path):
    out = _run(tmp_path / "r", rounds=6)
    _flip(out / "ledger.bin", len((out / "ledger.bin").read_bytes()) - 3 * RECORD + 20)
    before = _snapshot(out)
    code, output = _cli("export", str(out), "--output", str(tmp_path / "m.safetensors"))
    _one_line_exit_2(code, output, "ledger.bin", "record 4", "restore")
    code, output = _cli("run", "--resume", "--out", str(out), "--quiet")
    _one_line_exit_2(code, output, "record 4", "fails its checksum")
    assert _snapshot(out) == before and not (tmp_path / "m.safetensors").exists()


def test_a_corrupted_base_is_refused(tmp_path):
    out = _run(tmp_path / "r")
    _flip(out / "base.safetensors", len((out / "base.safetensors").read_bytes()) - 10)
    before = _snapshot(out)
    code, output = _cli("export", str(out), "--output", str(tmp_path / "m.safetensors"))
    _one_line_exit_2(code, output, "base.safetensors", "digest")
    code, output = _cli("run", "--resume", "--out", str(out), "--rounds", "8", "--quiet")
    _one_line_exit_2(code, output, "base.safetensors")
    assert _snapshot(out) == before


@pytest.mark.parametrize(
    "edit,field",
    [
        (('algorithm = "decomfl"', 'algorithm = "hiso"'), "algorithm"),
        (("seed = 0", "seed = 3"), "seed"),
        (("perturbations = 5", "perturbations = 4"), "perturbations"),
    ],
)
def test_an_edited_config_is_refused_naming_the_field(tmp_path, edit, field):
    out = _run(tmp_path / "r")
    config = out / "config.toml"
    assert edit[0] in config.read_text()
    config.write_text(config.read_text().replace(*edit))
    before = _snapshot(out)
    code, output = _cli("export", str(out), "--output", str(tmp_path / "m.safetensors"))
    _one_line_exit_2(code, output, f"says {field} = ", "the ledger decides")
    code, output = _cli("run", "--resume", "--out", str(out), "--quiet")
    _one_line_exit_2(code, output, field)
    assert _snapshot(out) == before


def test_exports_are_byte_for_byte_reproducible(tmp_path):
    out = _run(tmp_path / "r")
    for name in ("a", "b"):
        assert _cli("export", str(out), "--output", str(tmp_path / f"{name}.st"))[0] == 0
    assert (tmp_path / "a.st").read_bytes() == (tmp_path / "b.st").read_bytes()


# --- checkpoints -------------------------------------------------------------------------


def test_a_deleted_checkpoint_is_rebuilt_where_the_algorithm_replays(tmp_path):
    out = _run(tmp_path / "r", rounds=6, algorithm="hiso")
    original = (out / "checkpoint.safetensors").read_bytes()
    (out / "checkpoint.safetensors").unlink()
    run(resume=True, resume_overrides={"out": str(out)})  # finished: nothing to train
    assert (out / "checkpoint.safetensors").read_bytes() == original  # weights and H
    assert "rebuilt the missing checkpoint.safetensors at round 6" in (out / "run.log").read_text()


def test_a_deleted_fedavg_checkpoint_is_refused_not_silently_restarted(tmp_path):
    out = _run(tmp_path / "r", rounds=4, algorithm="fedavg")
    (out / "checkpoint.safetensors").unlink()
    before = _snapshot(out)
    code, output = _cli("run", "--resume", "--out", str(out), "--quiet")
    _one_line_exit_2(code, output, "checkpoint.safetensors is missing", "--from-round 0")
    assert _snapshot(out) == before
    run(resume=True, resume_overrides={"out": str(out)}, from_round=0)  # explicit restart
    assert len(Ledger.open(out / "ledger.bin")) == 4


# --- one writer ----------------------------------------------------------------------------

_HOLD = """
import sys, time
from fedscalar.rundir import RunDir
with RunDir(sys.argv[1]).writing():
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_writer_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path):
    out = _run(tmp_path / "r")
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _snapshot(out)
        code, output = _cli("run", "--resume", "--out", str(out), "--rounds", "8", "--quiet")
        _one_line_exit_2(code, output, f"being written by process {holder.pid}")
        with pytest.raises(FolderLocked):
            run(resume=True, resume_overrides={"out": str(out), "rounds": 8})
        assert _snapshot(out) == before
        assert _cli("export", str(out), "--output", str(tmp_path / "m.st"))[0] == 0  # readers
    finally:
        holder.kill()  # SIGKILL: the lock dies with the process
        holder.wait()
    run(resume=True, resume_overrides={"out": str(out), "rounds": 8})
    assert len(Ledger.open(out / "ledger.bin")) == 8


def test_out_naming_a_file_is_one_line(tmp_path):
    path = tmp_path / "afile"
    path.write_text("x")
    code, output = _cli("run", "--rounds", "1", "--out", str(path), "--quiet")
    _one_line_exit_2(code, output, "is a file, not a run folder")


# --- kills and signals ----------------------------------------------------------------------


def _start(out: Path, args: list[str], resume: bool) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fedscalar", "run", "--out", str(out), "--quiet"]
    cmd += ["--resume"] if resume else args
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(  # as from a terminal, even where the suite's SIGINT is ignored
        cmd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for_rounds(out: Path, rounds: int, proc: subprocess.Popen, limit: float = 60) -> None:
    end = time.monotonic() + limit
    while time.monotonic() < end and proc.poll() is None:
        if len(RunDir(out).read_metrics()) > rounds:
            return
        time.sleep(0.005)


def _straight(tmp_path: Path, args: list[str]) -> Path:
    """The same run, never stopped (in this process: the same command's configuration, on
    one thread like the killed runs: FedAvg's backward pass rounds differently on two)."""
    from fedscalar.config import build_config

    flags = dict(zip((a[2:].replace("-", "_") for a in args[::2]), args[1::2], strict=True))
    out = tmp_path / "straight"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(build_config(None, **flags, out=str(out)))
    finally:
        torch.set_num_threads(threads)
    return out


def _same_run(a: Path, b: Path) -> None:
    assert (a / "ledger.bin").read_bytes() == (b / "ledger.bin").read_bytes()
    wa, wb = rebuild(a)[0] if _replays(a) else None, rebuild(b)[0] if _replays(b) else None
    if wa is not None:
        assert all(torch.equal(wa[n], wb[n]) for n in wa)
    ca, _ = RunDir.load_tensors(RunDir(a).checkpoint)
    cb, _ = RunDir.load_tensors(RunDir(b).checkpoint)
    assert ca.keys() == cb.keys() and all(torch.equal(ca[n], cb[n]) for n in ca)
    keys = ("round", "train_loss", "test_accuracy", "bytes_up_cumulative", "bytes_down_cumulative")
    ma, mb = RunDir(a).read_metrics(), RunDir(b).read_metrics()
    assert [[m.get(k) for k in keys] for m in ma] == [[m.get(k) for k in keys] for m in mb]


def _replays(folder: Path) -> bool:
    return "fedavg" not in (folder / "config.toml").read_text()


@pytest.mark.parametrize("algorithm", ["decomfl", "hiso", "fedavg", "fedkseed"])
def test_sigkill_at_random_points_resumes_bit_identically(tmp_path, algorithm):
    args = ["--algorithm", algorithm, "--task", "digits", "--rounds", "60", "--eval-every", "7"]
    args += ["--clients", "4", "--sampled", "2"]
    straight = _straight(tmp_path, args)
    killed = tmp_path / "killed"
    rng = np.random.default_rng(len(algorithm))
    kills = 0
    for attempt in range(12):
        proc = _start(killed, args, resume=attempt > 0)
        done = len(RunDir(killed).read_metrics())
        _wait_for_rounds(killed, done + int(rng.integers(5, 25)), proc)  # a random round
        time.sleep(float(rng.uniform(0.0, 0.01)))  # and a random point in it
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
            break
        proc.kill()
        proc.wait()
        kills += 1
    else:
        proc = _start(killed, args, resume=True)
        assert proc.wait() == 0, proc.stderr.read().decode()[-2000:]
    assert kills >= 2
    _same_run(straight, killed)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_cleanly_and_resume_continues_bit_exactly(tmp_path, sig, code):
    args = ["--algorithm", "hiso", "--task", "digits", "--rounds", "150", "--eval-every", "25"]
    straight = _straight(tmp_path, args)
    for attempt in range(3):  # on a loaded machine the run may end before the signal lands
        stopped = tmp_path / f"stopped{attempt}"
        proc = _start(stopped, args, resume=False)
        _wait_for_rounds(stopped, 40, proc)
        proc.send_signal(sig)
        returned = proc.wait(timeout=60)
        summary = RunDir(stopped).read_summary() or {}
        if not (returned == 0 and summary.get("rounds") == 150):
            break
    assert returned == code
    rd = RunDir(stopped)
    summary = rd.read_summary()
    last = rd.read_metrics()[-1]["round"]
    assert summary["status"] == "interrupted" and summary["rounds"] == last < 150
    assert summary["final_test_accuracy"] is None and summary["last_evaluated_round"] <= last
    assert len(Ledger.open(rd.ledger)) == last
    assert "that round was not recorded; --resume runs it again" in rd.log.read_text()
    assert _start(stopped, args, resume=True).wait() == 0
    _same_run(straight, stopped)


def test_the_comparison_report_reads_run_folders_without_changing_them(tmp_path):
    from fedscalar import compare as cmp
    from fedscalar.report import write_report

    comparison = cmp.plan(tmp_path, ["decomfl", "hiso"], [0], **SMALL, rounds=4)
    cmp.execute(comparison, jobs=1, echo=lambda _: None, threads=1)
    torn = cmp.run_folder(tmp_path, "decomfl", 0) / "ledger.bin"
    torn.write_bytes(torn.read_bytes()[:-5])  # a crash while appending round 4
    folders = [cmp.run_folder(tmp_path, a, 0) for a in ("decomfl", "hiso")]
    before = [_snapshot(f) for f in folders]
    write_report(comparison, "t")
    assert [_snapshot(f) for f in folders] == before
