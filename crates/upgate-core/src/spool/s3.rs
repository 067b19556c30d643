//! The shared spool (`server.spool.url: s3://BUCKET/PREFIX/`): bytes that must outlive a
//! node rest in S3-compatible object storage, so that any node continues or delivers them.
//!
//! What flows through here: part files received on this node's disk (as with the local
//! spool), then put as objects before the client is answered: an async upload as
//! `PREFIX/uploads/<id>` (kept on this node's disk too, for its own outbox), a chunk of a
//! session as `PREFIX/sessions/<session>/<n>`, each request's bytes of a tus upload as a
//! segment `PREFIX/sessions/<session>/tus/<offset, 20 digits>`. Reads come back as local
//! files: a node that does not hold an upload downloads it; chunks and segments are
//! downloaded into temporary files for one reader. Keys are built from upgate's own ids and
//! numbers only. The object storage client retries with backoff; when it gives up, the error
//! is an I/O `NotConnected`, which the gateway answers with 503 and `Retry-After`.
//!
//! A tus upload's bytes are the chain of segments from offset 0, each starting where the one
//! before ends, up to the offset the store acknowledged; a segment a crash left past that
//! offset is not in the chain, and the next request at its offset replaces it.

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use upgate_upstream::s3::{ObjectStore, S3Error, S3Settings};

use super::local::LocalSpool;
use super::{AppendFile, Fetched, Spool};
use crate::config::{Durability, SpoolConfig};

/// How long an object of an upload no record names is left alone before a starting node
/// removes it: another node may have put it and not yet written its record.
const ORPHAN_AGE: Duration = Duration::from_secs(3600);

/// The object under `PREFIX/` naming the store its objects answer to
/// ([`Spool::bind_to_store`]).
const IDENTITY_OBJECT: &str = "store-identity";
/// The most of it read: an identity is 32 hex digits.
const IDENTITY_READ: u64 = 64;

/// Object storage for what outlives a node, with this node's disk for what arrives.
#[derive(Debug, Clone)]
pub(crate) struct S3Spool {
    local: LocalSpool,
    objects: Arc<ObjectStore>,
    /// `PREFIX/` of the URL (empty, or ending in `/`).
    prefix: String,
    /// Which store's records the prefix's objects answer to ([`Spool::bind_to_store`]).
    binding: Arc<std::sync::Mutex<Binding>>,
}

/// The store a spool's prefix must answer to, and what checking it found.
#[derive(Debug, Default)]
struct Binding {
    /// This node's store, once given.
    store: Option<String>,
    /// The prefix names that store.
    confirmed: bool,
    /// The prefix names another store (the error, for `/readyz`).
    refused: Option<String>,
}

impl S3Spool {
    /// Prepares the local part directory and the client (no request is sent).
    pub(crate) fn open(data_dir: &Path, durability: Durability, config: &SpoolConfig) -> io::Result<Self> {
        let settings = S3Settings {
            endpoint: config.endpoint(),
            region: config.region.0.clone(),
            bucket: config.url.bucket.clone(),
            access_key_id: config.access_key_id.0.clone(),
            secret_access_key: config.secret_access_key.expose().to_owned(),
            connect_timeout: Duration::from_secs(2),
            answer_timeout: Duration::from_secs(5),
        };
        let objects = ObjectStore::new(&settings).map_err(io::Error::other)?;
        Ok(Self {
            local: LocalSpool::open(data_dir, durability)?,
            objects: Arc::new(objects),
            prefix: config.url.prefix.clone(),
            binding: Arc::default(),
        })
    }

