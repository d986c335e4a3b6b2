//! Compiles `halo/v1/*.proto` with protox (pure Rust), so no system `protoc`
//! is needed to build halo.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["halo/v1/agent.proto", "halo/v1/controller.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    println!("cargo:rerun-if-changed=halo/v1/types.proto");
    let fds = protox::compile(files, ["."])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
