"""A Flower deployment on this machine: one SuperLink and N SuperNodes on loopback.

For trying the deployment path, for tests and for benchmarks; a real deployment starts
the same commands on separate machines (docs/deployment.md). Every process is started in
its own process group and stopped by PID, also when the caller fails.

    with LocalDeployment(nodes=3, home=tmp) as dep:
        dep.submit(config_toml, out)          # `flwr run` of the fedscalar app
        dep.kill_node(1); dep.start_node(1)    # a node crashes and comes back
        dep.wait_for(out)                      # until summary.json says it ended
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from fedscalar.runtime.flower import QUIET_ENV
from fedscalar.runtime.flower.certs import make_certificates

APP_DIR = Path(__file__).resolve().parents[4] / "flower-app"
"""The Flower app project (pyproject.toml naming fedscalar's ServerApp and ClientApp)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DeploymentError(RuntimeError):
    pass


class LocalDeployment:
    def __init__(
        self,
        nodes: int,
        home: Path,
        app_dir: Path = APP_DIR,
        env: dict[str, str] | None = None,
        tls: bool = False,
    ):
        """``tls``: the SuperLink serves TLS with a certificate of a CA made in
        ``home/certs``, and admits only SuperNodes whose public keys are registered."""
        self.n, self.home, self.app_dir = nodes, Path(home), Path(app_dir)
        self.certs = make_certificates(self.home / "certs", nodes) if tls else None
        self.logs = self.home / "logs"
        bindir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.home / "flwr"),
            **QUIET_ENV,
            "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
            **(env or {}),
        }
        self.bin = Path(bindir)
        self.link_port = 0
        self.fleet_address: str | None = None
        """Where SuperNodes connect (default: the SuperLink; a proxy can sit in between)."""
        self.procs: dict[str, subprocess.Popen] = {}

    # -- processes ------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str]) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        self.procs[name] = subprocess.Popen(
            args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()

    @staticmethod
    def group_members(pgid: int) -> list[int]:
        """Live (not zombie) processes of process group ``pgid`` (Linux /proc)."""
        members = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[2]) == pgid:
                members.append(int(stat.parent.name))
        return members

    def _stop(self, name: str, sig: int = signal.SIGTERM, wait: float = 10.0) -> None:
        """Signal the process group of ``name``; SIGKILL what is left after ``wait`` s."""
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        deadline = time.monotonic() + wait
        for signum in (sig, signal.SIGKILL):
            try:
                os.killpg(proc.pid, signum)
            except ProcessLookupError:
                break
            while self.group_members(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if not self.group_members(proc.pid):
                break
            deadline = time.monotonic() + wait
        proc.wait(timeout=wait)

    def start(self, nodes: bool = True) -> LocalDeployment:
        """Start the SuperLink and (unless ``nodes`` is False) the SuperNodes."""
        self.link_port = free_port()
        self._spawn(
            "superlink",
            [
                str(self.bin / "flower-superlink"),
                *self._link_security(),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.link_port),
                "--disable-runtime-dependency-installation",
            ],
        )
        self._await_health()
        (self.home / "flwr").mkdir(parents=True, exist_ok=True)
        trust = f'root-certificates = "{self.certs.ca}"' if self.certs else "insecure = true"
        (self.home / "flwr" / "config.toml").write_text(
            '[superlink]\ndefault = "local-deployment"\n\n[superlink.local-deployment]\n'
            f'address = "127.0.0.1:{self.link_port}"\n{trust}\n'
        )
        if self.certs:
            for i, key in enumerate(self.certs.node_keys):
                self._flwr(
                    "supernode", "register", f"{key}.pub", "local-deployment", "--name", f"node{i}"
                )
        if nodes:
            for i in range(self.n):
                self.start_node(i)
        return self

    def _link_security(self) -> list[str]:
        if self.certs is None:
            return ["--insecure"]
        return [
            "--ssl-ca-certfile",
            str(self.certs.ca),
            "--ssl-certfile",
            str(self.certs.server_cert),
            "--ssl-keyfile",
            str(self.certs.server_key),
            "--enable-supernode-auth",
        ]

    def _node_security(self, i: int) -> list[str]:
        if self.certs is None:
            return ["--insecure"]
        return [
            "--root-certificates",
            str(self.certs.ca),
            "--auth-supernode-private-key",
            str(self.certs.node_keys[i]),
        ]

    def _flwr(self, *args: str, timeout: float = 120) -> str:
        """Run the ``flwr`` command line against this deployment; return its output."""
        done = subprocess.run(
            [str(self.bin / "flwr"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise DeploymentError(f"flwr {args[0]} failed: {done.stdout}{done.stderr}")
        return done.stdout

    def _await_health(self, patience: float = 60.0) -> None:
        deadline = time.monotonic() + patience
        while time.monotonic() < deadline:
            if self.procs["superlink"].poll() is not None:
                raise DeploymentError(f"the SuperLink exited; see {self.logs / 'superlink.log'}")
            try:
                scheme = "https" if self.certs else "http"
                context = ssl.create_default_context(cafile=self.certs.ca) if self.certs else None
                url = f"{scheme}://127.0.0.1:{self.link_port}/health"
                urllib.request.urlopen(url, timeout=1, context=context)
                return
            except OSError:
                time.sleep(0.2)
        raise DeploymentError("the SuperLink did not come up within a minute")

    def start_node(self, i: int) -> None:
        """Start (or restart) the SuperNode serving client id ``i``."""
        self._spawn(
            f"supernode{i}",
            [
                str(self.bin / "flower-supernode"),
                *self._node_security(i),
                "--superlink",
                self.fleet_address or f"127.0.0.1:{self.link_port}",
                "--host",
                "127.0.0.1",
                "--port",
                str(free_port()),
                "--node-config",
                f"partition-id={i} num-partitions={self.n} cache-dir='{self.node_cache(i)}'",
            ],
        )

    def node_cache(self, i: int) -> Path:
        """Node ``i``'s own folder: its worker's socket and log, its model snapshots."""
        return self.home / f"node{i}"

    def kill_node(self, i: int, sig: int = signal.SIGKILL) -> None:
        self._stop(f"supernode{i}", sig)

    def stop(self) -> None:
        for name in [n for n in self.procs if n != "superlink"] + ["superlink"]:
            self._stop(name)
        for sock in self.home.glob("node*/worker-*.sock"):
            sock.unlink()  # the node workers exit within a second

    def __enter__(self) -> LocalDeployment:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- runs -----------------------------------------------------------------------------
    def submit(self, config: Path, out: Path, resume: bool = False) -> str:
        """``flwr run`` the fedscalar app with this run config; returns Flower's output."""
        overrides = f'config="{Path(config).resolve()}" out="{Path(out).resolve()}"'
        if resume:
            overrides += " resume=true"
        return self._flwr("run", str(self.app_dir), "local-deployment", "--run-config", overrides)

    @staticmethod
    def wait_for(out: Path, patience: float = 600.0) -> dict:
        """Wait until the run in ``out`` writes its summary; return it."""
        summary = Path(out) / "summary.json"
        deadline = time.monotonic() + patience
        while time.monotonic() < deadline:
            if summary.exists():
                try:
                    return json.loads(summary.read_text())
                except json.JSONDecodeError:
                    pass  # being written
            time.sleep(0.5)
        raise DeploymentError(f"no summary in {out} after {patience:g} s")

    @staticmethod
    def rounds_done(out: Path) -> int:
        metrics = Path(out) / "metrics.jsonl"
        if not metrics.exists():
            return 0
        lines = [x for x in metrics.read_text().splitlines() if x.strip()]
        return json.loads(lines[-1])["round"] if lines else 0
