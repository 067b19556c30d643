//! Test support for upgate: the end-to-end harness (the real daemon and plugins),
//! faithful mock servers for the five vendor APIs, a TLS front to put before them, a real
//! PostgreSQL and Redis of the tests' own for cluster mode, and a real SeaweedFS (S3) for
//! the spool.

pub mod harness;
pub mod inbound;
pub mod mock;
pub mod postgres;
pub mod redis;
pub mod seaweedfs;
pub mod tls;
