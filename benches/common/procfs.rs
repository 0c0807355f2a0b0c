//! What the benchmarks read about a process from `/proc`: CPU time,
//! resident memory, open file descriptors.

/// User plus system CPU seconds `pid` has used so far (0 if it is gone).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which may hold spaces: state is
    // field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| {
        f.iter().map(|t| t.parse::<f64>().unwrap_or(0.0)).sum()
    });
    // USER_HZ is 100 on every Linux we run on.
    ticks / 100.0
}

/// `pid`'s resident memory (VmRSS), in bytes (0 if it is gone).
#[allow(dead_code)] // Not every benchmark asks.
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// How many file descriptors `pid` has open (0 if it is gone).
#[allow(dead_code)] // Not every benchmark asks.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The median (the upper one of an even count; 0 for none).
#[allow(dead_code)] // Not every benchmark asks.
pub fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}
