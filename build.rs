//! Compiles `proto/` with protox (pure Rust, no system `protoc`).
//!
//! Two code generation passes over the same descriptors:
//! 1. messages + client + the descriptor set served by reflection (`OUT_DIR/lamplight.v1.rs`);
//! 2. the server trait alone (`OUT_DIR/server/lamplight.v1.rs`), with `SubscribeResponse` mapped to
//!    `crate::wire::SharedResponse`, so each event is encoded once at publish and every subscriber's stream
//!    writes the same refcounted bytes instead of re-encoding (or deep-copying) it.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["lamplight/v1/events.proto"], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("lamplight_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_fds(fds.clone())?;

    let server_out = out.join("server");
    std::fs::create_dir_all(&server_out)?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(false)
        .out_dir(&server_out)
        .extern_path(".lamplight.v1", "crate::proto::v1")
        .extern_path(
            ".lamplight.v1.SubscribeResponse",
            "crate::wire::SharedResponse",
        )
        .codec_path("crate::wire::Codec")
        .compile_fds(fds)?;
    Ok(())
}
