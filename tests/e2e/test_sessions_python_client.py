"""End to end for the Sessions API with a grpcio client built from the
repository's proto/ files: a portal creating, describing and deleting
sessions on the simulated fleet, and an agent written here (Agent service:
RegisterServer, StreamInstructions, ReportInstructionResult,
ValidateConnectionToken) carrying out what the broker asks of it.

Nothing assumes timing: whatever the simulated agents do on their own is
waited for by polling with a bounded deadline, and everything this file's
own agent does happens only when the test says so."""

from __future__ import annotations

import base64
import importlib
import os
import queue
import threading
import time
import types
import uuid
from datetime import datetime, timedelta, timezone

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

TIMEOUT = 10
#: How long to wait for something the broker or its simulated agents do by
#: themselves (generous, for a loaded machine; polling stops as soon as it
#: happens).
SETTLE_TIMEOUT_S = float(os.environ.get("DCV_E2E_SETTLE_TIMEOUT", "20"))

SESSION_NOT_FOUND_TEXT = "The requested dcvSession does not exist"
PIN_SERVER_ID1 = "server:Id = 'serverId1'"
PERMISSIONS = base64.b64encode(b"[permissions]\n%owner% allow builtin\n").decode()


def pin(server_id: str) -> str:
    return f"server:Id = '{server_id}'"


@pytest.fixture(scope="session")
def spb(pb) -> types.SimpleNamespace:
    """The Sessions service's generated modules (the `pb` fixture compiled
    every proto/ file and put them on sys.path), next to the others."""
    mods = {
        name: importlib.import_module(f"dcv.sessionmanager.v1.{name}")
        for name in ["sessions_pb2", "sessions_pb2_grpc"]
    }
    return types.SimpleNamespace(
        sm=mods["sessions_pb2"],
        sessions_pb2_grpc=mods["sessions_pb2_grpc"],
        fc=pb.servers_pb2,  # FailureCode lives in servers.proto
        t=pb.types_pb2,
        ag=pb.agent_pb2,
    )


@pytest.fixture
def channel(broker):
    with grpc.insecure_channel(broker) as ch:
        grpc.channel_ready_future(ch).result(timeout=TIMEOUT)
        yield ch


@pytest.fixture
def sessions(spb, channel):
    return spb.sessions_pb2_grpc.SessionsStub(channel)


@pytest.fixture
def servers(pb, channel):
    return pb.servers_pb2_grpc.ServersStub(channel)


@pytest.fixture
def agent(pb, channel):
    return pb.agent_pb2_grpc.AgentStub(channel)


# --- helpers ----------------------------------------------------------------


def assert_uuid4(text):
    parsed = uuid.UUID(text)
    assert parsed.version == 4 and str(parsed) == text, text


def item(spb, **kw):
    """A CreateSessionRequestData; Name, Owner and Type default."""
    kw.setdefault("name", "e2e")
    kw.setdefault("owner", "alice")
    kw.setdefault("type", spb.t.VIRTUAL)
    return spb.sm.CreateSessionRequestData(**kw)


def create(spb, stub, *items):
    return stub.CreateSessions(spb.sm.CreateSessionsRequest(sessions=list(items)), timeout=TIMEOUT)


def create_ok(spb, stub, **kw):
    """Creates one session that must be accepted; returns it as listed."""
    resp = create(spb, stub, item(spb, **kw))
    assert list(resp.unsuccessful_list) == [], resp
    [session] = resp.successful_list
    return session


def describe_sessions(spb, stub, **kw):
    return stub.DescribeSessions(spb.sm.DescribeSessionsRequest(**kw), timeout=TIMEOUT)


def session_by_id(spb, stub, session_id):
    resp = describe_sessions(spb, stub, session_ids=[session_id])
    assert [s.id for s in resp.sessions] == [session_id], resp
    return resp.sessions[0]


def state_name(spb, state):
    return spb.t.SessionState.Name(state)


def wait_for_state(spb, stub, session_id, state):
    """Polls DescribeSessions until the session is in `state`."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    pause = 0.01
    seen = []
    while True:
        session = session_by_id(spb, stub, session_id)
        if session.state == state:
            return session
        name = state_name(spb, session.state)
        if not seen or seen[-1] != name:
            seen.append(name)
        assert time.monotonic() < deadline, (
            f"session {session_id} not {state_name(spb, state)} within "
            f"{SETTLE_TIMEOUT_S}s; states seen: {seen}"
        )
        time.sleep(pause)
        pause = min(pause * 2, 0.25)


def delete(spb, stub, *items):
    """Deletes (session_id, owner) or (session_id, owner, force) items."""
    data = []
    for it in items:
        sid, owner, *force = it
        kw = {"session_id": sid, "owner": owner}
        if force:
            kw["force"] = force[0]
        data.append(spb.sm.DeleteSessionRequestData(**kw))
    return stub.DeleteSessions(spb.sm.DeleteSessionsRequest(sessions=data), timeout=TIMEOUT)


def update_permissions(spb, stub, *items):
    data = [
        spb.sm.UpdateSessionPermissionsRequestData(session_id=s, owner=o, permissions_file=p)
        for s, o, p in items
    ]
    return stub.UpdateSessionPermissions(
        spb.sm.UpdateSessionPermissionsRequest(sessions=data), timeout=TIMEOUT
    )


def connection_data(spb, stub, session_id, user):
    return stub.GetSessionConnectionData(
        spb.sm.GetSessionConnectionDataRequest(session_id=session_id, user=user), timeout=TIMEOUT
    )


def describe_servers(pb, stub, **kw):
    return stub.DescribeServers(pb.servers_pb2.DescribeServersRequest(**kw), timeout=TIMEOUT)


def server_by_id(pb, stub, server_id):
    resp = describe_servers(pb, stub, server_ids=[server_id])
    assert [s.id for s in resp.servers] == [server_id]
    return resp.servers[0]


def bad_request_fields(err: grpc.RpcError) -> list[str]:
    """The fields a google.rpc.BadRequest in an INVALID_ARGUMENT names."""
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    status = rpc_status.from_call(err)
    assert status is not None, "no grpc-status-details-bin trailer"
    [detail] = status.details
    bad = error_details_pb2.BadRequest()
    assert detail.Unpack(bad), detail
    assert all(v.description for v in bad.field_violations)
    return [v.field for v in bad.field_violations]


def walk_sessions(spb, stub, max_results, max_pages=200, **kw):
    """Walks every DescribeSessions page; returns the pages' id lists."""
    pages, token = [], ""
    while True:
        resp = describe_sessions(spb, stub, max_results=max_results, next_token=token, **kw)
        assert_uuid4(resp.request_id)
        assert len(resp.sessions) <= max_results
        pages.append([s.id for s in resp.sessions])
        token = resp.next_token
        if not token:
            return pages
        assert resp.sessions, "an empty page must be the last one"
        assert len(pages) < max_pages, "the walk does not end"


