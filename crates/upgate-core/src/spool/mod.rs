//! The spool: bytes waiting for delivery or assembly.
//!
//! What flows through here: the body bytes of each file, streamed through a [`SpoolWriter`]
//! (size capped mid-stream, sha256, the first bytes kept for content sniffing, UTF-8
//! checked for text) into a `.part` file; complete files ([`SpooledFile`]) made durable
//! when they must outlive the request (async delivery); chunks of sessions placed where
//! their session keeps them. The [`Spool`] trait is the seam for where those bytes rest:
//! [`local::LocalSpool`] (`<data_dir>/spool`, `<data_dir>/sessions`) is the embedded
//! default; shared object storage is one more module beside it. Its methods block: callers
//! run them off the async workers. Names are upgate's own ids and chunk numbers, never a
//! client's string.

pub(crate) mod local;
pub(crate) mod s3;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;

use crate::config::Durability;
use crate::content::{self, SNIFF_LEN, Utf8Validator};
use crate::error::ApiError;

/// Bytes gathered before one write to disk, by a writer that holds a share of the
/// [`IntakeBudget`].
pub(crate) const WRITE_SLICE: usize = 128 * 1024;
/// Bytes gathered before one write to disk by a writer without that share (and by every
/// writer until it has that much).
pub(crate) const SMALL_SLICE: usize = 64 * 1024;

/// The memory intake buffers may take beyond [`SMALL_SLICE`]s (`server.intake_memory`):
/// every upload in progress writes in small slices; one that fills a small slice asks once
/// for room for the [`WRITE_SLICE`]s a writer holds at most (`PIPELINE_DEPTH + 2`) and
/// writes large slices if it got it, small ones for the rest of its body if not. So intake
/// buffers take at most `intake_memory` plus three small slices per upload in progress, and
/// under load the uploads that came last write in smaller pieces instead of growing the
/// daemon.
#[derive(Debug, Clone)]
pub(crate) struct IntakeBudget {
    /// Units of [`SMALL_SLICE`] bytes.
    units: Arc<tokio::sync::Semaphore>,
}

impl IntakeBudget {
    const UNITS_PER_WRITER: u32 = ((PIPELINE_DEPTH + 2) * WRITE_SLICE / SMALL_SLICE) as u32;

    pub(crate) fn new(bytes: u64) -> Self {
        let units = (bytes / SMALL_SLICE as u64).min(tokio::sync::Semaphore::MAX_PERMITS as u64);
        Self {
            units: Arc::new(tokio::sync::Semaphore::new(units as usize)),
        }
    }

    /// Room for one writer's large slices, if the budget has it now (never waits).
    fn large_slices(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.units
            .clone()
            .try_acquire_many_owned(Self::UNITS_PER_WRITER)
            .ok()
    }
}

