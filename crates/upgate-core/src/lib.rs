//! upgate-core: the upload gateway as a library.
//!
//! What flows through here, from the edge down (each folder imports only those below it):
//! - [`daemon`]: listeners, signals, operator commands, background workers;
//! - [`http`]: the actix edge; `http::dialects` parse each vendor's requests and render its
//!   answers, `http::respond` turns errors into responses, `http::request_log` logs;
//! - [`upload`]: the shared flow, one file per step: admit, intake, record, deliver,
//!   chunked, delete;
//! - the seams the flow reaches its state through: [`store`] (records, sessions, outbox,
//!   usage; SQLite, or PostgreSQL shared by several nodes), [`spool`] (bytes waiting; local
//!   disk), [`limits`] (rate, concurrency, quota; in-process, or rate and tenant concurrency
//!   in Redis shared by several nodes), and the provider [`plugins`];
//! - [`policy`] (tenants, plans, keys compiled from [`config`]), [`content`] checks,
//!   [`metrics`], the neutral [`error`], and [`vocab`] (dialect names, id formats, the
//!   clock) below everything.
//!
//! `unsafe` is denied everywhere except the plugin loader (`plugins::loader`).
#![deny(unsafe_code)]
// Everything is crate-private but what the CLI and the benches use, re-exported below.
#![warn(unreachable_pub)]

mod config;
mod content;
mod daemon;
mod driver;
mod error;
mod http;
mod limits;
mod metrics;
mod plugins;
mod policy;
mod spool;
mod store;
mod upload;
mod vocab;

pub use config::{Config, ConfigError};
pub use daemon::{
    ServeError, check, delete_upload, list_sessions, list_uploads, load, retry_upload, serve, show_upload,
};
pub use plugins::{LoadedPlugin, PluginHostError, discover};
pub use policy::{Policy, Tenant};
pub use store::{Concat, SessionRecord, UploadFilter, UploadRecord, UploadState};
pub use vocab::{DialectName, is_unseen_control, stored_time};
