//! The upload flow every dialect shares, one file per step.
//!
//! What flows through here, in order: a dialect's request, as calls on the [`Gateway`]:
//! [`admit`] (key, dialect grant, rate, concurrency, disk floor, quota room) gives an
//! [`admit::Admission`]; [`intake`] streams a multipart body into the spool; [`record`]
//! accounts quota, writes the records and hands each file to [`deliver`] (sync: the
//! provider plugin now, with retries; async: the outbox); [`chunked`] keeps sessions of
//! chunks and joins them into one upload at completion; [`delete`] undoes an upload. Out
//! come the stored [`UploadRecord`](crate::store::UploadRecord)s for the dialect to
//! render, or an [`ApiError`](crate::error::ApiError). The gateway reaches its state only
//! through the seams: [`Store`], [`Spool`], [`Limiter`]. This folder knows nothing of
//! actix's request type or of any dialect's shapes.

pub(crate) mod admit;
pub(crate) mod chunked;
pub(crate) mod delete;
pub(crate) mod deliver;
pub(crate) mod hold;
pub(crate) mod intake;
pub(crate) mod pass_through;
pub(crate) mod plugin_call;
pub(crate) mod record;
pub(crate) mod resumable;
pub(crate) mod running_hash;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::{Notify, Semaphore};

use crate::error::ApiError;
use crate::limits::Limiter;
use crate::policy::Policy;
use crate::spool::{IntakeBudget, Spool};
use crate::store::{SessionRecord, Store, StoreError, UploadRecord, UploadState};

/// How long a request waits for the spool to remove bytes before it answers anyway
/// ([`Gateway::remove_spooled`]).
const REMOVAL_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Metadata a dialect passes along with its files (string values).
pub(crate) type Metadata = serde_json::Map<String, serde_json::Value>;

/// Shared state of the running daemon.
pub(crate) struct Gateway {
    policy: RwLock<Arc<Policy>>,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) spool: Arc<dyn Spool>,
    pub(crate) limiter: Arc<dyn Limiter>,
    /// Plugin calls in flight (each holds a blocking thread): `forward_concurrency`.
    pub(crate) delivery_slots: Arc<Semaphore>,
    /// The share of those slots pass-through deliveries may hold (half, rounded up): a
    /// stream holds its slot for as long as its client sends, so slow clients must not
    /// take the slots every stored delivery, retry, outbox attempt and delete waits for.
    pub(crate) streaming_slots: Arc<Semaphore>,
    /// Wakes the outbox worker when an async upload is accepted.
    pub(crate) outbox_wake: Notify,
    /// The memory the spool writers share (`server.intake_memory`).
    pub(crate) intake_budget: IntakeBudget,
    /// Whether the last measurement of `data_dir` was under `disk_free_floor`.
    below_disk_floor: AtomicBool,
    /// Set when the daemon stops: the background loops take no new work.
    stopping: AtomicBool,
    /// Taken while a session start counts the tenant's open sessions and inserts its own.
    pub(crate) session_starts: tokio::sync::Mutex<()>,
}

impl Gateway {
    pub(crate) fn new(
        policy: Policy,
        store: Arc<dyn Store>,
        spool: Arc<dyn Spool>,
        limiter: Arc<dyn Limiter>,
    ) -> Self {
        let slots = policy.config.server.forward_concurrency.max(1);
        let intake_budget = IntakeBudget::new(policy.config.server.intake_memory.0);
        Self {
            policy: RwLock::new(Arc::new(policy)),
            store,
            spool,
            limiter,
            delivery_slots: Arc::new(Semaphore::new(slots)),
            streaming_slots: Arc::new(Semaphore::new(slots.div_ceil(2))),
            outbox_wake: Notify::new(),
            intake_budget,
            below_disk_floor: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            session_starts: tokio::sync::Mutex::new(()),
        }
    }

    /// The current policy snapshot.
    pub(crate) fn policy(&self) -> Arc<Policy> {
        self.policy.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Swaps in a new policy; requests in flight keep the old one.
    pub(crate) fn replace_policy(&self, policy: Policy) {
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
    }

    /// Records a measurement of free space in `data_dir` against its floor.
    pub(crate) fn set_below_disk_floor(&self, below: bool) {
        self.below_disk_floor.store(below, Ordering::Relaxed);
    }

    /// The daemon is stopping: the outbox claims nothing more (and is woken to see it).
    pub(crate) fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.outbox_wake.notify_waiters();
    }

