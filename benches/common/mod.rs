//! Code the benchmarks share (each bench binary includes what it uses).

pub mod procfs;

/// Pins every thread of this process to `cpu` (with util-linux's
/// `taskset`), warning if it cannot.
#[allow(dead_code)] // Not every benchmark pins itself.
pub fn pin_self(cpu: usize) {
    let pid = std::process::id().to_string();
    let ok = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string(), &pid])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("warning: could not pin the generator to CPU {cpu}");
    }
}