def free_servers(pb, stub, family):
    """Ids of AVAILABLE demo servers of an OS family that run nothing."""
    t = pb.types_pb2
    resp = describe_servers(
        pb,
        stub,
        filters=[
            t.KeyValuePair(key="os-family", value=family),
            t.KeyValuePair(key="availability", value="AVAILABLE"),
        ],
    )
    return [
        s.id
        for s in resp.servers
        if not s.console_session_count and not s.virtual_session_count
    ]


class InstructionStream:
    """An agent's StreamInstructions call, read on a thread into a queue so
    that the test can wait for each instruction with a timeout."""

    def __init__(self, spb, agent_stub, server_id):
        self.server_id = server_id
        self.call = agent_stub.StreamInstructions(
            spb.ag.StreamInstructionsRequest(server_id=server_id),
            timeout=max(120, 4 * SETTLE_TIMEOUT_S),
        )
        self.items: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self):
        try:
            for message in self.call:
                self.items.put(message)
        except grpc.RpcError as err:
            self.items.put(err)

    def next(self, timeout=SETTLE_TIMEOUT_S):
        try:
            got = self.items.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"no instruction for {self.server_id} within {timeout}s"
            ) from None
        if isinstance(got, grpc.RpcError):
            raise AssertionError(f"instruction stream of {self.server_id} ended: {got!r}")
        # Creates and deletes carry an id derived from what the broker
        # stores (a version 8 UUID), the same each time one is sent again;
        # other instructions a fresh one.
        parsed = uuid.UUID(got.instruction_id)
        derived = got.WhichOneof("instruction") in ("create_session", "delete_session")
        assert parsed.version == (8 if derived else 4), got
        assert str(parsed) == got.instruction_id, got
        return got

    def pending(self):
        return self.items.qsize()

    def close(self):
        self.call.cancel()
        self.thread.join(timeout=TIMEOUT)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def register(spb, agent_stub, server_id, *, family="linux", max_virtual_sessions=4, **kw):
    t = spb.t
    agent_stub.RegisterServer(
        spb.ag.RegisterServerRequest(
            server_id=server_id,
            ip="127.0.0.9",
            hostname=f"{server_id}.e2e",
            endpoints=[
                t.Endpoint(ip_address="127.0.0.9", port=8443, protocol=t.HTTP, web_url_path="/")
            ],
            host=t.Host(os=t.Os(family=family)),
            max_virtual_sessions=max_virtual_sessions,
            **kw,
        ),
        timeout=TIMEOUT,
    )
    # A healthy DCV server: without a heartbeat saying so, it is unavailable.
    agent_stub.Heartbeat(
        spb.ag.HeartbeatRequest(server_id=server_id, dcv_server_healthy=True), timeout=TIMEOUT
    )


def report(spb, agent_stub, server_id, session_id, kind, success=True, state=None, reason=""):
    kw = {}
    if state is not None:
        kw["session_state"] = state
    return agent_stub.ReportInstructionResult(
        spb.ag.ReportInstructionResultRequest(
            server_id=server_id,
            session_id=session_id,
            kind=kind,
            success=success,
            failure_reason=reason,
            **kw,
        ),
        timeout=TIMEOUT,
    )


def validate(spb, agent_stub, server_id, token, session_id):
    return agent_stub.ValidateConnectionToken(
        spb.ag.ValidateConnectionTokenRequest(
            server_id=server_id, connection_token=token, session_id=session_id
        ),
        timeout=TIMEOUT,
    )


# --- create, describe, connection data ---------------------------------------


def test_create_describe_and_connection_data(pb, spb, sessions, servers):
    sm, t = spb.sm, spb.t
    t0 = datetime.now(timezone.utc)
    resp = create(
        spb,
        sessions,
        item(
            spb,
            name="e2e-create",
            owner="alice",
            max_concurrent_clients=5,
            dcv_gl_enabled=True,
            init_file="init.sh",
            storage_root="/home/alice/storage",
            permissions_file=PERMISSIONS,
            requirements=PIN_SERVER_ID1,
        ),
    )
    t1 = datetime.now(timezone.utc)
    assert_uuid4(resp.request_id)
    assert list(resp.unsuccessful_list) == []
    [created] = resp.successful_list
    assert_uuid4(created.id)
    assert (created.name, created.owner, created.type) == ("e2e-create", "alice", t.VIRTUAL)
    assert created.state == t.CREATING
    assert created.substate == sm.SESSION_PLACING
    assert created.server.id == "serverId1"
    assert created.server.port == "8443" and created.server.web_url_path == "/"
    assert created.max_concurrent_clients == 5
    assert created.storage_root == "/home/alice/storage"
    when = created.creation_time.ToDatetime(tzinfo=timezone.utc)
    assert t0 - timedelta(seconds=2) <= when <= t1 + timedelta(seconds=2)

    ready = wait_for_state(spb, sessions, created.id, t.READY)
    assert ready.substate == sm.SESSION_SUBSTATE_UNSPECIFIED
    assert ready.creation_time == created.creation_time
    assert ready.server.id == "serverId1"
    assert ready.max_concurrent_clients == 5
    assert server_by_id(pb, servers, "serverId1").virtual_session_count == 1

    data = connection_data(spb, sessions, created.id, "alice")
    assert_uuid4(data.request_id)
    assert data.connection_token
    assert data.session.id == created.id
    assert data.session.state == t.READY
    assert data.session.server == ready.server

    # Connection data needs a session id and a user.
    for sid, user, field in [(created.id, "", "User"), ("", "alice", "SessionId")]:
        with pytest.raises(grpc.RpcError) as err:
            connection_data(spb, sessions, sid, user)
        assert bad_request_fields(err.value) == [field]
    with pytest.raises(grpc.RpcError) as err:
        connection_data(spb, sessions, "no-such-session", "alice")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == SESSION_NOT_FOUND_TEXT


