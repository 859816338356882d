//! # palaver-proto: the wire contracts
//!
//! The `.proto` files under `proto/palaver/v1/` are the contract between palaver and its
//! clients (`ChatService`), its operators (`AdminService`) and its own nodes (`PeerService`).
//! This crate holds the code generated from them (prost messages, tonic clients and servers)
//! and the encoded file descriptor set that gRPC server reflection serves.
//!
//! Versioning: the package is `palaver.v1`; fields and enum values are only ever added, and a
//! field number is never reused. A breaking change is a new package.

/// Generated messages and services of `palaver.v1`.
#[allow(missing_docs, clippy::all, missing_debug_implementations)]
pub mod v1 {
    tonic::include_proto!("palaver.v1");
}

/// The encoded `FileDescriptorSet` of every palaver proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/palaver_descriptor.bin"));