/// The slice size of one writer: small until it has filled one, then large while it holds
/// a share of the budget (given back when dropped).
#[derive(Debug)]
pub(crate) struct SliceSize {
    budget: IntakeBudget,
    size: usize,
    asked: bool,
    _share: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl SliceSize {
    pub(crate) fn new(budget: &IntakeBudget) -> Self {
        Self {
            budget: budget.clone(),
            size: SMALL_SLICE,
            asked: false,
            _share: None,
        }
    }

    /// The size of the slice being filled, which holds `filled` bytes so far.
    pub(crate) fn get(&mut self, filled: usize) -> usize {
        if filled >= SMALL_SLICE && !self.asked {
            self.asked = true;
            self._share = self.budget.large_slices();
            if self._share.is_some() {
                self.size = WRITE_SLICE;
            }
        }
        self.size
    }
}
/// Files up to this size are written by the async worker itself (see `finish`).
const INLINE_WRITE: usize = 64 * 1024;

/// Where spooled bytes rest. Every method may block. Bytes arrive in local part files
/// (`part_path`); what must outlive the request is then handed over (`persist`,
/// `place_chunk`, `commit_append`) and read back as local files (`fetch`, `fetch_chunk`,
/// `link_part`), which a shared spool downloads first when this node does not hold them.
pub(crate) trait Spool: Send + Sync + std::fmt::Debug {
    /// How hard writes are made durable (`server.durability`).
    fn durability(&self) -> Durability;
    /// The local file a [`SpoolWriter`] fills for `name` (an upload id, or a temporary name).
    fn part_path(&self, name: &str) -> PathBuf;
    /// Makes the complete part file of upload `id` outlive the request (and this node, for
    /// a shared spool); returns where this node now reads it.
    fn persist(&self, part: &Path, id: &str) -> std::io::Result<PathBuf>;
    /// A local file holding the persisted bytes of upload `id` (`size` of them), for its
    /// delivery.
    fn fetch(&self, id: &str, size: u64) -> std::io::Result<PathBuf>;
    /// Where the persisted bytes of upload `id` are, for an operator; `None` when gone.
    fn locate(&self, id: &str) -> std::io::Result<Option<String>>;
    /// Removes the persisted bytes of upload `id` (delivered, or deleted), wherever they are.
    fn remove(&self, id: &str) -> std::io::Result<()>;
    /// Checks that this spool's bytes answer to the store whose [`Store::identity`]
    /// (crate::store::Store::identity) is `store`, binding them to it if they answer to
    /// none yet: [`Spool::remove_orphans`] is only safe against that store's records. A
    /// spool bound to another store is an `InvalidData` error naming both. A shared spool
    /// remembers `store` and, until the check once succeeds (the service may be down at
    /// start), checks again before each sweep and sweeps nothing of the bucket meanwhile.
    /// This node's own disk answers to this node's store.
    fn bind_to_store(&self, store: &str) -> std::io::Result<()>;
    /// Removes persisted files of uploads not in `keep` (never acknowledged); how many.
    fn remove_orphans(&self, keep: &HashSet<String>) -> std::io::Result<usize>;
    /// Removes part files named `prefix*` older than `age` (left by a crash).
    fn remove_stale_parts(&self, prefix: &str, age: Duration);
    /// Total bytes spooled on this node's disk (for the spool gauge).
    fn bytes_on_disk(&self) -> u64;
    /// Moves a complete part file in as chunk `number` of session `session`, replacing an
    /// earlier copy atomically.
    fn place_chunk(&self, session: &str, number: u64, part: &Path) -> std::io::Result<()>;
    /// A local file holding chunk `number` of `session`, recorded as `size` bytes (a shared
    /// spool refuses a stored copy of another size).
    fn fetch_chunk(&self, session: &str, number: u64, size: u64) -> std::io::Result<Fetched>;
    /// Removes chunk `number` of `session`.
    fn remove_chunk(&self, session: &str, number: u64);
    /// The in-place file of `session` (its chunks back to back, see
    /// `upload/chunked/in_place.rs`), created if needed and open for writing at `offset`,
    /// cut there; `None` for a spool that keeps every chunk apart.
    fn open_in_place(&self, session: &str, offset: u64) -> std::io::Result<Option<(std::fs::File, PathBuf)>>;
    /// The chunk numbers of `session` held in files of their own, and the length of its
    /// in-place file (`None` for a spool that keeps none).
    fn chunk_layout(&self, session: &str) -> std::io::Result<(HashSet<u64>, Option<u64>)>;
    /// Copies the `len` bytes at `offset` of `session`'s in-place file out as chunk
    /// `number`'s own file (replacing an earlier one atomically).
    fn move_out_of_place(&self, session: &str, number: u64, offset: u64, len: u64) -> std::io::Result<()>;
    /// A spooled part file for upload `name` holding the first `len` bytes of `session`'s
    /// in-place file, without copying them (the in-place file is cut to `len` first: what
    /// lies beyond was never part of the session).
    fn link_in_place(&self, session: &str, len: u64, name: &str) -> std::io::Result<PathBuf>;
    /// Where one request's bytes of the resumable upload `session` go, starting at its
    /// acknowledged `offset`. What a crash left after that offset is cut.
    fn open_append(&self, session: &str, offset: u64) -> std::io::Result<AppendFile>;
    /// Makes the `written` bytes of an [`AppendFile`] at `offset` part of the upload, durably
    /// (its file was written through a [`SpoolWriter`], which fsyncs under `power_loss`):
    /// after this, `offset + written` may be acknowledged.
    fn commit_append(
        &self,
        session: &str,
        offset: u64,
        written: u64,
        append: AppendFile,
    ) -> std::io::Result<()>;
    /// Drops what a refused request of `session` wrote after `offset`.
    fn cut(&self, session: &str, offset: u64) -> std::io::Result<()>;
    /// The first `len` bytes of the resumable upload `session`, which holds `length` (fewer
    /// if it holds fewer).
    fn head(&self, session: &str, length: u64, len: u64) -> std::io::Result<Vec<u8>>;
    /// A spooled part file for upload `name` holding the `length` bytes of the resumable
    /// upload `session` (without copying them where the spool can); the session keeps its
    /// own.
    fn link_part(&self, session: &str, length: u64, name: &str) -> std::io::Result<PathBuf>;
    /// Joins the resumable uploads `sources` (each with its length), in order, as
    /// `target`'s bytes; the bytes joined.
    fn join(&self, target: &str, sources: &[(String, u64)]) -> std::io::Result<u64>;
    /// Removes every chunk of `session`.
    fn remove_session(&self, session: &str);
    /// Sessions that have chunks here.
    fn sessions(&self) -> Vec<String>;
    /// Why the spool cannot take uploads now (for `/readyz`); `None` when it can.
    fn unready(&self) -> Option<String>;
}

/// The file one request of a resumable upload writes into, and, for a spool that keeps
/// each request's bytes apart, the staged file behind it (removed when dropped).
#[derive(Debug)]
pub(crate) struct AppendFile {
    /// Taken by the writer while it writes (positioned at the offset).
    pub(crate) file: Option<std::fs::File>,
    /// Where that file is.
    pub(crate) path: PathBuf,
    staged: Option<Fetched>,
}

/// A local file read from the spool; a temporary copy (of bytes that rest elsewhere) is
/// removed when dropped.
#[derive(Debug)]
pub(crate) struct Fetched {
    path: PathBuf,
    temporary: bool,
}

impl Fetched {
    /// The spool's own file: stays when dropped.
    pub(crate) fn kept(path: PathBuf) -> Self {
        Self {
            path,
            temporary: false,
        }
    }

