"""A ring of real `exo` node processes on loopback, found through a peers file.

Used by the ring tests and `bench/ring_decode.py`; also handy to try a cluster on one machine.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RingCluster:
    """By default node 0 has the most memory, so it holds layer 0, runs the draft and serves the API."""

    def __init__(self, workdir: Path, n: int, model: str, draft: str, *, ring_timeout_s: float = 30.0,
                 extra: tuple[str, ...] = (), cpus: list[list[int]] | None = None,
                 memory_gb: list[float] | None = None, secret: str = ""):
        """`cpus[i]`: pin node i to these CPUs (and give it that many BLAS threads);
        `memory_gb[i]`: the memory node i announces (its share of the layers); `secret`: the
        cluster secret, passed in the environment (EXO_CLUSTER_SECRET)."""
        self.workdir, self.n, self.model, self.draft, self.secret = workdir, n, model, draft, secret
        self.ring_timeout_s, self.extra, self.cpus = ring_timeout_s, extra, cpus
        self.memory_gb = memory_gb or [n + 1.0, *([float(n)] * (n - 1))]
        self.rpc_ports = [free_port() for _ in range(n)]
        self.api_ports = [free_port() for _ in range(n)]
        self.peers_file = workdir / "peers.json"
        self.peers_file.write_text(json.dumps({"peers": {
            self.node_id(i): {"address": "127.0.0.1", "port": self.rpc_ports[i]} for i in range(n)}}))
        self.procs: list[subprocess.Popen | None] = [None] * n

    def node_id(self, i: int) -> str:
        return f"node{i}"

    @property
    def url(self) -> str:
        return self.api_url(0)

    def api_url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.api_ports[i]}"

    def start(self, i: int) -> None:
        log = open(self.workdir / f"{self.node_id(i)}.log", "a")
        args = [sys.executable, "-m", "exo.main", "--node-id", self.node_id(i), "--node-host", "127.0.0.1",
                "--node-port", str(self.rpc_ports[i]), "--host", "127.0.0.1",
                "--chatgpt-api-port", str(self.api_ports[i]), "--discovery-module", "manual",
                "--discovery-config-path", str(self.peers_file), "--default-model", self.model,
                "--draft-model", self.draft, "--node-memory", str(self.memory_gb[i]),
                "--ring-timeout", str(self.ring_timeout_s), *self.extra]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("EXO_CLUSTER_SECRET", None)
        if self.secret:
            env["EXO_CLUSTER_SECRET"] = self.secret
        cpus = self.cpus[i] if self.cpus else None
        if cpus:
            env["OPENBLAS_NUM_THREADS"] = env["OMP_NUM_THREADS"] = str(len(cpus))
        self.procs[i] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        if cpus:
            os.sched_setaffinity(self.procs[i].pid, cpus)  # before it starts any thread of its own

    def wait_ring(self, size: int | None = None, timeout_s: float = 90.0) -> None:
        """Until node 0 sees `size` healthy nodes (all by default)."""
        size = size or self.n
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for i, proc in enumerate(self.procs):
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"{self.node_id(i)} exited: {self.log(i)[-2000:]}")
            try:
                if len(self.topology()["nodes"]) == size:
                    return
            except (urllib.error.URLError, OSError):
                pass  # not serving yet
            time.sleep(0.2)
        raise TimeoutError(f"ring of {size} not formed; node0 log:\n{self.log(0)[-3000:]}")

    def topology(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/v1/topology", timeout=5) as response:
            return json.loads(response.read())

    def log(self, i: int) -> str:
        return (self.workdir / f"{self.node_id(i)}.log").read_text(errors="replace")

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[i]
        proc.send_signal(sig)
        if sig == signal.SIGKILL:
            proc.wait(10)

    def __enter__(self) -> "RingCluster":
        for i in range(self.n):
            self.start(i)
        self.wait_ring()
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
        for proc in self.procs:
            if proc is not None:
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
