//! The provider plugin ABI: what crosses between the upgate host and a provider plugin.
//!
//! A plugin is a shared library (`cdylib`) that exports one symbol, [`ENTRY_SYMBOL`]
//! (`upgate_provider_v1`), a function returning a pointer to a static [`ProviderDescriptor`].
//! The descriptor starts with a fixed [`DescriptorHeader`] (`abi_version`, `struct_size`)
//! that every ABI version keeps, so the host can refuse a plugin built for another version
//! before touching anything else.
//!
//! Everything else crosses as JSON bytes: an [`InitRequest`] (settings plus the host's
//! [`InitContext`]) into `init`, a [`PutRequest`] (upload
//! metadata plus the path of the spooled file) into `put`, a [`PutResult`] or a
//! [`PluginError`] back. Buffers returned by the plugin are allocated by the plugin and freed
//! by the plugin's `free_buffer`; buffers passed in by the host stay owned by the host and
//! are only borrowed for the duration of the call.
//!
//! ABI version 2 adds `put_stream`: a plugin that declares [`FLAG_STREAMING`] may be handed
//! an upload while it is still arriving, as a [`StreamRequest`] and a [`HostBody`], the
//! host's read callback, which the plugin reads through [`Body`] (a [`std::io::Read`]). The
//! callback blocks until bytes arrive, and is bounded: while the body arrives the host answers
//! every read within its idle timeout, with bytes or an abort (the upload was refused or the
//! client went away), after which the plugin must leave nothing upstream; the end of the body
//! comes once the host has accepted the whole upload (size, content, sha256, quota, its
//! record; in a request of several files, after the earlier files' deliveries), within the
//! provider's timeout. The host keeps its own copy
//! of the bytes and retries a failed streaming attempt with `put` from that copy.
//!
//! Plugin authors never write `unsafe`: they implement [`Provider`] and call
//! [`export_provider!`], which generates the entry symbol and panic-catching trampolines.
//! The plugin crates can therefore `#![deny(unsafe_code)]`: the one unsafe attribute the macro
//! emits carries its own `#[allow(unsafe_code)]`.
//!
//! This crate denies `unsafe_code` too and allows it item by item, only where the ABI needs
//! it: the descriptor's `Sync`, [`PluginBuffer::as_slice`], the [`trampolines`] and the entry
//! symbol. Every `unsafe` block says which invariant makes it sound (`// SAFETY:`), every
//! `unsafe fn` what its caller must guarantee (`# Safety`).
//!
//! [`units`] parses and formats byte sizes (`10MiB`, `25MB`) for the host's config and the
//! plugins' settings alike.
#![deny(unsafe_code)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod units;

use std::ffi::{c_char, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The ABI version this crate implements. Bumped on any incompatible change: 2 added
/// `put_stream` and [`FLAG_STREAMING`].
pub const ABI_VERSION: u32 = 2;

/// Name of the exported entry function, NUL-terminated for `dlsym`. The same for every ABI
/// version (the `v1` is the entry convention's, not the ABI's): the descriptor's header says
/// which ABI the plugin speaks, so the host can refuse an older or newer plugin by name.
pub const ENTRY_SYMBOL: &[u8] = b"upgate_provider_v1\0";

/// Capability: `put` and `delete` only touch the local file system (no network) and finish
/// quickly for small files, so the host may call them for small uploads on its own workers
/// instead of handing them to its blocking pool.
pub const FLAG_LOCAL_IO: u32 = 1;

/// Capability: `put_stream` works: the plugin can send an upload upstream while it arrives
/// (it needs neither its size nor its sha256 before the first byte). A plugin without it
/// is always handed the complete spooled file (`put`).
pub const FLAG_STREAMING: u32 = 2;

/// Body read status: `filled` bytes (at least one) were written into the buffer.
pub const BODY_DATA: i32 = 0;
/// Body read status: the body is complete and accepted by the host; no more bytes.
pub const BODY_END: i32 = 1;
/// Body read status: the host aborted the upload (refused, or the client went away); the
/// plugin must abandon its upstream request and keep nothing.
pub const BODY_ABORTED: i32 = 2;

/// Call status: success, the output buffer holds the JSON result.
pub const STATUS_OK: i32 = 0;
/// Call status: the operation failed, the output buffer holds a JSON [`PluginError`].
pub const STATUS_ERROR: i32 = 1;
/// Call status: the plugin panicked; the output buffer holds a JSON [`PluginError`].
pub const STATUS_PANIC: i32 = 2;

/// The stable head of every descriptor, whatever its ABI version.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DescriptorHeader {
    pub abi_version: u32,
    /// `size_of::<ProviderDescriptor>()` as the plugin was compiled.
    pub struct_size: u32,
}

/// A byte buffer allocated by the plugin and handed to the host. The host must give it back
/// to the plugin's `free_buffer` exactly once.
#[repr(C)]
#[derive(Debug)]
pub struct PluginBuffer {
    pub ptr: *mut u8,
    pub len: usize,
    pub capacity: usize,
}

impl PluginBuffer {
    /// An empty buffer, used as the initial value of out-parameters.
    pub const fn empty() -> Self {
        Self {
            ptr: std::ptr::null_mut(),
            len: 0,
            capacity: 0,
        }
    }

    fn from_vec(bytes: Vec<u8>) -> Self {
        let mut bytes = std::mem::ManuallyDrop::new(bytes);
        Self {
            ptr: bytes.as_mut_ptr(),
            len: bytes.len(),
            capacity: bytes.capacity(),
        }
    }

    /// Views the bytes.
    ///
    /// # Safety
    /// `self` is [`PluginBuffer::empty`] or a buffer that a plugin function (`init`, `put`,
    /// `delete`, `health`) wrote into its out-parameter, with its fields unchanged, not yet
    /// given to `free_buffer`, and the plugin library is still loaded (the bytes belong to
    /// the plugin's allocator). `free_buffer` takes the buffer by value, so it cannot run while
    /// the returned slice borrows `self`.
    #[allow(unsafe_code)]
    pub unsafe fn as_slice(&self) -> &[u8] {
        if self.ptr.is_null() {
            &[]
        } else {
            // SAFETY: by the contract above, `ptr` and `len` are those of a `Vec<u8>` that
            // `PluginBuffer::from_vec` leaked in the plugin: `len` initialized bytes in one
            // live allocation (u8 needs no alignment), which nothing writes to or frees before
            // `free_buffer`, and that cannot happen while `&self` is borrowed for the slice.
            unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
        }
    }
}