    /// A copy made for one reader: removed when dropped.
    pub(crate) fn temporary(path: PathBuf) -> Self {
        Self {
            path,
            temporary: true,
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Fetched {
    fn drop(&mut self) {
        if self.temporary {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A file fully received into the spool. Removed from disk when dropped, unless
/// [`SpooledFile::keep`] was called.
#[derive(Debug)]
pub(crate) struct SpooledFile {
    pub(crate) upload_id: String,
    pub(crate) filename: String,
    pub(crate) extension: String,
    pub(crate) mime: String,
    pub(crate) size: u64,
    pub(crate) sha256: String,
    pub(crate) path: PathBuf,
    pub(crate) keep: bool,
}

impl SpooledFile {
    /// Gives the complete file its durable spool name, `<data_dir>/spool/<id>`, with an
    /// atomic rename (and, with `durability: power_loss`, an fsync of the directory): for
    /// files that outlive the request (async delivery).
    pub(crate) fn persist(&mut self, spool: &dyn Spool) -> std::io::Result<()> {
        self.path = spool.persist(&self.path, &self.upload_id)?;
        Ok(())
    }

    /// The file now belongs to a record: do not remove it on drop.
    pub(crate) fn keep(mut self) -> PathBuf {
        self.keep = true;
        std::mem::take(&mut self.path)
    }
}

impl Drop for SpooledFile {
    fn drop(&mut self) {
        if !self.keep && !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// What a complete file's bytes came to: its size, sha256, first bytes and UTF-8 verdict.
#[derive(Debug)]
pub(crate) struct FileDigest {
    pub(crate) size: u64,
    pub(crate) sha256: String,
    pub(crate) head: Vec<u8>,
    pub(crate) utf8_ok: bool,
}

/// Bytes read at a time by [`digest`].
const DIGEST_SLICE: usize = 256 * 1024;

/// Reads a complete spooled file once: its [`FileDigest`] (the streaming UTF-8 check when
/// `text`, else the first bytes decide whether it looks like text). Blocks.
pub(crate) fn digest(path: &Path, text: bool) -> std::io::Result<FileDigest> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut head = Vec::with_capacity(SNIFF_LEN);
    let mut utf8 = text.then(Utf8Validator::default);
    let mut buffer = vec![0u8; DIGEST_SLICE];
    let mut size = 0u64;
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        let bytes = &buffer[..read];
        size += read as u64;
        hasher.update(bytes);
        if head.len() < SNIFF_LEN {
            let take = (SNIFF_LEN - head.len()).min(read);
            head.extend_from_slice(&bytes[..take]);
        }
        if let Some(validator) = &mut utf8 {
            validator.feed(bytes);
        }
    }
    let utf8_ok = match &utf8 {
        Some(validator) => validator.finish(),
        None => content::looks_like_text(&head),
    };
    Ok(FileDigest {
        size,
        sha256: hex::encode(hasher.finalize()),
        head,
        utf8_ok,
    })
}

/// The [`FileDigest`] of a complete file whose sha256 is already known (hashed as it
/// arrived) and whose extension is not text: only its first bytes are read. Blocks.
pub(crate) fn digest_hashed(path: &Path, sha256: String) -> std::io::Result<FileDigest> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let size = file.metadata()?.len();
    let mut head = Vec::with_capacity(SNIFF_LEN);
    (&mut file).take(SNIFF_LEN as u64).read_to_end(&mut head)?;
    let utf8_ok = content::looks_like_text(&head);
    Ok(FileDigest {
        size,
        sha256,
        head,
        utf8_ok,
    })
}

type Sink = (Option<std::fs::File>, Sha256);

/// Slices queued for each of a writer's two threads beyond the one being worked on, for a
/// writer with a share of the [`IntakeBudget`] (large slices): it holds at most
/// `PIPELINE_DEPTH + 2` slices (the slower thread's, and the one filling). Deeper queues
/// let a thread that was briefly descheduled catch up without stopping the others (a
/// 1 GiB upload, depth 1 against 4: 605-796 against 623-869 MiB/s, four rounds).
const PIPELINE_DEPTH: usize = 4;
/// The same for a writer without that share: small slices, three at most.
const SMALL_PIPELINE_DEPTH: usize = 1;

type SliceQueue = tokio::sync::mpsc::Sender<Arc<Vec<u8>>>;

/// The two blocking threads a file's slices go through once it outgrows one slice: one
/// hashes them, the other writes them, each in order and each at its own pace, while the
/// async worker goes on receiving. A thread waits (and must be woken) only when it has
/// caught up with the body; with one thread hashing then writing each slice, and a
/// handoff per slice, a 1 GiB upload spent much of its time with the cores idle.
struct SlicePipeline {
    /// To the hashing thread and to the writing thread; closed (`None`) once one stopped.
    queues: Option<(SliceQueue, SliceQueue)>,
    /// Buffers both threads are done with, to be filled again.
    emptied: std::sync::mpsc::Receiver<Vec<u8>>,
    hashed: JoinHandle<Sha256>,
    /// Taken when the writer is waited for early (it stopped on an error).
    written: Option<JoinHandle<std::io::Result<Option<std::fs::File>>>>,
}

impl SlicePipeline {
    /// Starts both threads after what `sink` has taken so far, `depth` slices queued for
    /// each at most; the file is created at `path` with the first bytes when the sink has
    /// none.
    fn start(sink: Sink, path: PathBuf, depth: usize) -> Self {
        let (file, mut hasher) = sink;
        let (to_hash, mut hash_queue): (SliceQueue, _) = tokio::sync::mpsc::channel(depth);
        let (to_write, mut write_queue): (SliceQueue, _) = tokio::sync::mpsc::channel(depth);
        let (give_back, emptied) = std::sync::mpsc::channel();
        let give_back_hashed = give_back.clone();
        let hashed = tokio::task::spawn_blocking(move || {
            while let Some(slice) = hash_queue.blocking_recv() {
                hasher.update(&slice[..]);
                recycle(slice, &give_back_hashed);
            }
            hasher
        });
        let written = tokio::task::spawn_blocking(move || {
            let mut file = file;
            while let Some(slice) = write_queue.blocking_recv() {
                file = write_bytes(file, &path, &slice)?;
                recycle(slice, &give_back);
            }
            Ok(file)
        });
        Self {
            queues: Some((to_hash, to_write)),
            emptied,
            hashed,
            written: Some(written),
        }
    }

    /// An emptied buffer, if one came back.
    fn reuse(&self) -> Option<Vec<u8>> {
        self.emptied.try_recv().ok()
    }

    /// Queues a slice for both threads (waiting while they are behind).
    async fn send(&mut self, slice: Vec<u8>) -> Result<(), ApiError> {
        let (to_hash, to_write) = self.queues.as_ref().ok_or(ApiError::Internal)?;
        let slice = Arc::new(slice);
        let hashing = to_hash.send(slice.clone()).await;
        if hashing.is_err() || to_write.send(slice).await.is_err() {
            // A thread stopped: the writer on a disk error, which its end says. Both queues
            // close first, so that the other thread ends too.
            self.queues = None;
            if let Some(written) = self.written.take() {
                written.await??;
            }
            return Err(ApiError::Internal);
        }
        Ok(())
    }

    /// Closes the queues and waits for both threads: the sink, holding every byte.
    async fn finish(self) -> Result<Sink, ApiError> {
        let Self {
            queues,
            hashed,
            written,
            ..
        } = self;
        drop(queues);
        let written = written.ok_or(ApiError::Internal)?;
        // Both are waited for before either's error counts: no thread is left with a slice.
        let (file, hasher) = (written.await, hashed.await);
        Ok((file??, hasher?))
    }
}

/// Hands a slice's buffer back once the last of the two threads is done with it.
fn recycle(slice: Arc<Vec<u8>>, give_back: &std::sync::mpsc::Sender<Vec<u8>>) {
    // Exactly one of two concurrent callers gets the buffer.
    if let Some(mut buffer) = Arc::into_inner(slice) {
        buffer.clear();
        let _ = give_back.send(buffer);
    }
}

/// Streams one file into the spool (see the module docs).
pub(crate) struct SpoolWriter {
    spool: Arc<dyn Spool>,
    part_path: PathBuf,
    /// What the bytes so far went into, until a first full slice starts the pipeline.
    sink: Option<Sink>,
    pipeline: Option<SlicePipeline>,
    buffer: Vec<u8>,
    slice: SliceSize,
    size: u64,
    max_size: u64,
    head: Vec<u8>,
    utf8: Option<Utf8Validator>,
    finished: bool,
    /// Writing into a file that is not the writer's own (a session's in-place file): never
    /// removed.
    in_place: bool,
}

impl SpoolWriter {
    /// Starts a spool file for upload `upload_id`. `check_utf8` turns on the streaming
    /// UTF-8 validator.
    pub(crate) fn new(
        spool: &Arc<dyn Spool>,
        budget: &IntakeBudget,
        upload_id: &str,
        max_size: u64,
        check_utf8: bool,
    ) -> Self {
        Self::writing(
            spool,
            budget,
            spool.part_path(upload_id),
            (None, Sha256::new()),
            max_size,
            check_utf8.then(Utf8Validator::default),
            false,
        )
    }

    /// Streams one chunk into `file` at its position (a session's in-place file at `path`),
    /// at most `max_size` bytes, its bytes hashed on from `hasher`. What an abandoned writer
    /// wrote stays, beyond what its session counts.
    pub(crate) fn in_place(
        spool: &Arc<dyn Spool>,
        budget: &IntakeBudget,
        file: std::fs::File,
        path: PathBuf,
        max_size: u64,
        hasher: Sha256,
    ) -> Self {
        Self::writing(spool, budget, path, (Some(file), hasher), max_size, None, true)
    }

    fn writing(
        spool: &Arc<dyn Spool>,
        budget: &IntakeBudget,
        part_path: PathBuf,
        sink: Sink,
        max_size: u64,
        utf8: Option<Utf8Validator>,
        in_place: bool,
    ) -> Self {
        Self {
            spool: spool.clone(),
            part_path,
            sink: Some(sink),
            pipeline: None,
            buffer: Vec::new(),
            slice: SliceSize::new(budget),
            size: 0,
            max_size,
            head: Vec::new(),
            utf8,
            finished: false,
            in_place,
        }
    }

    /// Adds bytes; refuses them once the total passes the limit.
    pub(crate) async fn write(&mut self, bytes: &[u8]) -> Result<(), ApiError> {
        self.size += bytes.len() as u64;
        if self.size > self.max_size {
            return Err(ApiError::TooLarge { limit: self.max_size });
        }
        if self.head.len() < SNIFF_LEN {
            let take = (SNIFF_LEN - self.head.len()).min(bytes.len());
            self.head.extend_from_slice(&bytes[..take]);
        }
        if let Some(validator) = &mut self.utf8 {
            validator.feed(bytes);
        }
        // Slices are filled to their size exactly, so a buffer never grows past it.
        let mut rest = bytes;
        while !rest.is_empty() {
            let size = self.slice.get(self.buffer.len());
            let take = (size - self.buffer.len()).min(rest.len());
            self.buffer.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.buffer.len() >= self.slice.get(self.buffer.len()) {
                self.flush().await?;
            }
        }
        Ok(())
    }

    /// Once the first [`SNIFF_LEN`] bytes have arrived: those bytes and whether the content
    /// still looks like text (valid UTF-8 so far), for an early content check.
    pub(crate) fn sniffed(&self) -> Option<(&[u8], bool)> {
        if self.head.len() < SNIFF_LEN {
            return None;
        }
        let text = match &self.utf8 {
            Some(validator) => validator.valid_so_far(),
            None => content::looks_like_text(&self.head),
        };
        Some((&self.head, text))
    }

    /// Hands the full buffer to the pipeline (started with the first), then takes one to
    /// fill: an emptied one when the threads gave one back.
    async fn flush(&mut self) -> Result<(), ApiError> {
        if self.pipeline.is_none() {
            let sink = self.sink.take().ok_or(ApiError::Internal)?;
            let depth = if self.slice.size == WRITE_SLICE {
                PIPELINE_DEPTH
            } else {
                SMALL_PIPELINE_DEPTH
            };
            self.pipeline = Some(SlicePipeline::start(sink, self.part_path.clone(), depth));
        }
        let pipeline = self.pipeline.as_mut().ok_or(ApiError::Internal)?;
        pipeline.send(std::mem::take(&mut self.buffer)).await?;
        self.buffer = pipeline
            .reuse()
            .unwrap_or_else(|| Vec::with_capacity(self.slice.size));
        Ok(())
    }

    /// Stops without finishing: waits until the slices already queued are written, so that
    /// nothing lands in an in-place file after its owner cut it back.
    pub(crate) async fn abandon(mut self) {
        if let Some(pipeline) = self.pipeline.take() {
            let _ = pipeline.finish().await;
        }
    }

    /// Writes the rest and returns the complete `.part` file's path, size and sha256, the
    /// first bytes and the UTF-8 verdict. The file keeps its `.part` name until it must
    /// outlive the request ([`SpooledFile::persist`]): a sync delivery reads it (or the local
    /// provider renames it into place) straight away.
    pub(crate) async fn finish(self) -> Result<(PathBuf, u64, String, Vec<u8>, bool), ApiError> {
        let (path, size, hasher, head, utf8_ok) = self.finish_open().await?;
        Ok((path, size, hex::encode(hasher.finalize()), head, utf8_ok))
    }

    /// [`SpoolWriter::finish`] with the sha256 left open: for a chunk written in place, whose
    /// hash goes on with the next chunk's bytes.
    pub(crate) async fn finish_open(mut self) -> Result<(PathBuf, u64, Sha256, Vec<u8>, bool), ApiError> {
        let slice = std::mem::take(&mut self.buffer);
        let part_path = self.part_path.clone();
        let durable = self.spool.durability() == Durability::PowerLoss;
        let (sink, slice) = match self.pipeline.take() {
            Some(mut pipeline) => {
                if !slice.is_empty() {
                    pipeline.send(slice).await?;
                }
                (pipeline.finish().await?, Vec::new())
            }
            None => (self.sink.take().ok_or(ApiError::Internal)?, slice),
        };
        // A small file that never needed a disk write so far is written right here: a few
        // microseconds of page-cache work cost less than handing it to another thread. Large
        // files, and anything that must be fsynced, stay off the async worker. A file the
        // pipeline wrote (nothing left in `slice`) is only left to fsync.
        let inline = !durable && (slice.is_empty() || sink.0.is_none() && slice.len() <= INLINE_WRITE);
        let path = part_path.clone();
        let finish = move || -> std::io::Result<Sha256> {
            let (file, hasher) = write_slice(sink, &path, &slice)?;
            let file = match file {
                Some(file) => file,
                None => std::fs::File::create(&path)?,
            };
            if durable {
                file.sync_all()?;
            }
            Ok(hasher)
        };
        let hasher = if inline {
            finish()
        } else {
            tokio::task::spawn_blocking(finish)
                .await
                .map_err(|_| ApiError::Internal)?
        }?;
        self.finished = true;
        // Without a validator (not a text extension) the first bytes decide.
        let utf8_ok = match &self.utf8 {
            Some(validator) => validator.finish(),
            None => content::looks_like_text(&self.head),
        };
        Ok((
            part_path,
            self.size,
            hasher,
            std::mem::take(&mut self.head),
            utf8_ok,
        ))
    }
}

/// Hashes and writes one slice.
fn write_slice(sink: Sink, path: &Path, slice: &[u8]) -> std::io::Result<Sink> {
    let (file, mut hasher) = sink;
    hasher.update(slice);
    Ok((write_bytes(file, path, slice)?, hasher))
}

/// Writes `bytes` at the end of `file`, creating it at `path` with the first bytes.
fn write_bytes(
    file: Option<std::fs::File>,
    path: &Path,
    bytes: &[u8],
) -> std::io::Result<Option<std::fs::File>> {
    if bytes.is_empty() {
        return Ok(file);
    }
    let mut file = match file {
        Some(file) => file,
        None => std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)?,
    };
    file.write_all(bytes)?;
    Ok(Some(file))
}

impl Drop for SpoolWriter {
    fn drop(&mut self) {
        if self.finished || self.in_place {
            return;
        }
        // Abandoned (error or dropped connection): remove the part file, once the threads
        // have written what was queued (the writer creates the file with its first slice).
        let path = std::mem::take(&mut self.part_path);
        match (self.pipeline.take(), tokio::runtime::Handle::try_current()) {
            (Some(pipeline), Ok(runtime)) => {
                runtime.spawn(async move {
                    let _ = pipeline.finish().await;
                    let _ = tokio::fs::remove_file(path).await;
                });
            }
            _ => {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// `id` when it is a plain file name or key of upgate's ids (ASCII letters, digits, `-`, at most
/// 128 bytes): never a path of its own (`/`, `..`), whatever wrote it.
pub(crate) fn plain_name(id: &str) -> std::io::Result<&str> {
    let plain = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-');
    match plain {
        true => Ok(id),
        false => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not an upgate id (a stored id that is no plain name is never a path)",
        )),
    }
}