def test_placement_spreads_one_owner_over_servers(pb, spb, sessions, servers):
    """Demo servers take one session per user: one owner's sessions, created
    in one batch, land on distinct Linux servers."""
    t = spb.t
    linux = set(free_servers(pb, servers, "linux"))
    assert len(linux) >= 5
    resp = create(spb, sessions, *[item(spb, name=f"spread-{i}", owner="gina") for i in range(5)])
    assert list(resp.unsuccessful_list) == []
    placed = [s.server.id for s in resp.successful_list]
    assert len(set(placed)) == 5, placed
    assert set(placed) <= linux
    for s in resp.successful_list:
        wait_for_state(spb, sessions, s.id, t.READY)


# --- describe: filters and pagination -----------------------------------------


def test_describe_filters_and_pagination(pb, spb, sessions, servers):
    t = spb.t
    kv = t.KeyValuePair
    resp = create(
        spb,
        sessions,
        *[item(spb, name=f"pager-{i}", owner="pager") for i in range(6)],
        *[item(spb, name=f"other-{i}", owner="other") for i in range(2)],
    )
    assert list(resp.unsuccessful_list) == []
    pager = {s.id: s for s in resp.successful_list if s.owner == "pager"}
    other = {s.id: s for s in resp.successful_list if s.owner == "other"}
    assert len(pager) == 6 and len(other) == 2

    # owner
    got = describe_sessions(spb, sessions, filters=[kv(key="owner", value="pager")])
    assert [s.id for s in got.sessions] == sorted(pager)
    assert not got.next_token
    # Same key twice: either matches.
    got = describe_sessions(
        spb,
        sessions,
        filters=[kv(key="owner", value="pager"), kv(key="owner", value="other")],
    )
    assert [s.id for s in got.sessions] == sorted(pager | other)

    # tag:KEY is the session's server's tag.
    pools = {}
    for s in resp.successful_list:
        [pool] = [tag.value for tag in s.server.tags if tag.key == "pool"]
        pools[s.id] = pool
    some_pool = pools[sorted(pager)[0]]
    got = describe_sessions(
        spb,
        sessions,
        filters=[kv(key="owner", value="pager"), kv(key="tag:pool", value=some_pool)],
    )
    assert [s.id for s in got.sessions] == sorted(i for i in pager if pools[i] == some_pool)
    got = describe_sessions(spb, sessions, filters=[kv(key="tag:pool", value=some_pool)])
    assert {i for i in pager | other if pools[i] == some_pool} <= {s.id for s in got.sessions}
    for s in got.sessions:
        assert ("pool", some_pool) in {(tag.key, tag.value) for tag in s.server.tags}
    got = describe_sessions(
        spb,
        sessions,
        filters=[kv(key="owner", value="pager"), kv(key="tag:dcv:os-family", value="linux")],
    )
    assert [s.id for s in got.sessions] == sorted(pager)
    got = describe_sessions(
        spb,
        sessions,
        filters=[kv(key="owner", value="pager"), kv(key="tag:dcv:os-family", value="windows")],
    )
    assert list(got.sessions) == []
    got = describe_sessions(spb, sessions, filters=[kv(key="tag:no-such-tag", value="x")])
    assert list(got.sessions) == []

    # state (beyond DCV)
    for sid in pager:
        wait_for_state(spb, sessions, sid, t.READY)
    got = describe_sessions(
        spb, sessions, filters=[kv(key="owner", value="pager"), kv(key="state", value="READY")]
    )
    assert [s.id for s in got.sessions] == sorted(pager)

    # SessionIds: unknown ids are left out; the order is by id.
    wanted = [sorted(pager)[3], "no-such-session", sorted(pager)[1]]
    got = describe_sessions(spb, sessions, session_ids=wanted)
    assert [s.id for s in got.sessions] == sorted(set(wanted) - {"no-such-session"})

    # Pages of the owner's sessions.
    for size in [1, 2, 4, 5, 6, 1000]:
        pages = walk_sessions(spb, sessions, size, filters=[kv(key="owner", value="pager")])
        assert [i for p in pages for i in p] == sorted(pager), size
        assert len(pages) == -(-6 // size), (size, pages)

    # Pages of everything (the demo fleet's own sessions included).
    everything = [s.id for s in describe_sessions(spb, sessions).sessions]
    assert set(pager) | set(other) <= set(everything)
    assert everything == sorted(everything) and len(everything) == len(set(everything))
    pages = walk_sessions(spb, sessions, 3)
    assert [i for p in pages for i in p] == everything

    # The page size may change during a walk.
    ids, token = [], ""
    for size in [1, 3, 2, 1000]:
        page = describe_sessions(
            spb,
            sessions,
            max_results=size,
            next_token=token,
            filters=[kv(key="owner", value="pager")],
        )
        ids += [s.id for s in page.sessions]
        token = page.next_token
        if not token:
            break
    assert ids == sorted(pager)

    # A token is bound to its query.
    first = describe_sessions(
        spb, sessions, max_results=2, filters=[kv(key="owner", value="pager")]
    )
    assert first.next_token
    for kw in (
        {},
        {"filters": [kv(key="owner", value="other")]},
        {"session_ids": sorted(pager), "filters": [kv(key="owner", value="pager")]},
    ):
        with pytest.raises(grpc.RpcError) as err:
            describe_sessions(spb, sessions, max_results=2, next_token=first.next_token, **kw)
        assert bad_request_fields(err.value) == ["NextToken"], kw
    with pytest.raises(grpc.RpcError) as err:
        describe_sessions(
            spb, sessions, next_token="garbage", filters=[kv(key="owner", value="pager")]
        )
    assert bad_request_fields(err.value) == ["NextToken"]


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"max_results": 0}, "MaxResults"),
        ({"max_results": 1001}, "MaxResults"),
        ({"filters": [("bogus", "x")]}, "Filters[0].Key"),
        ({"filters": [("owner", "a"), ("tag:", "x")]}, "Filters[1].Key"),
        ({"filters": [("state", "RUNNING")]}, "Filters[0].Value"),
        ({"session_ids": [f"s-{i}" for i in range(1001)]}, "SessionIds"),
    ],
    ids=["max-results-0", "max-results-1001", "unknown-key", "empty-tag", "bad-state", "ids"],
)
def test_describe_sessions_invalid_argument(spb, sessions, kw, field):
    if "filters" in kw:
        kw = dict(kw, filters=[spb.t.KeyValuePair(key=k, value=v) for k, v in kw["filters"]])
    with pytest.raises(grpc.RpcError) as err:
        describe_sessions(spb, sessions, **kw)
    assert bad_request_fields(err.value) == [field]


