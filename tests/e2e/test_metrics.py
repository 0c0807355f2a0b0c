"""End to end for GET /metrics: the real broker binary, a known sequence of
calls (a session created and deleted, closes with a failure, a session
with nowhere to go, a request shed, one rate-limited, requests too large), then one scrape parsed with
Prometheus' own text parser whose counters and gauges must have exactly
the expected values. Also the OpenMetrics form, --metrics-listen, and
--metrics false.

Nothing waits on timing: what the simulated agent does by itself is
awaited by scraping until a gauge says it happened (bounded by a
deadline), and the scrapes themselves are counted."""

from __future__ import annotations

import importlib
import os
import socket
import subprocess
import time
import types
import urllib.error
import urllib.request

import grpc
import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

TIMEOUT = 10
SETTLE_TIMEOUT_S = float(os.environ.get("DCV_E2E_SETTLE_TIMEOUT", "20"))
SESSIONS = "dcv.sessionmanager.v1.Sessions"
SERVERS = "dcv.sessionmanager.v1.Servers"
MAX_REQUEST_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def spb(pb) -> types.SimpleNamespace:
    """The Sessions service's generated modules (`pb` compiled them)."""
    sm = importlib.import_module("dcv.sessionmanager.v1.sessions_pb2")
    stubs = importlib.import_module("dcv.sessionmanager.v1.sessions_pb2_grpc")
    return types.SimpleNamespace(sm=sm, sessions_pb2_grpc=stubs, t=pb.types_pb2)


class Scraper:
    """Scrapes one address's /metrics, counting its scrapes."""

    def __init__(self, addr: str):
        self.addr = addr
        self.count = 0

    def raw(self, accept: str | None = None) -> tuple[str, str]:
        request = urllib.request.Request(f"http://{self.addr}/metrics")
        if accept:
            request.add_header("Accept", accept)
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            self.count += 1
            return response.headers["Content-Type"], response.read().decode()

    def __call__(self) -> dict:
        """Every sample: (name, sorted labels) -> value."""
        _, text = self.raw()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def until(self, what: str, check) -> dict:
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while True:
            samples = self()
            if check(samples):
                return samples
            if time.monotonic() > deadline:
                raise AssertionError(f"never saw {what}: {samples}")


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def rpc(samples: dict, service: str, method: str, suffix: str, **labels) -> float:
    return value(
        samples,
        f"grpc_server_{suffix}",
        grpc_service=service,
        grpc_method=method,
        grpc_type="unary",
        **labels,
    )


def http_request(addr: str, head: bytes, body: bytes = b"") -> socket.socket:
    """Sends an HTTP/1.1 request's head (and `body`) on a new connection."""
    sock = socket.create_connection(tuple(addr.rsplit(":", 1)), timeout=TIMEOUT)
    sock.sendall(head + body)
    return sock


