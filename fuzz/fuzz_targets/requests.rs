//! Fuzz target: every request message of every RPC, decoded and driven
//! through its real handler against a live in-process fleet (see
//! `dcv_broker_fuzz::requests`).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dcv_broker_fuzz::requests::run(data));