# --- update permissions ---------------------------------------------------------


def test_update_permissions(spb, sessions):
    fc, t = spb.fc, spb.t
    session = create_ok(spb, sessions, name="perm", owner="hank", requirements=PIN_SERVER_ID1)
    sid = session.id
    wait_for_state(spb, sessions, sid, t.READY)

    resp = update_permissions(spb, sessions, (sid, "hank", PERMISSIONS))
    assert_uuid4(resp.request_id)
    assert [s.session_id for s in resp.successful_list] == [sid]
    assert list(resp.unsuccessful_list) == []

    too_big = base64.b64encode(b"x" * (64 * 1024 + 1)).decode()
    resp = update_permissions(
        spb,
        sessions,
        (sid, "hank", PERMISSIONS),
        (sid, "hank", PERMISSIONS),
        ("no-such-session", "hank", PERMISSIONS),
        ("", "hank", PERMISSIONS),
    )
    assert [s.session_id for s in resp.successful_list] == [sid]
    assert [(f.session_id, f.failure_code) for f in resp.unsuccessful_list] == [
        (sid, fc.DUPLICATE_SESSION_ID),
        ("no-such-session", fc.SESSION_NOT_FOUND),
        ("", fc.INVALID_SESSION_PARAMETER),
    ]
    assert resp.unsuccessful_list[1].failure_reason == SESSION_NOT_FOUND_TEXT

    for owner, permissions, code, words in [
        ("someone-else", PERMISSIONS, fc.SESSION_NOT_FOUND, SESSION_NOT_FOUND_TEXT),
        ("hank", "not base64!", fc.INVALID_SESSION_PARAMETER, "PermissionsFile"),
        ("hank", "", fc.INVALID_SESSION_PARAMETER, "PermissionsFile"),
        ("hank", too_big, fc.INVALID_SESSION_PARAMETER, "PermissionsFile"),
        ("", PERMISSIONS, fc.INVALID_SESSION_PARAMETER, "Owner"),
    ]:
        resp = update_permissions(spb, sessions, (sid, owner, permissions))
        assert list(resp.successful_list) == []
        [failed] = resp.unsuccessful_list
        assert (failed.session_id, failed.failure_code) == (sid, code), (owner, permissions[:20])
        assert words in failed.failure_reason


# --- delete -------------------------------------------------------------------


def test_delete_without_force(pb, spb, sessions, servers):
    t = spb.t
    session = create_ok(spb, sessions, name="del", owner="ivan", requirements=PIN_SERVER_ID1)
    wait_for_state(spb, sessions, session.id, t.READY)
    resp = delete(spb, sessions, (session.id, "ivan"))
    assert_uuid4(resp.request_id)
    assert [(s.session_id, s.state) for s in resp.successful_list] == [(session.id, t.DELETING)]
    assert list(resp.unsuccessful_list) == []
    deleted = wait_for_state(spb, sessions, session.id, t.DELETED)
    assert deleted.state_reason == "Deleted on its server."
    with pytest.raises(grpc.RpcError) as err:
        connection_data(spb, sessions, session.id, "ivan")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_delete_while_queued_and_again(pb, spb, sessions, servers):
    fc, t = spb.fc, spb.t
    # A queued session: serverId1, its only candidate, is closed.
    servers.CloseServers(
        pb.servers_pb2.CloseServersRequest(
            servers=[pb.servers_pb2.CloseServerRequestData(server_id="serverId1")]
        ),
        timeout=TIMEOUT,
    )
    queued = create_ok(
        spb, sessions, name="q", owner="judy", requirements=PIN_SERVER_ID1, enqueue_request=True
    )
    assert (queued.state, queued.substate) == (t.CREATING, spb.sm.SESSION_PLACING)
    assert not queued.HasField("server")
    with pytest.raises(grpc.RpcError) as err:
        connection_data(spb, sessions, queued.id, "judy")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    # Deleting a queued session needs no agent: DELETED at once.
    resp = delete(spb, sessions, (queued.id, "judy"))
    assert [(s.session_id, s.state) for s in resp.successful_list] == [(queued.id, t.DELETED)]
    gone = session_by_id(spb, sessions, queued.id)
    assert gone.state == t.DELETED and gone.state_reason

    # Deleting a DELETED session succeeds, DELETED.
    resp = delete(spb, sessions, (queued.id, "judy", True))
    assert [(s.session_id, s.state) for s in resp.successful_list] == [(queued.id, t.DELETED)]

    # But not someone else's.
    resp = delete(spb, sessions, (queued.id, "mallory"))
    [failed] = resp.unsuccessful_list
    assert failed.failure_code == fc.SESSION_NOT_FOUND
    assert failed.failure_reason == SESSION_NOT_FOUND_TEXT

    # It left the queue: opening its server places nothing.
    servers.OpenServers(
        pb.servers_pb2.OpenServersRequest(
            servers=[pb.servers_pb2.OpenServerRequestData(server_id="serverId1")]
        ),
        timeout=TIMEOUT,
    )
    assert server_by_id(pb, servers, "serverId1").virtual_session_count == 0
    assert session_by_id(spb, sessions, queued.id).state == t.DELETED


