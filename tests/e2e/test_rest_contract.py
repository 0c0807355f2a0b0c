"""The REST contract test (issue 15, acceptance 1): for every DCV operation, a
real request through the broker's REST routes gets a reply whose JSON
validates against that operation's response schema in the broker's own
OpenAPI document, fetched from the broker at `/dcv-session-manager-api.yaml`
as a DCV client would fetch it. Error replies validate against the error
schema the document gives for their status.

The validation is strict where the document is loose on purpose: every
object schema is closed (`additionalProperties: false`) for the check, so a
reply field the document does not describe fails; formats are checked
(`int32`, `int64`, `float`, `double`, `byte`, `date-time`), so a 64-bit
integer sent as a string or a timestamp that is not RFC 3339 fails.

The broker is the real binary with its demo fleet, authentication on (over
loopback without TLS), and API clients registered through its admin socket.
"""

from __future__ import annotations

import base64
import copy
import http.client
import json
import re
import subprocess
from datetime import datetime
from pathlib import Path

import jsonschema
import pytest
import yaml

DOCUMENT_PATH = "/dcv-session-manager-api.yaml"
#: The broker's request size limit in these tests, small enough that a
#: 413 costs little to provoke.
MAX_REQUEST_BYTES = 256 * 1024

RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$"
)

FORMATS = jsonschema.FormatChecker(formats=())


@FORMATS.checks("int32")
def _int32(value) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@FORMATS.checks("int64")
def _int64(value) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


@FORMATS.checks("float")
@FORMATS.checks("double")
def _number(value) -> bool:
    return not isinstance(value, str)


@FORMATS.checks("byte")
def _byte(value) -> bool:
    if not isinstance(value, str):
        return True
    try:
        base64.b64decode(value, validate=True)
    except ValueError:
        return False
    return True


@FORMATS.checks("date-time")
def _date_time(value) -> bool:
    if not isinstance(value, str):
        return True
    if RFC3339.match(value) is None:
        return False
    datetime.fromisoformat(value.replace("Z", "+00:00"))
    return True


def _closed(document: dict) -> dict:
    """The document with every component object schema closed."""
    closed = copy.deepcopy(document)
    for schema in closed["components"]["schemas"].values():
        if "properties" in schema:
            schema["additionalProperties"] = False
    return closed


class Contract:
    """Our OpenAPI document, as served, and strict validation against it."""

    def __init__(self, document: dict):
        self.document = document
        self._closed = _closed(document)

    def validate(self, instance, schema: dict, what: str) -> None:
        # The schema is checked inside the (closed) document, so that its
        # `#/components/...` references resolve; `components` is no JSON
        # Schema keyword and is ignored as one.
        root = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "components": self._closed["components"],
            **schema,
        }
        validator = jsonschema.Draft202012Validator(root, format_checker=FORMATS)
        errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.path))
        assert not errors, f"{what}: reply does not match the document:\n" + "\n".join(
            f"  at {'/'.join(map(str, e.path)) or '(root)'}: {e.message}" for e in errors[:10]
        )

    def check_reply(self, path: str, method: str, reply: "Reply") -> None:
        """The reply's status is documented for the operation, its content
        type is JSON, and its body validates against that status's schema."""
        operation = self.document["paths"][path][method.lower()]
        responses = operation["responses"]
        what = f"{method} {path} -> {reply.status}"
        assert str(reply.status) in responses, (
            f"{what}: status not documented ({sorted(responses)}): {reply.text}"
        )
        content = responses[str(reply.status)]["content"]
        assert reply.content_type in content, (
            f"{what}: content type {reply.content_type!r}, documented {sorted(content)}"
        )
        self.validate(reply.json(), content[reply.content_type]["schema"], what)

    def check_error(self, reply: "Reply", status: int) -> None:
        """An error reply of a route the document does not have (or a
        method it does not list): the error schema."""
        assert reply.status == status, f"{reply.status}: {reply.text}"
        assert reply.content_type == "application/json", reply.content_type
        self.validate(
            reply.json(), {"$ref": "#/components/schemas/ErrorResponse"}, f"-> {status}"
        )


class Reply:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes):
        self.status = status
        self.headers = headers
        self.body = body
        self.content_type = (headers.get("content-type") or "").split(";")[0].strip()

    @property
    def text(self) -> str:
        return self.body[:2000].decode(errors="replace")

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError as e:
            raise AssertionError(f"reply is not JSON ({e}): {self.text!r}") from None


class Rest:
    """An HTTP/1.1 client of one broker, with an optional bearer token."""

    def __init__(self, port: int, token: str | None = None):
        self.port = port
        self.token = token

    def with_token(self, token: str | None) -> "Rest":
        return Rest(self.port, token)

    def call(
        self,
        method: str,
        path: str,
        body=None,
        *,
        raw: bytes | None = None,
        content_type: str = "application/json",
    ) -> Reply:
        headers = {}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        if data is not None:
            headers["Content-Type"] = content_type
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            return Reply(response.status, response.headers, response.read())
        finally:
            conn.close()