/// `init(init_request_json) -> instance`; on failure returns null and fills `out` with a
/// [`PluginError`].
///
/// What the caller guarantees: `settings` points at `settings_len` initialized bytes (an
/// [`InitRequest`] as JSON) that stay alive and unchanged for the call, or `settings_len` is
/// 0; `out` is null or points at a writable [`PluginBuffer`] that owns nothing (it is
/// overwritten, not freed: pass [`PluginBuffer::empty`]). A buffer written into `out` goes back
/// to the same descriptor's `free_buffer`.
pub type InitFn =
    unsafe extern "C" fn(settings: *const u8, settings_len: usize, out: *mut PluginBuffer) -> *mut c_void;
/// `put`, `delete` and `health`: request JSON in, status code out, JSON result in `out`.
///
/// What the caller guarantees: `instance` is a non-null instance returned by the same
/// descriptor's `init` and not yet given to `drop_instance` (calls may run concurrently on
/// several threads, never concurrently with or after `drop_instance`); `request`,
/// `request_len` and `out` as for [`InitFn`]'s `settings`, `settings_len` and `out`.
pub type CallFn = unsafe extern "C" fn(
    instance: *mut c_void,
    request: *const u8,
    request_len: usize,
    out: *mut PluginBuffer,
) -> i32;
/// `put_stream`: as [`CallFn`], plus the host's body.
///
/// What the caller guarantees: as for [`CallFn`], and `body` points at a [`HostBody`] whose
/// functions may be called (from the calling thread only) until `put_stream` returns.
pub type StreamFn = unsafe extern "C" fn(
    instance: *mut c_void,
    request: *const u8,
    request_len: usize,
    body: *const HostBody,
    out: *mut PluginBuffer,
) -> i32;

/// Reads the next bytes of the body into `buffer` (`capacity` bytes, at least 1): blocks
/// until there are some; returns [`BODY_DATA`] with `*filled` set (1..=capacity),
/// [`BODY_END`] or [`BODY_ABORTED`] (then `*filled` is 0). After END or ABORTED every
/// further read returns the same.
///
/// What the caller (the plugin) guarantees: `context` is the [`HostBody`]'s, `buffer` is
/// writable for `capacity` bytes of initialised memory (the host fills it as a byte slice:
/// a C plugin zeroes a fresh buffer first), `filled` is writable; the call is made on the thread that
/// `put_stream` runs on, before it returns.
pub type BodyReadFn =
    unsafe extern "C" fn(context: *mut c_void, buffer: *mut u8, capacity: usize, filled: *mut usize) -> i32;

/// After [`BODY_END`]: the upload's final metadata (a JSON object, string to string: fields
/// the client sent after the file part are in it), written as a pointer and length into
/// `json` and `len`; the bytes stay the host's and valid until `put_stream` returns. Before
/// the end it writes an empty length.
///
/// What the caller guarantees: as for [`BodyReadFn`]; `json` and `len` are writable.
pub type BodyMetadataFn = unsafe extern "C" fn(context: *mut c_void, json: *mut *const u8, len: *mut usize);

/// The host's side of a streamed body: a context and the functions that read it. Owned by
/// the host; the plugin only borrows it during `put_stream`.
#[repr(C)]
pub struct HostBody {
    pub context: *mut c_void,
    pub read: BodyReadFn,
    pub metadata: BodyMetadataFn,
}

/// Drops an instance created by `init`.
///
/// What the caller guarantees: `instance` is null or came from the same descriptor's `init`,
/// is dropped once, with no call on it in flight and none after.
pub type DropInstanceFn = unsafe extern "C" fn(instance: *mut c_void);
/// Frees a buffer that the plugin returned.
///
/// What the caller guarantees: `buffer` is one that this descriptor's functions wrote into an
/// out-parameter, with its fields unchanged, freed once.
pub type FreeBufferFn = unsafe extern "C" fn(buffer: PluginBuffer);

/// What `upgate_provider_v1` returns a pointer to. Static for the library's lifetime.
#[repr(C)]
pub struct ProviderDescriptor {
    pub header: DescriptorHeader,
    /// NUL-terminated UTF-8, static.
    pub name: *const c_char,
    /// NUL-terminated UTF-8, static.
    pub version: *const c_char,
    /// Capability bits: [`FLAG_LOCAL_IO`], [`FLAG_STREAMING`].
    pub flags: u32,
    pub init: InitFn,
    pub put: CallFn,
    pub delete: CallFn,
    pub health: CallFn,
    pub drop_instance: DropInstanceFn,
    pub free_buffer: FreeBufferFn,
    /// ABI 2: called only when `flags` has [`FLAG_STREAMING`] (else it answers an error).
    pub put_stream: StreamFn,
}

// SAFETY: `Sync` lets threads share `&ProviderDescriptor` (needed for the `static` that
// `export_provider!` builds). The type has no interior mutability: plain integers, fn
// pointers and two `*const c_char` that are only ever read, never written through, and
// dereferencing them takes `unsafe` code that answers for their validity itself. In the
// descriptors the macro builds they point at NUL-terminated string literals, 'static and
// immutable, so any thread may read them.
#[allow(unsafe_code)]
unsafe impl Sync for ProviderDescriptor {}

/// The entry function's type.
pub type EntryFn = unsafe extern "C" fn() -> *const ProviderDescriptor;

