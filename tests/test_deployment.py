"""A real Flower deployment on loopback: SuperLink, 3 SuperNodes, one crashes and returns,
on digits and with a (tiny) language model that each node loads once; over TLS, a private
run (secure aggregation, local DP) gives the simulator's ledger.

All under ``-m slow`` (``make test-slow``): each takes 2-3 minutes, mostly Flower's
start-up and polling, which would put the default suite past its 10 minutes on 2 cores;
tests/test_flower.py runs the same server and client code through an in-process grid and
Flower's simulation engine in the default suite."""

import json
import os
import re
import shutil
import time

import pytest
import torch

pytest.importorskip("flwr")

from fedscalar.export import rebuild
from fedscalar.ledger import Ledger
from fedscalar.rundir import RunDir
from fedscalar.runtime.flower.certs import make_certificates
from fedscalar.runtime.flower.launch import LocalDeployment

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("flower-superlink", path=os.path.dirname(os.sys.executable)) is None,
        reason="Flower's command-line tools are not installed",
    ),
]


# the same kill and restart on an MLP and with a model each node's worker loads once
@pytest.mark.parametrize("task", ["digits", "language-model"])
def test_deployment_survives_a_supernode_crash(tmp_path, task, request):
    setting = 'task = "digits"\n'
    if task == "language-model":
        from tests.text_config import text_options

        options = text_options(
            request.getfixturevalue("tiny_llama"), request.getfixturevalue("news_csv")
        )
        setting = "".join(
            f"{k} = {json.dumps(v)}\n"
            for k, v in options.items()
            if k not in ("clients", "sampled")
        )
    config = tmp_path / "run.toml"
    config.write_text(
        setting + 'algorithm = "decomfl"\nclients = 3\nsampled = 3\nrounds = 6\n'
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
    setups = re.findall(r"client 1: node \d+ set up", log)
    assert len(setups) == 2  # set up at the start and after the restart
    assert log.count("did not answer; asked to set up again") <= 1  # one timeout at most
    back = log.split(setups[-1])[-1]  # what happened once the new node was set up
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[2]["replies"] == 3 and metrics[-1]["round"] == 6
    # the restarted node caught up by replay and answered validly in a later round
    assert any(m["replies"] == 3 for m in metrics[3:]) and "client 1 left out" not in back
    assert [u.round for u in Ledger.open(out / "ledger.bin").updates] == [1, 2, 3, 4, 5, 6]
    weights, _ = rebuild(out)  # the ledger alone gives the server's final weights
    checkpoint, _ = RunDir.load_tensors(RunDir(out).checkpoint)
    assert all(torch.equal(weights[n], checkpoint[n]) for n in weights)
    # each node's worker loaded the model once for all its rounds (node 1: its worker
    # outlived the SuperNode's SIGKILL, so the restarted SuperNode found it loaded)
    for i in range(3):
        worker_log = dep.node_cache(i) / f"worker-p{i}.log"
        assert worker_log.read_text().count("node set up") == 1, worker_log.read_text()


def test_a_tls_deployment_with_node_authentication_runs_fedscalar_privately(tmp_path):
    """TLS to the SuperLink with a CA made here, and only registered SuperNode keys; the
    run under secure aggregation and local DP gives the local simulator's ledger."""
    from fedscalar.api import run
    from fedscalar.config import build_config_text

    text = (
        'task = "digits"\nalgorithm = "decomfl"\nclients = 3\nsampled = 3\nrounds = 3\n'
        'eval_every = 3\nreply_timeout = 30.0\nsecure_aggregation = true\ndp_mode = "local"\n'
        "dp_noise_multiplier = 0.5\ndp_seed = 3\n"
    )
    config = tmp_path / "run.toml"
    config.write_text(text)
    local = tmp_path / "local"
    run(build_config_text(text).model_copy(update={"out": str(local)}))
    out = tmp_path / "run"
    with LocalDeployment(nodes=3, home=tmp_path / "deployment", tls=True) as dep:
        link = dep.procs["superlink"].args
        assert "--insecure" not in link and "--enable-supernode-auth" in link
        assert all("--insecure" not in p.args for n, p in dep.procs.items() if n != "superlink")
        dep.submit(config, out)
        summary = dep.wait_for(out, patience=300)
        # a SuperNode whose key was never registered is turned away
        stranger = make_certificates(tmp_path / "stranger", 1).node_keys[0]
        dep.certs.node_keys[1].write_bytes(stranger.read_bytes())  # node 1's key, replaced
        dep.start_node(1)
        assert dep.procs["supernode1"].wait(timeout=120) != 0
    assert summary["status"] == "completed" and summary["rounds"] == 3
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(m["contributors"] == [0, 1, 2] for m in metrics[1:])
    assert (out / "ledger.bin").read_bytes() == (local / "ledger.bin").read_bytes()
    weights, _ = rebuild(out)
    checkpoint, _ = RunDir.load_tensors(RunDir(out).checkpoint)
    assert all(torch.equal(weights[n], checkpoint[n]) for n in weights)
