//! upgate-core: the upload gateway as a library.
//!
//! What flows through here, end to end: an HTTP upload in one of five vendor dialects
//! ([`dialects`]) is authenticated and limited ([`policy`]), streamed to a spool file with
//! its size capped and its sha256 and content type established on the way ([`intake`],
//! [`content`]), recorded in SQLite ([`store`]), and handed to the tenant's provider plugin
//! ([`plugins`], [`forward`]); the client gets the record, or an [`error::ApiError`], in its
//! own dialect. [`gateway`] is the shared flow; [`server`] runs it; [`config`] feeds it.
//!
//! `unsafe` is denied everywhere except the plugin loader (`plugins::loader`).
#![deny(unsafe_code)]

pub mod config;
pub mod content;
pub mod dialects;
pub mod error;
pub mod forward;
pub mod gateway;
pub mod intake;
pub mod metrics;
pub mod plugins;
pub mod policy;
pub mod server;
pub mod sessions;
pub mod store;
