"""Fixtures for the end-to-end tests: the real `dcv-broker` binary, started
on a free loopback port with a simulated fleet, and Python stubs generated
from proto/.

The binary is `$DCV_BROKER_BIN`, or `target/debug/dcv-broker` under the repo
root; `scripts/test` builds it and sets the variable.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO_ROOT / "proto"

#: The simulated fleet every test broker runs.
DEMO_FLEET = 50
#: How long the broker may take to print its listening line.
START_TIMEOUT_S = float(os.environ.get("DCV_E2E_START_TIMEOUT", "30"))
#: How long the broker may take to exit after SIGTERM. Its default drain
#: deadline is 10s; an idle broker should stop far sooner.
STOP_TIMEOUT_S = float(os.environ.get("DCV_E2E_STOP_TIMEOUT", "20"))

LISTENING_LINE = re.compile(r"dcv-broker listening on (127\.0\.0\.1:(\d+))")


def broker_binary() -> Path:
    """The broker binary under test."""
    raw = os.environ.get("DCV_BROKER_BIN", "target/debug/dcv-broker")
    path = Path(raw)
    if not path.is_absolute():
        path = REPO_ROOT / path
    if not os.access(path, os.X_OK):
        pytest.fail(
            f"broker binary {path} is missing or not executable: run `cargo build` "
            "or set DCV_BROKER_BIN",
            pytrace=False,
        )
    return path


class Broker:
    """A `dcv-broker` child process listening on 127.0.0.1."""

    def __init__(
        self, binary: Path, log_path: Path, *extra_args: str, demo_fleet: int = DEMO_FLEET
    ):
        self.log_path = log_path
        self._stdout_rest = b""
        self._log = open(log_path, "wb")
        self.args = [
            str(binary),
            "--listen",
            "127.0.0.1:0",
            "--demo-fleet",
            str(demo_fleet),
            # Each broker its own durable store, so brokers never share state.
            "--data-dir",
            str(log_path.parent / f"{log_path.stem}-data"),
            # No grace period between NOT_SERVING and the drain: nothing
            # balances load here, and SIGTERM should stop the broker at once.
            "--shutdown-grace",
            "0s",
            *extra_args,
        ]
        self.proc = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            bufsize=0,
            cwd=log_path.parent,
        )
        self.returncode: int | None = None
        try:
            self.line = self._read_first_line(START_TIMEOUT_S)
            match = LISTENING_LINE.fullmatch(self.line)
            if match is None:
                raise AssertionError(
                    f"unexpected first stdout line {self.line!r}\n{self.log_tail()}"
                )
        except BaseException:
            self.kill()
            raise
        self.addr = match.group(1)
        self.port = int(match.group(2))

    def _read_first_line(self, timeout: float) -> str:
        """Reads stdout up to the first newline, failing after `timeout`
        seconds or when the broker closes stdout (exits) first."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = self._stdout_rest
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise AssertionError(
                        f"dcv-broker printed no listening line within {timeout}s "
                        f"(stdout so far: {buf!r})\n{self.log_tail()}"
                    )
                chunk = os.read(fd, 4096)
                if not chunk:
                    rc = self.proc.wait(timeout=STOP_TIMEOUT_S)
                    raise AssertionError(
                        f"dcv-broker exited with {rc} before listening "
                        f"(stdout: {buf!r})\n{self.log_tail()}"
                    )
                buf += chunk
        line, _, rest = buf.partition(b"\n")
        self._stdout_rest = rest
        return line.decode()

    def next_line(self, timeout: float = START_TIMEOUT_S) -> str:
        """The next line the broker prints on stdout."""
        return self._read_first_line(timeout)

    def log_tail(self, lines: int = 40) -> str:
        """The end of the broker's stderr log, for failure messages."""
        self._log.flush()
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no broker log)"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- dcv-broker stderr ({self.log_path}) ---\n{tail}"

    def send_signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def wait(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """Waits for exit; returns the exit code (negative: killed by a
        signal). Fails, and kills the broker, if it outlives `timeout`."""
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"dcv-broker did not exit within {timeout}s\n{self.log_tail()}"
            ) from None
        return self.returncode

    def stop(self, signum: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int:
        """Sends `signum` and waits for the exit code."""
        self.send_signal(signum)
        return self.wait(timeout)

    def remaining_stdout(self) -> bytes:
        """Whatever the broker printed on stdout after its listening line;
        only complete once it has exited."""
        assert self.proc.stdout is not None
        rest = self._stdout_rest + self.proc.stdout.read()
        self._stdout_rest = b""
        return rest

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.close()

    def close(self) -> None:
        if self.proc.stdout is not None and not self.proc.stdout.closed:
            self.proc.stdout.close()
        self._log.close()


@pytest.fixture(scope="session")
def broker_bin() -> Path:
    return broker_binary()


@pytest.fixture
def broker_process(broker_bin: Path, tmp_path: Path):
    """A fresh broker for one test; on teardown it must exit 0 on SIGTERM
    and have printed nothing on stdout but its listening line."""
    broker = Broker(broker_bin, tmp_path / "dcv-broker.log")
    try:
        yield broker
        if broker.returncode is None:
            rc = broker.stop(signal.SIGTERM)
            assert rc == 0, f"dcv-broker exited {rc} on SIGTERM\n{broker.log_tail()}"
        extra = broker.remaining_stdout()
        assert extra == b"", f"dcv-broker printed more on stdout: {extra!r}"
    finally:
        broker.kill()


@pytest.fixture
def broker(broker_process: Broker) -> str:
    """The `127.0.0.1:PORT` address of a fresh broker with a demo fleet."""
    return broker_process.addr


@pytest.fixture
def start_broker(broker_bin: Path, tmp_path: Path):
    """A factory for brokers that a test stops itself; any still running at
    teardown are killed."""
    started: list[Broker] = []

    def start(*extra_args: str, demo_fleet: int = DEMO_FLEET) -> Broker:
        b = Broker(
            broker_bin,
            tmp_path / f"dcv-broker-{len(started)}.log",
            *extra_args,
            demo_fleet=demo_fleet,
        )
        started.append(b)
        return b

    yield start
    for b in started:
        b.kill()


@pytest.fixture(scope="session")
def pb(tmp_path_factory: pytest.TempPathFactory) -> types.SimpleNamespace:
    """Python messages and stubs generated from proto/ with grpc_tools.protoc
    into a temporary directory that is put on sys.path."""
    import importlib

    import grpc_tools

    out = tmp_path_factory.mktemp("pb")
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    assert protos, f"no .proto files under {PROTO_DIR}"
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    # In a child process: protoc's diagnostics then reach the failure
    # message, and the compiler leaves no state in the test process.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *protos,
        ],
        cwd=PROTO_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"protoc failed:\n{result.stdout}{result.stderr}"
    sys.path.insert(0, str(out))
    importlib.invalidate_caches()
    mods = {}
    for name in ["types_pb2", "servers_pb2", "servers_pb2_grpc", "agent_pb2", "agent_pb2_grpc"]:
        mods[name] = importlib.import_module(f"dcv.sessionmanager.v1.{name}")
    return types.SimpleNamespace(out_dir=out, **mods)
