//! Compiles the public berth.v1 protos (server and client) and the descriptor set for reflection.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "../../proto/berth/v1/agent.proto",
        "../../proto/berth/v1/secrets.proto",
    ];
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("berth_v1_descriptor.bin"))
        .compile_protos(&protos, &["../../proto"])?;
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
