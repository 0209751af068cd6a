"""Payload bytes vs bytes on the wire, and seconds per round, in a Flower deployment.

Starts a SuperLink and N SuperNodes on loopback (`fedscalar.runtime.flower.launch`)
with a byte-counting TCP proxy between the SuperNodes and the SuperLink, runs DeComFL
on digits with every client sampled each round, and reports, per client and round, the
fedscalar payload (from metrics.jsonl) against the bytes the proxy saw in each
direction; then the same with tuned Flower polling, and the local simulator on the same
configuration, side by side in one run. Idle traffic (heartbeats, polling with no run)
is measured before the run and reported separately. ``--setting`` adds run options (TOML
lines), for example a language model on the nodes:

    python benchmarks/flower_wire.py --nodes 4 --rounds 10
    python benchmarks/flower_wire.py --nodes 4 --rounds 10 --setting 'task = "sentiment"' \
        --setting 'model = "minilm-l6"' --setting 'lora = true' --setting 'lora_layers = 2'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

from fedscalar.runtime.flower.launch import LocalDeployment, free_port

TUNED = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.02"}


class CountingProxy:
    """Relays TCP connections from ``port`` to ``target``, counting bytes each way."""

    def __init__(self, target: int):
        self.port, self.target = free_port(), target
        self.up = self.down = 0  # up: SuperNodes -> SuperLink
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self._serve, daemon=True).start()
        time.sleep(0.5)

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.loop.run_until_complete(server)
        self.loop.run_forever()

    async def _pipe(self, reader, writer, direction: str) -> None:
        try:
            while data := await reader.read(65536):
                setattr(self, direction, getattr(self, direction) + len(data))
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _relay(self, reader, writer) -> None:
        r2, w2 = await asyncio.open_connection("127.0.0.1", self.target)
        await asyncio.gather(self._pipe(reader, w2, "up"), self._pipe(r2, writer, "down"))

    def snapshot(self) -> tuple[int, int]:
        return self.up, self.down


def _config(nodes: int, rounds: int, setting: list[str]) -> str:
    lines = [f"clients = {nodes}", f"sampled = {nodes}", f"rounds = {rounds}"]
    lines += [f"eval_every = {rounds}", "reply_timeout = 60.0", *setting]
    if not any(x.replace(" ", "").startswith("task=") for x in setting):
        lines.append('task = "digits"')
    return "\n".join(lines) + "\n"


def simulate(nodes: int, rounds: int, setting: list[str]) -> dict:
    """The same run in the local simulator: its median seconds per round (rounds 2-)."""
    from fedscalar.api import run
    from fedscalar.config import build_config_text

    with tempfile.TemporaryDirectory() as tmp:
        text = _config(nodes, rounds, setting) + f'out = "{tmp}/run"\n'
        cfg = build_config_text(text, stored=False)
        run(cfg)
        metrics = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").open()]
    trained = [m for m in metrics if m["round"] >= 2]
    return {"s/round (median)": statistics.median(m["round_seconds"] for m in trained)}


def measure(
    nodes: int, rounds: int, env: dict[str, str], idle_s: float, setting: list[str]
) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        config = home / "run.toml"
        config.write_text(_config(nodes, rounds, setting))
        out = home / "run"
        dep = LocalDeployment(nodes, home / "deployment", env=env)
        try:
            dep.start(nodes=False)
            proxy = CountingProxy(dep.link_port)
            dep.fleet_address = f"127.0.0.1:{proxy.port}"
            for i in range(nodes):
                dep.start_node(i)
            time.sleep(idle_s / 2)  # let the nodes register
            u0, d0 = proxy.snapshot()
            time.sleep(idle_s)
            u1, d1 = proxy.snapshot()
            idle = (u1 - u0 + d1 - d0) / idle_s / nodes
            dep.submit(config, out)
            marks = {}
            while len(marks) < rounds:
                done = dep.rounds_done(out)
                if done >= 1 and done not in marks:
                    marks[done] = proxy.snapshot()
                if (out / "summary.json").exists() and done == rounds:
                    break
                time.sleep(0.02)
            dep.wait_for(out, patience=60)
        finally:
            dep.stop()
        handled = [
            float(line.split(" in ")[1].split()[0])
            for log in (home / "deployment").glob("node*/worker-*.log")
            for line in log.read_text().splitlines()
            if line.startswith("handled a message")
        ]
        metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = min(marks), max(marks)
    n_rounds = last - first
    (up0, down0), (up1, down1) = marks[first], marks[last]
    trained = [m for m in metrics if first < m["round"] <= last]
    payload_up = sum(m["bytes_up"] for m in trained) / n_rounds / nodes
    payload_down = sum(m["bytes_down"] for m in trained) / n_rounds / nodes
    wire_up, wire_down = (up1 - up0) / n_rounds / nodes, (down1 - down0) / n_rounds / nodes
    return {
        "rounds measured": n_rounds,
        "s/round (median)": statistics.median(m["round_seconds"] for m in trained),
        "node compute s (median)": statistics.median(handled) if handled else float("nan"),
        "payload up B": payload_up,
        "payload down B": payload_down,
        "wire up B": wire_up,
        "wire down B": wire_down,
        "overhead x": (wire_up + wire_down) / (payload_up + payload_down),
        "idle wire B/s per node": idle,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--idle", type=float, default=10.0, help="seconds of idle traffic measured")
    ap.add_argument("--setting", action="append", default=[], help="a run option, TOML line")
    args = ap.parse_args()
    n, r, idle, setting = args.nodes, args.rounds, args.idle, args.setting
    rows = {
        "local simulator": simulate(n, r, setting),
        "default polling": measure(n, r, {}, idle, setting),
        "tuned (FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.02)": measure(n, r, TUNED, idle, setting),
    }
    keys = list(rows["default polling"])
    print(f"\nDeComFL, {'; '.join(setting) or 'digits'}, {n} SuperNodes all sampled, loopback\n")
    print("| setting | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for name, row in rows.items():
        cells = [
            f"{v:.2f}" if isinstance(v, float) else str(v) for v in (row.get(k, "-") for k in keys)
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
