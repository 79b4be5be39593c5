//! Generates the gRPC code of `proto/cairn/coordinator/v1/coordinator.proto`
//! and the file descriptor set that server reflection serves.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let file = proto_root.join("cairn/coordinator/v1/coordinator.proto");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed={}", file.display());
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("cairn_coordinator_v1.bin"))
        .compile_protos(&[file], &[proto_root])?;
    Ok(())
}
