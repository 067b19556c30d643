//! Test support for upgate: the end-to-end harness (the real daemon and plugins) and
//! faithful mock servers for the five vendor APIs, and a TLS front to put before them.

pub mod harness;
pub mod inbound;
pub mod mock;
pub mod postgres;
pub mod tls;
