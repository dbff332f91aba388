"""Distributed tuning: measure candidates on devices behind a TVM RPC tracker.

Candidates are built on this machine and timed on the remote devices that
registered with the tracker under ``key``; measurements run on as many devices
at once as are registered. Start the pieces with TVM's own tools::

    python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190
    python -m tvm.exec.rpc_server --tracker TRACKER_HOST:9190 --key znver3    # on each device

and tune with ``soniq_tvm.tune(..., rpc=RPC("TRACKER_HOST:9190", "znver3"))`` or
``soniq-tvm tune ... --rpc TRACKER_HOST:9190 --rpc-key znver3``. The target must
describe the remote devices (its fingerprint is what the records are filed under).
Built modules travel as object-file tarballs, linked on the device by its C
compiler (``cc``), as TVM's RPC server does by default.

:class:`LocalCluster` starts a tracker and servers on this machine (loopback),
for tests and for trying the set-up out.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from ..errors import SoniqError

__all__ = ["RPC", "LocalCluster", "RPCError"]


class RPCError(SoniqError):
    """The RPC tracker cannot be reached or has no device for the key."""


def _split(tracker: str) -> tuple[str, int]:
    host, sep, port = str(tracker).rpartition(":")
    if not sep or not host:
        raise RPCError(f"tracker address {tracker!r} is not HOST:PORT")
    try:
        return host, int(port)
    except ValueError:
        raise RPCError(f"tracker address {tracker!r} has a non-integer port") from None


@dataclass(frozen=True)
class RPC:
    """Where to measure: ``tracker`` ``"host:port"``, device ``key``. ``workers``:
    measurements at once (0: as many as the tracker has servers for the key)."""

    tracker: str
    key: str
    workers: int = 0
    session_timeout_s: int = 60
    priority: int = 1

    @property
    def host(self) -> str:
        return _split(self.tracker)[0]

    @property
    def port(self) -> int:
        return _split(self.tracker)[1]

    def config(self):
        from tvm.s_tir import meta_schedule as ms

        return ms.runner.RPCConfig(tracker_host=self.host, tracker_port=self.port, tracker_key=self.key,
                                   session_priority=self.priority, session_timeout_sec=self.session_timeout_s)

    def servers(self) -> int:
        """Free + busy servers the tracker has for ``key``."""
        host, port = _split(self.tracker)
        try:
            socket.create_connection((host, port), timeout=min(5, self.session_timeout_s)).close()
        except OSError as e:
            raise RPCError(f"cannot reach RPC tracker {self.tracker}: {e}",
                           hint="is python -m tvm.exec.rpc_tracker running there?") from None
        try:
            return int(self.config().count_num_servers(allow_missing=True))
        except Exception as e:  # noqa: BLE001  (TVM raises ValueError/TVMError/OSError)
            raise RPCError(f"cannot query RPC tracker {self.tracker}: {str(e).splitlines()[0]}",
                           hint="is python -m tvm.exec.rpc_tracker running there?") from None

    def runner(self, evaluator_config, f_alloc_argument=None, f_run_evaluator=None):
        from tvm.s_tir import meta_schedule as ms

        n = self.workers or self.servers()
        if n < 1:
            raise RPCError(f"RPC tracker {self.tracker} has no server for key {self.key!r}",
                           hint=f"start one: python -m tvm.exec.rpc_server --tracker {self.tracker} --key {self.key}")
        return ms.runner.RPCRunner(rpc_config=self.config(), evaluator_config=evaluator_config,
                                   f_alloc_argument=f_alloc_argument, f_run_evaluator=f_run_evaluator,
                                   max_workers=n)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """A tracker and ``servers`` RPC servers on 127.0.0.1, as child processes in
    their own process groups; ``stop()`` (or leaving the ``with`` block) ends
    exactly those groups."""

    def __init__(self, servers: int = 2, key: str = "soniq-local", timeout_s: float = 60.0):
        self.key = key
        self.n = servers
        self.timeout_s = timeout_s
        self.procs: list[subprocess.Popen] = []
        self.port = 0

    @property
    def tracker(self) -> str:
        return f"127.0.0.1:{self.port}"

    def rpc(self, **kw) -> RPC:
        return RPC(self.tracker, self.key, **kw)

    def _spawn(self, args: list[str]) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.procs.append(p)
        return p

    def start(self) -> "LocalCluster":
        self.port = free_port()
        self._spawn(["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(self.port),
                     "--port-end", str(self.port + 1), "--silent"])
        self._wait(lambda: _connectable(self.port), "the tracker to listen")
        for _ in range(self.n):
            p = free_port()
            self._spawn(["tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(p), "--port-end",
                         str(p + 50), "--tracker", self.tracker, "--key", self.key, "--silent"])
        self._wait(lambda: self.rpc().servers() >= self.n, f"{self.n} servers to register")
        return self

    def _wait(self, ready, what: str) -> None:
        deadline = time.time() + self.timeout_s
        while time.time() < deadline:
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                self.stop()
                raise RPCError(f"an RPC process exited (status {dead[0].returncode}) while waiting for {what}")
            try:
                if ready():
                    return
            except RPCError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RPCError(f"timed out after {self.timeout_s:.0f} s waiting for {what}")

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in reversed(self.procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=10)
        self.procs.clear()

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False


def _connectable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0
