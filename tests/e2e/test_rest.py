"""DCV's REST API end to end, as users of DCV's Python SDK call it: the real
broker binary over TLS with authentication on, a token from its own
`POST /oauth2/token`, and every REST route called with Python's standard
library (bare JSON arrays for the batch operations, DCV's field names),
plus the error replies a DCV client sees for a missing token and a bad
body."""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

# Fixtures and helpers of the authentication tests: a TLS broker with its
# defaults (authentication on), clients registered through its admin socket.
from test_auth import fetch_token, register, secure_broker, tls_dir  # noqa: F401

#: How long a demo session may take to become READY.
SETTLE_TIMEOUT_S = 20.0


class Rest:
    """A DCV REST client of one broker, with or without a token."""

    def __init__(self, broker, ca: Path, token: str | None):
        self.base = f"https://127.0.0.1:{broker.port}"
        self.context = ssl.create_default_context(cafile=str(ca))
        self.token = token

    def call(self, method: str, path: str, body=None) -> tuple[int, object, dict]:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(
            self.base + path, method=method, data=data, headers=headers
        )
        try:
            with urllib.request.urlopen(request, context=self.context, timeout=30) as reply:
                return reply.status, reply.headers, json.load(reply)
        except urllib.error.HTTPError as e:
            return e.code, e.headers, json.load(e)

    def ok(self, method: str, path: str, body=None, request_id: bool = True) -> dict:
        """A 200 reply; with `request_id`, one carrying DCV's RequestId
        (DCV's connection-data reply has none, and by default neither has
        ours: the broker sends only DCV's fields unless --rest-additions)."""
        status, _, reply = self.call(method, path, body)
        assert status == 200, reply
        if request_id:
            assert reply["RequestId"], reply
        else:
            assert "RequestId" not in reply, reply
        return reply