/// One upload handed to a provider.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PutRequest {
    /// upgate's id for the upload (a dialect-formatted id: uuid, 24 hex, f-uuid).
    pub upload_id: String,
    /// The client's filename, validated (no path separators or control characters).
    pub filename: String,
    /// Lower-case last extension without the dot, possibly empty.
    pub extension: String,
    /// MIME type detected from the content.
    pub mime_type: String,
    pub size: u64,
    /// Lower-case hex sha256 of the content.
    pub sha256: String,
    /// The spooled file. The plugin may read it, or move it away (rename): the host no
    /// longer needs it once `put` returns success.
    pub path: String,
    pub tenant: String,
    /// The inbound dialect the client used.
    pub dialect: String,
    /// Dialect metadata the client sent (for example Beam's `threadId` and workspace id,
    /// Dify's `user`), string to string.
    #[serde(default)]
    pub metadata: serde_json::Map<String, Value>,
    /// When the host stops waiting for this call (Unix epoch milliseconds; absent from hosts
    /// before it was added). A put that succeeds later is deleted by the host when the
    /// provider can delete; a plugin that works in steps and cannot (Kore's chunked
    /// sessions) stops before the step that would make the upload exist upstream past it.
    #[serde(default)]
    pub deadline_ms: Option<i64>,
}

impl PutRequest {
    /// The time left before the host stops waiting (`None` when the host sent no deadline);
    /// zero once it has passed.
    pub fn time_left(&self) -> Option<std::time::Duration> {
        let deadline = self.deadline_ms?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| i64::try_from(since.as_millis()).unwrap_or(i64::MAX));
        Some(std::time::Duration::from_millis(
            u64::try_from(deadline.saturating_sub(now)).unwrap_or(0),
        ))
    }
}

/// One upload handed to a streaming provider while it arrives (`put_stream`): what
/// [`PutRequest`] says, less what is known only at the end (the sha256; the spool path).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StreamRequest {
    pub upload_id: String,
    /// The client's filename, validated (no path separators or control characters).
    pub filename: String,
    /// Lower-case last extension without the dot, possibly empty.
    pub extension: String,
    /// MIME type detected from the first bytes of the content.
    pub mime_type: String,
    /// The size, when the client declared it before the body; else the body ends when
    /// [`Body`] says.
    #[serde(default)]
    pub size: Option<u64>,
    /// The most bytes the body can have: the tenant's file size limit, or less when the
    /// request's own length says so (the host refuses a longer body). A provider whose
    /// upstream request depends on the size (a single upload below a limit) decides with it.
    pub size_at_most: u64,
    pub tenant: String,
    pub dialect: String,
    /// The metadata the client sent before the file; [`Body::metadata`] has all of it once
    /// the body has ended.
    #[serde(default)]
    pub metadata: serde_json::Map<String, Value>,
}

/// The bytes of a streamed upload as they arrive: reads block until the host has bytes,
/// end (`Ok(0)`) once the host has accepted the whole upload, or fail with
/// [`std::io::ErrorKind::ConnectionAborted`] when the host aborted it.
pub struct Body<'a> {
    host: &'a HostBody,
    state: i32,
}

impl<'a> Body<'a> {
    /// Wraps the host's body for the duration of a `put_stream` call. Crate-private: its
    /// reads call `host.read` on `host.context` unchecked, which holds only for the
    /// `HostBody` the host passed in (a plugin building one of its own could reach undefined
    /// behaviour without writing `unsafe`).
    pub(crate) fn new(host: &'a HostBody) -> Self {
        Self {
            host,
            state: BODY_DATA,
        }
    }

    /// Whether the host aborted the upload (a read failed with `ConnectionAborted`).
    pub fn aborted(&self) -> bool {
        self.state == BODY_ABORTED
    }

    /// Whether the whole body was read and accepted.
    pub fn ended(&self) -> bool {
        self.state == BODY_END
    }

    /// The upload's final metadata, once the body has ended (`None` before).
    #[allow(unsafe_code)]
    pub fn metadata(&self) -> Option<serde_json::Map<String, Value>> {
        if !self.ended() {
            return None;
        }
        let (mut json, mut len): (*const u8, usize) = (std::ptr::null(), 0);
        // SAFETY: `host` is the host's body, valid during the `put_stream` call this `Body`
        // lives in (`StreamFn` contract); `json` and `len` are local and writable.
        unsafe { (self.host.metadata)(self.host.context, &mut json, &mut len) };
        let bytes = if json.is_null() || len == 0 {
            &[][..]
        } else {
            // SAFETY: the host wrote a pointer to `len` bytes it keeps alive and unchanged
            // until `put_stream` returns (`BodyMetadataFn`); the slice is dropped before that.
            unsafe { std::slice::from_raw_parts(json, len) }
        };
        serde_json::from_slice(bytes).ok()
    }
}

impl std::io::Read for Body<'_> {
    #[allow(unsafe_code)]
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        if buffer.is_empty() {
            return Ok(0);
        }
        if self.state == BODY_DATA {
            let mut filled = 0usize;
            // SAFETY: `host` is valid during this `put_stream` call (`StreamFn` contract);
            // `buffer` is writable for its length and `filled` is a local.
            let status = unsafe {
                (self.host.read)(self.host.context, buffer.as_mut_ptr(), buffer.len(), &mut filled)
            };
            match status {
                BODY_DATA if filled > 0 && filled <= buffer.len() => return Ok(filled),
                BODY_END => self.state = BODY_END,
                _ => self.state = BODY_ABORTED,
            }
        }
        if self.state == BODY_END {
            Ok(0)
        } else {
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the host aborted the upload",
            ))
        }
    }
}

/// What a successful `put` returns.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct PutResult {
    /// The upstream's id for the stored file.
    pub remote_id: String,
    /// Where the file can be fetched, when the upstream says.
    #[serde(default)]
    pub url: Option<String>,
    /// The upstream's answer, for the record (optional).
    #[serde(default)]
    pub raw: Value,
    /// True when the plugin moved the spooled file away (so the host need not remove it).
    #[serde(default)]
    pub consumed_file: bool,
}

/// A `delete` request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeleteRequest {
    pub upload_id: String,
    pub remote_id: String,
    /// The metadata the upload was put with (so a provider can find where it put it).
    #[serde(default)]
    pub metadata: serde_json::Map<String, Value>,
    /// The inbound dialect the upload came through, as in [`PutRequest::dialect`] (empty from
    /// hosts before it was added): whose metadata keys mean what.
    #[serde(default)]
    pub dialect: String,
}

