//! The fleet alone, in process, without gRPC: the cost per item of batch
//! CloseServers/OpenServers, and resident memory per registered server.
//! It isolates what the load benchmark (`benches/load.rs`) measures end to
//! end, so a change to the domain shows here without the transport's noise.
//!
//! `cargo bench --bench domain` (`-- --quick` for fewer rounds).

use std::time::{Duration, Instant};

use dcv_broker::{
    demo,
    fleet::{CloseItem, Fleet, FleetConfig, OpenItem, ServerId},
};

/// Servers registered for the batch measurement.
const FLEET: usize = 10_000;
/// Items per batch, the API's maximum.
const BATCH: usize = 1_000;
/// Batches, each of its own servers, closed and opened per round.
const BATCHES: usize = 8;

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    // Memory first, and one fleet size only: memory freed by an earlier
    // fleet would be reused and hide the cost of a later one.
    memory(100_000);
    runtime.block_on(batches(if quick { 20 } else { 200 }));
}

/// Median nanoseconds per item of closing and of opening batches of
/// 1,000 servers, over `rounds` rounds of every batch.
async fn batches(rounds: usize) {
    let fleet = Fleet::new(FleetConfig::default()).expect("a fleet");
    for i in 0..FLEET {
        let (_, durable) = fleet
            .register_nowait(&demo::server_id(i), demo::tagged_description(i))
            .expect("a valid registration");
        // In memory: nothing to wait for.
        drop(durable);
    }
    let batches: Vec<Vec<String>> = (0..BATCHES)
        .map(|b| {
            (0..BATCH)
                .map(|i| demo::server_id(1 + b * BATCH + i))
                .collect()
        })
        .collect();
    let (mut close, mut open) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let (mut c, mut o) = (Duration::ZERO, Duration::ZERO);
        for ids in &batches {
            let items: Vec<CloseItem> = ids
                .iter()
                .map(|id| CloseItem {
                    server_id: id.clone(),
                    force: true,
                    reason: String::new(),
                    ..Default::default()
                })
                .collect();
            let opens: Vec<OpenItem> = ids
                .iter()
                .map(|id| OpenItem {
                    server_id: id.clone(),
                    ..Default::default()
                })
                .collect();
            let started = Instant::now();
            let closed = fleet.close_servers(&items, "bench").await.expect("closed");
            c += started.elapsed();
            assert!(closed.iter().all(Result::is_ok), "a close failed");
            let started = Instant::now();
            let opened = fleet.open_servers(&opens).await.expect("opened");
            o += started.elapsed();
            assert!(opened.iter().all(Result::is_ok), "an open failed");
        }
        let items = (BATCHES * BATCH) as f64;
        close.push(c.as_nanos() as f64 / items);
        open.push(o.as_nanos() as f64 / items);
    }
    println!(
        "batches of {BATCH}, {FLEET} servers, median of {rounds} rounds: close {:.0} ns/item, open {:.0} ns/item",
        median(&mut close),
        median(&mut open)
    );
}

/// Resident memory per server with `n` tagged servers registered and
/// heartbeating once, in a fleet of its own (the process's growth, so it
/// must be the first thing the process allocates much for).
fn memory(n: usize) {
    let before = resident_bytes();
    let fleet = Fleet::new(FleetConfig::default()).expect("a fleet");
    let ids: Vec<ServerId> = (0..n).map(|i| ServerId::from(demo::server_id(i))).collect();
    for (i, id) in ids.iter().enumerate() {
        let (_, durable) = fleet
            .register_nowait(id, demo::tagged_description(i))
            .expect("a valid registration");
        drop(durable);
    }
    let beats: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.clone(), demo::heartbeat(i)))
        .collect();
    let unknown = fleet.heartbeat_many(beats);
    assert!(unknown.is_empty(), "heartbeats of unknown servers");
    let after = resident_bytes();
    println!(
        "{n} servers: {} bytes/server resident",
        after.saturating_sub(before) / n
    );
    drop(fleet);
}

fn resident_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("resident pages");
    pages * 4096
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
