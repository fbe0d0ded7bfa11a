//! Compiles `arcfed/v1/*.proto` with protox (pure Rust), so no system `protoc` is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=arcfed");
    let files = ["arcfed/v1/agent.proto", "arcfed/v1/admin.proto", "arcfed/v1/raft.proto"];
    let fds = protox::compile(files, ["."])?;
    // Small per-stream buffers: a leader holds one stream per agent (src/codec.rs).
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .codec_path("crate::codec::SmallCodec")
        .compile_fds(fds)?;
    Ok(())
}
