"""Authentication end to end, as an operator sets it up: `dcv-broker tls
init`, a broker serving TLS (authentication on by default), API clients
registered with `dcv-broker clients register` through the running broker's
admin socket, tokens from the broker's own `POST /oauth2/token` fetched
with Python's standard library, and then grpcurl and a grpcio client
calling with `authorization: Bearer`. Agents authenticate by a client
certificate from `dcv-broker tls agent-cert`. DCV servers verify users'
connection tokens with a form POST and no credentials of their own."""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import grpc
import pytest

from test_tls import _grpcurl_path

SERVERS = "dcv.sessionmanager.v1.Servers"
AGENT = "dcv.sessionmanager.v1.Agent"
SESSIONS = "dcv.sessionmanager.v1.Sessions"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60)


@pytest.fixture
def tls_dir(broker_bin: Path, tmp_path: Path) -> Path:
    out = tmp_path / "tls"
    res = _run(str(broker_bin), "tls", "init", "--names", "localhost,127.0.0.1", "--out", str(out))
    assert res.returncode == 0, res
    return out


@pytest.fixture
def secure_broker(start_broker, tls_dir: Path):
    """A TLS broker with its defaults (authentication on) and agents allowed
    to use client certificates from the same CA."""
    broker = start_broker(
        "--tls-cert", str(tls_dir / "server.pem"),
        "--tls-key", str(tls_dir / "server-key.pem"),
        "--agent-ca", str(tls_dir / "ca.pem"),
    )
    yield broker
    assert broker.stop() == 0, broker.log_tail()


def _data_dir(broker) -> str:
    return broker.args[broker.args.index("--data-dir") + 1]


def register(broker_bin: Path, broker, name: str, scopes: str) -> tuple[str, str]:
    res = _run(
        str(broker_bin), "clients", "register", "--name", name, "--scopes", scopes,
        "--data-dir", _data_dir(broker), "--json",
    )
    assert res.returncode == 0, res.stderr
    client = json.loads(res.stdout)["client"]
    return client["client_id"], client["client_secret"]


def fetch_token(broker, tls_dir: Path, client_id: str, secret: str) -> dict:
    """The client credentials grant, as DCV documents it."""
    request = urllib.request.Request(
        f"https://127.0.0.1:{broker.port}/oauth2/token?grant_type=client_credentials",
        method="POST",
        data=b"",
        headers={
            "Authorization": "Basic "
            + base64.b64encode(f"{client_id}:{secret}".encode()).decode(),
            "Content-Type": "application/x-www-form-urlencoded",
        },
    )
    context = ssl.create_default_context(cafile=str(tls_dir / "ca.pem"))
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as reply:
            return {"status": reply.status, **json.load(reply)}
    except urllib.error.HTTPError as e:
        return {"status": e.code, **json.load(e)}


@pytest.fixture
def grpcurl(tls_dir: Path, tmp_path_factory):
    binary = _grpcurl_path()
    cwd = tmp_path_factory.mktemp("grpcurl-cwd")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [binary, "-connect-timeout", "10", "-max-time", "20",
             "-cacert", str(tls_dir / "ca.pem"), *args],
            capture_output=True, text=True, timeout=60, cwd=cwd,
        )

    return run


def test_tokens_from_the_broker_authorize_grpcurl_by_scope(
    broker_bin, secure_broker, tls_dir, grpcurl
):
    reader = register(broker_bin, secure_broker, "portal", "read")
    token = fetch_token(secure_broker, tls_dir, *reader)
    assert token["status"] == 200, token
    assert token["token_type"] == "Bearer"
    assert token["scope"] == "read"
    assert 0 < token["expires_in"] <= 3600
    bearer = f"authorization: Bearer {token['access_token']}"
    describe = json.dumps({"ServerIds": ["serverId1"]})

    # Reflection and health stay open: grpcurl needs no token to learn the API.
    res = grpcurl(secure_broker.addr, "list")
    assert res.returncode == 0 and SERVERS in res.stdout.split(), res.stderr
    res = grpcurl(secure_broker.addr, "grpc.health.v1.Health/Check")
    assert json.loads(res.stdout) == {"status": "SERVING"}, res.stderr

    res = grpcurl("-d", describe, secure_broker.addr, f"{SERVERS}/DescribeServers")
    assert res.returncode != 0
    assert "Code: Unauthenticated" in res.stderr, res.stderr

    res = grpcurl("-H", bearer, "-d", describe, secure_broker.addr, f"{SERVERS}/DescribeServers")
    assert res.returncode == 0, res.stderr
    assert [s["Id"] for s in json.loads(res.stdout)["Servers"]] == ["serverId1"]

    close = json.dumps({"Servers": [{"ServerId": "serverId1"}]})
    res = grpcurl("-H", bearer, "-d", close, secure_broker.addr, f"{SERVERS}/CloseServers")
    assert res.returncode != 0
    assert "Code: PermissionDenied" in res.stderr, res.stderr
    assert '"servers:operate"' in res.stderr, res.stderr

    # Wrong secret and unknown client look the same.
    wrong = fetch_token(secure_broker, tls_dir, reader[0], "not-the-secret")
    unknown = fetch_token(secure_broker, tls_dir, "no-such-client", "not-the-secret")
    assert wrong == unknown
    assert wrong["status"] == 401 and wrong["error"] == "invalid_client"