def read_status(sock: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"connection closed: {data!r}"
        data += chunk
    return int(data.split(b" ", 2)[1])


def test_metrics_count_a_known_sequence(start_broker, pb, spb):
    broker = start_broker(
        "--max-concurrent-requests",
        "1",
        "--client-rate",
        "1",
        "--client-burst",
        "60",
        "--max-request-bytes",
        str(MAX_REQUEST_BYTES),
        demo_fleet=1,
    )
    scrape = Scraper(broker.addr)
    scrape.until("the simulated server", lambda m: value(m, "dcv_broker_servers_available") == 1)

    with grpc.insecure_channel(broker.addr) as channel:
        grpc.channel_ready_future(channel).result(timeout=TIMEOUT)
        sessions = spb.sessions_pb2_grpc.SessionsStub(channel)
        servers = pb.servers_pb2_grpc.ServersStub(channel)

        # A session created, then deleted by its agent.
        created = sessions.CreateSessions(
            spb.sm.CreateSessionsRequest(
                sessions=[
                    spb.sm.CreateSessionRequestData(name="m", owner="alice", type=spb.t.VIRTUAL)
                ]
            ),
            timeout=TIMEOUT,
        )
        [session] = created.successful_list
        scrape.until("the session READY", lambda m: value(m, "dcv_broker_sessions", state="READY") == 1)
        deleted = sessions.DeleteSessions(
            spb.sm.DeleteSessionsRequest(
                sessions=[spb.sm.DeleteSessionRequestData(session_id=session.id, owner="alice")]
            ),
            timeout=TIMEOUT,
        )
        assert len(deleted.successful_list) == 1, deleted
        scrape.until(
            "the session DELETED", lambda m: value(m, "dcv_broker_sessions", state="DELETED") == 1
        )

        # A close with one failure.
        closed = servers.CloseServers(
            pb.servers_pb2.CloseServersRequest(
                servers=[
                    pb.servers_pb2.CloseServerRequestData(server_id="serverId1"),
                    pb.servers_pb2.CloseServerRequestData(server_id="no-such-server"),
                ]
            ),
            timeout=TIMEOUT,
        )
        assert len(closed.successful_list) == 1 and len(closed.unsuccessful_list) == 1, closed

        # Nowhere to place a session now, and no queueing asked for.
        unplaced = sessions.CreateSessions(
            spb.sm.CreateSessionsRequest(
                sessions=[
                    spb.sm.CreateSessionRequestData(name="n", owner="bob", type=spb.t.VIRTUAL)
                ]
            ),
            timeout=TIMEOUT,
        )
        assert len(unplaced.unsuccessful_list) == 1, unplaced

        # Too large: a gRPC message over --max-request-bytes, and a REST
        # body declared over it.
        with pytest.raises(grpc.RpcError) as too_large:
            sessions.DescribeSessions(
                spb.sm.DescribeSessionsRequest(session_ids=["x" * 200] * 400), timeout=TIMEOUT
            )
        assert too_large.value.code() == grpc.StatusCode.OUT_OF_RANGE
        head = (
            f"POST /describeServers HTTP/1.1\r\nHost: {broker.addr}\r\n"
            "Content-Type: application/json\r\n"
        ).encode()
        with http_request(
            broker.addr, head + f"Content-Length: {10 * MAX_REQUEST_BYTES}\r\n\r\n".encode()
        ) as sock:
            assert read_status(sock) == 413

        # Shed: a REST request holds the only slot while its body is
        # unfinished; a gRPC call meanwhile is refused at once.
        with http_request(broker.addr, head + b"Content-Length: 2\r\n\r\n", b"{") as sock:
            scrape.until(
                "the REST request in flight",
                lambda m: value(m, "dcv_broker_requests_in_flight") == 1,
            )
            with pytest.raises(grpc.RpcError) as shed:
                servers.DescribeServers(pb.servers_pb2.DescribeServersRequest(), timeout=TIMEOUT)
            assert shed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            sock.sendall(b"}")
            assert read_status(sock) == 200

        # Rate-limited: calls until the client's bucket is empty.
        described = 0
        while True:
            try:
                servers.DescribeServers(pb.servers_pb2.DescribeServersRequest(), timeout=TIMEOUT)
                described += 1
                assert described < 200, "never rate-limited"
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
                break

    scrapes_before = scrape.count
    m = scrape()

    # Per RPC.
    assert rpc(m, SESSIONS, "CreateSessions", "started_total") == 2
    assert rpc(m, SESSIONS, "CreateSessions", "handled_total", grpc_code="OK") == 2
    assert rpc(m, SESSIONS, "CreateSessions", "handling_seconds_count") == 2
    assert rpc(m, SESSIONS, "DeleteSessions", "handled_total", grpc_code="OK") == 1
    assert rpc(m, SERVERS, "CloseServers", "started_total") == 1
    assert rpc(m, SERVERS, "CloseServers", "handled_total", grpc_code="OK") == 1
    assert rpc(m, SESSIONS, "DescribeSessions", "handled_total", grpc_code="OutOfRange") == 1
    assert rpc(m, SERVERS, "DescribeServers", "started_total") == described + 2
    assert rpc(m, SERVERS, "DescribeServers", "handled_total", grpc_code="OK") == described
    assert (
        rpc(m, SERVERS, "DescribeServers", "handled_total", grpc_code="ResourceExhausted") == 2
    )
    assert rpc(m, SERVERS, "DescribeServers", "handling_seconds_count") == described + 2
    assert value(m, "dcv_broker_http_requests_total", route="describeServers", code="200") == 1
    assert value(m, "dcv_broker_http_requests_total", route="describeServers", code="413") == 1
    # Every earlier scrape; this one is counted once it is answered.
    assert value(m, "dcv_broker_http_requests_total", route="metrics", code="200") == scrapes_before

    # Limits.
    assert value(m, "dcv_broker_requests_shed_total") == 1
    assert value(m, "dcv_broker_requests_rate_limited_total") == 1
    assert value(m, "dcv_broker_requests_too_large_total", protocol="grpc") == 1
    assert value(m, "dcv_broker_requests_too_large_total", protocol="rest") == 1
    assert value(m, "dcv_broker_requests_in_flight") == 0

    # The fleet.
    assert value(m, "dcv_broker_servers_available") == 0
    assert value(m, "dcv_broker_servers_unavailable", reason="SERVER_CLOSED") == 1
    assert value(m, "dcv_broker_servers_unavailable", reason="UNREACHABLE_AGENT") == 0
    assert value(m, "dcv_broker_servers_closed") == 1
    assert value(m, "dcv_broker_holds") == 1
    for state, n in [("CREATING", 0), ("READY", 0), ("DELETING", 0), ("DELETED", 1)]:
        assert value(m, "dcv_broker_sessions", state=state) == n, state
    assert value(m, "dcv_broker_queue_length") == 0
    assert value(m, "dcv_broker_queue_oldest_age_seconds") == 0
    assert value(m, "dcv_broker_instructions_in_flight") == 0
    assert value(m, "dcv_broker_placements_total") == 1
    assert value(m, "dcv_broker_placement_failures_total", reason="no_server") == 1
    for reason in ["queue_full", "agent_failed"]:
        assert value(m, "dcv_broker_placement_failures_total", reason=reason) == 0, reason

    # The store: every change committed, none failed.
    assert value(m, "dcv_broker_store_commit_seconds_count") >= 1
    assert value(m, "dcv_broker_store_changes_per_commit_sum") >= 1
    assert value(m, "dcv_broker_store_commit_failures_total") == 0

    # Authentication is off: no token asked for.
    assert value(m, "dcv_broker_tokens_issued_total") == 0
    assert value(m, "dcv_broker_tokens_refused_total", reason="invalid_client") == 0

    # A single broker leads.
    assert value(m, "dcv_broker_cluster_leader") == 1
    assert value(m, "dcv_broker_cluster_lag_seconds") == 0

    # The build and the process.
    assert value(m, "dcv_broker_build_info", version="0.1.0") == 1
    assert value(m, "process_cpu_seconds_total") > 0
    assert value(m, "process_resident_memory_bytes") > 0
    assert value(m, "process_open_fds") > 0


def test_openmetrics_when_asked(broker_process):
    scrape = Scraper(broker_process.addr)
    content_type, text = scrape.raw(accept="application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text"), content_type
    assert text.endswith("# EOF\n")
    names = {family.name for family in openmetrics_families(text)}
    assert {"dcv_broker_servers_available", "dcv_broker_build", "grpc_server_started"} <= names
    content_type, text = scrape.raw()
    assert content_type.startswith("text/plain; version=0.0.4"), content_type
    assert "# EOF" not in text


def test_metrics_listen_serves_metrics_apart(start_broker, pb):
    broker = start_broker("--metrics-listen", "127.0.0.1:0", demo_fleet=2)
    line = broker.next_line()
    prefix = "dcv-broker metrics listening on "
    assert line.startswith(prefix), line
    apart = Scraper(line[len(prefix) :])
    m = apart.until("the simulated servers", lambda m: value(m, "dcv_broker_servers_available") == 2)
    assert value(m, "dcv_broker_build_info", version="0.1.0") == 1
    with pytest.raises(urllib.error.HTTPError) as other:
        urllib.request.urlopen(f"http://{apart.addr}/health", timeout=TIMEOUT)
    assert other.value.code == 404
    # The broker's own port still serves them too.
    assert value(Scraper(broker.addr)(), "dcv_broker_servers_available") == 2


def test_metrics_false_turns_them_off(start_broker, broker_bin, tmp_path):
    broker = start_broker("--metrics", "false", demo_fleet=2)
    with pytest.raises(urllib.error.HTTPError) as off:
        Scraper(broker.addr)()
    assert off.value.code == 404
    # A port of their own without them is refused at start.
    refused = subprocess.run(
        [
            str(broker_bin),
            "--in-memory",
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "false",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert refused.returncode != 0
    assert "--metrics-listen" in refused.stderr
