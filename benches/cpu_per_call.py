#!/usr/bin/env python3
"""Server CPU per call of two brokers, alternating (BENCHMARKS.md,
"Metrics"): a grpcio client keeps 64 unary calls in flight with raw
protobuf bodies; each broker's CPU comes from /proc/PID/stat before and
after 40,000 calls.

Usage: cpu_per_call.py ON_ADDR ON_PID OFF_ADDR OFF_PID ROUNDS"""
import sys, time, threading, statistics, os
import grpc

def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

DESCRIBE = b"\x0a\x0bdcv-0000042"
inner = b"\x0a\x0bdcv-0000002\x10\x01"
CLOSE = b"\x0a" + bytes([len(inner)]) + inner

def run(addr, pid, path, body, n=40000, inflight=64):
    with grpc.insecure_channel(addr) as ch:
        call = ch.unary_unary(path)
        for _ in range(500):
            call(body, timeout=10)
        sem = threading.Semaphore(inflight)
        done = threading.Event(); left = [n]; lock = threading.Lock()
        def cb(f):
            f.result()
            sem.release()
            with lock:
                left[0] -= 1
                if left[0] == 0: done.set()
        c0 = cpu(pid); t0 = time.monotonic()
        for _ in range(n):
            sem.acquire()
            call.future(body, timeout=30).add_done_callback(cb)
        done.wait()
        t = time.monotonic() - t0; c = cpu(pid) - c0
        return c / n * 1e6, n / t

on_addr, on_pid, off_addr, off_pid, rounds = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
for name, path, body in [("describe-1", "/dcv.sessionmanager.v1.Servers/DescribeServers", DESCRIBE),
                         ("close-1 (repeated)", "/dcv.sessionmanager.v1.Servers/CloseServers", CLOSE)]:
    res = {"on": [], "off": []}
    for r in range(rounds):
        order = [("off", off_addr, off_pid), ("on", on_addr, on_pid)] if r % 2 == 0 else [("on", on_addr, on_pid), ("off", off_addr, off_pid)]
        for k, a, p in order:
            res[k].append(run(a, p, path, body))
    for k in ("off", "on"):
        print(name, k, "cpu us/call", [round(x[0], 2) for x in res[k]], "req/s", [round(x[1]) for x in res[k]])
    mon = statistics.median(x[0] for x in res["on"]); moff = statistics.median(x[0] for x in res["off"])
    print(name, f"median cpu us/call off {moff:.2f} on {mon:.2f} ratio {mon/moff:.3f}")
    print(name, "pairwise ratios", [round(a[0]/b[0], 3) for a, b in zip(res["on"], res["off"])])