    /// Checks, until it once succeeds, that the prefix answers to the store given to
    /// [`Spool::bind_to_store`]: `PREFIX/store-identity` names it (the first node on a
    /// prefix puts it). Unavailable storage is an error to try again later; another store's
    /// name is `InvalidData`, and is kept for `/readyz`. (Two stores binding one empty prefix
    /// at the same moment could both pass: the last put wins, and is what later starts read.)
    fn confirm_binding(&self) -> io::Result<()> {
        let store = {
            let binding = self.binding.lock().unwrap_or_else(|e| e.into_inner());
            if binding.confirmed {
                return Ok(());
            }
            binding.store.clone().ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotConnected, "the spool's store is not known yet")
            })?
        };
        let key = format!("{}{IDENTITY_OBJECT}", self.prefix);
        let named = match self.objects.get_head(&key, IDENTITY_READ) {
            Ok(named) => named,
            Err(S3Error::NotFound(_)) => {
                let staged = Fetched::temporary(self.temp_path("identity"));
                std::fs::write(staged.path(), &store)?;
                self.objects.put_file(&key, staged.path())?;
                self.objects.get_head(&key, IDENTITY_READ)?
            }
            Err(error) => return Err(error.into()),
        };
        let mut binding = self.binding.lock().unwrap_or_else(|e| e.into_inner());
        if named == store.as_bytes() {
            binding.confirmed = true;
            return Ok(());
        }
        // What the object holds is shown only when it is a plain name (it is the service's
        // text, which could hold anything).
        let named = std::str::from_utf8(&named)
            .ok()
            .and_then(|text| super::plain_name(text).ok())
            .unwrap_or("(unreadable)");
        let refused = format!(
            "s3://{}/{key} says its objects answer to the store {named}, but this node's store is {store}: \
             its records do not name them, so it would take them for orphans. Point every node of a \
             cluster at the same server.store, or give this store a prefix of its own",
            self.objects.bucket_name()
        );
        binding.refused = Some(refused.clone());
        Err(io::Error::new(io::ErrorKind::InvalidData, refused))
    }

    /// The bucket answers and the credentials may list it (check-config, readiness).
    pub(crate) fn check(&self) -> Result<(), S3Error> {
        self.objects.check()
    }

    /// An id that is no plain name (a record no upgate wrote) names an object of its own
    /// that none is ever put to, never a key outside its place (`../x`).
    fn upload_key(&self, id: &str) -> String {
        format!("{}uploads/{}", self.prefix, plain_or_void(id))
    }

    fn session_prefix(&self, session: &str) -> String {
        format!("{}sessions/{}/", self.prefix, plain_or_void(session))
    }

    fn chunk_key(&self, session: &str, number: u64) -> String {
        format!("{}{number}", self.session_prefix(session))
    }

    fn segment_key(&self, session: &str, offset: u64) -> String {
        format!("{}tus/{offset:020}", self.session_prefix(session))
    }

    /// A new temporary file name on this node's disk.
    fn temp_path(&self, what: &str) -> PathBuf {
        self.local
            .part_path(&format!("{what}-{}", uuid::Uuid::new_v4().simple()))
    }

    /// Downloads `key`, which should hold `size` bytes, into a temporary file. An object of
    /// another size is not what was stored there: storage not to be trusted now, as if it
    /// were unavailable.
    fn download(&self, key: &str, size: u64) -> io::Result<Fetched> {
        let fetched = Fetched::temporary(self.temp_path("fetch"));
        let held = self.objects.get_to_file(key, fetched.path(), size)?;
        if held != size {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                format!("the stored object {key} holds {held} bytes, not {size}"),
            ));
        }
        Ok(fetched)
    }

    /// The segments holding the first `length` bytes of the tus upload `session`, in order.
    fn chain(&self, session: &str, length: u64) -> io::Result<Vec<(String, u64)>> {
        let prefix = format!("{}tus/", self.session_prefix(session));
        let segments: BTreeMap<u64, (String, u64)> = self
            .objects
            .list(&prefix)?
            .into_iter()
            .filter_map(|entry| {
                let offset = entry.key.strip_prefix(&prefix)?.parse::<u64>().ok()?;
                Some((offset, (entry.key, entry.size)))
            })
            .collect();
        let mut chain = Vec::new();
        let mut at = 0;
        while at < length {
            match segments.get(&at) {
                // A segment that would run past the length (or wrap the count) is no part of
                // a chain that ends there.
                Some((key, size)) if *size > 0 && *size <= length - at => {
                    chain.push((key.clone(), *size));
                    at += size;
                }
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("upload {session} has no segment at offset {at}"),
                    ));
                }
            }
        }
        if at != length {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the segments of upload {session} hold {at} bytes, not {length}"),
            ));
        }
        Ok(chain)
    }

    /// Appends the first `length` bytes of tus upload `session` to `out`.
    fn copy_chain(&self, session: &str, length: u64, out: &mut std::fs::File) -> io::Result<u64> {
        let mut total = 0;
        for (key, size) in self.chain(session, length)? {
            let segment = self.download(&key, size)?;
            total += io::copy(&mut std::fs::File::open(segment.path())?, out)?;
        }
        Ok(total)
    }
}

