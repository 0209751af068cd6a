"""docs/protocol.md holds: an independent NumPy replay reproduces runs bit for bit, on
every CPU instruction set; ledgers written before arithmetic v2 keep their arithmetic."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedscalar import RunConfig, compare, run
from fedscalar.arithmetic import _corrected_sqrt, _nearest_root, apply_, correctly_rounded_sqrt
from fedscalar.config import read_toml
from fedscalar.export import rebuild
from fedscalar.ledger import Ledger, LedgerError
from fedscalar.rundir import RunDir
from tests import reference

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(task="digits", clients=4, sampled=2, eval_every=100, batch_size=16, rounds=6)
CASES = {
    "decomfl": dict(algorithm="decomfl"),
    "decomfl-K2-central": dict(algorithm="decomfl", local_steps=2, difference="central"),
    "hiso": dict(algorithm="hiso"),
    "hiso-K2-last": dict(algorithm="hiso", local_steps=2, perturbations=3),
    "hiso-K3-all-central": dict(
        algorithm="hiso", local_steps=3, hiso_curvature_update="all", difference="central"
    ),
    "fedkseed": dict(algorithm="fedkseed", local_steps=2, seed_pool=16),
    "mezo": dict(algorithm="mezo"),
}


def _checkpoint(out: Path) -> dict[str, torch.Tensor]:
    return RunDir.load_tensors(RunDir(out).checkpoint)[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_numpy_replay_reproduces_weights_and_curvature_bit_for_bit(tmp_path, case):
    out = tmp_path / case
    run(RunConfig(**{**SMALL, **CASES[case]}, out=str(out)))
    weights, curvature = reference.replay(out)
    ours, rounds = rebuild(out)
    assert rounds == SMALL["rounds"] and ours.keys() == weights.keys()
    checkpoint = _checkpoint(out)
    for name, value in weights.items():
        np.testing.assert_array_equal(ours[name].numpy(), value, err_msg=name)
        np.testing.assert_array_equal(checkpoint[name].numpy(), value, err_msg=name)
    assert (curvature is not None) == (CASES[case]["algorithm"] == "hiso")
    for name, h in (curvature or {}).items():
        np.testing.assert_array_equal(checkpoint[f"curvature::{name}"].numpy().ravel(), h)
        assert not np.all(h == 1.0)  # H moved: the check covers its update


def test_the_worked_example_of_protocol_md():
    text = (ROOT / "docs" / "protocol.md").read_text()
    block = text.split("<!-- worked-example -->")[1].split("<!-- /worked-example -->")[0]
    rows = {
        line.split("=")[0].strip(): [float.fromhex(v) for v in line.split("=")[1].split()]
        for line in block.strip().splitlines()[1:]
    }
    x = torch.tensor([0.5, -0.25, 1.0, 0.003])
    h = [torch.ones(4)]
    g = np.array([0.75, -1.5, 0.1], np.float32)
    steps = [[(12345, p, float(g[p]) / 3) for p in range(3)]]
    apply_([x], h, steps, float(np.float32(0.01)), eps=1e-8, beta=0.95)
    assert x.tolist() == rows["x"] and h[0].tolist() == rows["H"]
    d = sum(float(g[p] / np.float32(3)) * reference.rademacher(12345, p, 0, 4) for p in range(3))
    assert d.tolist() == rows["d"]


def test_replay_stops_at_any_round(tmp_path):
    run(RunConfig(**{**SMALL, "algorithm": "hiso"}, out=str(tmp_path)))
    ours, _ = rebuild(tmp_path, rounds=3)
    weights, _ = reference.replay(tmp_path, rounds=3)
    for name, value in weights.items():
        np.testing.assert_array_equal(ours[name].numpy(), value)


def test_correctly_rounded_sqrt_against_float64():
    """sqrt(f64(v)) rounded to float32 is the correctly rounded float32 square root (53 >=
    2 * 24 + 2): an independent oracle for both ways fedscalar takes it."""
    rng = np.random.default_rng(0)
    v = np.concatenate(
        [
            rng.random(200_000, dtype=np.float32),
            rng.random(50_000, dtype=np.float32) * 1e-30,
            (rng.random(50_000, dtype=np.float32) * 1e30).astype(np.float32),
            np.array([0.0, 1e-45, 0.90414006, 1.0, 2.0, 3.4e38], np.float32),
        ]
    )
    expected = np.sqrt(v.astype(np.float64)).astype(np.float32)
    for sqrt in (correctly_rounded_sqrt, _corrected_sqrt):  # the CPU's, and other devices'
        ours = sqrt(torch.from_numpy(v)).numpy()
        np.testing.assert_array_equal(ours, expected)
        assert ours[-4] == np.float32(0.9508628)  # the value a float32 torch.sqrt gets wrong
    # the correction step repairs a root one unit off either way
    good = torch.from_numpy(expected)
    off = torch.where(
        torch.from_numpy(rng.random(v.size) < 0.5),
        torch.nextafter(good, torch.full_like(good, float("inf"))),
        torch.nextafter(good, torch.zeros_like(good)),
    )
    assert (off != good).sum() > 0.99 * v.size
    np.testing.assert_array_equal(_nearest_root(torch.from_numpy(v), off).numpy(), expected)


# --- every instruction set -----------------------------------------------------------------

_PARTY = """
import hashlib, json, sys
from fedscalar import RunConfig, run
from fedscalar.export import rebuild
from fedscalar.rundir import RunDir

def digest(tensors):
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode() + tensors[name].numpy().tobytes())
    return h.hexdigest()

