//! upgate-core: the upload gateway as a library.
//!
//! What flows through here, from the edge down (each folder imports only those below it):
//! - [`daemon`]: listeners, signals, operator commands, background workers;
//! - [`http`]: the actix edge; `http::dialects` parse each vendor's requests and render its
//!   answers, `http::respond` turns errors into responses, `http::request_log` logs;
//! - [`upload`]: the shared flow, one file per step: admit, intake, record, deliver,
//!   chunked, delete;
//! - the seams the flow reaches its state through: [`store`] (records, sessions, outbox,
//!   usage; SQLite), [`spool`] (bytes waiting; local disk), [`limits`] (rate, concurrency,
//!   quota; in-process), and the provider [`plugins`];
//! - [`policy`] (tenants, plans, keys compiled from [`config`]), [`content`] checks,
//!   [`metrics`], the neutral [`error`], and [`vocab`] (dialect names, id formats, the
//!   clock) below everything.
//!
//! `unsafe` is denied everywhere except the plugin loader (`plugins::loader`).
#![deny(unsafe_code)]

pub mod config;
pub(crate) mod content;
pub mod daemon;
pub(crate) mod error;
pub(crate) mod http;
pub(crate) mod limits;
pub mod metrics;
pub mod plugins;
pub mod policy;
pub(crate) mod spool;
pub(crate) mod store;
pub(crate) mod upload;
pub mod vocab;