impl Spool for S3Spool {
    fn durability(&self) -> Durability {
        self.local.durability()
    }

    fn part_path(&self, name: &str) -> PathBuf {
        self.local.part_path(name)
    }

    /// Put in the bucket first (acknowledged only then), then kept under its spool name on
    /// this node's disk for this node's own delivery attempt.
    fn persist(&self, part: &Path, id: &str) -> io::Result<PathBuf> {
        self.objects.put_file(&self.upload_key(id), part)?;
        self.local.persist(part, id)
    }

    /// This node's copy, or the object downloaded, when it holds the upload's `size`: a
    /// download cut short or that is not the object (a storage's error page answered 200)
    /// is dropped and counts as storage unavailable, so the next attempt downloads again.
    fn fetch(&self, id: &str, size: u64) -> io::Result<PathBuf> {
        let path = self.local.fetch(id, size)?;
        if path.is_file() {
            return Ok(path);
        }
        let fetched = self.download(&self.upload_key(id), size)?;
        std::fs::rename(fetched.path(), &path)?;
        Ok(path)
    }

    fn locate(&self, id: &str) -> io::Result<Option<String>> {
        let key = self.upload_key(id);
        let found = self.objects.list(&key)?.into_iter().any(|entry| entry.key == key);
        Ok(found.then(|| format!("s3://{}/{key}", self.objects.bucket_name())))
    }

    fn remove(&self, id: &str) -> io::Result<()> {
        self.local.remove(id)?;
        self.objects.delete(&self.upload_key(id))?;
        Ok(())
    }

    /// Remembers `store` and checks the prefix against it ([`S3Spool::confirm_binding`]).
    fn bind_to_store(&self, store: &str) -> io::Result<()> {
        self.binding.lock().unwrap_or_else(|e| e.into_inner()).store = Some(store.to_owned());
        self.confirm_binding()
    }

