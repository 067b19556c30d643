//! A plugin call on a blocking thread that the host may stop waiting for.
//!
//! What flows through here: one plugin call's result, from the blocking thread that runs it
//! to the request that waits for it, through a oneshot channel. A request that stops
//! waiting (its deadline passed, or it was dropped because the client went away) closes the
//! channel; a result that then arrives is nobody's, and its `unclaimed` handler gets it: for
//! a put that stored the upload, a delete, so that no upstream copy outlives a record that
//! says the delivery failed (or is stored twice by the retry that follows). Exactly one side
//! sees each result: the waiting request, or the handler.

use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, oneshot};
use tokio::time::Instant;
use upgate_plugin_api::{DeleteRequest, ErrorKind, PluginError, PutResult};

use crate::plugins::Provider;

use super::Metadata;

/// What becomes of a successful result that nobody waits for any more.
type Unclaimed<T> = Arc<Mutex<Option<Box<dyn FnOnce(T) + Send>>>>;

/// A plugin call running on a blocking thread.
pub(crate) struct PendingCall<T: Send + 'static> {
    result: oneshot::Receiver<Result<T, PluginError>>,
    unclaimed: Unclaimed<T>,
}

impl<T: Send + 'static> PendingCall<T> {
    /// Runs `call` on a blocking thread that holds `slot` (a delivery slot) until the plugin
    /// returns, even when the host stopped waiting: `forward_concurrency` bounds real threads.
    pub(crate) fn spawn(
        provider: &Arc<Provider>,
        slot: OwnedSemaphorePermit,
        call: impl FnOnce(&Provider) -> Result<T, PluginError> + Send + 'static,
        unclaimed: Option<Box<dyn FnOnce(T) + Send>>,
    ) -> Self {
        let (sender, receiver) = oneshot::channel();
        let unclaimed: Unclaimed<T> = Arc::new(Mutex::new(unclaimed));
        let handler = unclaimed.clone();
        let worker = provider.clone();
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            if let Err(Ok(value)) = sender.send(call(&worker))
                && let Some(unclaimed) = take(&handler)
            {
                unclaimed(value);
            }
        });
        Self {
            result: receiver,
            unclaimed,
        }
    }

    /// The call's result, waited for until `deadline`; a result that arrives after it is
    /// left to the `unclaimed` handler. A call that panicked past the ABI's guard, or whose
    /// thread was lost, is a `Panic` error.
    pub(crate) async fn wait_until(&mut self, deadline: Instant) -> Result<T, PluginError> {
        match tokio::time::timeout_at(deadline, &mut self.result).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(PluginError::new(ErrorKind::Panic, "plugin call aborted")),
            Err(_) => {
                // Closed first: from here on the thread hands a late result to the handler;
                // one that arrived just before is still this request's.
                self.result.close();
                self.result.try_recv().unwrap_or_else(|_| {
                    Err(PluginError::new(
                        ErrorKind::Timeout,
                        "no answer from the provider in time",
                    ))
                })
            }
        }
    }
}

impl<T: Send + 'static> Drop for PendingCall<T> {
    fn drop(&mut self) {
        self.result.close();
        // A result that arrived while nobody read it any more: the handler's, off this thread
        // (a delete is a blocking plugin call).
        if let Ok(Ok(value)) = self.result.try_recv()
            && let Some(unclaimed) = take(&self.unclaimed)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn_blocking(move || unclaimed(value));
        }
    }
}

fn take<T>(unclaimed: &Unclaimed<T>) -> Option<Box<dyn FnOnce(T) + Send>> {
    unclaimed.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// The delete of what a put of upload `upload_id` stored, but for the remote id the put
/// answers.
pub(crate) fn delete_of(upload_id: &str, dialect: &str, metadata: &Metadata) -> DeleteRequest {
    DeleteRequest {
        upload_id: upload_id.to_owned(),
        remote_id: String::new(),
        metadata: metadata.clone(),
        dialect: dialect.to_owned(),
    }
}

/// The `unclaimed` handler of a put: deletes what it stored (a provider that cannot delete
/// says so, and the copy is only logged).
pub(crate) fn delete_unclaimed(
    provider: &Arc<Provider>,
    delete: DeleteRequest,
) -> Box<dyn FnOnce(PutResult) + Send> {
    let provider = provider.clone();
    Box::new(move |stored: PutResult| {
        forget_stored(
            &provider,
            DeleteRequest {
                remote_id: stored.remote_id,
                ..delete
            },
        )
    })
}

/// Deletes an upload a provider stored although nobody takes it any more.
pub(crate) fn forget_stored(provider: &Provider, delete: DeleteRequest) {
    let upload_id = &delete.upload_id;
    match provider.delete(&delete) {
        Ok(()) => tracing::info!(%upload_id, provider = %provider.name,
            "an upload stored after the host stopped waiting was deleted upstream"),
        Err(error) if error.kind == ErrorKind::NotFound => {}
        Err(error) => tracing::warn!(%upload_id, provider = %provider.name, %error,
            "an upload stored after the host stopped waiting cannot be deleted upstream"),
    }
}
