"""A local Ray cluster for tests and benchmarks: a head and one worker node on 127.0.0.1,
each a separate `ray start --block` process (one CPU each, as two small machines)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """A head and one worker node, each a `ray start --block` process in its own session,
    so that killing the session kills the node (raylet, workers, object store)."""

    def __init__(self, temp: Path):
        """temp: short (Ray's socket paths must fit in 107 bytes). Token authentication is
        on, as Ray turns it on by default; a driver joins with the variables in `auth`."""
        import secrets

        self.temp, self.port = temp, free_port()
        self.address = f"127.0.0.1:{self.port}"
        temp.mkdir(parents=True, exist_ok=True)
        token = temp / "auth_token"
        token.write_text(secrets.token_hex(32))
        self.auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
        self.env = {**os.environ, **self.auth, "HF_HUB_OFFLINE": "1",
                    "RAY_USAGE_STATS_ENABLED": "0",
                    "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
        self.head = self._start(["--head", f"--port={self.port}", "--include-dashboard=false",
                                 f"--ray-client-server-port={free_port()}",
                                 f"--temp-dir={temp}"])
        self.worker = None
        try:
            self.ensure_two_nodes()
        except BaseException:
            self.stop()
            raise

    def _start(self, args: list[str]) -> subprocess.Popen:
        return subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1",
             "--num-cpus=1", f"--object-store-memory={120 * 2**20}", *args],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)

    def alive_nodes(self) -> int:
        out = subprocess.run([str(BIN / "ray"), "status", f"--address={self.address}"],
                             env=self.env, capture_output=True, text=True).stdout
        active = out.split("Active:")[-1].split("Pending:")[0] if "Active:" in out else ""
        return sum(1 for line in active.splitlines() if "node_" in line)

    def ensure_two_nodes(self, timeout: float = 120) -> None:
        if self.worker is None or self.worker.poll() is not None:
            self.worker = self._start([f"--address={self.address}"])
        deadline = time.monotonic() + timeout
        while self.alive_nodes() != 2:
            assert time.monotonic() < deadline, "the local Ray cluster did not come up"
            time.sleep(1)

    def kill_worker_node(self) -> None:
        os.killpg(self.worker.pid, signal.SIGKILL)
        self.worker.wait()

    def stop(self) -> None:
        for proc in (self.worker, self.head):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(self.temp, ignore_errors=True)
