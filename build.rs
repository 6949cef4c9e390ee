//! Generates the scand.v1 types, services and the descriptor set served by gRPC reflection,
//! and the storage messages of scand.storage.v1 (values and changelog snapshots).
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc: a fresh machine needs no system protobuf compiler.
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("scand_descriptor.bin"))
        .compile_protos(&["proto/scand/v1/scand.proto"], &["proto"])?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .extern_path(".scand.v1", "crate::proto::pb")
        // A record is decoded from one shared buffer its entries' scans point into.
        .bytes(".scand.storage.v1.EntryRecord.event")
        .compile_protos(&["proto/scand/storage/v1/storage.proto"], &["proto"])?;
    Ok(())
}