def test_delete_batch_failure_codes(spb, sessions):
    fc, t = spb.fc, spb.t
    a = create_ok(spb, sessions, name="a", owner="kate")
    b = create_ok(spb, sessions, name="b", owner="kate")
    for s in (a, b):
        wait_for_state(spb, sessions, s.id, t.READY)
    resp = delete(
        spb,
        sessions,
        ("no-such-session", "kate"),
        (a.id, "not-kate"),  # a's first occurrence: not found for this owner
        (a.id, "kate"),  # later occurrence: a duplicate, not processed
        (b.id, "kate"),
        ("", "kate"),
        ("x" * 257, "kate"),
        ("some-id", ""),
    )
    assert [(s.session_id, s.state) for s in resp.successful_list] == [(b.id, t.DELETING)]
    assert [(f.session_id, f.failure_code) for f in resp.unsuccessful_list] == [
        ("no-such-session", fc.SESSION_NOT_FOUND),
        (a.id, fc.SESSION_NOT_FOUND),
        (a.id, fc.DUPLICATE_SESSION_ID),
        ("", fc.INVALID_SESSION_PARAMETER),
        ("x" * 257, fc.INVALID_SESSION_PARAMETER),
        ("some-id", fc.INVALID_SESSION_PARAMETER),
    ]
    reasons = [f.failure_reason for f in resp.unsuccessful_list]
    assert reasons[0] == reasons[1] == SESSION_NOT_FOUND_TEXT
    assert all(reasons)
    # Nothing happened to a.
    assert session_by_id(spb, sessions, a.id).state == t.READY
    wait_for_state(spb, sessions, b.id, t.DELETED)


# --- create failure codes -----------------------------------------------------


#: One-item CreateSessions that fail: (request fields, code name, words the
#: reason contains). A Windows server id is filled in for `{windows}`.
CREATE_FAILURES = {
    "init-file-on-console": (
        {"type": "CONSOLE", "init_file": "init.sh"},
        "INVALID_SESSION_PARAMETER",
        "InitFile",
    ),
    "gl-on-console": (
        {"type": "CONSOLE", "dcv_gl_enabled": True},
        "INVALID_SESSION_PARAMETER",
        "DcvGlEnabled",
    ),
    "max-clients-0": (
        {"max_concurrent_clients": 0},
        "INVALID_SESSION_PARAMETER",
        "MaxConcurrentClients",
    ),
    "max-clients-101": (
        {"max_concurrent_clients": 101},
        "INVALID_SESSION_PARAMETER",
        "MaxConcurrentClients",
    ),
    "no-name": ({"name": ""}, "INVALID_SESSION_PARAMETER", "Name"),
    "no-owner": ({"owner": ""}, "INVALID_SESSION_PARAMETER", "Owner"),
    "no-type": ({"type": "SESSION_TYPE_UNSPECIFIED"}, "INVALID_SESSION_PARAMETER", "Type"),
    "long-name": ({"name": "n" * 257}, "INVALID_SESSION_PARAMETER", "Name"),
    "permissions-not-base64": (
        {"permissions_file": "%%%"},
        "INVALID_SESSION_PARAMETER",
        "PermissionsFile",
    ),
    "autorun-args-without-file": (
        {"autorun_file_arguments": ["--x"]},
        "INVALID_SESSION_PARAMETER",
        "AutorunFile",
    ),
    "requirements-unparsable": (
        {"requirements": "tag:pool = 'design' and"},
        "INVALID_REQUIREMENTS",
        "Requirements at character 24: ",
    ),
    "requirements-unknown-property": (
        {"requirements": "server:Nope = 'x'"},
        "INVALID_REQUIREMENTS",
        "Requirements at character 8: ",
    ),
    "virtual-on-windows": (
        {"requirements": "server:Id = '{windows}'"},
        "NO_SERVER_AVAILABLE",
        "",
    ),
    "nothing-matches": (
        {"requirements": "tag:pool = 'no-such-pool'"},
        "NO_SERVER_AVAILABLE",
        "",
    ),
}


@pytest.fixture
def windows_server(pb, servers):
    ids = free_servers(pb, servers, "windows")
    assert ids, "the demo fleet should have a free Windows server"
    return ids[0]


@pytest.mark.parametrize("case", list(CREATE_FAILURES))
def test_create_failure_codes(spb, sessions, windows_server, case):
    fields, code, words = CREATE_FAILURES[case]
    fields = dict(fields)
    if "type" in fields:
        fields["type"] = spb.t.SessionType.Value(fields["type"])
    if "requirements" in fields:
        fields["requirements"] = fields["requirements"].format(windows=windows_server)
    request = item(spb, name=fields.pop("name", f"e2e-{case}"), **fields)
    resp = create(spb, sessions, request)
    assert list(resp.successful_list) == []
    [failed] = resp.unsuccessful_list
    assert failed.create_session_request_data == request, "the item is echoed as received"
    assert spb.fc.FailureCode.Name(failed.failure_code) == code, failed
    assert failed.failure_reason
    assert words in failed.failure_reason
    # Nothing was recorded.
    owner = request.owner
    if owner:
        got = describe_sessions(
            spb, sessions, filters=[spb.t.KeyValuePair(key="owner", value=owner)]
        )
        assert [s.name for s in got.sessions if s.name == request.name] == []


