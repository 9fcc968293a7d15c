//! lamplight: a gRPC-native real-time event service.
//!
//! Backend services `Publish` events to rooms; browsers and services `Subscribe` to rooms over gRPC or
//! grpc-web and receive them live, with replay of what they missed after a reconnect. See
//! `ARCHITECTURE.md` for the path of one event, and the README for the room and claim model.
//!
//! Modules, by concept: [`config`] (flags and env), [`auth`] (JWT -> principal), [`rooms`] (room grammar),
//! [`policy`] (who may do what), [`service`] (the gRPC handlers), [`bus`] (ids, history, fan-out; one
//! trait, several transports), [`presence`], [`statuses`] (coalesced ONLINE/OFFLINE events), [`ratelimit`], [`wire`] (pre-encoded responses), [`error`]
//! (the one mapping to `tonic::Status`), [`server`] (assembly and middleware), [`listener`] (accepting
//! connections, their limits and settings), [`limits`] (streams per user), [`watchdog`] (ending streams the
//! server cannot write to), [`admin`] (membership changes on live streams), [`shutdown`], [`tls`], [`cli`].
#![warn(missing_docs, unreachable_pub)]

pub mod admin;
pub mod auth;
#[cfg(feature = "client")]
pub mod bench;
pub mod bus;
pub mod cli;
#[cfg(feature = "client")]
pub mod client;
pub mod config;
pub mod error;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod policy;
pub mod presence;
pub mod proto;
pub mod ratelimit;
pub mod rooms;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod statuses;
pub mod tls;
pub mod watchdog;
pub mod wire;

pub use config::Config;
pub use server::{serve, ServeError};
