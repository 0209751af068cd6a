"""The round-0 evaluation cache: its key tells models apart exactly, and a comparison's
runs reuse the evaluation the first one computed, with the numbers it would compute."""

import torch

from fedscalar import RunConfig, run
from fedscalar import compare as cmp
from fedscalar.evalcache import EvalCache, model_digest
from fedscalar.rundir import RunDir
from fedscalar.tasks import build_task
from tests.text_config import text_config, text_options


def test_an_untrained_adapter_leaves_the_key_alone_and_a_trained_one_changes_it(
    tiny_llama, news_csv
):
    task = build_task(text_config(tiny_llama, news_csv, lora=True, lora_rank=2))
    a, b = task.build_model(0), task.build_model(1)
    lora_a = [n for n, _ in a.named_parameters() if ".lora_A." in n]
    assert lora_a and not torch.equal(
        dict(a.named_parameters())[lora_a[0]], dict(b.named_parameters())[lora_a[0]]
    )  # the seeds draw different A; B is zero in both
    assert model_digest(a) == model_digest(b)
    with torch.no_grad():
        next(p for n, p in b.named_parameters() if ".lora_B." in n)[0, 0] = 1e-3
    assert model_digest(a) != model_digest(b)
    full = build_task(text_config(tiny_llama, news_csv))
    other = full.build_model(0)
    assert model_digest(other) != model_digest(a)  # the adapters' model is another one
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1e-6
    assert model_digest(other) != model_digest(full.build_model(0))
    assert (
        task.eval_digest() == build_task(text_config(tiny_llama, news_csv, lora=True)).eval_digest()
    )
    assert (
        task.eval_digest()
        != build_task(text_config(tiny_llama, news_csv, eval_examples=8)).eval_digest()
    )


def test_a_comparison_evaluates_round_0_once_per_model(tiny_llama, news_csv, tmp_path):
    options = text_options(tiny_llama, news_csv, lora=True, lora_rank=2, rounds=2, eval_every=1)
    comparison = cmp.plan(tmp_path / "cmp", ["decomfl"], [0, 1], **options)
    cmp.execute(comparison, jobs=1, echo=lambda _: None, threads=1)
    # two seeds draw different adapters (A), both inert at round 0: one model, one entry
    assert len(list(comparison.eval_cache.glob("*.json"))) == 1
    firsts = [RunDir(comparison.folder(*k)).read_metrics()[0] for k in comparison.runs]
    logs = [RunDir(comparison.folder(*k)).log.read_text() for k in comparison.runs]
    assert sum("from the cache" in text for text in logs) == 1
    assert sum("round 0: evaluating the model before training" in text for text in logs) == 1
    # the cached numbers are the ones a run without the cache computes
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = run(RunConfig(**options, algorithm="decomfl", out=str(tmp_path / "one")))
    finally:
        torch.set_num_threads(threads)
    first = RunDir(alone.out).read_metrics()[0]
    assert first["test_accuracy"] is not None

    def numbers(record: dict) -> dict:
        return {k: v for k, v in record.items() if k != "wall_seconds"}  # timing aside

    assert all(numbers(f) == numbers(first) for f in firsts)


def test_an_unreadable_entry_is_computed_again(tmp_path):
    cache = EvalCache(tmp_path / "c")
    assert cache.get("k") is None
    cache.put("k", {"test_loss": 0.5})
    assert cache.get("k") == {"test_loss": 0.5}
    (tmp_path / "c" / "k.json").write_text("{not json")
    assert cache.get("k") is None