def test_create_batch_is_judged_item_by_item(spb, sessions, windows_server):
    """Failures keep their order; accepted items are placed; a Windows
    server that refuses VIRTUAL takes CONSOLE."""
    fc, t = spb.fc, spb.t
    resp = create(
        spb,
        sessions,
        item(spb, name="ok-1", owner="liam", requirements=PIN_SERVER_ID1),
        item(spb, name="bad-1", type=t.CONSOLE, init_file="x"),
        item(spb, name="bad-2", owner="liam", requirements=pin(windows_server)),
        item(spb, name="ok-2", owner="liam", type=t.CONSOLE, requirements=pin(windows_server)),
        item(spb, name="bad-3", max_concurrent_clients=0),
        # serverId1 already runs liam's ok-1: one session per user.
        item(spb, name="bad-4", owner="liam", requirements=PIN_SERVER_ID1),
        item(spb, name="bad-5", requirements="("),
    )
    assert [(s.name, s.server.id) for s in resp.successful_list] == [
        ("ok-1", "serverId1"),
        ("ok-2", windows_server),
    ]
    failures = [
        (f.create_session_request_data.name, f.failure_code) for f in resp.unsuccessful_list
    ]
    assert failures == [
        ("bad-1", fc.INVALID_SESSION_PARAMETER),
        ("bad-2", fc.NO_SERVER_AVAILABLE),
        ("bad-3", fc.INVALID_SESSION_PARAMETER),
        ("bad-4", fc.NO_SERVER_AVAILABLE),
        ("bad-5", fc.INVALID_REQUIREMENTS),
    ]
    for s in resp.successful_list:
        ready = wait_for_state(spb, sessions, s.id, t.READY)
        assert ready.type == (t.VIRTUAL if s.name == "ok-1" else t.CONSOLE)


@pytest.mark.parametrize("method", ["CreateSessions", "DeleteSessions", "UpdateSessionPermissions"])
def test_empty_batch_is_invalid_argument(spb, sessions, method):
    request = getattr(spb.sm, f"{method}Request")()
    with pytest.raises(grpc.RpcError) as err:
        getattr(sessions, method)(request, timeout=TIMEOUT)
    assert bad_request_fields(err.value) == ["Sessions"]


def test_oversized_create_batch_is_rejected_whole(spb, sessions):
    items = [item(spb, name=f"big-{i}", owner="mona") for i in range(1001)]
    with pytest.raises(grpc.RpcError) as err:
        create(spb, sessions, *items)
    assert bad_request_fields(err.value) == ["Sessions"]
    got = describe_sessions(spb, sessions, filters=[spb.t.KeyValuePair(key="owner", value="mona")])
    assert list(got.sessions) == []


# --- the agent's side -----------------------------------------------------------


def test_agent_creates_and_deletes_on_instruction(pb, spb, sessions, servers, agent):
    """A hand-written agent: every step happens when it reports, so each
    state is checked exactly, without polling."""
    ag, sm, t = spb.ag, spb.sm, spb.t
    server_id = "e2e-agent-sessions"
    register(spb, agent, server_id, max_virtual_sessions=4)
    assert server_by_id(pb, servers, server_id).availability == t.AVAILABLE

    with InstructionStream(spb, agent, server_id) as stream:
        resp = create(
            spb,
            sessions,
            item(
                spb,
                name="agent-made",
                owner="nora",
                init_file="init.sh",
                max_concurrent_clients=3,
                dcv_gl_enabled=True,
                permissions_file=PERMISSIONS,
                autorun_file="run.sh",
                autorun_file_arguments=["--a", "b c"],
                storage_root="/srv/nora",
                requirements=pin(server_id),
            ),
        )
        [created] = resp.successful_list
        sid = created.id
        assert created.server.id == server_id
        assert created.server.ip == "127.0.0.9"
        assert created.server.hostname == f"{server_id}.e2e"

        msg = stream.next()
        assert msg.WhichOneof("instruction") == "create_session", msg
        c = msg.create_session
        assert c.session_id == sid
        assert (c.name, c.owner, c.type) == ("agent-made", "nora", t.VIRTUAL)
        assert (c.init_file, c.max_concurrent_clients, c.dcv_gl_enabled) == ("init.sh", 3, True)
        assert c.permissions_file == PERMISSIONS
        assert (c.autorun_file, list(c.autorun_file_arguments)) == ("run.sh", ["--a", "b c"])
        assert c.storage_root == "/srv/nora"

        # Until the agent answers, the session is being placed, and counts.
        waiting = session_by_id(spb, sessions, sid)
        assert (waiting.state, waiting.substate) == (t.CREATING, sm.SESSION_PLACING)
        assert server_by_id(pb, servers, server_id).virtual_session_count == 1
        with pytest.raises(grpc.RpcError) as err:
            connection_data(spb, sessions, sid, "nora")
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

        r = report(spb, agent, server_id, sid, ag.CREATE_SESSION, state=t.READY)
        assert_uuid4(r.request_id)
        ready = session_by_id(spb, sessions, sid)
        assert (ready.state, ready.substate) == (t.READY, sm.SESSION_SUBSTATE_UNSPECIFIED)

        # Connection tokens, checked by the server the session runs on.
        token = connection_data(spb, sessions, sid, "nora").connection_token
        ok = validate(spb, agent, server_id, token, sid)
        assert_uuid4(ok.request_id)
        assert (ok.valid, ok.user, ok.reason) == (True, "nora", "")
        guest = connection_data(spb, sessions, sid, "guest").connection_token
        assert validate(spb, agent, server_id, guest, sid).user == "guest"

        payload, _, mac = token.partition(".")
        flipped = mac[:-2] + ("A" if mac[-2] != "A" else "B") + mac[-1]
        forged_payload = base64.urlsafe_b64encode(
            base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).replace(
                b"nora", b"eve!"
            )
        ).decode().rstrip("=")
        for bad_token, bad_server, bad_session in [
            (flipped, server_id, sid),
            (f"{forged_payload}.{mac}", server_id, sid),
            (token[:-1], server_id, sid),
            ("garbage", server_id, sid),
            ("", server_id, sid),
            (token, "serverId1", sid),
            (token, server_id, "another-session"),
        ]:
            verdict = validate(spb, agent, bad_server, bad_token, bad_session)
            assert verdict.valid is False, (bad_token, bad_server, bad_session)
            assert verdict.user == "" and verdict.reason, verdict

        # Permissions go to the agent.
        new_permissions = base64.b64encode(b"[permissions]\nnora allow display\n").decode()
        update_permissions(spb, sessions, (sid, "nora", new_permissions))
        msg = stream.next()
        assert msg.WhichOneof("instruction") == "update_permissions", msg
        assert msg.update_permissions.session_id == sid
        assert msg.update_permissions.permissions_file == new_permissions
        report(spb, agent, server_id, sid, ag.UPDATE_PERMISSIONS)

        # Deletion: DELETING until the agent confirms.
        resp = delete(spb, sessions, (sid, "nora"))
        assert [(s.session_id, s.state) for s in resp.successful_list] == [(sid, t.DELETING)]
        msg = stream.next()
        assert msg.WhichOneof("instruction") == "delete_session", msg
        assert msg.delete_session.session_id == sid
        assert session_by_id(spb, sessions, sid).state == t.DELETING
        assert validate(spb, agent, server_id, token, sid).valid is False

        report(spb, agent, server_id, sid, ag.DELETE_SESSION)
        gone = session_by_id(spb, sessions, sid)
        assert gone.state == t.DELETED
        assert gone.state_reason == "Deleted on its server."
        assert server_by_id(pb, servers, server_id).virtual_session_count == 0
        assert stream.pending() == 0


