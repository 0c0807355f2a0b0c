//! Compiles the protobuf contract in `proto/` without a system `protoc`:
//! protox parses it (keeping comments, so reflection shows them), and
//! tonic-prost-build generates the messages, clients and servers (whose
//! codec is `api::codec::BoundedCodec`).

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
    // Type names let the codec tell which request it decodes; the codec
    // scans each request before prost allocates for it.
    let mut config = tonic_prost_build::Config::new();
    config.enable_type_names();
    tonic_prost_build::configure()
        .codec_path("crate::api::codec::BoundedCodec")
        .compile_fds_with_config(fds, config)?;
    Ok(())
}
