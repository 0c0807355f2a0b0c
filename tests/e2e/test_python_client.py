"""End to end with a grpcio client built from the repository's proto/ files:
the real broker binary, as a Python portal or tool would use it."""

from __future__ import annotations

import json
import re
import signal
import socket
import time
import uuid
from datetime import datetime, timedelta, timezone

import grpc
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from conftest import DEMO_FLEET

TIMEOUT = 10
EXPECTED_IDS = {"serverId1"} | {f"dcv-{i:07d}" for i in range(1, DEMO_FLEET)}


@pytest.fixture
def channel(broker):
    with grpc.insecure_channel(broker) as ch:
        grpc.channel_ready_future(ch).result(timeout=TIMEOUT)
        yield ch


@pytest.fixture
def servers(pb, channel):
    return pb.servers_pb2_grpc.ServersStub(channel)


@pytest.fixture
def agent(pb, channel):
    return pb.agent_pb2_grpc.AgentStub(channel)


def close(pb, stub, *items, **common):
    req = pb.servers_pb2.CloseServersRequest(
        servers=[
            pb.servers_pb2.CloseServerRequestData(server_id=i, **common)
            if isinstance(i, str)
            else i
            for i in items
        ]
    )
    return stub.CloseServers(req, timeout=TIMEOUT)


def open_(pb, stub, *ids):
    req = pb.servers_pb2.OpenServersRequest(
        servers=[pb.servers_pb2.OpenServerRequestData(server_id=i) for i in ids]
    )
    return stub.OpenServers(req, timeout=TIMEOUT)


def describe(pb, stub, **kw):
    return stub.DescribeServers(pb.servers_pb2.DescribeServersRequest(**kw), timeout=TIMEOUT)


def describe_one(pb, stub, server_id):
    resp = describe(pb, stub, server_ids=[server_id])
    assert [s.id for s in resp.servers] == [server_id]
    return resp.servers[0]


def walk(pb, stub, max_results, max_pages=200, between_pages=None, **kw):
    """Walks every page; returns the pages' server id lists."""
    pages = []
    token = ""
    while True:
        resp = describe(pb, stub, max_results=max_results, next_token=token, **kw)
        pages.append([s.id for s in resp.servers])
        assert len(resp.servers) <= max_results
        token = resp.next_token
        if not token:
            return pages
        assert resp.servers, "an empty page must be the last one"
        assert len(pages) < max_pages, "the walk does not end"
        if between_pages:
            between_pages(len(pages))


def assert_uuid4(text):
    parsed = uuid.UUID(text)
    assert parsed.version == 4 and str(parsed) == text, text


# --- close / open / describe ---------------------------------------------


