//! The process' own metrics, with the names Prometheus' client libraries
//! use (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
//! `process_open_fds`, ...), read from `/proc/self` at scrape time. Off
//! Linux only the start time is known.

use std::sync::LazyLock;
use std::time::SystemTime;

use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

/// When the process started (when the metrics were first touched, which
/// is at start).
static STARTED: LazyLock<SystemTime> = LazyLock::new(SystemTime::now);

/// Clock ticks a second of `/proc/self/stat`'s times: USER_HZ, 100 on
/// every Linux architecture the broker runs on.
const TICKS_PER_SECOND: f64 = 100.0;

/// The page size `/proc/self/stat`'s RSS counts in: 4 KiB on x86-64 and
/// the usual arm64 kernels (the crate forbids the unsafe `sysconf` call
/// that would ask).
const PAGE_BYTES: u64 = 4096;

pub(super) fn encode(encoder: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
    let started = STARTED
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    ConstGauge::new(started).encode(encoder.encode_descriptor(
        "process_start_time_seconds",
        "Start time of the process since the Unix epoch, in seconds",
        None,
        MetricType::Gauge,
    )?)?;
    let Some(stat) = Stat::read() else {
        return Ok(());
    };
    ConstCounter::new(stat.cpu_seconds).encode(encoder.encode_descriptor(
        "process_cpu_seconds",
        "User and system CPU time spent, in seconds",
        None,
        MetricType::Counter,
    )?)?;
    ConstGauge::new(stat.resident_bytes as i64).encode(encoder.encode_descriptor(
        "process_resident_memory_bytes",
        "Resident memory size, in bytes",
        None,
        MetricType::Gauge,
    )?)?;
    ConstGauge::new(stat.virtual_bytes as i64).encode(encoder.encode_descriptor(
        "process_virtual_memory_bytes",
        "Virtual memory size, in bytes",
        None,
        MetricType::Gauge,
    )?)?;
    ConstGauge::new(stat.threads as i64).encode(encoder.encode_descriptor(
        "process_threads",
        "Threads of the process",
        None,
        MetricType::Gauge,
    )?)?;
    if let Some(fds) = open_fds() {
        ConstGauge::new(fds as i64).encode(encoder.encode_descriptor(
            "process_open_fds",
            "Open file descriptors",
            None,
            MetricType::Gauge,
        )?)?;
    }
    if let Some(max) = max_fds() {
        ConstGauge::new(max as i64).encode(encoder.encode_descriptor(
            "process_max_fds",
            "The most file descriptors the process may open",
            None,
            MetricType::Gauge,
        )?)?;
    }
    Ok(())
}

/// What `/proc/self/stat` says.
struct Stat {
    cpu_seconds: f64,
    virtual_bytes: u64,
    resident_bytes: u64,
    threads: u64,
}

impl Stat {
    fn read() -> Option<Stat> {
        let text = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name (field 2) is in parentheses and may hold
        // spaces; the fields after its closing one are plain numbers.
        let rest = &text[text.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // Fields 3.. of proc(5), so field n is fields[n - 3].
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
        let ticks = field(14)? + field(15)?;
        Some(Stat {
            cpu_seconds: ticks as f64 / TICKS_PER_SECOND,
            threads: field(20)?,
            virtual_bytes: field(23)?,
            resident_bytes: field(24)? * PAGE_BYTES,
        })
    }
}

fn open_fds() -> Option<usize> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count())
}

fn max_fds() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}