def wait_ready(rest: Rest, session_id: str) -> dict:
    """Polls describeSessions until the demo fleet has made the session READY."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    pause = 0.01
    while True:
        sessions = rest.ok("POST", "/describeSessions", {"SessionIds": [session_id]})["Sessions"]
        if sessions and sessions[0].get("State") == "READY":
            return sessions[0]
        assert time.monotonic() < deadline, sessions
        time.sleep(pause)
        pause = min(pause * 2, 0.25)


def test_every_rest_route_as_a_dcv_sdk_user(broker_bin, secure_broker, tls_dir):  # noqa: F811
    client = register(
        broker_bin, secure_broker, "portal", "read,servers:operate,sessions:manage"
    )
    token = fetch_token(secure_broker, tls_dir, *client)
    assert token["status"] == 200, token
    rest = Rest(secure_broker, tls_dir / "ca.pem", token["access_token"])

    servers = rest.ok("POST", "/describeServers", {})["Servers"]
    assert servers and all(s["Id"] for s in servers)
    server_id = servers[0]["Id"]

    # The documented CloseServers example: one server closed, one unknown.
    closed = rest.ok(
        "POST", "/closeServers", [{"ServerId": server_id}, {"ServerId": "serverId2"}]
    )
    assert closed["SuccessfulList"] == [{"ServerId": server_id}]
    [failed] = closed["UnsuccessfulList"]
    assert failed["CloseServerRequestData"]["ServerId"] == "serverId2"
    assert failed["FailureCode"] == "DCV_SERVER_NOT_FOUND"
    assert failed["FailureReason"] == "Dcv server not found."
    opened = rest.ok("POST", "/openServers", [{"ServerId": server_id}])
    assert opened["SuccessfulList"] == [{"ServerId": server_id}]
    assert opened["UnsuccessfulList"] == []

    created = rest.ok(
        "POST", "/createSessions", [{"Name": "py", "Owner": "alice", "Type": "VIRTUAL"}]
    )
    assert created["UnsuccessfulList"] == [], created
    session_id = created["SuccessfulList"][0]["Id"]
    session = wait_ready(rest, session_id)
    assert session["Owner"] == "alice"

    data = rest.ok(
        "GET",
        f"/sessionConnectionData/{urllib.parse.quote(session_id)}/alice",
        request_id=False,
    )
    assert data["Session"]["Id"] == session_id
    assert data["ConnectionToken"]

    permissions = rest.ok(
        "PUT",
        "/sessionPermissions",
        [{"SessionId": session_id, "Owner": "alice", "PermissionsFile": "W3Blcm1pc3Npb25zXQ=="}],
    )
    assert permissions["SuccessfulList"] == [{"SessionId": session_id}], permissions

    shots = rest.ok("POST", "/getSessionScreenshots", [{"SessionId": session_id}])
    assert shots["UnsuccessfulList"] == [], shots
    image = shots["SuccessfulList"][0]["SessionScreenshot"]["Images"][0]
    assert image["Format"] == "png" and image["Data"], image

    deleted = rest.ok(
        "POST", "/deleteSessions", [{"SessionId": session_id, "Owner": "alice", "Force": True}]
    )
    assert deleted["SuccessfulList"][0]["SessionId"] == session_id, deleted

    # What a DCV client sees when it gets things wrong.
    anonymous = Rest(secure_broker, tls_dir / "ca.pem", None)
    status, headers, reply = anonymous.call("POST", "/describeServers", {})
    assert status == 401 and reply["error"] == "invalid_token", reply
    assert headers.get("WWW-Authenticate", "").startswith("Bearer"), headers
    status, _, reply = rest.call("POST", "/closeServers", {"ServerId": server_id})
    assert status == 400 and reply["error"] == "invalid_request", reply
    assert reply["field_violations"][0]["field"] == "body", reply
    status, _, reply = rest.call("POST", "/closeServers", [{"ServerId": server_id, "Bogus": 1}])
    assert status == 400, reply
    assert reply["field_violations"][0]["field"] == "Servers[0].Bogus", reply

    # Open to load balancers.
    with urllib.request.urlopen(
        anonymous.base + "/health", context=anonymous.context, timeout=30
    ) as health:
        assert health.status == 200
        assert json.load(health) == {"status": "SERVING"}


def _first_event(reply) -> dict:
    """The first server-sent event of an open reply: its fields, with
    `data` parsed as JSON."""
    fields: dict = {}
    while True:
        line = reply.readline().decode()
        if line in ("\n", ""):
            break
        name, _, value = line.rstrip("\n").partition(": ")
        fields[name] = value
    fields["data"] = json.loads(fields["data"])
    return fields


def test_watch_servers_as_server_sent_events_over_tls(broker_bin, secure_broker, tls_dir):  # noqa: F811
    """The watch stream over HTTPS with a bearer token, as a portal reads
    it without gRPC: the snapshot event with its EPOCH:SEQUENCE id; the
    `read` scope is needed, as for the gRPC method."""
    reader = register(broker_bin, secure_broker, "watcher", "read")
    operator = register(broker_bin, secure_broker, "operator", "servers:operate")
    context = ssl.create_default_context(cafile=str(tls_dir / "ca.pem"))
    url = f"https://127.0.0.1:{secure_broker.port}/watchServers?progressInterval=60"

    def open_stream(token: str | None):
        headers = {"Accept": "text/event-stream"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(url, headers=headers)
        return urllib.request.urlopen(request, context=context, timeout=30)

    for token, status in [
        (None, 401),
        (fetch_token(secure_broker, tls_dir, *operator)["access_token"], 403),
    ]:
        try:
            open_stream(token).close()
            raise AssertionError(f"expected HTTP {status}")
        except urllib.error.HTTPError as e:
            assert e.code == status, e.read()

    token = fetch_token(secure_broker, tls_dir, *reader)["access_token"]
    with open_stream(token) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"] == "text/event-stream"
        event = _first_event(reply)
    assert event["event"] == "SNAPSHOT", event
    data = event["data"]
    assert data["Type"] == "SNAPSHOT" and data["SnapshotEnd"] is True, data
    assert event["id"] == f"{data['Epoch']}:{data.get('Sequence', 0)}", event
