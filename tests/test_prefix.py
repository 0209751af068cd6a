"""LoRA on the last layers and the frozen-prefix cache: same numbers, fewer computations."""

import numpy as np
import pytest
import torch

from fedscalar import run
from fedscalar.algorithms import ClientData
from fedscalar.algorithms.zo import ZOAlgorithm, ZOSettings, ZOState
from fedscalar.params import ParamSpace
from fedscalar.tasks import build_task
from tests.text_config import text_config


def _cfg(model, csv_path, **kw):
    return text_config(model, csv_path, **{"lora": True, "lora_rank": 2, **kw})


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_bert"])
def test_zo_scalars_are_bit_identical_with_and_without_the_cache(request, news_csv, fixture):
    task = build_task(_cfg(request.getfixturevalue(fixture), news_csv, lora_layers=1))
    model = task.build_model(0)
    space = ParamSpace(model)
    assert all(".1." in n or n.startswith("head") for n in space.names)  # the last block only
    assert len(task.prefix) == 1  # block 0 holds no trainable weight
    algo, state = ZOAlgorithm(ZOSettings(perturbations=4)), ZOState(space, hiso=False)
    data = ClientData(0, None, task.loss)
    batches = [task.batch(np.array(ix)) for ix in ([0, 3, 5, 9], [1, 2, 4, 8], [0, 3, 5, 9])]
    cached = [algo.measure(state, data, b, 11, []) for b in batches]
    assert task.prefix.hits == 3 * 4  # P of the P + 1 forwards of each step reuse block 0
    for block in task.prefix.blocks:
        del block.forward  # back to the plain module
    plain = [algo.measure(state, data, b, 11, []) for b in batches]
    for (f_a, g_a), (f_b, g_b) in zip(cached, plain, strict=True):
        assert f_a == f_b and np.array_equal(g_a, g_b)
    assert not np.array_equal(cached[0][1], cached[1][1])  # another batch: recomputed


def test_a_run_with_lora_on_the_last_layer_replays_exactly(tiny_llama, news_csv, tmp_path):
    out = tmp_path / "r"
    cfg = _cfg(tiny_llama, news_csv, lora_layers=1, rounds=4, eval_every=2, lr=1e-2, out=str(out))
    assert run(cfg).summary["rounds"] == 4
    from fedscalar.export import rebuild
    from fedscalar.rundir import RunDir

    weights, _ = rebuild(out)
    final, _ = RunDir.load_tensors(out / "checkpoint.safetensors")
    assert weights.keys() == final.keys()
    assert all(torch.equal(weights[k], final[k]) for k in weights)


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(lora_layers=3), "lora_layers: 3 layers asked, the model has 2"),
        (dict(lora=False, lora_layers=1), "lora_layers: only with --lora"),
    ],
)
def test_bad_lora_layers(tiny_llama, news_csv, kw, message):
    from fedscalar.config import ConfigError

    with pytest.raises((ValueError, ConfigError), match=message):
        build_task(_cfg(tiny_llama, news_csv, **kw)).build_model(0)


def test_bad_lora_layers_on_the_command_line_is_one_line(tiny_llama, news_csv, tmp_path):
    from typer.testing import CliRunner

    from fedscalar.cli import app

    args = ["run", "--task", "text-classification", "--model", str(tiny_llama)]
    args += ["--dataset", str(news_csv), "--text-column", "sentence", "--label-column"]
    args += ["topic", "--lora", "--lora-layers", "5", "--max-length", "16", "--quiet"]
    args += ["--out", str(tmp_path / "x")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == "error: lora_layers: 5 layers asked, the model has 2"