def test_grpcio_client_closes_as_its_client_id_until_revoked(
    broker_bin, secure_broker, tls_dir, pb
):
    ops_id, ops_secret = register(broker_bin, secure_broker, "ops", "read,servers:operate")
    token = fetch_token(secure_broker, tls_dir, ops_id, ops_secret)["access_token"]
    credentials = grpc.ssl_channel_credentials((tls_dir / "ca.pem").read_bytes())
    metadata = [("authorization", f"Bearer {token}")]
    with grpc.secure_channel(secure_broker.addr, credentials) as channel:
        servers = pb.servers_pb2_grpc.ServersStub(channel)
        reply = servers.CloseServers(
            pb.servers_pb2.CloseServersRequest(
                servers=[pb.servers_pb2.CloseServerRequestData(server_id="dcv-0000002", reason="disk", force=True)]
            ),
            metadata=metadata,
            timeout=20,
        )
        assert [s.server_id for s in reply.successful_list] == ["dcv-0000002"]
        described = servers.DescribeServers(
            pb.servers_pb2.DescribeServersRequest(server_ids=["dcv-0000002"]),
            metadata=metadata,
            timeout=20,
        )
        holds = described.servers[0].holds
        assert [h.actor for h in holds] == [ops_id]

        res = _run(str(broker_bin), "clients", "revoke", ops_id, "--data-dir", _data_dir(secure_broker))
        assert res.returncode == 0, res.stderr
        with pytest.raises(grpc.RpcError) as refused:
            servers.DescribeServers(
                pb.servers_pb2.DescribeServersRequest(), metadata=metadata, timeout=20
            )
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "revoked" in refused.value.details()


def test_agents_authenticate_with_a_client_certificate_for_their_own_server(
    broker_bin, secure_broker, tls_dir, grpcurl
):
    res = _run(
        str(broker_bin), "tls", "agent-cert", "--server-id", "agent-host-1",
        "--ca-dir", str(tls_dir),
    )
    assert res.returncode == 0, res.stderr
    cert, key = tls_dir / "agent-agent-host-1.pem", tls_dir / "agent-agent-host-1-key.pem"

    def register_server(server_id: str, *auth: str) -> subprocess.CompletedProcess:
        body = {
            "ServerId": server_id,
            "Hostname": f"{server_id}.example",
            "Ip": "192.0.2.10",
            "Host": {"Os": {"Family": "linux", "Name": "test os"}},
            "MaxVirtualSessions": 2,
        }
        return grpcurl(*auth, "-d", json.dumps(body), secure_broker.addr, f"{AGENT}/RegisterServer")

    res = register_server("agent-host-1", "-cert", str(cert), "-key", str(key))
    assert res.returncode == 0, res.stderr
    res = register_server("agent-host-2", "-cert", str(cert), "-key", str(key))
    assert "Code: PermissionDenied" in res.stderr, res.stderr
    assert "agent-host-1" in res.stderr, res.stderr
    res = register_server("agent-host-1")
    assert "Code: Unauthenticated" in res.stderr, res.stderr


def verify_token(broker, tls_dir: Path, session_id: str, token: str) -> tuple[int, str, ET.Element]:
    """What a DCV server does with a connecting client's token (dcv.conf
    `auth-token-verifier`): a form POST, answered in XML. No bearer token."""
    request = urllib.request.Request(
        f"https://127.0.0.1:{broker.port}/agent/validate-authentication-token",
        method="POST",
        data=urllib.parse.urlencode(
            {"sessionId": session_id, "authenticationToken": token, "clientAddress": "198.51.100.7"}
        ).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    context = ssl.create_default_context(cafile=str(tls_dir / "ca.pem"))
    with urllib.request.urlopen(request, context=context, timeout=30) as reply:
        return reply.status, reply.headers["Content-Type"], ET.fromstring(reply.read())


def test_a_dcv_server_verifies_a_connection_token_without_a_bearer_token(
    broker_bin, secure_broker, tls_dir, grpcurl
):
    portal = register(broker_bin, secure_broker, "portal", "sessions:manage")
    bearer = f"authorization: Bearer {fetch_token(secure_broker, tls_dir, *portal)['access_token']}"
    create = json.dumps({"Sessions": [{"Name": "desk", "Owner": "gus", "Type": "VIRTUAL"}]})
    res = grpcurl("-H", bearer, "-d", create, secure_broker.addr, f"{SESSIONS}/CreateSessions")
    assert res.returncode == 0, res.stderr
    session_id = json.loads(res.stdout)["SuccessfulList"][0]["Id"]

    # The demo fleet's agent makes the session READY; until then there is
    # no connection data. Polled, bounded.
    ask = json.dumps({"SessionId": session_id, "User": "gus"})
    deadline = time.monotonic() + 20
    while True:
        res = grpcurl("-H", bearer, "-d", ask, secure_broker.addr,
                      f"{SESSIONS}/GetSessionConnectionData")
        if res.returncode == 0:
            break
        assert "FailedPrecondition" in res.stderr, res.stderr
        assert time.monotonic() < deadline, "the session never became READY"
        time.sleep(0.1)
    token = json.loads(res.stdout)["ConnectionToken"]

    status, content_type, auth = verify_token(secure_broker, tls_dir, session_id, token)
    assert (status, content_type) == (200, "text/xml")
    assert auth.tag == "auth" and auth.get("result") == "yes"
    assert auth.findtext("username") == "gus"

    for session, garbled in [(session_id, token[:-2]), (session_id, "garbage"), ("other", token)]:
        status, _, auth = verify_token(secure_broker, tls_dir, session, garbled)
        assert status == 200
        assert auth.get("result") == "no", ET.tostring(auth)
        assert auth.findtext("message")