    /// Whether the daemon is stopping.
    pub(crate) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Removes a session's bytes from the spool (a Kore session's chunks, a tus upload's file)
    /// and forgets its running hash; its row is the caller's.
    pub(crate) async fn remove_session_files(&self, id: &str) {
        running_hash::RunningHash::forget(id);
        let (spool, session) = (self.spool.clone(), id.to_owned());
        self.remove_spooled(id, move || {
            spool.remove_session(&session);
            Ok(())
        })
        .await;
    }

    /// Removes bytes nobody needs any more (`removal`, blocking) and waits for it at most
    /// [`REMOVAL_WAIT`]: a shared spool that stopped answering must not hold a client's
    /// answer for the length of its own timeouts. A removal still running then finishes on
    /// its own; a failure is logged, and the orphan sweeps remove what it left.
    pub(crate) async fn remove_spooled(
        &self,
        id: &str,
        removal: impl FnOnce() -> std::io::Result<()> + Send + 'static,
    ) {
        let upload_id = id.to_owned();
        let removing = tokio::spawn(async move {
            let error = match tokio::task::spawn_blocking(removal).await {
                Ok(Ok(())) => return,
                Ok(Err(error)) => error.to_string(),
                Err(error) => error.to_string(),
            };
            tracing::warn!(%upload_id, %error, "cannot remove the spooled bytes");
        });
        if tokio::time::timeout(REMOVAL_WAIT, removing).await.is_err() {
            tracing::warn!(upload_id = %id, "the spool is slow to remove the spooled bytes: answering, still removing");
        }
    }

    /// What the completion noted in `session` came to (a chunked session's `complete`, a
    /// tus upload's last bytes note the upload's id before recording it, and take it back
    /// when they fail), so that a completion that ended is never made twice and one that
    /// did not is made again from the session's bytes, which stay until one succeeds.
    pub(crate) async fn noted_upload(
        &self,
        tenant: &str,
        session: &SessionRecord,
    ) -> Result<Noted, StoreError> {
        let Some(noted) = &session.upload_id else {
            return Ok(Noted::Unmade);
        };
        let record = self.store.upload_of(tenant.to_owned(), noted.clone()).await?;
        Ok(match record {
            None => Noted::Unmade,
            Some(record) => match record.state {
                UploadState::Delivering => Noted::Running,
                UploadState::Failed if record::was_interrupted(&record) => Noted::Unmade,
                UploadState::Failed => Noted::Failed,
                UploadState::Received | UploadState::Forwarded | UploadState::Deleted => {
                    Noted::Made(Box::new(record))
                }
            },
        })
    }

    /// Runs `completion`, which records upload `upload_id` of session `session`, with the id
    /// noted in the session first ([`Gateway::noted_upload`] reads it) and taken back if
    /// `completion` fails.
    pub(crate) async fn noting<T>(
        &self,
        session: &str,
        upload_id: &str,
        completion: impl Future<Output = Result<T, ApiError>>,
    ) -> Result<T, ApiError> {
        self.store
            .set_session_upload(session.to_owned(), Some(upload_id.to_owned()))
            .await?;
        let completed = completion.await;
        if completed.is_err()
            && let Err(error) = self.store.set_session_upload(session.to_owned(), None).await
        {
            tracing::warn!(session_id = %session, %error, "cannot take back the upload id noted in a session");
        }
        completed
    }

    /// Whether uploads are refused for lack of disk space.
    pub(crate) fn below_disk_floor(&self) -> bool {
        self.below_disk_floor.load(Ordering::Relaxed)
    }
}

/// What the completion noted in a session came to ([`Gateway::noted_upload`]).
#[derive(Debug)]
pub(crate) enum Noted {
    /// None noted, or one that never ended: noted and not recorded, or recorded but its
    /// sync delivery cut off by the daemon's death. The session is to be completed (again).
    Unmade,
    /// Its sync delivery is running (or its daemon died and the delivery's lease has not
    /// run out yet): wait, it may still reach the provider.
    Running,
    /// Recorded, delivered or on its way: the session's answer.
    Made(Box<UploadRecord>),
    /// Recorded, and its delivery failed. The answer when it was answered so (its bytes
    /// gone with its success, then an async delivery failed); completed again when its
    /// bytes are still there (the failure was this completion's, and taking the note back
    /// failed, or the daemon died before).
    Failed,
}

/// Removes a file if it is there. A single unlink: cheaper inline than on another thread.
pub(crate) fn remove_quietly(path: &Path) {
    let _ = std::fs::remove_file(path);
}
