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
//! Plugin authors never write `unsafe`: they implement [`Provider`] and call
//! [`export_provider!`], which generates the entry symbol and panic-catching trampolines.

use std::ffi::{c_char, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The ABI version this crate implements. Bumped on any incompatible change.
pub const ABI_VERSION: u32 = 1;

/// Name of the exported entry function, NUL-terminated for `dlsym`.
pub const ENTRY_SYMBOL: &[u8] = b"upgate_provider_v1\0";

/// Capability: `put` and `delete` only touch the local file system (no network) and finish
/// quickly for small files, so the host may call them for small uploads on its own workers
/// instead of handing them to its blocking pool.
pub const FLAG_LOCAL_IO: u32 = 1;

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
    /// `self` must have been filled by a plugin call and not yet freed.
    pub unsafe fn as_slice(&self) -> &[u8] {
        if self.ptr.is_null() {
            &[]
        } else {
            // SAFETY: the plugin created ptr/len from a live Vec (see `from_vec`).
            unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
        }
    }
}

/// `init(init_request_json) -> instance`; on failure returns null and fills `out` with a
/// [`PluginError`].
pub type InitFn =
    unsafe extern "C" fn(settings: *const u8, settings_len: usize, out: *mut PluginBuffer) -> *mut c_void;
/// `put`, `delete` and `health`: request JSON in, status code out, JSON result in `out`.
pub type CallFn = unsafe extern "C" fn(
    instance: *mut c_void,
    request: *const u8,
    request_len: usize,
    out: *mut PluginBuffer,
) -> i32;
/// Drops an instance created by `init`.
pub type DropInstanceFn = unsafe extern "C" fn(instance: *mut c_void);
/// Frees a buffer that the plugin returned.
pub type FreeBufferFn = unsafe extern "C" fn(buffer: PluginBuffer);

/// What `upgate_provider_v1` returns a pointer to. Static for the library's lifetime.
#[repr(C)]
pub struct ProviderDescriptor {
    pub header: DescriptorHeader,
    /// NUL-terminated UTF-8, static.
    pub name: *const c_char,
    /// NUL-terminated UTF-8, static.
    pub version: *const c_char,
    /// Capability bits: [`FLAG_LOCAL_IO`].
    pub flags: u32,
    pub init: InitFn,
    pub put: CallFn,
    pub delete: CallFn,
    pub health: CallFn,
    pub drop_instance: DropInstanceFn,
    pub free_buffer: FreeBufferFn,
}

// SAFETY: the descriptor is immutable static data: two pointers to static strings and
// function pointers.
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
#[macro_export]
macro_rules! export_provider {
    ($provider:ty, $name:literal) => {
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
            };
            &DESCRIPTOR
        }
    };
}

/// The `extern "C"` functions behind a descriptor. Each catches panics and turns them into
/// [`STATUS_PANIC`]; none lets a panic unwind into the host.
pub mod trampolines {
    use super::*;

    fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
        if let Some(text) = payload.downcast_ref::<&str>() {
            (*text).to_owned()
        } else if let Some(text) = payload.downcast_ref::<String>() {
            text.clone()
        } else {
            "plugin panicked".to_owned()
        }
    }

    fn write_json<T: Serialize>(out: *mut PluginBuffer, value: &T) {
        let bytes = serde_json::to_vec(value).unwrap_or_else(|_| b"null".to_vec());
        if !out.is_null() {
            // SAFETY: the host passes a valid, writable out-parameter.
            unsafe { out.write(PluginBuffer::from_vec(bytes)) };
        }
    }

    /// Borrows the host's request bytes.
    ///
    /// # Safety
    /// `ptr` must point at `len` readable bytes for the duration of the call.
    unsafe fn request_bytes<'a>(ptr: *const u8, len: usize) -> &'a [u8] {
        if ptr.is_null() || len == 0 {
            &[]
        } else {
            // SAFETY: guaranteed by the caller.
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

    /// Runs `body`, writing its JSON result or error into `out`.
    fn run<T: Serialize>(out: *mut PluginBuffer, body: impl FnOnce() -> Result<T, PluginError>) -> i32 {
        match catch_unwind(AssertUnwindSafe(body)) {
            Ok(Ok(value)) => {
                write_json(out, &value);
                STATUS_OK
            }
            Ok(Err(error)) => {
                write_json(out, &error);
                STATUS_ERROR
            }
            Err(payload) => {
                let error = PluginError::new(ErrorKind::Panic, panic_message(payload));
                // Serializing a plain struct cannot panic.
                write_json(out, &error);
                STATUS_PANIC
            }
        }
    }

    /// # Safety
    /// Called by the host with valid settings bytes and out-parameter.
    pub unsafe extern "C" fn init<P: Provider>(
        settings: *const u8,
        settings_len: usize,
        out: *mut PluginBuffer,
    ) -> *mut c_void {
        // SAFETY: forwarded from the caller's contract.
        let bytes = unsafe { request_bytes(settings, settings_len) };
        let mut instance: *mut c_void = std::ptr::null_mut();
        let status = run(out, || {
            let request: InitRequest = decode(bytes)?;
            let provider = P::init(&request.context, request.settings)?;
            instance = Box::into_raw(Box::new(provider)).cast();
            Ok(Value::Null)
        });
        if status == STATUS_OK {
            instance
        } else {
            std::ptr::null_mut()
        }
    }

    /// # Safety
    /// `instance` must come from `init::<P>` and not be dropped yet.
    unsafe fn provider<'a, P: Provider>(instance: *mut c_void) -> &'a P {
        // SAFETY: guaranteed by the caller.
        unsafe { &*instance.cast::<P>() }
    }

    /// # Safety
    /// See [`CallFn`]: a live instance, valid request bytes and out-parameter.
    pub unsafe extern "C" fn put<P: Provider>(
        instance: *mut c_void,
        request: *const u8,
        request_len: usize,
        out: *mut PluginBuffer,
    ) -> i32 {
        // SAFETY: forwarded from the caller's contract.
        let (provider, bytes) = unsafe { (provider::<P>(instance), request_bytes(request, request_len)) };
        run(out, || provider.put(decode(bytes)?))
    }

    /// # Safety
    /// See [`CallFn`].
    pub unsafe extern "C" fn delete<P: Provider>(
        instance: *mut c_void,
        request: *const u8,
        request_len: usize,
        out: *mut PluginBuffer,
    ) -> i32 {
        // SAFETY: forwarded from the caller's contract.
        let (provider, bytes) = unsafe { (provider::<P>(instance), request_bytes(request, request_len)) };
        run(out, || provider.delete(decode(bytes)?).map(|()| Value::Null))
    }

    /// # Safety
    /// See [`CallFn`]; the request bytes are ignored.
    pub unsafe extern "C" fn health<P: Provider>(
        instance: *mut c_void,
        _request: *const u8,
        _request_len: usize,
        out: *mut PluginBuffer,
    ) -> i32 {
        // SAFETY: forwarded from the caller's contract.
        let provider = unsafe { provider::<P>(instance) };
        run(out, || provider.health().map(|()| Value::Null))
    }

    /// # Safety
    /// `instance` must come from `init::<P>`; it is dropped here and must not be used again.
    pub unsafe extern "C" fn drop_instance<P: Provider>(instance: *mut c_void) {
        if instance.is_null() {
            return;
        }
        // SAFETY: created by Box::into_raw in `init::<P>`.
        let boxed = unsafe { Box::from_raw(instance.cast::<P>()) };
        let _ = catch_unwind(AssertUnwindSafe(move || drop(boxed)));
    }

    /// # Safety
    /// `buffer` must have been returned by this plugin and not freed yet.
    pub unsafe extern "C" fn free_buffer(buffer: PluginBuffer) {
        if buffer.ptr.is_null() {
            return;
        }
        // SAFETY: ptr/len/capacity come from a Vec<u8> leaked in `PluginBuffer::from_vec`.
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
        fn delete(&self, _request: DeleteRequest) -> Result<(), PluginError> {
            Err(PluginError::new(ErrorKind::NotFound, "gone"))
        }
    }
    export_provider!(Echo, "echo");

    fn call(function: CallFn, instance: *mut c_void, request: &[u8]) -> (i32, Vec<u8>) {
        let descriptor = unsafe { &*upgate_provider_v1() };
        let mut out = PluginBuffer::empty();
        let status = unsafe { function(instance, request.as_ptr(), request.len(), &mut out) };
        let bytes = unsafe { out.as_slice() }.to_vec();
        unsafe { (descriptor.free_buffer)(out) };
        (status, bytes)
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
        let descriptor = unsafe { &*upgate_provider_v1() };
        assert_eq!(descriptor.header.abi_version, ABI_VERSION);
        assert_eq!(
            descriptor.header.struct_size as usize,
            std::mem::size_of::<ProviderDescriptor>()
        );
        let mut out = PluginBuffer::empty();
        let settings = br#"{"settings":{},"context":{"config_dir":"/etc/upgate"}}"#;
        let instance = unsafe { (descriptor.init)(settings.as_ptr(), settings.len(), &mut out) };
        assert!(!instance.is_null());
        unsafe { (descriptor.free_buffer)(out) };

        let (status, body) = call(descriptor.put, instance, &request("ok.txt"));
        assert_eq!(status, STATUS_OK);
        let result: PutResult = serde_json::from_slice(&body).unwrap();
        assert_eq!(result.remote_id, "u1");

        let (status, body) = call(descriptor.put, instance, &request("panic"));
        assert_eq!(status, STATUS_PANIC);
        let error: PluginError = serde_json::from_slice(&body).unwrap();
        assert_eq!(error.kind, ErrorKind::Panic);
        assert_eq!(error.message, "boom");

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
        unsafe { (descriptor.drop_instance)(instance) };
    }

    #[test]
    fn init_failure_returns_null_and_an_error() {
        let descriptor = unsafe { &*upgate_provider_v1() };
        let mut out = PluginBuffer::empty();
        let settings = br#"{"settings":{"fail":true},"context":{"config_dir":""}}"#;
        let instance = unsafe { (descriptor.init)(settings.as_ptr(), settings.len(), &mut out) };
        assert!(instance.is_null());
        let error: PluginError = serde_json::from_slice(unsafe { out.as_slice() }).unwrap();
        assert_eq!(error.kind, ErrorKind::Config);
        unsafe { (descriptor.free_buffer)(out) };
    }
}