/// How a provider call failed. `kind` decides whether the host retries.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Bad settings (init only).
    Config,
    /// The upstream refused the request (4xx other than 429): not retried.
    Rejected,
    /// The upstream failed (5xx, 429, connection error): retried.
    Unavailable,
    /// The upstream did not answer in time: retried.
    Timeout,
    /// The thing to delete does not exist upstream.
    NotFound,
    /// Local I/O or anything else inside the plugin.
    Internal,
    /// The plugin panicked (set by the trampolines, never by plugin code).
    Panic,
    /// `put_stream` only, returned before reading the body: this upload is not streamed
    /// (too large for the upstream's streamable request, say). The host stores it and calls
    /// `put`, which is the delivery's first attempt; this is not one.
    NotStreamed,
    /// No delivery slot (`forward_concurrency`) came free in time, or the host is stopping:
    /// the call never reached the plugin (set by the host, never by plugin code).
    Busy,
}

/// A provider error as it crosses the boundary.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PluginError {
    pub kind: ErrorKind,
    pub message: String,
    /// Upstream HTTP status, when there was one.
    #[serde(default)]
    pub status: Option<u16>,
    /// Upstream `Retry-After`, in seconds, when there was one.
    #[serde(default)]
    pub retry_after_secs: Option<u64>,
}

impl PluginError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            status: None,
            retry_after_secs: None,
        }
    }
}

impl std::fmt::Display for PluginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

impl std::error::Error for PluginError {}

/// What the host tells a plugin about where it runs, beside its settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitContext {
    /// Directory of the config file the settings came from: relative paths in settings
    /// (a `root`, a `ca_file`) are relative to it, never to the daemon's working directory.
    pub config_dir: std::path::PathBuf,
    /// The operator asked for `durability: power_loss`: a plugin that stores files itself
    /// makes them (and their directory entries) durable before `put` returns.
    #[serde(default)]
    pub durable: bool,
}

impl InitContext {
    /// `path` as the operator meant it: absolute paths as they are, relative ones under
    /// [`InitContext::config_dir`] (`./x` under `.` is `./x`, not `././x`).
    pub fn resolve(&self, path: &std::path::Path) -> std::path::PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.config_dir.join(path.strip_prefix(".").unwrap_or(path))
        }
    }
}

/// The bytes `init` receives: the provider's `settings:` map and the host's context.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitRequest {
    pub settings: Value,
    pub context: InitContext,
}

/// What a plugin implements. Instances are shared across threads: the host calls `put`
/// concurrently from its blocking pool.
pub trait Provider: Send + Sync + Sized + 'static {
    /// Capability bits the plugin declares (e.g. [`FLAG_LOCAL_IO`]); none by default.
    const FLAGS: u32 = 0;
    /// Builds an instance from its `settings` (the provider's `settings:` map in config);
    /// paths in settings are resolved with [`InitContext::resolve`].
    fn init(context: &InitContext, settings: Value) -> Result<Self, PluginError>;
    /// Stores one upload upstream.
    fn put(&self, request: PutRequest) -> Result<PutResult, PluginError>;
    /// Stores one upload upstream while it arrives; only called on plugins that declare
    /// [`FLAG_STREAMING`]. Read `body` to its end before completing the upstream request:
    /// the end means the host accepted the upload; an error (the host's abort) means the
    /// upstream must keep nothing (abandon the request, or delete what it stored). A provider
    /// that cannot stream this one upload returns [`ErrorKind::NotStreamed`] before reading:
    /// the host stores it, then calls [`Provider::put`].
    fn put_stream(&self, request: StreamRequest, body: &mut Body<'_>) -> Result<PutResult, PluginError> {
        let _ = (request, body);
        Err(PluginError::new(
            ErrorKind::Internal,
            "this plugin does not stream",
        ))
    }
    /// Deletes one upload upstream.
    fn delete(&self, request: DeleteRequest) -> Result<(), PluginError>;
    /// Cheap readiness check (no network unless the provider needs it).
    fn health(&self) -> Result<(), PluginError> {
        Ok(())
    }
}

/// Generates the exported entry symbol for a [`Provider`] type.
///
/// ```text
/// upgate_plugin_api::export_provider!(MyProvider, "my-provider");
/// ```
///
/// Once per plugin library. The entry symbol needs `#[unsafe(no_mangle)]`, which the
/// expansion allows itself (`#[allow(unsafe_code)]`), so the plugin crate can
/// `#![deny(unsafe_code)]`; `#![forbid(unsafe_code)]` rejects that `allow` (E0453), as it
/// should: the crate does export an unmangled symbol.
#[macro_export]
macro_rules! export_provider {
    ($provider:ty, $name:literal) => {
        // SAFETY: `no_mangle` exports this function unmangled as `upgate_provider_v1`
        // (`ENTRY_SYMBOL`), the one symbol the host looks up. That is sound as long as nothing
        // else linked into the library defines the same symbol: one `export_provider!` per
        // plugin library (a second one in the same crate fails to compile). The function is
        // safe to call: it returns a pointer to an immutable `static`, valid while the library
        // is loaded, whose `name` and `version` point at NUL-terminated string literals and
        // whose functions are the trampolines for `$provider`, all for the same type, so an
        // instance made by its `init` is the type its `put` expects.
        // The `allow` keeps this working in plugin crates that `#![deny(unsafe_code)]`.
        #[allow(unsafe_code)]
        #[unsafe(no_mangle)]
        pub extern "C" fn upgate_provider_v1() -> *const $crate::ProviderDescriptor {
            static DESCRIPTOR: $crate::ProviderDescriptor = $crate::ProviderDescriptor {
                header: $crate::DescriptorHeader {
                    abi_version: $crate::ABI_VERSION,
                    struct_size: ::std::mem::size_of::<$crate::ProviderDescriptor>() as u32,
                },
                name: concat!($name, "\0").as_ptr().cast(),
                version: concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast(),
                flags: <$provider as $crate::Provider>::FLAGS,
                init: $crate::trampolines::init::<$provider>,
                put: $crate::trampolines::put::<$provider>,
                delete: $crate::trampolines::delete::<$provider>,
                health: $crate::trampolines::health::<$provider>,
                drop_instance: $crate::trampolines::drop_instance::<$provider>,
                free_buffer: $crate::trampolines::free_buffer,
                put_stream: $crate::trampolines::put_stream::<$provider>,
            };
            &DESCRIPTOR
        }
    };
}