own, shared, settings = sys.argv[1], sys.argv[2:-1], json.loads(sys.argv[-1])
run(RunConfig(**settings, out=own))
result = {"own": digest(rebuild(own)[0])}
for folder in shared:  # a run another machine wrote: replayed here
    result[folder] = digest(rebuild(folder)[0])
print(json.dumps(result))
"""


def _capabilities() -> list[str]:
    best = torch.backends.cpu.get_cpu_capability().lower()
    x86 = best.startswith("avx")
    return list(dict.fromkeys(["default", *(["avx2"] if x86 else []), best]))


def _digest(tensors: dict[str, np.ndarray] | dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name]
        array = value.numpy() if isinstance(value, torch.Tensor) else value
        h.update(name.encode() + np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def test_parties_on_every_cpu_instruction_set_agree(tmp_path):
    """A run written on this machine's best instruction set is replayed by parties pinned
    to ``default`` (scalar), ``avx2`` and the best: all derive its weights bit for bit.
    Each party's own run equals the NumPy replay of its own ledger. (The ledgers themselves
    differ between instruction sets: the scalars are forward-pass measurements, whose
    vectorised reductions round differently; the protocol fixes what follows from them.)"""
    settings = {**SMALL, "algorithm": "hiso", "local_steps": 2}
    shared = {}
    for algorithm in ("hiso", "decomfl"):
        folder = tmp_path / f"written-{algorithm}"
        run(RunConfig(**{**settings, "algorithm": algorithm}, out=str(folder)))
        shared[str(folder)] = _digest(rebuild(folder)[0])
    for capability in _capabilities():
        own = tmp_path / f"party-{capability}"
        env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(
            [sys.executable, "-c", _PARTY, str(own), *shared, json.dumps(settings)],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        for folder, expected in shared.items():
            assert result[folder] == expected, (capability, folder)
        assert result["own"] == _digest(reference.replay(own)[0]), capability


# --- versions ----------------------------------------------------------------------------


def _strip_arithmetic(out: Path) -> None:
    """Make ``out`` look like a run written before the option existed."""
    ledger = Ledger.open(out / "ledger.bin")
    header = {k: v for k, v in ledger.header.items() if k not in ("arithmetic", "parameters")}
    records = b"".join(Ledger.record(u) for u in ledger.updates)
    Ledger.create(out / "ledger.bin", header)
    with open(out / "ledger.bin", "ab") as f:
        f.write(records)
    config = (out / "config.toml").read_text().splitlines()
    (out / "config.toml").write_text(
        "\n".join(line for line in config if not line.startswith("arithmetic")) + "\n"
    )


@pytest.mark.parametrize("algorithm", ["decomfl", "hiso"])
def test_a_run_written_before_v2_replays_and_resumes_with_its_own_arithmetic(tmp_path, algorithm):
    out = tmp_path / "old"
    settings = {**SMALL, "algorithm": algorithm, "arithmetic": "v1"}
    run(RunConfig(**settings, out=str(out)))
    finished = _checkpoint(out)
    _strip_arithmetic(out)
    ours, _ = rebuild(out)
    for name, value in ours.items():
        assert torch.equal(value, finished[name]), name
    # resumed: still v1, to the same weights as an uninterrupted v1 run
    run(resume=True, resume_overrides={"out": str(out), "rounds": 9})
    assert read_toml(out / "config.toml")["arithmetic"] == "v1"
    straight = tmp_path / "straight"
    run(RunConfig(**{**settings, "rounds": 9}, out=str(straight)))
    resumed, reference_run = rebuild(out)[0], rebuild(straight)[0]
    for name, value in resumed.items():
        assert torch.equal(value, reference_run[name]), name


def test_v1_and_v2_differ_and_the_ledger_decides(tmp_path):
    out = tmp_path / "r"
    run(RunConfig(**{**SMALL, "algorithm": "hiso"}, out=str(out)))
    assert Ledger.open(out / "ledger.bin").header["arithmetic"] == "v2"
    text = (out / "config.toml").read_text()
    (out / "config.toml").write_text(text.replace('arithmetic = "v2"', 'arithmetic = "v1"'))
    with pytest.raises(LedgerError, match=r"says arithmetic = 'v1' but .* written with 'v2'"):
        rebuild(out)


def test_an_unknown_arithmetic_is_refused_by_name(tmp_path):
    out = tmp_path / "r"
    run(RunConfig(**{**SMALL, "algorithm": "decomfl"}, out=str(out)))
    ledger = Ledger.open(out / "ledger.bin")
    records = b"".join(Ledger.record(u) for u in ledger.updates)
    Ledger.create(out / "ledger.bin", {**ledger.header, "arithmetic": "v9"})
    with open(out / "ledger.bin", "ab") as f:
        f.write(records)
    config = (out / "config.toml").read_text().splitlines()
    (out / "config.toml").write_text("\n".join(x for x in config if "arithmetic" not in x))
    with pytest.raises(LedgerError, match=r"update arithmetic 'v9', which this fedscalar"):
        rebuild(out)


def test_a_comparison_keeps_the_arithmetic_of_its_older_runs(tmp_path):
    comparison = compare.plan(tmp_path, ["hiso"], [0], **{**SMALL, "rounds": 3})
    assert comparison.runs["hiso", 0].arithmetic == "v2"
    compare.execute(comparison, echo=lambda _: None)
    folder = compare.run_folder(tmp_path, "hiso", 0)
    _strip_arithmetic(folder)  # an old run: no arithmetic anywhere, so v1
    longer = compare.plan(tmp_path, ["hiso"], [0], **{**SMALL, "rounds": 5})
    assert longer.runs["hiso", 0].arithmetic == "v1"
