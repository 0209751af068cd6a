"""Whether parties on different devices agree bit for bit, and what a round costs on each.

On a machine with a GPU (``--devices cpu,cuda``; ``cpu`` alone checks the script):

    python benchmarks/device_check.py --devices cpu,cuda --rounds 10 --report device.md

1. Directions: `rademacher`, `rademacher_rows`, `combination` and `combination_segments`
   for several seeds, perturbations, parameters and offsets, on each device, against the
   CPU's, bit for bit.
2. Update arithmetic (`v2`): one DeComFL and one HiSo global update (two local steps,
   five perturbations) applied to the same weights and H on each device, against the
   CPU's, bit for bit.
3. Runs: DeComFL and HiSo on digits, and DeComFL with LoRA on a text CSV (``--model``),
   trained on each device: the median seconds per round (round 1 left out); every run's
   ledger replayed on every device against the checkpoint its training process wrote
   (`fedscalar.export.verify`); and how far two devices' runs drift apart (the first
   round's loss, the final weights): a client's measurement is not covered by the
   guarantee, so they may.

Where the model's weights or the data cannot be brought along, ``--prepare DIR`` (run
where they are) writes the model's config and tokenizer and a CSV of 400 `sentiment`
snippets (a few MB in all); ``--model DIR/model --random-weights --text-csv
DIR/reviews.csv`` then builds the model with random weights from its config. Directions,
arithmetic and replay do not depend on the weights' values, and a round's time barely does.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedscalar import RunConfig, run
from fedscalar.arithmetic import apply_
from fedscalar.directions import (
    combination,
    combination_segments,
    rademacher,
    rademacher_rows,
)
from fedscalar.export import bit_pattern, verify
from fedscalar.rundir import RunDir


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(bit_pattern(a), bit_pattern(b))


def directions_agree(device: str) -> list[tuple[str, bool]]:
    """Each direction function on ``device`` against the CPU."""
    out = []
    for seed, p, index, start, n in [
        (0, 0, 0, 0, 1),
        (7, 3, 2, 64, 31),
        (2**31 + 5, 4, 11, 4096, 100_003),
        (123_456_789, 1, 40, 1 << 20, 3_000_001),
    ]:
        same = _same_bits(
            rademacher(seed, p, index, start, start + n, device=device),
            rademacher(seed, p, index, start, start + n),
        )
        out.append((f"rademacher(seed {seed}, p {p}, param {index}, {start}:+{n})", same))
    rows = rademacher_rows(99, 5, 3, 32, 70_000, device=device)
    out.append(
        (
            "rademacher_rows(5 perturbations)",
            _same_bits(rows, rademacher_rows(99, 5, 3, 32, 70_000)),
        )
    )
    rng = np.random.default_rng(0)
    terms = [
        (int(s), int(q), float(c))
        for s, q, c in zip(
            rng.integers(0, 2**32, 10), rng.integers(0, 5, 10), rng.normal(0, 1e-3, 10), strict=True
        )
    ]
    out.append(
        (
            "combination(10 terms, 1M)",
            _same_bits(
                combination(terms, 5, 0, 1 << 20, device=device), combination(terms, 5, 0, 1 << 20)
            ),
        )
    )
    segments = [(i, int(n)) for i, n in enumerate(rng.integers(1, 700, 40))]
    out.append(
        (
            "combination_segments(40 tensors)",
            _same_bits(
                combination_segments(terms, segments, device=device),
                combination_segments(terms, segments),
            ),
        )
    )
    return out


def arithmetic_agrees(device: str) -> list[tuple[str, bool]]:
    """One DeComFL and one HiSo global update on ``device`` against the CPU."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(300, 700), (513,), (2, 3, 5)]
    weights = [torch.randn(s, generator=gen) for s in shapes]
    curvature = [torch.rand(s, generator=gen).reshape(-1) + 0.5 for s in shapes]  # flat, as H is
    rng = np.random.default_rng(1)
    steps = [
        [(int(rng.integers(2**32)), q, float(rng.normal(0, 0.1))) for q in range(5)]
        for _ in range(2)
    ]
    out = []
    for name, h in [("DeComFL update", None), ("HiSo update", curvature)]:
        results = []
        for dev in ("cpu", device):
            x = [w.clone().to(dev) for w in weights]
            hh = None if h is None else [c.clone().to(dev) for c in h]
            apply_(x, hh, steps, 0.01)
            results.append(x + (hh or []))
        out.append((name, all(_same_bits(a, b) for a, b in zip(*results, strict=True))))
    return out


def _seconds_per_round(folder: Path) -> float:
    rounds = RunDir(folder).read_metrics()
    return statistics.median(r["round_seconds"] for r in rounds if r["round"] >= 2)


def _first_loss(folder: Path) -> float:
    return next(r["train_loss"] for r in RunDir(folder).read_metrics() if r["round"] == 1)


def _drift(a: Path, b: Path) -> float:
    wa, _ = RunDir.load_tensors(RunDir(a).checkpoint)
    wb, _ = RunDir.load_tensors(RunDir(b).checkpoint)
    return max(float((wa[n].double() - wb[n].double()).abs().max()) for n in wa)


