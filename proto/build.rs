//! Compiles `halo/v1/*.proto` with protox (pure Rust), so the API crate
//! needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["halo/v1/agent.proto", "halo/v1/controller.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    println!("cargo:rerun-if-changed=halo/v1/types.proto");
    let fds = protox::compile(files, ["."])?;
    // The encoded descriptors, for gRPC server reflection.
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("halo_v1_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // prost's codec, with undecodable messages as INVALID_ARGUMENT.
        .codec_path("crate::limits::Codec")
        .compile_fds(fds)?;
    Ok(())
}
