//! Writes the committed seed corpus, `fuzz/corpus/<target>/`, from
//! `dcv_broker_fuzz::seeds`: run it after changing the seeds or the proto
//! (`cargo run --manifest-path fuzz/Cargo.toml --example write_seeds`).
//! Seeds are added or replaced by name; other files (inputs the fuzzer
//! found and someone chose to keep) are left alone.

use std::{fs, path::Path};

use dcv_broker_fuzz::seeds::{self, Seed};

fn write(target: &str, seeds: Vec<Seed>) -> std::io::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    fs::create_dir_all(&dir)?;
    for (name, bytes) in &seeds {
        fs::write(dir.join(name), bytes)?;
    }
    println!("{} seeds in {}", seeds.len(), dir.display());
    Ok(())
}

fn main() -> std::io::Result<()> {
    write("requests", seeds::requests())?;
    write("requirements", seeds::requirements())
}