    /// This node's copies of uploads no record names, and objects of such uploads older
    /// than [`ORPHAN_AGE`]: only once the prefix is confirmed to be this store's.
    fn remove_orphans(&self, keep: &HashSet<String>) -> io::Result<usize> {
        self.confirm_binding()?;
        let mut removed = self.local.remove_orphans(keep)?;
        let prefix = format!("{}uploads/", self.prefix);
        let cutoff = humantime::format_rfc3339_seconds(SystemTime::now() - ORPHAN_AGE).to_string();
        for entry in self.objects.list(&prefix)? {
            // A key the listing names that is no plain id (`uploads/../x`) is not upgate's to
            // delete: a request for it could resolve outside the prefix.
            let Some(id) = entry
                .key
                .strip_prefix(&prefix)
                .filter(|id| super::plain_name(id).is_ok())
            else {
                continue;
            };
            // Both are RFC 3339 in UTC: their first 19 characters compare as times. An object
            // without a readable time is not known to be old.
            let old = matches!(
                (entry.last_modified.get(..19), cutoff.get(..19)),
                (Some(modified), Some(cutoff)) if modified < cutoff
            );
            if !keep.contains(id) && old && self.objects.delete(&entry.key).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    fn remove_stale_parts(&self, prefix: &str, age: Duration) {
        self.local.remove_stale_parts(prefix, age);
    }

    fn bytes_on_disk(&self) -> u64 {
        self.local.bytes_on_disk()
    }

    /// A put replaces an earlier copy of the chunk atomically.
    fn place_chunk(&self, session: &str, number: u64, part: &Path) -> io::Result<()> {
        self.objects.put_file(&self.chunk_key(session, number), part)?;
        let _ = std::fs::remove_file(part);
        Ok(())
    }

    fn fetch_chunk(&self, session: &str, number: u64, size: u64) -> io::Result<Fetched> {
        self.download(&self.chunk_key(session, number), size)
    }

    fn remove_chunk(&self, session: &str, number: u64) {
        if let Err(error) = self.objects.delete(&self.chunk_key(session, number)) {
            tracing::warn!(session_id = %session, chunk = number, %error, "cannot remove a chunk");
        }
    }

    /// Every chunk is an object of its own.
    fn open_in_place(&self, _session: &str, _offset: u64) -> io::Result<Option<(std::fs::File, PathBuf)>> {
        Ok(None)
    }

    fn chunk_layout(&self, _session: &str) -> io::Result<(HashSet<u64>, Option<u64>)> {
        Ok((HashSet::new(), None))
    }

    fn move_out_of_place(&self, session: &str, number: u64, _offset: u64, _len: u64) -> io::Result<()> {
        Err(io::Error::other(format!(
            "the shared spool keeps no in-place file (session {session}, chunk {number})"
        )))
    }

    fn link_in_place(&self, session: &str, _len: u64, _name: &str) -> io::Result<PathBuf> {
        Err(io::Error::other(format!(
            "the shared spool keeps no in-place file (session {session})"
        )))
    }

    /// A staged file of this request's bytes alone, put as one segment at commit.
    fn open_append(&self, _session: &str, _offset: u64) -> io::Result<AppendFile> {
        let staged = Fetched::temporary(self.temp_path("append"));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(staged.path())?;
        Ok(AppendFile {
            file: Some(file),
            path: staged.path().to_owned(),
            staged: Some(staged),
        })
    }

    fn commit_append(&self, session: &str, offset: u64, written: u64, append: AppendFile) -> io::Result<()> {
        let AppendFile { file, staged, .. } = append;
        drop(file);
        let staged =
            staged.ok_or_else(|| io::Error::other("a shared-spool append without its staged file"))?;
        if written > 0 {
            self.objects
                .put_file(&self.segment_key(session, offset), staged.path())?;
        }
        Ok(())
    }

    /// Nothing of a refused request left this node: its staged file went with its
    /// [`AppendFile`].
    fn cut(&self, _session: &str, _offset: u64) -> io::Result<()> {
        Ok(())
    }

    fn head(&self, session: &str, length: u64, len: u64) -> io::Result<Vec<u8>> {
        let mut head = Vec::new();
        for (key, _) in self.chain(session, length)? {
            let wanted = len.min(length) - head.len() as u64;
            if wanted == 0 {
                break;
            }
            head.extend(self.objects.get_head(&key, wanted)?);
        }
        Ok(head)
    }

    fn link_part(&self, session: &str, length: u64, name: &str) -> io::Result<PathBuf> {
        let part = self.part_path(name);
        let mut out = std::fs::File::create(&part)?;
        let copied = self.copy_chain(session, length, &mut out);
        if copied.is_err() {
            let _ = std::fs::remove_file(&part);
        }
        copied?;
        Ok(part)
    }

    /// Downloads the sources' chains into one staged file and puts it as the target's one
    /// segment.
    fn join(&self, target: &str, sources: &[(String, u64)]) -> io::Result<u64> {
        let staged = Fetched::temporary(self.temp_path("join"));
        let mut out = std::fs::File::create(staged.path())?;
        let mut total = 0;
        for (source, length) in sources {
            total += self.copy_chain(source, *length, &mut out)?;
        }
        drop(out);
        if total > 0 {
            self.objects
                .put_file(&self.segment_key(target, 0), staged.path())?;
        }
        Ok(total)
    }

    fn remove_session(&self, session: &str) {
        if let Err(error) = self.objects.delete_prefix(&self.session_prefix(session)) {
            tracing::warn!(session_id = %session, %error, "cannot remove a session's objects");
        }
    }

    /// The session ids with objects, one name each (a listing grouped by `/`: not every chunk
    /// and segment of every session).
    /// None until the prefix is confirmed to be this store's: the session sweep removes
    /// what its store does not name.
    fn sessions(&self) -> Vec<String> {
        if let Err(error) = self.confirm_binding() {
            tracing::warn!(%error, "the spool's sessions are not swept: the prefix is not known to be this store's");
            return Vec::new();
        }
        let prefix = format!("{}sessions/", self.prefix);
        self.objects.list_names(&prefix).unwrap_or_default()
    }

    /// Unavailable storage, or a prefix that belongs to another store.
    fn unready(&self) -> Option<String> {
        if let Some(refused) = &self.binding.lock().unwrap_or_else(|e| e.into_inner()).refused {
            return Some(format!("spool: {refused}"));
        }
        self.check().err().map(|error| format!("spool: {error}"))
    }
}

/// `id` if it is a plain name ([`super::plain_name`]), else a name no id has.
fn plain_or_void(id: &str) -> &str {
    super::plain_name(id).unwrap_or("not-an-id")
}
