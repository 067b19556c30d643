//! The runtime a shared engine's client (PostgreSQL, Redis) does its socket I/O on: a
//! current-thread tokio runtime on a thread of its own, so the engine's connections outlive
//! any one actix worker and a worker's restart never drops them.
//!
//! What flows through here: nothing but the thread's lifetime; it ends when the returned
//! sender is dropped.

use tokio::sync::oneshot;

/// Starts the runtime on a thread named `name`; its handle, and the sender whose drop stops it.
pub(crate) fn start(name: &str) -> Result<(tokio::runtime::Handle, oneshot::Sender<()>), std::io::Error> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = runtime.handle().clone();
    let (stop, stopped) = oneshot::channel::<()>();
    std::thread::Builder::new().name(name.into()).spawn(move || {
        let _ = runtime.block_on(stopped);
    })?;
    Ok((handle, stop))
}
