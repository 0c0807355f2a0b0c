//! The table the benchmark prints and the JSON it writes.

use super::{common::procfs::median, *};

/// The 1, 5 and 15-minute load averages, as `uptime` shows them.
pub fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1 << 20) as f64)
}

#[allow(clippy::too_many_arguments)]
pub fn report(
    opts: &Opts,
    machine: &str,
    empty_rss: u64,
    fleet_rss: u64,
    seed_s: f64,
    idle: &[Idle],
    live: &[Live],
    closing: &[f64],
    valid: bool,
) {
    let m = |f: &dyn Fn(&Live) -> f64| median(live.iter().map(f).collect());
    let mi = |f: &dyn Fn(&Idle) -> f64| median(idle.iter().map(f).collect());
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    let per_rep = |f: &dyn Fn(&Live, &Idle) -> f64| -> Vec<String> {
        live.iter()
            .zip(idle)
            .map(|(a, b)| format!("{:.2}", f(a, b)))
            .collect()
    };
    let pages_ratio = ratio(m(&|a| a.pages.p99), mi(&|b| b.pages.p99));
    let single_ratio = ratio(m(&|a| a.single.p99), mi(&|b| b.single.p99));
    println!();
    println!(
        "{} agents, {} B/A pairs, {:.0} s windows, {}, {}; medians over the pairs; {machine}",
        opts.agents,
        opts.reps,
        opts.window.as_secs_f64(),
        if opts.pin {
            "broker and DescribeServers client on CPU 0, agents on CPU 1"
        } else {
            "not pinned"
        },
        if opts.agent_port {
            "agents on the agents' port (--agent-listen)"
        } else {
            "agents on the main port"
        }
    );
    println!(
        "{:<44} {:>12} {:>12} {:>8}",
        "", "live (A)", "without (B)", "A/B"
    );
    let row = |name: &str, a: f64, b: f64| {
        println!("{name:<44} {a:>12.0} {b:>12.0} {:>8.2}", ratio(a, b));
    };
    row(
        "DescribeServers, pages of 1000: p50 µs",
        m(&|a| a.pages.p50),
        mi(&|b| b.pages.p50),
    );
    row(
        "DescribeServers, pages of 1000: p99 µs",
        m(&|a| a.pages.p99),
        mi(&|b| b.pages.p99),
    );
    row(
        "DescribeServers, one id: p50 µs",
        m(&|a| a.single.p50),
        mi(&|b| b.single.p50),
    );
    row(
        "DescribeServers, one id: p99 µs",
        m(&|a| a.single.p99),
        mi(&|b| b.single.p99),
    );
    // B's resident memory is the first B's, before any agent connected:
    // what the allocator keeps after the agents leave is reported apart.
    row(
        "broker RSS MiB (B: before any agent)",
        m(&|a| a.rss as f64) / 1048576.0,
        fleet_rss as f64 / 1048576.0,
    );
    row(
        "broker CPU, % of a core",
        m(&|a| a.broker_cpu * 100.0),
        mi(&|b| b.cpu * 100.0),
    );
    row(
        "broker open descriptors",
        m(&|a| a.fds as f64),
        mi(&|b| b.fds as f64),
    );
    println!(
        "per pair, p99 A/B: pages {:?}, one id {:?}",
        per_rep(&|a, b| ratio(a.pages.p99, b.pages.p99)),
        per_rep(&|a, b| ratio(a.single.p99, b.single.p99))
    );
    println!(
        "acceptance (p99 A/B of pages within 1.5x): {:.2} {}",
        pages_ratio,
        if pages_ratio <= 1.5 { "met" } else { "NOT met" }
    );
    println!();
    println!(
        "heartbeats: {:.0}/s (asked: {}/s), p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs; p99 while paging {:.0} µs",
        m(&|a| a.heartbeats_per_s),
        opts.agents,
        m(&|a| a.hb_p50),
        m(&|a| a.hb_p99),
        m(&|a| a.hb_max),
        m(&|a| a.hb_p99_paging)
    );
    let live_rss = m(&|a| a.rss as f64);
    let after: Vec<f64> = idle.iter().skip(1).map(|b| b.rss as f64).collect();
    println!(
        "broker: {:.1} µs CPU per heartbeat ({:.1}% of a core); RSS {} empty, {} with the fleet, \
         {} live ({:.1} KiB per agent), {} after the agents left",
        m(&|a| a.broker_us_per_hb),
        m(&|a| a.broker_cpu * 100.0),
        mib(empty_rss),
        mib(fleet_rss),
        mib(live_rss as u64),
        (live_rss - fleet_rss as f64) / opts.agents as f64 / 1024.0,
        if after.is_empty() {
            "-".to_string()
        } else {
            mib(median(after) as u64)
        }
    );
    println!(
        "load process (the agents): {:.1} µs CPU per heartbeat ({:.1}% of a core)",
        m(&|a| a.load_us_per_hb),
        m(&|a| a.load_cpu * 100.0)
    );
    println!(
        "bring-up: {:.1} s for {} agents ({} at once), {} failed; servers registered over one \
         connection in {seed_s:.1} s; the broker let the connections go in {:.1} s",
        m(&|a| a.bring_up_s),
        opts.agents,
        opts.connect_concurrency,
        live.iter().map(|a| a.failed).sum::<u64>(),
        median(closing.to_vec())
    );
    if !valid {
        println!("INVALID RUN: see the lines marked INVALID above");
    }
    let latency = |l: &Latency| {
        serde_json::json!({"requests": l.requests, "p50_us": l.p50, "p99_us": l.p99,
            "errors": l.errors, "servers_per_walk": l.walked})
    };
    let json = serde_json::json!({
        "agents": opts.agents,
        "reps": opts.reps,
        "window_s": opts.window.as_secs_f64(),
        "pinned": opts.pin,
        "agent_port": opts.agent_port,
        "valid": valid,
        "machine": machine,
        "empty_rss_bytes": empty_rss,
        "fleet_rss_bytes": fleet_rss,
        "seed_s": seed_s,
        "pages_p99_ratio": pages_ratio,
        "single_p99_ratio": single_ratio,
        "without": idle.iter().map(|b| serde_json::json!({
            "rss_bytes": b.rss, "fds": b.fds, "broker_cpu": b.cpu,
            "pages": latency(&b.pages), "single": latency(&b.single),
        })).collect::<Vec<_>>(),
        "live": live.iter().map(|a| serde_json::json!({
            "bring_up_s": a.bring_up_s, "failed": a.failed, "rss_bytes": a.rss, "fds": a.fds,
            "heartbeats_per_s": a.heartbeats_per_s, "heartbeat_p50_us": a.hb_p50,
            "heartbeat_p99_us": a.hb_p99, "heartbeat_max_us": a.hb_max,
            "heartbeat_p99_paging_us": a.hb_p99_paging,
            "broker_cpu": a.broker_cpu, "broker_us_per_heartbeat": a.broker_us_per_hb,
            "load_cpu": a.load_cpu, "load_us_per_heartbeat": a.load_us_per_hb,
            "heartbeat_errors": a.heartbeat_errors, "streams_lost": a.streams_lost,
            "pages": latency(&a.pages), "single": latency(&a.single),
        })).collect::<Vec<_>>(),
        "closing_s": closing,
    });
    if let Some(dir) = opts.out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(&opts.out, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    println!("wrote {}", opts.out.display());
}