def _register(broker_bin: Path, broker, name: str, scopes: str) -> tuple[str, str]:
    data_dir = broker.args[broker.args.index("--data-dir") + 1]
    res = subprocess.run(
        [str(broker_bin), "clients", "register", "--name", name, "--scopes", scopes,
         "--data-dir", data_dir, "--json"],
        capture_output=True, text=True, timeout=60,
    )
    assert res.returncode == 0, res.stderr
    client = json.loads(res.stdout)["client"]
    return client["client_id"], client["client_secret"]


def _token(broker, client_id: str, secret: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", broker.port, timeout=30)
    try:
        basic = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
        conn.request(
            "POST", "/oauth2/token?grant_type=client_credentials", body=b"",
            headers={"Authorization": f"Basic {basic}",
                     "Content-Type": "application/x-www-form-urlencoded"},
        )
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200, body
        return json.loads(body)["access_token"]
    finally:
        conn.close()


def _start(start_broker, broker_bin, *flags: str):
    """A broker with authentication on, an operator token (every REST
    scope) and a read-only one."""
    broker = start_broker(
        "--auth", "on", "--max-request-bytes", str(MAX_REQUEST_BYTES), *flags
    )
    operator = _token(
        broker, *_register(broker_bin, broker, "portal", "read,servers:operate,sessions:manage")
    )
    reader = _token(broker, *_register(broker_bin, broker, "viewer", "read"))
    return broker, Rest(broker.port, operator), reader


@pytest.fixture(params=[False, True], ids=["dcv-fields", "rest-additions"])
def rest_broker(request, start_broker, broker_bin):
    """Both reply modes: DCV's fields only (the default), and with our
    additions (--rest-additions); the document describes both."""
    flags = ("--rest-additions",) if request.param else ()
    started = _start(start_broker, broker_bin, *flags)
    yield started
    assert started[0].stop() == 0, started[0].log_tail()


@pytest.fixture
def contract(rest_broker) -> Contract:
    return _fetch_contract(rest_broker[0])


def _fetch_contract(broker) -> Contract:
    # Open, like DCV's: no token.
    reply = Rest(broker.port).call("GET", DOCUMENT_PATH)
    assert reply.status == 200, reply.text
    assert reply.content_type == "application/yaml", reply.content_type
    document = yaml.safe_load(reply.body)
    assert document["openapi"].startswith("3.1"), document.get("openapi")
    head = Rest(broker.port).call("HEAD", DOCUMENT_PATH)
    assert head.status == 200 and head.body == b"", (head.status, head.text)
    assert head.headers.get("content-length") == str(len(reply.body)), head.headers
    wrong = Rest(broker.port).call("POST", DOCUMENT_PATH, {})
    assert wrong.status == 405, wrong.text
    assert "GET" in wrong.headers.get("allow", ""), wrong.headers
    return Contract(document)


def _ready_session(rest: Rest, contract: Contract) -> dict:
    reply = rest.call("POST", "/describeSessions")
    assert reply.status == 200, reply.text
    contract.check_reply("/describeSessions", "POST", reply)
    for session in reply.json()["Sessions"]:
        if session.get("State") == "READY" and "Server" in session:
            return session
    raise AssertionError(f"the demo fleet has no READY session: {reply.text}")


def test_every_operation_replies_as_the_document_says(rest_broker, contract):
    _, rest, _ = rest_broker
    documented = {
        (path, method.upper())
        for path, item in contract.document["paths"].items()
        for method in item
        if path != "/health"
    }
    exercised: set[tuple[str, str]] = set()

    def check(method: str, path: str, template: str | None = None, body=None) -> dict:
        reply = rest.call(method, path, body)
        assert reply.status == 200, f"{method} {path}: {reply.status} {reply.text}"
        contract.check_reply(template or path, method, reply)
        exercised.add((template or path, method))
        return reply.json()

    # The describes: no body, and an object body.
    check("POST", "/describeServers")
    servers = check("POST", "/describeServers", body={"MaxResults": 2})
    assert len(servers["Servers"]) == 2 and servers["NextToken"], servers
    session = _ready_session(rest, contract)
    check("POST", "/describeSessions", body={"SessionIds": [session["Id"]]})

    # Servers: each batch with a success and a per-item failure, so both
    # lists' item schemas are exercised.
    closed = check("POST", "/closeServers",
                   body=[{"ServerId": "serverId1", "Force": True}, {"ServerId": "no-such-server"}])
    assert [s["ServerId"] for s in closed["SuccessfulList"]] == ["serverId1"], closed
    assert closed["UnsuccessfulList"][0]["FailureCode"] == "DCV_SERVER_NOT_FOUND", closed
    opened = check("POST", "/openServers",
                   body=[{"ServerId": "serverId1"}, {"ServerId": "no-such-server"}])
    assert len(opened["SuccessfulList"]) == 1 and len(opened["UnsuccessfulList"]) == 1, opened

    # Sessions.
    created = check("POST", "/createSessions", body=[
        {"Name": "contract", "Owner": "alice", "Type": "VIRTUAL"},
        {"Name": "", "Owner": "alice", "Type": "VIRTUAL"},
    ])
    assert len(created["SuccessfulList"]) == 1, created
    assert len(created["UnsuccessfulList"]) == 1, created
    permissions = base64.b64encode(b"[permissions]\n%owner% allow builtin\n").decode()
    check("PUT", "/sessionPermissions", body=[
        {"SessionId": session["Id"], "Owner": session["Owner"], "PermissionsFile": permissions},
        {"SessionId": "no-such-session", "Owner": "alice", "PermissionsFile": permissions},
    ])
    connection = check(
        "GET", f"/sessionConnectionData/{session['Id']}/{session['Owner']}",
        template="/sessionConnectionData/{sessionId}/{user}",
    )
    assert connection["ConnectionToken"], connection
    shots = check("POST", "/getSessionScreenshots",
                  body=[{"SessionId": session["Id"]}, {"SessionId": "no-such-session"}])
    assert len(shots["SuccessfulList"]) == 1, shots
    assert shots["SuccessfulList"][0]["SessionScreenshot"]["Images"], shots
    assert len(shots["UnsuccessfulList"]) == 1, shots
    deleted = check("POST", "/deleteSessions", body=[
        {"SessionId": created["SuccessfulList"][0]["Id"], "Owner": "alice"},
        {"SessionId": "no-such-session", "Owner": "alice"},
    ])
    assert len(deleted["SuccessfulList"]) == 1 and len(deleted["UnsuccessfulList"]) == 1, deleted

    assert exercised == documented, f"not exercised: {sorted(documented - exercised)}"


def test_error_replies_match_the_error_schema(rest_broker, contract):
    broker, rest, reader = rest_broker
    close = "/closeServers"

    def check(reply: Reply, status: int, path: str = close, method: str = "POST") -> dict:
        assert reply.status == status, f"{reply.status} (wanted {status}): {reply.text}"
        contract.check_reply(path, method, reply)
        return reply.json()

    body = [{"ServerId": "serverId1"}]
    # 401: no token, and a token that is not one; RFC 6750's challenge.
    for anonymous in (rest.with_token(None), rest.with_token("not-a-token")):
        reply = anonymous.call("POST", close, body)
        check(reply, 401)
        assert reply.headers.get("www-authenticate", "").startswith("Bearer"), reply.headers
    # 403: a token without the scope.
    check(rest.with_token(reader).call("POST", close, body), 403)
    # 400: malformed JSON, a wrong type, an unknown field; an object where
    # DCV's bare array goes.
    for raw in (b"[{", b'[{"ServerId": 5}]', b'[{"ServerIdent": "x"}]', b'{"ServerId": "x"}'):
        error = check(rest.call("POST", close, raw=raw), 400)
        assert error["error"] == "invalid_request", error
    # 404: a session that does not exist, on the operation that has no
    # per-item list for it.
    check(
        rest.call("GET", "/sessionConnectionData/no-such-session/alice"),
        404, "/sessionConnectionData/{sessionId}/{user}", "GET",
    )
    # 413: a body over the broker's limit.
    big = json.dumps([{"ServerId": "x" * 200}] * (MAX_REQUEST_BYTES // 200)).encode()
    assert len(big) > MAX_REQUEST_BYTES
    check(rest.call("POST", close, raw=big), 413)
    # 415: a body that is not JSON by its content type.
    check(rest.call("POST", close, raw=b"[]", content_type="text/plain"), 415)
    # 405: a known path, a method it does not take (documented on the
    # path's operation); 404: a path DCV does not have.
    reply = rest.call("GET", close)
    check(reply, 405)
    assert "POST" in reply.headers.get("allow", ""), reply.headers
    contract.check_error(rest.call("POST", "/describeserverz", {}), 404)

    # The broker is healthy after all of it.
    reply = Rest(broker.port).call("GET", "/health")
    assert reply.status == 200, reply.text
    contract.check_reply("/health", "GET", reply)
    assert reply.json() == {"status": "SERVING"}


def test_a_rate_limited_reply_matches_the_document(start_broker, broker_bin):
    """429 (the per-client rate limit) as the document describes it, with
    Retry-After. (503 comes only from a broker shutting down or not ready,
    which no request can provoke on purpose; it is the same error body.)"""
    broker, rest, _ = _start(
        start_broker, broker_bin, "--client-rate", "1", "--client-burst", "2"
    )
    contract = _fetch_contract(broker)
    # At one request a second, 200 back-to-back requests cannot all pass.
    for _ in range(200):
        reply = rest.call("POST", "/describeServers")
        if reply.status != 200:
            break
        contract.check_reply("/describeServers", "POST", reply)
    assert reply.status == 429, f"{reply.status}: {reply.text}"
    contract.check_reply("/describeServers", "POST", reply)
    assert reply.json()["error"] == "too_many_requests", reply.text
    assert reply.headers.get("retry-after", "").isdigit(), reply.headers
    assert broker.stop() == 0, broker.log_tail()
