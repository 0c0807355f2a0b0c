//! Code the benchmarks share (each bench binary includes what it uses).

pub mod procfs;
