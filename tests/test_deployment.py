"""A real Flower deployment on loopback: SuperLink, 3 SuperNodes, one crashes and returns."""

import json
import os
import shutil
import time

import pytest
import torch

pytest.importorskip("flwr")

from fedscalar.export import rebuild
from fedscalar.ledger import Ledger
from fedscalar.rundir import RunDir
from fedscalar.runtime.flower.launch import LocalDeployment

pytestmark = pytest.mark.skipif(
    shutil.which("flower-superlink", path=os.path.dirname(os.sys.executable)) is None,
    reason="Flower's command-line tools are not installed",
)


def test_deployment_survives_a_supernode_crash(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(
        'task = "digits"\nalgorithm = "decomfl"\nclients = 3\nsampled = 3\nrounds = 6\n'
        "eval_every = 6\nreply_timeout = 30.0\n"
    )
    out = tmp_path / "run"
    dep = LocalDeployment(nodes=3, home=tmp_path / "deployment")
    started = []
    try:
        with dep:
            started = list(dep.procs.values())
            dep.submit(config, out)
            deadline = time.monotonic() + 180
            while dep.rounds_done(out) < 2:
                assert time.monotonic() < deadline, "the run did not reach round 2"
                time.sleep(0.2)
            dep.kill_node(1)  # SIGKILL: no goodbye to the SuperLink
            dep.start_node(1)
            started += [dep.procs["supernode1"]]
            summary = dep.wait_for(out, patience=240)
    finally:
        for proc in started:  # every process we started is gone, with its children
            assert proc.poll() is not None
            assert LocalDeployment.group_members(proc.pid) == []
    assert summary["status"] == "completed" and summary["rounds"] == 6
    log = (out / "run.log").read_text()
    assert log.count("client 1: node") == 2  # set up at the start and after the restart
    back = log.split("client 1: node")[-1]  # what happened once the new node was set up
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[2]["replies"] == 3 and metrics[-1]["round"] == 6
    # the restarted node caught up by replay and answered validly in a later round
    assert any(m["replies"] == 3 for m in metrics[3:]) and "client 1 left out" not in back
    assert [u.round for u in Ledger.open(out / "ledger.bin").updates] == [1, 2, 3, 4, 5, 6]
    weights, _ = rebuild(out)  # the ledger alone gives the server's final weights
    checkpoint, _ = RunDir.load_tensors(RunDir(out).checkpoint)
    assert all(torch.equal(weights[n], checkpoint[n]) for n in weights)
