//! Fuzz target: the placement Requirements parser and evaluator on
//! arbitrary bytes (see `dcv_broker_fuzz::requirements`).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dcv_broker_fuzz::requirements::run(data));
