//! One request at a time per session (a chunked session, a tus upload, an upload being
//! deleted).
//!
//! What flows through here: session and upload ids. [`lock_session`] is the lock of this
//! process: a second request on the same id waits for the first. [`hold_session`] adds,
//! when the store is shared between nodes, a lease in the store, so that a request on
//! another node is refused ([`ApiError::SessionBusy`], 409) instead of interleaving; the
//! lease is renewed while it is held and released when the hold is dropped, and a lease
//! whose node died stops counting after [`SESSION_LEASE`].

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use tokio::sync::OwnedMutexGuard;
use tokio::task::JoinHandle;

use crate::error::ApiError;
use crate::store::Store;
use crate::vocab::now_ms;

/// How long a lease counts without being renewed; it is renewed every third of that.
pub(crate) const SESSION_LEASE: Duration = Duration::from_secs(30);

/// One lock per session id, created on demand and dropped with its last user.
type LockMap = HashMap<String, Arc<tokio::sync::Mutex<()>>>;
static LOCKS: LazyLock<Mutex<LockMap>> = LazyLock::new(Default::default);

/// Holds a session's lock; removes the lock from the registry when nobody else uses it.
pub(crate) struct SessionLock {
    id: String,
    mutex: Option<Arc<tokio::sync::Mutex<()>>>,
    guard: Option<OwnedMutexGuard<()>>,
}

/// Waits for the lock of session `id`.
pub(crate) async fn lock_session(id: &str) -> SessionLock {
    // Registered before waiting, so a cancelled wait still cleans the registry up.
    let (mut lock, mutex) = SessionLock::registered(id);
    lock.guard = Some(mutex.lock_owned().await);
    lock
}

/// The lock of session `id` if nobody holds it now; `None` without waiting when a request
/// does (for the sweeps, which must never wait on a client).
pub(crate) fn try_lock_session(id: &str) -> Option<SessionLock> {
    let (mut lock, mutex) = SessionLock::registered(id);
    lock.guard = Some(mutex.try_lock_owned().ok()?);
    Some(lock)
}

impl SessionLock {
    /// Not held yet: the registry's lock of `id` (created if none), and its mutex to take.
    fn registered(id: &str) -> (Self, Arc<tokio::sync::Mutex<()>>) {
        let mutex = LOCKS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.to_owned())
            .or_default()
            .clone();
        let lock = Self {
            id: id.to_owned(),
            mutex: Some(mutex.clone()),
            guard: None,
        };
        (lock, mutex)
    }
}

impl Drop for SessionLock {
    fn drop(&mut self) {
        self.guard.take();
        self.mutex.take();
        let mut locks = LOCKS.lock().unwrap_or_else(|e| e.into_inner());
        if locks
            .get(&self.id)
            .is_some_and(|mutex| Arc::strong_count(mutex) == 1)
        {
            locks.remove(&self.id);
        }
    }
}

/// A session held by one request: this process's lock and, in a shared store, the lease.
pub(crate) struct SessionHold {
    _lock: SessionLock,
    _lease: Option<Lease>,
}

/// A lease taken in the store, renewed by a task until dropped, then released.
struct Lease {
    store: Arc<dyn Store>,
    id: String,
    holder: String,
    renewal: JoinHandle<()>,
}

/// Waits for this process's lock of session `id`, then takes its lease in a shared store:
/// [`ApiError::SessionBusy`] while another node's request holds it. When another request of
/// this process holds the lock, `if_busy` runs first and its error is the answer: the
/// caller's check that the id is the client's, so that a stranger is answered at once
/// instead of after a wait that would tell the id exists.
pub(crate) async fn hold_session(
    store: &Arc<dyn Store>,
    id: &str,
    if_busy: impl Future<Output = Result<(), ApiError>>,
) -> Result<SessionHold, ApiError> {
    let lock = match try_lock_session(id) {
        Some(lock) => lock,
        None => {
            if_busy.await?;
            lock_session(id).await
        }
    };
    if !store.is_shared() {
        return Ok(SessionHold {
            _lock: lock,
            _lease: None,
        });
    }
    let holder = uuid::Uuid::new_v4().simple().to_string();
    let lease_ms = SESSION_LEASE.as_millis() as i64;
    let now = now_ms();
    if !store
        .lease_session(id.to_owned(), holder.clone(), now, now + lease_ms)
        .await?
    {
        return Err(ApiError::SessionBusy);
    }
    let renewal = tokio::spawn({
        let (store, id, holder) = (store.clone(), id.to_owned(), holder.clone());
        async move {
            loop {
                tokio::time::sleep(SESSION_LEASE / 3).await;
                let now = now_ms();
                match store
                    .lease_session(id.clone(), holder.clone(), now, now + lease_ms)
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(session_id = %id, "a session's lease was taken over while held");
                        return;
                    }
                    Err(error) => tracing::warn!(session_id = %id, %error, "cannot renew a session's lease"),
                }
            }
        }
    });
    Ok(SessionHold {
        _lock: lock,
        _lease: Some(Lease {
            store: store.clone(),
            id: id.to_owned(),
            holder,
            renewal,
        }),
    })
}

impl SessionHold {
    /// Releases the lease now (before the client is answered, so that its next request may
    /// go to any node at once), then the lock.
    pub(crate) async fn release(mut self) {
        if let Some(mut lease) = self._lease.take() {
            lease.renewal.abort();
            let (id, holder) = (std::mem::take(&mut lease.id), std::mem::take(&mut lease.holder));
            release_lease(lease.store.clone(), id, holder).await;
        }
    }
}

/// Releases a lease; when the store cannot be asked (down, restarting), asks again every
/// second in the background until it answers or the lease has ended by itself. Otherwise
/// a store that is back would refuse the session's next request (409) on every node,
/// this one included, until the lease ran out.
async fn release_lease(store: Arc<dyn Store>, id: String, holder: String) {
    let Err(error) = store.release_session_lease(id.clone(), holder.clone()).await else {
        return;
    };
    tracing::warn!(session_id = %id, %error, "cannot release a session's lease; trying again until the store answers");
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let given_up = tokio::time::Instant::now() + SESSION_LEASE;
        while tokio::time::Instant::now() < given_up {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if store
                .release_session_lease(id.clone(), holder.clone())
                .await
                .is_ok()
            {
                tracing::info!(session_id = %id, "a session's lease released once the store answered");
                return;
            }
        }
    });
}

/// Runs `work` holding session `id` ([`hold_session`], `if_busy` included), and releases it
/// before returning, whatever `work` returned.
pub(crate) async fn holding<T>(
    store: &Arc<dyn Store>,
    id: &str,
    if_busy: impl Future<Output = Result<(), ApiError>>,
    work: impl Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    let hold = hold_session(store, id, if_busy).await?;
    let result = work.await;
    hold.release().await;
    result
}

impl Drop for Lease {
    /// A hold dropped without [`SessionHold::release`] (its request was cancelled) releases
    /// in the background.
    fn drop(&mut self) {
        self.renewal.abort();
        if self.holder.is_empty() {
            return;
        }
        let (store, id, holder) = (
            self.store.clone(),
            std::mem::take(&mut self.id),
            std::mem::take(&mut self.holder),
        );
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(release_lease(store, id, holder));
        }
    }
}

#[cfg(test)]
mod tests;