/// The `extern "C"` functions behind a descriptor. Each catches panics and turns them into
/// [`STATUS_PANIC`]; none lets a panic unwind into the host.
pub mod trampolines {
    use std::cell::{Cell, RefCell};
    use std::sync::Once;

    use super::*;

    thread_local! {
        /// Whether this thread is inside a trampoline's call into the provider.
        static IN_CALL: Cell<bool> = const { Cell::new(false) };
        /// Where the last panic inside a call happened (`file:line`), for its message.
        static PANICKED_AT: RefCell<Option<String>> = const { RefCell::new(None) };
    }

    static QUIET_PANICS: Once = Once::new();

    /// A panic inside a call is reported to the host, which logs it (escaped, in its own
    /// format): the library's own std (a cdylib has its copy, with its own panic hook) must
    /// not also write it raw to the process's stderr, in the middle of the host's log lines.
    /// Other panics (a plugin's own threads, its tests) go to the hook there was.
    fn quiet_panics_in_calls() {
        QUIET_PANICS.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                if IN_CALL.with(Cell::get) {
                    let at = info.location().map(|at| format!("{}:{}", at.file(), at.line()));
                    PANICKED_AT.with(|slot| *slot.borrow_mut() = at);
                } else {
                    previous(info);
                }
            }));
        });
    }

    /// What a panic says, and where it happened. The payload is dropped inside a catch of
    /// its own: a payload whose drop panics must not unwind into the host.
    fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
        let text = catch_unwind(AssertUnwindSafe(move || {
            if let Some(text) = payload.downcast_ref::<&str>() {
                (*text).to_owned()
            } else if let Some(text) = payload.downcast_ref::<String>() {
                text.clone()
            } else {
                "plugin panicked".to_owned()
            }
        }))
        .unwrap_or_else(|leftover| {
            std::mem::forget(leftover);
            "plugin panicked".to_owned()
        });
        match PANICKED_AT.with(|slot| slot.borrow_mut().take()) {
            Some(at) => format!("{text} (at {at})"),
            None => text,
        }
    }

    /// Serializes `value` for the host; `null` if that fails.
    fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
        serde_json::to_vec(value).unwrap_or_else(|_| b"null".to_vec())
    }

    /// Hands `bytes` to the host through its out-parameter (dropped if `out` is null).
    ///
    /// # Safety
    /// `out` is null or valid for writing one [`PluginBuffer`] (non-null, aligned, into memory
    /// the host keeps for the call, such as its `&mut PluginBuffer`), and what `out` holds
    /// owns nothing: it is overwritten without being dropped or freed.
    #[allow(unsafe_code)]
    unsafe fn write_out(out: *mut PluginBuffer, bytes: Vec<u8>) {
        if !out.is_null() {
            // SAFETY: `out` is non-null here and valid for the write by the contract above;
            // `write` neither reads nor drops the old value, which owns nothing.
            unsafe { out.write(PluginBuffer::from_vec(bytes)) };
        }
    }

    /// Borrows the host's request bytes.
    ///
    /// # Safety
    /// `len` is 0 or `ptr` points at `len` initialized bytes that stay alive and unchanged for
    /// `'a`, which the caller keeps within the FFI call the host passed them to.
    #[allow(unsafe_code)]
    unsafe fn request_bytes<'a>(ptr: *const u8, len: usize) -> &'a [u8] {
        if ptr.is_null() || len == 0 {
            &[]
        } else {
            // SAFETY: `ptr` is non-null here and, by the contract above, points at `len`
            // initialized bytes of one host allocation (so `len` <= isize::MAX) that nobody
            // mutates or frees during `'a`; u8 needs no alignment.
            unsafe { std::slice::from_raw_parts(ptr, len) }
        }
    }

    fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, PluginError> {
        serde_json::from_slice(bytes).map_err(|error| {
            PluginError::new(
                ErrorKind::Internal,
                format!("bad request JSON from host: {error}"),
            )
        })
    }

    /// Runs `body`, catching a panic; returns the status and the JSON (result or error) for
    /// the out-parameter.
    fn run<T: Serialize>(body: impl FnOnce() -> Result<T, PluginError>) -> (i32, Vec<u8>) {
        quiet_panics_in_calls();
        let outer = IN_CALL.with(|in_call| in_call.replace(true));
        let result = catch_unwind(AssertUnwindSafe(body));
        IN_CALL.with(|in_call| in_call.set(outer));
        match result {
            Ok(Ok(value)) => (STATUS_OK, to_json(&value)),
            Ok(Err(error)) => (STATUS_ERROR, to_json(&error)),
            Err(payload) => {
                let error = PluginError::new(ErrorKind::Panic, panic_message(payload));
                // Serializing a plain struct cannot panic.
                (STATUS_PANIC, to_json(&error))
            }
        }
    }

    /// # Safety
    /// The [`InitFn`] contract: `settings` readable for `settings_len` bytes during the call,
    /// `out` null or a writable out-parameter that owns nothing.
    #[allow(unsafe_code)]
    pub unsafe extern "C" fn init<P: Provider>(
        settings: *const u8,
        settings_len: usize,
        out: *mut PluginBuffer,
    ) -> *mut c_void {
        // SAFETY: the host's settings bytes stay alive and unchanged for this call (`InitFn`
        // contract), and `bytes` does not outlive it.
        let bytes = unsafe { request_bytes(settings, settings_len) };
        let mut instance: *mut c_void = std::ptr::null_mut();
        let (status, json) = run(|| {
            let request: InitRequest = decode(bytes)?;
            let provider = P::init(&request.context, request.settings)?;
            instance = Box::into_raw(Box::new(provider)).cast();
            Ok(Value::Null)
        });
        // SAFETY: `out` is the host's out-parameter, null or writable and owning nothing
        // (`InitFn` contract).
        unsafe { write_out(out, json) };
        if status == STATUS_OK {
            instance
        } else {
            std::ptr::null_mut()
        }
    }

    /// # Safety
    /// `instance` is non-null and is the `Box::into_raw` of a `Box<P>` made by `init::<P>`
    /// (the same `P`), and `drop_instance` does not free it during `'a`, which the caller
    /// keeps within one FFI call (the host never drops an instance with calls in flight).
    #[allow(unsafe_code)]
    unsafe fn provider<'a, P: Provider>(instance: *mut c_void) -> &'a P {
        // SAFETY: by the contract above the pointer is a live, aligned, initialized `P` for
        // `'a`. Only shared references to it exist until `drop_instance` (the trampolines
        // never make a `&mut`), and `P: Sync`, so concurrent calls may each hold one.
        unsafe { &*instance.cast::<P>() }
    }

    /// # Safety
    /// The [`CallFn`] contract: a live instance from this descriptor's `init`, request bytes
    /// readable during the call, `out` null or a writable out-parameter that owns nothing.
    #[allow(unsafe_code)]
    pub unsafe extern "C" fn put<P: Provider>(
        instance: *mut c_void,
        request: *const u8,
        request_len: usize,
        out: *mut PluginBuffer,
    ) -> i32 {
        // SAFETY: `instance` came from this descriptor's `init`, whose `P` is this `P` (one
        // `export_provider!` instantiates them all), and is not dropped during the call
        // (`CallFn` contract); `provider` does not outlive the call.
        let provider = unsafe { provider::<P>(instance) };
        // SAFETY: the host's request bytes stay alive and unchanged for this call (`CallFn`
        // contract), and `bytes` does not outlive it.
        let bytes = unsafe { request_bytes(request, request_len) };
        let (status, json) = run(|| provider.put(decode(bytes)?));
        // SAFETY: `out` is the host's out-parameter, null or writable and owning nothing
        // (`CallFn` contract).
        unsafe { write_out(out, json) };
        status
    }

    /// # Safety
    /// The [`StreamFn`] contract: as for [`put`], and `body` is the host's [`HostBody`],
    /// callable until this returns.
    #[allow(unsafe_code)]
    pub unsafe extern "C" fn put_stream<P: Provider>(
        instance: *mut c_void,
        request: *const u8,
        request_len: usize,
        body: *const HostBody,
        out: *mut PluginBuffer,
    ) -> i32 {
        // SAFETY: `instance` came from this descriptor's `init`, whose `P` is this `P`, and is
        // not dropped during the call (`StreamFn` contract); `provider` does not outlive it.
        let provider = unsafe { provider::<P>(instance) };
        // SAFETY: the host's request bytes stay alive and unchanged for this call.
        let bytes = unsafe { request_bytes(request, request_len) };
        let (status, json) = run(|| {
            // SAFETY: `body` is null or the host's `HostBody`, valid until this returns
            // (`StreamFn` contract); the reference does not outlive the call.
            let host = unsafe { body.as_ref() }
                .ok_or_else(|| PluginError::new(ErrorKind::Internal, "no body from the host"))?;
            // A plugin that stored the upload although the host aborted it answers its remote
            // id as usual: the host, which knows it aborted, deletes it.
            provider.put_stream(decode(bytes)?, &mut Body::new(host))
        });
        // SAFETY: `out` is the host's out-parameter, null or writable and owning nothing.
        unsafe { write_out(out, json) };
        status
    }

    /// # Safety
    /// The [`CallFn`] contract, as for [`put`].
    #[allow(unsafe_code)]
    pub unsafe extern "C" fn delete<P: Provider>(
        instance: *mut c_void,
        request: *const u8,
        request_len: usize,
        out: *mut PluginBuffer,
    ) -> i32 {
        // SAFETY: `instance` came from this descriptor's `init`, whose `P` is this `P`, and is
        // not dropped during the call (`CallFn` contract); `provider` does not outlive it.
        let provider = unsafe { provider::<P>(instance) };
        // SAFETY: the host's request bytes stay alive and unchanged for this call (`CallFn`
        // contract), and `bytes` does not outlive it.
        let bytes = unsafe { request_bytes(request, request_len) };
        let (status, json) = run(|| provider.delete(decode(bytes)?).map(|()| Value::Null));
        // SAFETY: `out` is the host's out-parameter, null or writable and owning nothing
        // (`CallFn` contract).
        unsafe { write_out(out, json) };
        status
    }

    /// # Safety
    /// The [`CallFn`] contract, as for [`put`]; the request bytes are not read.
    #[allow(unsafe_code)]
    pub unsafe extern "C" fn health<P: Provider>(
        instance: *mut c_void,
        _request: *const u8,
        _request_len: usize,
        out: *mut PluginBuffer,
    ) -> i32 {
        // SAFETY: `instance` came from this descriptor's `init`, whose `P` is this `P`, and is
        // not dropped during the call (`CallFn` contract); `provider` does not outlive it.
        let provider = unsafe { provider::<P>(instance) };
        let (status, json) = run(|| provider.health().map(|()| Value::Null));
        // SAFETY: `out` is the host's out-parameter, null or writable and owning nothing
        // (`CallFn` contract).
        unsafe { write_out(out, json) };
        status
    }

    /// # Safety
    /// The [`DropInstanceFn`] contract: `instance` is null or came from `init::<P>`, is
    /// dropped once, with no call on it in flight and none after.
    #[allow(unsafe_code)]
    pub unsafe extern "C" fn drop_instance<P: Provider>(instance: *mut c_void) {
        if instance.is_null() {
            return;
        }
        // SAFETY: `instance` is the `Box::into_raw` of a `Box<P>` made in `init::<P>`, not
        // freed before, and no `&P` from `provider` is alive (no call in flight), so this
        // takes back sole ownership of the box.
        let boxed = unsafe { Box::from_raw(instance.cast::<P>()) };
        if let Err(payload) = catch_unwind(AssertUnwindSafe(move || drop(boxed))) {
            // Its drop could panic too, outside any catch: it is leaked instead.
            std::mem::forget(payload);
        }
    }

    /// # Safety
    /// The [`FreeBufferFn`] contract: `buffer` was written into an out-parameter by this
    /// library's trampolines (reached through its descriptor), its fields are unchanged, and
    /// it is freed once. It must come back to the `free_buffer` of the library that made it,
    /// never to another copy of this function (the host links this crate too, with its own
    /// allocator).
    #[allow(unsafe_code)]
    pub unsafe extern "C" fn free_buffer(buffer: PluginBuffer) {
        if buffer.ptr.is_null() {
            return;
        }
        // SAFETY: ptr, len and capacity are those of a `Vec<u8>` that `PluginBuffer::from_vec`
        // leaked in this same library, so they describe an allocation of the global allocator
        // that `Vec::from_raw_parts` frees with here; nothing else frees it (contract above).
        drop(unsafe { Vec::from_raw_parts(buffer.ptr, buffer.len, buffer.capacity) });
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    struct Echo;
    impl Provider for Echo {
        fn init(_context: &InitContext, settings: Value) -> Result<Self, PluginError> {
            if settings.get("fail").is_some() {
                return Err(PluginError::new(ErrorKind::Config, "told to fail"));
            }
            Ok(Echo)
        }
        fn put(&self, request: PutRequest) -> Result<PutResult, PluginError> {
            if request.filename == "panic" {
                panic!("boom");
            }
            Ok(PutResult {
                remote_id: request.upload_id,
                url: None,
                raw: Value::Null,
                consumed_file: false,
            })
        }
        fn put_stream(&self, request: StreamRequest, body: &mut Body<'_>) -> Result<PutResult, PluginError> {
            let mut bytes = Vec::new();
            let mut piece = [0u8; 3];
            loop {
                match std::io::Read::read(body, &mut piece) {
                    Ok(0) => break,
                    Ok(read) if request.filename == "panic" => panic!("boom after {read}"),
                    Ok(read) => bytes.extend_from_slice(&piece[..read]),
                    Err(error) => return Err(PluginError::new(ErrorKind::Unavailable, error.to_string())),
                }
            }
            let user = body.metadata().and_then(|m| m.get("user").cloned());
            Ok(PutResult {
                remote_id: String::from_utf8_lossy(&bytes).into_owned(),
                url: None,
                raw: user.unwrap_or(Value::Null),
                consumed_file: false,
            })
        }
        fn delete(&self, _request: DeleteRequest) -> Result<(), PluginError> {
            Err(PluginError::new(ErrorKind::NotFound, "gone"))
        }
    }
    export_provider!(Echo, "echo");

    /// A host body over a byte string: its pieces, then END (with metadata) or ABORTED.
    struct FakeBody {
        pieces: Vec<&'static [u8]>,
        end: i32,
        metadata: &'static [u8],
    }

    #[allow(unsafe_code)]
    unsafe extern "C" fn fake_read(
        context: *mut c_void,
        buffer: *mut u8,
        capacity: usize,
        filled: *mut usize,
    ) -> i32 {
        // SAFETY: the tests pass a live `FakeBody` as the context, used by one thread.
        let body = unsafe { &mut *context.cast::<FakeBody>() };
        if body.pieces.is_empty() {
            return body.end;
        }
        let piece = body.pieces[0];
        let take = piece.len().min(capacity);
        // SAFETY: `buffer` is writable for `capacity` >= `take` bytes (`BodyReadFn`).
        unsafe { std::ptr::copy_nonoverlapping(piece.as_ptr(), buffer, take) };
        if take == piece.len() {
            body.pieces.remove(0);
        } else {
            body.pieces[0] = &piece[take..];
        }
        // SAFETY: `filled` is writable (`BodyReadFn`).
        unsafe { *filled = take };
        BODY_DATA
    }

    #[allow(unsafe_code)]
    unsafe extern "C" fn fake_metadata(context: *mut c_void, json: *mut *const u8, len: *mut usize) {
        // SAFETY: as in `fake_read`; `json` and `len` are writable (`BodyMetadataFn`).
        unsafe {
            let body = &*context.cast::<FakeBody>();
            *json = body.metadata.as_ptr();
            *len = body.metadata.len();
        }
    }

    /// One `put_stream` over `body`.
    #[allow(unsafe_code)]
    fn stream(instance: *mut c_void, filename: &str, mut body: FakeBody) -> (i32, Vec<u8>) {
        let host = HostBody {
            context: (&raw mut body).cast(),
            read: fake_read,
            metadata: fake_metadata,
        };
        let request = serde_json::to_vec(&StreamRequest {
            upload_id: "u1".into(),
            filename: filename.into(),
            extension: String::new(),
            mime_type: "text/plain".into(),
            size: None,
            size_at_most: 1 << 20,
            tenant: "t".into(),
            dialect: "dify".into(),
            metadata: Default::default(),
        })
        .unwrap();
        let mut out = PluginBuffer::empty();
        // SAFETY: a live instance; `request`, `host` and `body` outlive the call.
        let status =
            unsafe { (descriptor().put_stream)(instance, request.as_ptr(), request.len(), &host, &mut out) };
        (status, take(out))
    }

    #[test]
    fn streamed_bodies_end_abort_and_panic_across_the_boundary() {
        let (instance, _) = init(br#"{"settings":{},"context":{"config_dir":""}}"#);
        let whole = FakeBody {
            pieces: vec![b"hello ", b"world"],
            end: BODY_END,
            metadata: br#"{"user":"late"}"#,
        };
        let (status, body) = stream(instance, "a.txt", whole);
        assert_eq!(status, STATUS_OK);
        let result: PutResult = serde_json::from_slice(&body).unwrap();
        assert_eq!(result.remote_id, "hello world");
        assert_eq!(result.raw, Value::from("late"));

        let aborted = FakeBody {
            pieces: vec![b"hel"],
            end: BODY_ABORTED,
            metadata: b"",
        };
        let (status, body) = stream(instance, "a.txt", aborted);
        assert_eq!(status, STATUS_ERROR);
        let error: PluginError = serde_json::from_slice(&body).unwrap();
        assert!(error.message.contains("aborted"), "{}", error.message);

        let panicking = FakeBody {
            pieces: vec![b"abc"],
            end: BODY_END,
            metadata: b"",
        };
        let (status, body) = stream(instance, "panic", panicking);
        assert_eq!(status, STATUS_PANIC);
        let message = serde_json::from_slice::<PluginError>(&body).unwrap().message;
        assert!(message.starts_with("boom after 3 (at "), "{message}");
        drop_instance(instance);
    }

    // The helpers below call the descriptor the way the host's loader does; the tests
    // themselves stay safe code.

    /// The descriptor `export_provider!` generated above.
    #[allow(unsafe_code)]
    fn descriptor() -> &'static ProviderDescriptor {
        // SAFETY: the entry function returns a pointer to its `static DESCRIPTOR`, which lives
        // as long as the test binary it is linked into.
        unsafe { &*upgate_provider_v1() }
    }

    /// Copies a buffer the plugin wrote and frees it through the descriptor.
    #[allow(unsafe_code)]
    fn take(out: PluginBuffer) -> Vec<u8> {
        // SAFETY: `out` was just written by one of the descriptor's functions (or is still
        // empty) and is freed only below, after the copy.
        let bytes = unsafe { out.as_slice() }.to_vec();
        // SAFETY: the buffer came from this descriptor's functions, unchanged, and is freed
        // once, here, by the same library's `free_buffer`.
        unsafe { (descriptor().free_buffer)(out) };
        bytes
    }

    /// `init` with `settings`: the instance (null on failure) and the output JSON.
    #[allow(unsafe_code)]
    fn init(settings: &[u8]) -> (*mut c_void, Vec<u8>) {
        let mut out = PluginBuffer::empty();
        // SAFETY: `settings` outlives the call; `out` is a local empty buffer.
        let instance = unsafe { (descriptor().init)(settings.as_ptr(), settings.len(), &mut out) };
        (instance, take(out))
    }

    /// One `put`, `delete` or `health` call on `instance` (from [`init`], not dropped yet).
    #[allow(unsafe_code)]
    fn call(function: CallFn, instance: *mut c_void, request: &[u8]) -> (i32, Vec<u8>) {
        let mut out = PluginBuffer::empty();
        // SAFETY: `instance` is a live instance of this descriptor (the tests drop it only
        // after their last call); `request` outlives the call; `out` is a local empty buffer.
        let status = unsafe { function(instance, request.as_ptr(), request.len(), &mut out) };
        (status, take(out))
    }

    /// Drops an instance from [`init`]; the tests make no call on it afterwards.
    #[allow(unsafe_code)]
    fn drop_instance(instance: *mut c_void) {
        // SAFETY: `instance` came from this descriptor's `init`, no call on it is in flight,
        // and it is not used again.
        unsafe { (descriptor().drop_instance)(instance) };
    }

    fn request(filename: &str) -> Vec<u8> {
        serde_json::to_vec(&PutRequest {
            upload_id: "u1".into(),
            filename: filename.into(),
            extension: String::new(),
            mime_type: "text/plain".into(),
            size: 1,
            sha256: String::new(),
            path: "/nonexistent".into(),
            tenant: "t".into(),
            dialect: "dify".into(),
            metadata: Default::default(),
            deadline_ms: None,
        })
        .unwrap()
    }

    #[test]
    fn relative_settings_paths_join_the_config_dir_without_a_doubled_dot() {
        let here = InitContext {
            config_dir: ".".into(),
            durable: false,
        };
        assert_eq!(here.resolve("./data/files".as_ref()), Path::new("./data/files"));
        assert_eq!(here.resolve("ca.pem".as_ref()), Path::new("./ca.pem"));
        let etc = InitContext {
            config_dir: "/etc/upgate".into(),
            durable: false,
        };
        assert_eq!(etc.resolve("./ca.pem".as_ref()), Path::new("/etc/upgate/ca.pem"));
        assert_eq!(
            etc.resolve("../ca.pem".as_ref()),
            Path::new("/etc/upgate/../ca.pem")
        );
        assert_eq!(etc.resolve("/srv/ca.pem".as_ref()), Path::new("/srv/ca.pem"));
    }

    #[test]
    fn descriptor_round_trip_and_panics_are_caught() {
        let descriptor = descriptor();
        assert_eq!(descriptor.header.abi_version, ABI_VERSION);
        assert_eq!(
            descriptor.header.struct_size as usize,
            std::mem::size_of::<ProviderDescriptor>()
        );
        let (instance, _) = init(br#"{"settings":{},"context":{"config_dir":"/etc/upgate"}}"#);
        assert!(!instance.is_null());

        let (status, body) = call(descriptor.put, instance, &request("ok.txt"));
        assert_eq!(status, STATUS_OK);
        let result: PutResult = serde_json::from_slice(&body).unwrap();
        assert_eq!(result.remote_id, "u1");

        let (status, body) = call(descriptor.put, instance, &request("panic"));
        assert_eq!(status, STATUS_PANIC);
        let error: PluginError = serde_json::from_slice(&body).unwrap();
        assert_eq!(error.kind, ErrorKind::Panic);
        assert!(
            error.message.starts_with("boom (at ") && error.message.contains("lib.rs:"),
            "{}",
            error.message
        );

        let (status, body) = call(
            descriptor.delete,
            instance,
            br#"{"upload_id":"u1","remote_id":"r"}"#,
        );
        assert_eq!(status, STATUS_ERROR);
        assert_eq!(
            serde_json::from_slice::<PluginError>(&body).unwrap().kind,
            ErrorKind::NotFound
        );

        let (status, _) = call(descriptor.put, instance, b"not json");
        assert_eq!(status, STATUS_ERROR);

        let (status, body) = call(descriptor.health, instance, b"");
        assert_eq!((status, body.as_slice()), (STATUS_OK, b"null".as_slice()));
        drop_instance(instance);
    }

    #[test]
    fn init_failure_returns_null_and_an_error() {
        let (instance, body) = init(br#"{"settings":{"fail":true},"context":{"config_dir":""}}"#);
        assert!(instance.is_null());
        let error: PluginError = serde_json::from_slice(&body).unwrap();
        assert_eq!(error.kind, ErrorKind::Config);
    }
}
