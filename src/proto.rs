//! Generated protobuf messages and the gRPC client for `lamplight.v1`, and the descriptor set that server
//! reflection serves. The generated *server* trait lives in [`server`], where `SubscribeResponse` is the
//! pre-encoded [`crate::wire::SharedResponse`].

/// Messages and client of `lamplight.v1` (the contract in `proto/lamplight/v1/events.proto`).
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("lamplight.v1");
}

/// The generated `EventService` server trait, whose stream items are pre-encoded responses.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub(crate) mod server {
    include!(concat!(env!("OUT_DIR"), "/server/lamplight.v1.rs"));
}

/// Encoded `FileDescriptorSet` of `proto/` (with its imports), for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/lamplight_descriptor.bin"));
