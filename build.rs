//! Compiles the protobuf contract in `proto/` without a system `protoc`:
//! protox parses it (keeping comments, so reflection shows them), and
//! tonic-prost-build generates the messages, clients and servers.

use std::{env, fs, path::PathBuf};

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/dcv/sessionmanager/v1/types.proto",
        "proto/dcv/sessionmanager/v1/servers.proto",
        "proto/dcv/sessionmanager/v1/agent.proto",
        "proto/dcv/sessionmanager/v1/sessions.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("dcv_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
