//! Generates the gRPC code of both packages (`cairn.agent.v1`,
//! `cairn.coordinator.v1`) and the file descriptor sets that server
//! reflection serves.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    for (file, set) in [
        ("cairn/agent/v1/agent.proto", "cairn_agent_v1.bin"),
        (
            "cairn/coordinator/v1/coordinator.proto",
            "cairn_coordinator_v1.bin",
        ),
    ] {
        let path = root.join(file);
        println!("cargo:rerun-if-changed={}", path.display());
        tonic_prost_build::configure()
            .codec_path("crate::codec::Codec")
            .file_descriptor_set_path(out.join(set))
            .compile_protos(&[path], &[root.to_path_buf()])?;
    }
    Ok(())
}