def runs_agree(devices: list[str], cases: dict[str, dict], rounds: int, work: Path) -> list[str]:
    """Markdown rows: each case trained on each device, replayed on every device."""
    rows = []
    for case, options in cases.items():
        folders = []
        for i, dev in enumerate(devices):
            folder = work / f"{case.split(' (')[0].replace(' ', '-')}-{i}-{dev}"
            run(RunConfig(**options, rounds=rounds, eval_every=rounds, device=dev, out=str(folder)))
            folders.append(folder)
        for dev, folder in zip(devices, folders, strict=True):
            replays = []
            for other in devices:
                found = verify(folder, other)
                said = "identical" if found.identical else f"{found.differing:,} differ"
                replays.append(f"{other}: {said} ({found.values:,} values)")
            seconds, loss = _seconds_per_round(folder), _first_loss(folder)
            rows.append(f"| {case} | {dev} | {seconds:.3f} | {loss:.6f} | {'; '.join(replays)} |")
        if len(devices) > 1:
            a, b = folders[:2]
            rel = abs(_first_loss(a) - _first_loss(b)) / abs(_first_loss(a))
            rows.append(
                f"| {case} | {devices[0]} vs {devices[1]} | | {rel:.1e} (relative) | "
                f"final weights differ by at most {_drift(a, b):.2e} |"
            )
    return rows


def random_model(source: str, dest: Path) -> Path:
    """A copy of ``source``'s config and tokenizer with random weights (seed 0)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from fedscalar.tasks import hf

    source = hf.resolve(source)  # a built-in name's folder (only its config is read)
    if not (dest / "config.json").exists():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source)).save_pretrained(dest)
        AutoTokenizer.from_pretrained(source).save_pretrained(dest)
    return dest


def prepare(dest: Path, model: str) -> None:
    """The model's config and tokenizer, and 400 `sentiment` snippets as a CSV, in ``dest``."""
    import csv

    from fedscalar.tasks import hf
    from fedscalar.tasks.text_data import load_sentiment

    pre = hf.inspect(model)
    pre.config.save_pretrained(dest / "model")
    pre.tokenizer.save_pretrained(dest / "model")
    data = load_sentiment()
    words = ["terrible", "great"]  # label names whose " word" is one token: the verbalizers
    with open(dest / "reviews.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for text, label in list(zip(data.train_texts, data.train_labels, strict=True))[:400]:
            writer.writerow([text, words[int(label)]])
    print(f"wrote {dest / 'model'} (config, tokenizer) and {dest / 'reviews.csv'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--devices", default="cpu,cuda", help="devices, the first is the reference run's"
    )
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--model", default="smollm2-135m", help="model of the text runs")
    ap.add_argument(
        "--random-weights", action="store_true", help="random weights from --model's config"
    )
    ap.add_argument(
        "--text-csv", type=Path, help="CSV (text,label) of the text runs (none: no text runs)"
    )
    ap.add_argument("--work", type=Path, help="folder for the runs (default: a temporary one)")
    ap.add_argument("--report", type=Path, help="also write the report here (markdown)")
    ap.add_argument(
        "--prepare", type=Path, help="only write the model's config and tokenizer and a CSV here"
    )
    args = ap.parse_args()
    if args.prepare:
        prepare(args.prepare, args.model)
        return
    devices = args.devices.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        lines = [
            f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, devices {devices}"
            + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""),
            "",
            "| check | device | bit-identical to the CPU |",
            "|---|---|---|",
        ]
        for dev in devices[1:] or devices:
            for name, same in directions_agree(dev) + arithmetic_agrees(dev):
                lines.append(f"| {name} | {dev} | {'yes' if same else '**no**'} |")
        cases: dict[str, dict] = {
            "digits decomfl": {"task": "digits", "algorithm": "decomfl"},
            "digits hiso": {"task": "digits", "algorithm": "hiso"},
        }
        if args.text_csv:
            model = (
                str(random_model(args.model, work / "random-model"))
                if args.random_weights
                else args.model
            )
            cases[f"text decomfl LoRA ({Path(model).name})"] = {
                "task": "text-classification",
                "dataset": str(args.text_csv),
                "model": model,
                "algorithm": "decomfl",
                "lora": True,
                "lora_layers": 10,
                "clients": 8,
                "sampled": 2,
                "batch_size": 16,
                "max_length": 64,
                "eval_examples": 32,
            }
        t0 = time.perf_counter()
        lines += [
            "",
            f"{args.rounds} rounds a run; each ledger replayed on each device, against its"
            " checkpoint:",
            "",
            "| run | trained on | s / round (median) | round 1 loss | replayed |",
            "|---|---|---|---|---|",
            *runs_agree(devices, cases, args.rounds, work),
            "",
            f"({time.perf_counter() - t0:.0f} s for the runs)",
        ]
    report = "\n".join(lines)
    print(report)
    if args.report:
        args.report.write_text(report + "\n")


if __name__ == "__main__":
    main()