def test_agent_pending_preparation_then_ready_by_heartbeat(pb, spb, sessions, servers, agent):
    ag, sm, t = spb.ag, spb.sm, spb.t
    server_id = "e2e-agent-prep"
    register(spb, agent, server_id)
    with InstructionStream(spb, agent, server_id) as stream:
        session = create_ok(spb, sessions, name="slow", owner="olga", requirements=pin(server_id))
        assert stream.next().create_session.session_id == session.id

        report(spb, agent, server_id, session.id, ag.CREATE_SESSION, state=t.CREATING)
        prep = session_by_id(spb, sessions, session.id)
        assert (prep.state, prep.substate) == (t.CREATING, sm.PENDING_PREPARATION)

        def heartbeat(*states):
            agent.Heartbeat(
                ag.HeartbeatRequest(
                    server_id=server_id,
                    dcv_server_healthy=True,
                    sessions=[
                        ag.AgentSession(id=session.id, owner="olga", type=t.VIRTUAL, state=s)
                        for s in states
                    ],
                ),
                timeout=TIMEOUT,
            )

        heartbeat(t.READY)
        ready = session_by_id(spb, sessions, session.id)
        assert (ready.state, ready.substate) == (t.READY, sm.SESSION_SUBSTATE_UNSPECIFIED)
        assert server_by_id(pb, servers, server_id).virtual_session_count == 1

        # The agent stops reporting it: it is gone.
        heartbeat()
        gone = session_by_id(spb, sessions, session.id)
        assert gone.state == t.DELETED
        assert gone.state_reason
        assert server_by_id(pb, servers, server_id).virtual_session_count == 0


def test_agent_failure_is_retried_elsewhere_or_fails(pb, spb, sessions, agent):
    ag, t = spb.ag, spb.t
    a, b = "e2e-agent-retry-a", "e2e-agent-retry-b"
    for server_id in (a, b):
        register(spb, agent, server_id)
    both = f"server:Id = '{a}' or server:Id = '{b}'"
    with InstructionStream(spb, agent, a) as on_a, InstructionStream(spb, agent, b) as on_b:
        # Spread placement, ties to the lowest id: a first.
        session = create_ok(spb, sessions, name="retry", owner="pete", requirements=both)
        assert session.server.id == a
        assert on_a.next().create_session.session_id == session.id
        report(spb, agent, a, session.id, ag.CREATE_SESSION, success=False, reason="disk full")
        moved = session_by_id(spb, sessions, session.id)
        assert moved.server.id == b
        assert moved.state == t.CREATING
        assert on_b.next().create_session.session_id == session.id
        # A late answer from a is ignored.
        report(spb, agent, a, session.id, ag.CREATE_SESSION, state=t.READY)
        assert session_by_id(spb, sessions, session.id).state == t.CREATING
        report(spb, agent, b, session.id, ag.CREATE_SESSION, state=t.READY)
        assert session_by_id(spb, sessions, session.id).state == t.READY

        # Without retries, a failure ends the session.
        once = create_ok(
            spb,
            sessions,
            name="once",
            owner="quinn",
            requirements=both,
            disable_retry_on_failure=True,
        )
        stream = on_a if once.server.id == a else on_b
        assert stream.next().create_session.session_id == once.id
        report(
            spb, agent, once.server.id, once.id, ag.CREATE_SESSION, success=False, reason="no GPU"
        )
        failed = session_by_id(spb, sessions, once.id)
        assert failed.state == t.DELETED
        assert "no GPU" in failed.state_reason


def test_instruction_stream_resends_what_waits(spb, sessions, agent):
    """Instructions issued while no stream is open arrive when one opens;
    a newer stream replaces the older one."""
    ag, t = spb.ag, spb.t
    server_id = "e2e-agent-resend"
    register(spb, agent, server_id)
    session = create_ok(spb, sessions, name="later", owner="rita", requirements=pin(server_id))
    with InstructionStream(spb, agent, server_id) as stream:
        assert stream.next().create_session.session_id == session.id
        report(spb, agent, server_id, session.id, ag.CREATE_SESSION, state=t.READY)
    assert session_by_id(spb, sessions, session.id).state == t.READY

    delete(spb, sessions, (session.id, "rita"))
    with InstructionStream(spb, agent, server_id) as first:
        assert first.next().delete_session.session_id == session.id
        with InstructionStream(spb, agent, server_id) as second:
            # Not answered yet: the new stream gets it again.
            assert second.next().delete_session.session_id == session.id
            report(spb, agent, server_id, session.id, ag.DELETE_SESSION)
    assert session_by_id(spb, sessions, session.id).state == t.DELETED