def test_close_open_describe(pb, servers):
    sm, types = pb.servers_pb2, pb.types_pb2
    reason = "e2e: firmware update"
    t0 = datetime.now(timezone.utc)
    resp = close(
        pb,
        servers,
        sm.CloseServerRequestData(server_id="serverId1", reason=reason),
        "serverId2",
    )
    t1 = datetime.now(timezone.utc)
    assert_uuid4(resp.request_id)
    assert [s.server_id for s in resp.successful_list] == ["serverId1"]
    [failed] = resp.unsuccessful_list
    assert failed.close_server_request_data.server_id == "serverId2"
    # Force is echoed as present even though the request left it out.
    assert failed.close_server_request_data.HasField("force")
    assert failed.close_server_request_data.force is False
    assert failed.failure_code == sm.DCV_SERVER_NOT_FOUND
    assert failed.failure_reason == "Dcv server not found."

    server = describe_one(pb, servers, "serverId1")
    assert server.availability == types.UNAVAILABLE
    assert server.unavailability_reason == types.SERVER_CLOSED
    assert list(server.unavailability_reasons) == [types.SERVER_CLOSED]
    [hold] = server.holds
    assert hold.kind == types.CLOSED
    assert hold.actor == "anonymous"
    assert hold.reason == reason
    created = hold.creation_time.ToDatetime(tzinfo=timezone.utc)
    assert t0 - timedelta(seconds=2) <= created <= t1 + timedelta(seconds=2)

    # Closing a closed server succeeds and keeps the original hold.
    again = close(
        pb, servers, sm.CloseServerRequestData(server_id="serverId1", reason="another")
    )
    assert [s.server_id for s in again.successful_list] == ["serverId1"]
    assert list(describe_one(pb, servers, "serverId1").holds) == [hold]

    opened = open_(pb, servers, "serverId1", "serverId2")
    assert_uuid4(opened.request_id)
    assert [s.server_id for s in opened.successful_list] == ["serverId1"]
    [failed] = opened.unsuccessful_list
    assert failed.open_server_request_data.server_id == "serverId2"
    assert failed.failure_code == sm.DCV_SERVER_NOT_FOUND
    assert failed.failure_reason == "Dcv server not found."

    server = describe_one(pb, servers, "serverId1")
    assert server.availability == types.AVAILABLE
    assert server.unavailability_reason == types.UNAVAILABILITY_REASON_UNSPECIFIED
    assert list(server.unavailability_reasons) == []
    assert list(server.holds) == []

    # Opening an open server succeeds.
    assert [s.server_id for s in open_(pb, servers, "serverId1").successful_list] == [
        "serverId1"
    ]


def test_batch_items_fail_one_by_one(pb, servers):
    sm = pb.servers_pb2
    items = [
        sm.CloseServerRequestData(server_id="serverId1"),
        sm.CloseServerRequestData(server_id=""),
        sm.CloseServerRequestData(server_id="x" * 257),
        sm.CloseServerRequestData(server_id="serverId1"),
        sm.CloseServerRequestData(server_id="dcv-0000001", reason="bad\nreason"),
        sm.CloseServerRequestData(server_id="dcv-0000002", reason="r" * 1025),
        sm.CloseServerRequestData(server_id="dcv-0000003", reason="tab\tis fine", force=True),
        sm.CloseServerRequestData(server_id="dcv-0000004", reason="r" * 1024, force=True),
    ]
    resp = close(pb, servers, *items)
    assert [s.server_id for s in resp.successful_list] == [
        "serverId1",
        "dcv-0000003",
        "dcv-0000004",
    ]
    assert [
        (f.close_server_request_data.server_id, f.failure_code) for f in resp.unsuccessful_list
    ] == [
        ("", sm.INVALID_SERVER_ID),
        ("x" * 257, sm.INVALID_SERVER_ID),
        ("serverId1", sm.DUPLICATE_SERVER_ID),
        ("dcv-0000001", sm.INVALID_REASON),
        ("dcv-0000002", sm.INVALID_REASON),
    ]
    for f in resp.unsuccessful_list:
        assert f.failure_reason, f
    # Failed items were not applied.
    for sid in ("dcv-0000001", "dcv-0000002"):
        assert list(describe_one(pb, servers, sid).holds) == []


def test_close_busy_server_needs_force(pb, servers):
    sm, types = pb.servers_pb2, pb.types_pb2
    all_servers = describe(pb, servers).servers
    busy = [s for s in all_servers if s.console_session_count or s.virtual_session_count]
    assert busy
    sid = busy[0].id
    resp = close(pb, servers, sid)
    assert list(resp.successful_list) == []
    [failed] = resp.unsuccessful_list
    assert failed.failure_code == sm.DCV_SERVER_HAS_RUNNING_SESSIONS
    resp = close(pb, servers, sid, force=True)
    assert [s.server_id for s in resp.successful_list] == [sid]
    assert describe_one(pb, servers, sid).unavailability_reason == types.SERVER_CLOSED


# --- pagination ------------------------------------------------------------


