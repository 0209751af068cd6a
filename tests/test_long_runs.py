"""Long comparisons survive being killed and restarted many times, and their report
says how many rounds and hours each figure took."""

import contextlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fedscalar import compare as cmp
from fedscalar.report import write_report
from fedscalar.rundir import RunDir

ARGS = ["--task", "digits", "--algorithms", "decomfl,hiso", "--rounds", "240"]
ARGS += ["--eval-every", "50", "--clients", "6", "--sampled", "3", "--jobs", "2"]


def _compare(out, timeout=None):
    """`fedscalar compare` in its own process group; killed (SIGKILL) after ``timeout``."""
    cmd = [sys.executable, "-m", "fedscalar", "compare", "--out", str(out), *ARGS]
    proc = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        proc.wait(timeout=timeout)
        return proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the comparison and its training processes
        proc.wait()
        return None


def _rounds_done(out) -> int:
    return sum(len(RunDir(cmp.run_folder(out, a, 0)).read_metrics()) for a in ("decomfl", "hiso"))


def _kill_after(out, rounds: int, limit: float = 120.0) -> bool:
    """Start the comparison and SIGKILL its process group once its runs hold ``rounds``
    metrics lines between them; False if it finished first."""
    cmd = [sys.executable, "-m", "fedscalar", "compare", "--out", str(out), *ARGS]
    proc = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + limit
    while proc.poll() is None and time.time() < deadline and _rounds_done(out) < rounds:
        time.sleep(0.05)
    if proc.poll() is not None:
        return False
    os.killpg(proc.pid, signal.SIGKILL)  # the comparison and its training processes
    proc.wait()
    return True


def test_a_comparison_killed_again_and_again_ends_as_if_never_stopped(tmp_path):
    straight = tmp_path / "straight"
    assert _compare(straight) == 0
    killed = tmp_path / "killed"
    rng = np.random.default_rng(0)
    kills = 0
    for point in sorted(rng.integers(20, 460, size=4)):  # of 2 x 241 metrics lines
        kills += _kill_after(killed, int(point))
    assert kills >= 2
    assert _compare(killed) == 0
    for algo in ("decomfl", "hiso"):
        a, b = (RunDir(cmp.run_folder(x, algo, 0)) for x in (straight, killed))
        assert a.ledger.read_bytes() == b.ledger.read_bytes(), algo
        keys = ("round", "train_loss", "test_accuracy", "bytes_up_cumulative")
        ma, mb = a.read_metrics(), b.read_metrics()
        assert [[m.get(k) for k in keys] for m in ma] == [[m.get(k) for k in keys] for m in mb]
    same = ("algorithm", "runs", "final", "best", "to_target", "bytes_up", "bytes_down", "rounds")
    shared = dict(task="digits", rounds=240, eval_every=50, clients=6, sampled=3)
    tables = [
        write_report(cmp.plan(x, ["decomfl", "hiso"], [0], **shared), "t")
        for x in (straight, killed)
    ]
    (_, rows_a, target_a), (_, rows_b, target_b) = tables
    assert target_a == target_b
    assert [[getattr(r, k) for k in same] for r in rows_a] == [
        [getattr(r, k) for k in same] for r in rows_b
    ]


def test_the_report_gives_rounds_and_hours(tmp_path):
    comparison = cmp.plan(
        tmp_path, ["decomfl", "fedavg"], [0, 1], task="digits", rounds=6, eval_every=3
    )
    start = time.time()
    cmp.execute(comparison, echo=lambda _: None)
    elapsed = time.time() - start
    path, rows, _ = write_report(comparison, "digits")
    table = path.read_text()
    assert "| rounds | hours |" in table.splitlines()[2]
    for row in rows:
        assert row.rounds == [6, 6]
        for seed, hours in zip((0, 1), row.hours, strict=True):
            history = RunDir(cmp.run_folder(tmp_path, row.algorithm, seed)).read_metrics()
            assert hours == history[-1]["wall_seconds"] / 3600 and 0 < hours * 3600 < elapsed
        assert f"| 6 | {min(row.hours):.2f}" in table