def test_force_delete_forgets_and_a_report_revives(pb, spb, sessions, servers, agent):
    """Force deletes without asking the agent; if the agent still reports
    the session, it comes back."""
    ag, t = spb.ag, spb.t
    server_id = "e2e-agent-force"
    register(spb, agent, server_id)
    with InstructionStream(spb, agent, server_id) as stream:
        session = create_ok(spb, sessions, name="f", owner="sam", requirements=pin(server_id))
        assert stream.next().create_session.session_id == session.id
        report(spb, agent, server_id, session.id, ag.CREATE_SESSION, state=t.READY)

        resp = delete(spb, sessions, (session.id, "sam", True))
        assert [(s.session_id, s.state) for s in resp.successful_list] == [(session.id, t.DELETED)]
        forgotten = session_by_id(spb, sessions, session.id)
        assert forgotten.state == t.DELETED
        assert forgotten.state_reason == "Deleted with Force."
        assert server_by_id(pb, servers, server_id).virtual_session_count == 0

        agent.Heartbeat(
            ag.HeartbeatRequest(
                server_id=server_id,
                dcv_server_healthy=True,
                sessions=[
                    ag.AgentSession(id=session.id, owner="sam", type=t.VIRTUAL, state=t.READY)
                ],
            ),
            timeout=TIMEOUT,
        )
        back = session_by_id(spb, sessions, session.id)
        assert back.state == t.READY
        assert back.state_reason == "Reported again by its agent."
        assert server_by_id(pb, servers, server_id).virtual_session_count == 1
        # No delete instruction was ever sent.
        assert stream.pending() == 0


def test_agent_calls_for_unknown_servers_or_bad_input(spb, agent):
    ag = spb.ag
    with pytest.raises(grpc.RpcError) as err:
        stream = agent.StreamInstructions(
            ag.StreamInstructionsRequest(server_id="no-such-server"), timeout=TIMEOUT
        )
        next(iter(stream))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        report(spb, agent, "no-such-server", "s", ag.CREATE_SESSION)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        report(spb, agent, "serverId1", "s", ag.INSTRUCTION_KIND_UNSPECIFIED)
    assert bad_request_fields(err.value) == ["Kind"]
    with pytest.raises(grpc.RpcError) as err:
        report(spb, agent, "serverId1", "", ag.CREATE_SESSION)
    assert bad_request_fields(err.value) == ["SessionId"]
    # An answer about a session the broker does not know is accepted.
    report(spb, agent, "serverId1", "no-such-session", ag.DELETE_SESSION)


# --- known problems ---------------------------------------------------------------


def test_confirmed_delete_frees_the_server_at_once(pb, spb, sessions, servers, agent):
    ag, t = spb.ag, spb.t
    fc = spb.fc
    server_id = "e2e-agent-stale"
    register(spb, agent, server_id)
    with InstructionStream(spb, agent, server_id) as stream:
        session = create_ok(spb, sessions, name="s", owner="uma", requirements=pin(server_id))
        assert stream.next().create_session.session_id == session.id
        report(spb, agent, server_id, session.id, ag.CREATE_SESSION, state=t.READY)
        agent.Heartbeat(
            ag.HeartbeatRequest(
                server_id=server_id,
                dcv_server_healthy=True,
                sessions=[
                    ag.AgentSession(id=session.id, owner="uma", type=t.VIRTUAL, state=t.READY)
                ],
            ),
            timeout=TIMEOUT,
        )
        delete(spb, sessions, (session.id, "uma"))
        assert stream.next().delete_session.session_id == session.id
        report(spb, agent, server_id, session.id, ag.DELETE_SESSION)
        assert session_by_id(spb, sessions, session.id).state == t.DELETED

        # DescribeSessions says DELETED; the server should agree.
        assert server_by_id(pb, servers, server_id).virtual_session_count == 0
        resp = servers.CloseServers(
            pb.servers_pb2.CloseServersRequest(
                servers=[pb.servers_pb2.CloseServerRequestData(server_id=server_id)]
            ),
            timeout=TIMEOUT,
        )
        assert [f.failure_code for f in resp.unsuccessful_list] == []
        servers.OpenServers(
            pb.servers_pb2.OpenServersRequest(
                servers=[pb.servers_pb2.OpenServerRequestData(server_id=server_id)]
            ),
            timeout=TIMEOUT,
        )
        again = create(
            spb, sessions, item(spb, name="s2", owner="uma", requirements=pin(server_id))
        )
        assert [f.failure_code for f in again.unsuccessful_list] != [fc.NO_SERVER_AVAILABLE]


def test_no_connection_token_while_the_agent_is_unreachable(pb, spb, start_broker):
    ag, t = spb.ag, spb.t
    broker = start_broker("--unreachable-after", "1s")
    try:
        with grpc.insecure_channel(broker.addr) as ch:
            agent = pb.agent_pb2_grpc.AgentStub(ch)
            stub = spb.sessions_pb2_grpc.SessionsStub(ch)
            server_id = "e2e-agent-silent"
            register(spb, agent, server_id)
            with InstructionStream(spb, agent, server_id) as stream:
                # The server counts as reachable for a second after each
                # heartbeat: on a slow machine, heartbeat and try again.
                deadline = time.monotonic() + SETTLE_TIMEOUT_S
                while True:
                    agent.Heartbeat(
                        ag.HeartbeatRequest(server_id=server_id, dcv_server_healthy=True),
                        timeout=TIMEOUT,
                    )
                    resp = create(
                        spb, stub, item(spb, name="s", owner="vic", requirements=pin(server_id))
                    )
                    if resp.successful_list or time.monotonic() > deadline:
                        break
                [session] = resp.successful_list
                assert stream.next().create_session.session_id == session.id
                report(spb, agent, server_id, session.id, ag.CREATE_SESSION, state=t.READY)
            # The agent falls silent; after a second it is unreachable.
            wait_for_state(spb, stub, session.id, t.UNKNOWN)
            with pytest.raises(grpc.RpcError) as err:
                connection_data(spb, stub, session.id, "vic")
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        assert broker.stop() == 0, broker.log_tail()