@pytest.mark.parametrize("page_size", [1, 7, 10, 49, 50, 1000])
def test_page_walk_covers_the_fleet_once(pb, servers, page_size):
    pages = walk(pb, servers, page_size)
    ids = [i for page in pages for i in page]
    assert len(ids) == len(set(ids)), "a server was repeated"
    assert set(ids) == EXPECTED_IDS
    assert ids == sorted(ids), "pages must be in ascending order of server id"
    assert len(pages) in (-(-DEMO_FLEET // page_size), -(-DEMO_FLEET // page_size) + 1)


def test_page_walk_with_filters_and_ids(pb, servers):
    types = pb.types_pb2
    linux = types.KeyValuePair(key="os-family", value="linux")
    expected = sorted(s.id for s in describe(pb, servers, filters=[linux]).servers)
    assert expected and len(expected) < DEMO_FLEET
    pages = walk(pb, servers, 4, filters=[linux])
    assert [i for p in pages for i in p] == expected

    wanted = ["serverId1", "dcv-0000003", "dcv-0000042", "serverId2", "dcv-0000007"]
    pages = walk(pb, servers, 2, server_ids=wanted)
    assert [i for p in pages for i in p] == sorted(set(wanted) - {"serverId2"})


def test_page_walk_survives_changes_between_pages(pb, servers, agent):
    """Closes servers and registers new ones mid-walk: every server that
    existed throughout is still seen exactly once."""
    ag, types = pb.agent_pb2, pb.types_pb2

    def meddle(page_no):
        close(pb, servers, f"dcv-{page_no:07d}", "serverId1", force=True)
        for new_id in (f"aaa-e2e-{page_no}", f"dcv-{page_no:07d}-e2e", f"zzz-e2e-{page_no}"):
            agent.RegisterServer(
                ag.RegisterServerRequest(
                    server_id=new_id,
                    host=types.Host(os=types.Os(family="linux")),
                ),
                timeout=TIMEOUT,
            )

    pages = walk(pb, servers, 6, between_pages=meddle)
    ids = [i for p in pages for i in p]
    assert len(ids) == len(set(ids)), "a server was repeated"
    assert EXPECTED_IDS <= set(ids)
    assert ids == sorted(ids)


def test_page_size_may_change_during_a_walk(pb, servers):
    ids, token = [], ""
    for size in [3, 11, 1, 20, 1000]:
        resp = describe(pb, servers, max_results=size, next_token=token)
        ids += [s.id for s in resp.servers]
        token = resp.next_token
        if not token:
            break
    assert not token
    assert len(ids) == len(set(ids)) and set(ids) == EXPECTED_IDS


def test_next_token_is_bound_to_the_query(pb, servers):
    types = pb.types_pb2
    linux = types.KeyValuePair(key="os-family", value="linux")
    first = describe(pb, servers, max_results=2, filters=[linux])
    assert first.next_token
    for kw in (
        {},
        {"filters": [types.KeyValuePair(key="os-family", value="windows")]},
        {"server_ids": ["serverId1"], "filters": [linux]},
    ):
        with pytest.raises(grpc.RpcError) as err:
            describe(pb, servers, max_results=2, next_token=first.next_token, **kw)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, kw
    token = first.next_token
    mid = len(token) // 2
    tampered = token[:mid] + ("A" if token[mid] != "A" else "B") + token[mid + 1 :]
    for forged in ("garbage", tampered):
        with pytest.raises(grpc.RpcError) as err:
            describe(pb, servers, max_results=2, next_token=forged, filters=[linux])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, forged


# --- names and JSON -------------------------------------------------------

PASCAL = re.compile(r"^[A-Z][A-Za-z0-9]*$")


def json_keys(value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from json_keys(v)
    elif isinstance(value, list):
        for v in value:
            yield from json_keys(v)


def test_python_field_names_and_pascal_case_json(pb, servers):
    sm = pb.servers_pb2
    fields = sm.CloseServersResponse.DESCRIPTOR.fields
    # DCV's three fields first; ours beyond DCV (issue 18) after them.
    assert [f.name for f in fields] == [
        "request_id", "successful_list", "unsuccessful_list", "dry_run", "blast_radius",
    ]
    assert [f.json_name for f in fields] == [
        "RequestId", "SuccessfulList", "UnsuccessfulList", "DryRun", "BlastRadius",
    ]
    data = sm.CloseServerRequestData.DESCRIPTOR.fields
    assert [(f.name, f.json_name) for f in data] == [
        ("server_id", "ServerId"),
        ("force", "Force"),
        ("reason", "Reason"),
        ("hold_name", "HoldName"),
        ("expires_at", "ExpiresAt"),
        ("expires_in", "ExpiresIn"),
        ("expected_state_version", "ExpectedStateVersion"),
        ("override_capacity_floor", "OverrideCapacityFloor"),
    ]

    # DCV's documented JSON parses as is.
    req = json_format.Parse(
        '{"Servers": [{"ServerId": "serverId1"}, {"ServerId": "serverId2", "Force": true}]}',
        sm.CloseServersRequest(),
    )
    assert [s.server_id for s in req.servers] == ["serverId1", "serverId2"]
    assert not req.servers[0].HasField("force") and req.servers[1].force is True

    resp = servers.CloseServers(req, timeout=TIMEOUT)
    doc = json.loads(json_format.MessageToJson(resp))
    assert set(doc) == {"RequestId", "SuccessfulList", "UnsuccessfulList"}
    assert doc["SuccessfulList"] == [{"ServerId": "serverId1"}]
    assert doc["UnsuccessfulList"] == [
        {
            "CloseServerRequestData": {"ServerId": "serverId2", "Force": True},
            "FailureCode": "DCV_SERVER_NOT_FOUND",
            "FailureReason": "Dcv server not found.",
        }
    ]
    snake = json.loads(json_format.MessageToJson(resp, preserving_proto_field_name=True))
    assert set(snake) == {"request_id", "successful_list", "unsuccessful_list"}

    # Every key of a full DescribeServers answer is PascalCase.
    doc = json.loads(json_format.MessageToJson(describe(pb, servers)))
    keys = set(json_keys(doc))
    assert {"Servers", "Id", "Availability", "Host", "Os", "Family", "Holds", "Tags"} <= keys
    assert {"EC2InstanceType", "CpuLoadAverage", "LastHeartbeatTime"} <= keys
    assert [k for k in keys if not PASCAL.match(k)] == []
    assert len(doc["Servers"]) == DEMO_FLEET


# --- errors -----------------------------------------------------------------


#: Invalid requests: (method, request built from (servers_pb2, types_pb2),
#: the field the google.rpc.BadRequest names).
BAD_REQUESTS = {
    "max-results-0": (
        "DescribeServers",
        lambda sm, t: sm.DescribeServersRequest(max_results=0),
        "MaxResults",
    ),
    "max-results-1001": (
        "DescribeServers",
        lambda sm, t: sm.DescribeServersRequest(max_results=1001),
        "MaxResults",
    ),
    "unknown-filter": (
        "DescribeServers",
        lambda sm, t: sm.DescribeServersRequest(filters=[t.KeyValuePair(key="bogus", value="x")]),
        "Filters[0].Key",
    ),
    "too-many-ids": (
        "DescribeServers",
        lambda sm, t: sm.DescribeServersRequest(server_ids=[f"id-{i}" for i in range(1001)]),
        "ServerIds",
    ),
    "empty-close": ("CloseServers", lambda sm, t: sm.CloseServersRequest(), "Servers"),
    "empty-open": ("OpenServers", lambda sm, t: sm.OpenServersRequest(), "Servers"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_invalid_argument_carries_bad_request_details(pb, servers, case):
    method, build, field = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as info:
        getattr(servers, method)(build(pb.servers_pb2, pb.types_pb2), timeout=TIMEOUT)
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    trailers = dict(err.trailing_metadata())
    assert "grpc-status-details-bin" in trailers

    # By hand: the trailer is a serialized google.rpc.Status.
    raw = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    assert raw.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert raw.message == err.details()

    # And through grpcio-status.
    status = rpc_status.from_call(err)
    assert status == raw
    [detail] = status.details
    assert detail.Is(error_details_pb2.BadRequest.DESCRIPTOR)
    bad = error_details_pb2.BadRequest()
    assert detail.Unpack(bad)
    assert [v.field for v in bad.field_violations] == [field]
    assert all(v.description for v in bad.field_violations)


# --- agent ------------------------------------------------------------------


def test_agent_register_heartbeat_deregister(pb, servers, agent):
    ag, types = pb.agent_pb2, pb.types_pb2
    sid = "e2e-agent-1"
    reg = agent.RegisterServer(
        ag.RegisterServerRequest(
            server_id=sid,
            ip="127.0.0.2",
            hostname="e2e-host",
            host=types.Host(os=types.Os(family="linux", name="Debian", version="12")),
            tags=[types.KeyValuePair(key="pool", value="e2e")],
            max_virtual_sessions=4,
        ),
        timeout=TIMEOUT,
    )
    assert_uuid4(reg.request_id)
    assert reg.heartbeat_interval.ToTimedelta() > timedelta(0)

    hb = agent.Heartbeat(
        ag.HeartbeatRequest(
            server_id=sid,
            dcv_server_healthy=True,
            sessions=[
                ag.AgentSession(id="s1", owner="alice", type=types.VIRTUAL, state=types.READY)
            ],
        ),
        timeout=TIMEOUT,
    )
    assert_uuid4(hb.request_id)
    server = describe_one(pb, servers, sid)
    assert server.virtual_session_count == 1
    assert server.hostname == "e2e-host"
    tags = {(t.key, t.value) for t in server.tags}
    assert {("pool", "e2e"), ("dcv:os-family", "linux")} <= tags

    dereg = agent.DeregisterServer(ag.DeregisterServerRequest(server_id=sid), timeout=TIMEOUT)
    assert dereg.removed is True
    assert list(describe(pb, servers, server_ids=[sid]).servers) == []
    with pytest.raises(grpc.RpcError) as err:
        agent.Heartbeat(ag.HeartbeatRequest(server_id=sid), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    # A closed server outlives its agent's deregistration.
    close(pb, servers, "serverId1")
    dereg = agent.DeregisterServer(
        ag.DeregisterServerRequest(server_id="serverId1"), timeout=TIMEOUT
    )
    assert dereg.removed is False
    server = describe_one(pb, servers, "serverId1")
    reasons = list(server.unavailability_reasons)
    assert reasons[:2] == [types.SERVER_CLOSED, types.UNREACHABLE_AGENT]
    assert [h.kind for h in server.holds] == [types.CLOSED]


# --- process lifecycle ----------------------------------------------------


def port_is_closed(port):
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_makes_the_broker_exit_zero(pb, start_broker, signum):
    broker = start_broker()
    # An open, idle client connection must not hold the shutdown up.
    with grpc.insecure_channel(broker.addr) as ch:
        stub = pb.servers_pb2_grpc.ServersStub(ch)
        resp = describe(pb, stub, max_results=5)
        assert len(resp.servers) == 5
        started = time.monotonic()
        rc = broker.stop(signum)
        took = time.monotonic() - started
    assert rc == 0, f"exit code {rc}\n{broker.log_tail()}"
    assert took < 5, f"shutdown took {took:.1f}s with an idle connection open"
    assert broker.remaining_stdout() == b""
    assert port_is_closed(broker.port)
    log = broker.log_path.read_text(errors="replace")
    assert "stopped" in log, broker.log_tail()