def test_training_processes_stop_cleanly_when_the_comparison_dies(tmp_path):
    import psutil

    out = tmp_path / "c"
    cmd = [sys.executable, "-m", "fedscalar", "compare", "--out", str(out), *ARGS]
    cmd[cmd.index("240")] = "100000"  # far more rounds than the test waits for
    proc = subprocess.Popen(  # started as `nohup ... &` would be: SIGINT ignored
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    folder = cmp.run_folder(out, "decomfl", 0)
    deadline = time.time() + 120
    while time.time() < deadline and len(RunDir(folder).read_metrics()) < 5:
        time.sleep(0.5)
    workers = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()  # the comparison only, as `kill -9 <pid>` would
    proc.wait()
    _, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive, "an orphaned training process kept running"
    summary = RunDir(folder).read_summary()
    assert summary is not None and summary["status"] == "interrupted"
    history = RunDir(folder).read_metrics()  # a consistent prefix: resumable
    assert [m["round"] for m in history] == list(range(len(history)))


def test_an_orphaned_run_stops_after_the_round_even_if_its_interrupt_was_swallowed(tmp_path):
    """Python drops a KeyboardInterrupt that lands in a finaliser; the round check still
    stops the run, cleanly and resumable."""
    import threading

    from fedscalar.api import run
    from fedscalar.config import RunConfig
    from fedscalar.runner import RunFailed

    orphaned = threading.Event()
    check = cmp._orphan_check(orphaned)

    def on_round(record):
        if record["round"] == 3:
            orphaned.set()  # the watcher saw the comparison die; its interrupt was lost
        check(record)

    cfg = RunConfig(task="digits", rounds=50, eval_every=10, out=str(tmp_path / "r"))
    try:
        run(cfg, on_round=on_round)
        raise AssertionError("the orphaned run kept training")
    except RunFailed as e:
        assert e.code == 130
    rd = RunDir(tmp_path / "r")
    assert rd.read_summary()["status"] == "interrupted"
    assert [m["round"] for m in rd.read_metrics()] == [0, 1, 2, 3]


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_whose_exception_was_swallowed_still_stops_the_run_after_its_round(
    tmp_path, sig, code
):
    """Ctrl-C or SIGTERM whose exception Python dropped (it landed in a finaliser): the
    run still stops after that round, cleanly and resumable."""
    from fedscalar.api import run
    from fedscalar.config import RunConfig
    from fedscalar.runner import RunFailed

    def on_round(record):
        if record["round"] == 3:
            with contextlib.suppress(BaseException):  # what a finaliser does with it
                signal.getsignal(sig)(sig, None)  # the handler the run installed

    cfg = RunConfig(task="digits", rounds=50, eval_every=10, out=str(tmp_path / "r"))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a terminal
    try:
        with pytest.raises(RunFailed) as e:
            run(cfg, on_round=on_round)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    finally:
        signal.signal(signal.SIGINT, previous)
    assert e.value.code == code
    rd = RunDir(tmp_path / "r")
    assert rd.read_summary()["status"] == "interrupted"
    assert [m["round"] for m in rd.read_metrics()] == [0, 1, 2, 3]


def test_a_training_process_whose_comparison_died_before_it_started_trains_nothing(tmp_path):
    """A process started just before the comparison died (on a loaded machine a run can
    start seconds after the others) sees it gone at once, not never."""
    import torch

    from fedscalar.config import RunConfig

    out = tmp_path / "r"
    cfg = RunConfig(task="digits", rounds=5, out=str(out))
    gone = os.getppid() + 1_000_000  # no process has this pid: not our parent
    summary = cmp._train(cfg.to_toml(), "new", torch.get_num_threads(), gone)
    assert summary["status"] == "interrupted" and not out.exists()
