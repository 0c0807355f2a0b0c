"""End to end through grpcurl: the real broker binary, driven the way an
operator would, with the contract learnt from server reflection only. No
.proto file is ever given to grpcurl (no -proto, -protoset or
-import-path), and it runs in an empty directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

SERVERS = "dcv.sessionmanager.v1.Servers"
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
    assert {SERVERS, AGENT, HEALTH} <= services, res.stdout


@pytest.mark.parametrize(
    "service, methods",
    [
        (SERVERS, {"CloseServers", "OpenServers", "DescribeServers"}),
        (AGENT, {"RegisterServer", "Heartbeat", "DeregisterServer"}),
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
    assert set(hold) == {"Kind", "Actor", "CreationTime", "Reason"}, hold
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


@pytest.mark.parametrize("service", ["", SERVERS, AGENT])
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
