//! The only `unsafe` in upgate-core: opening provider plugin libraries and calling through
//! their descriptors.
//!
//! What flows through here: a library path in, a checked [`LoadedPlugin`] out (entry symbol
//! found, ABI version and descriptor size verified before anything else is read); JSON bytes
//! in and out of the plugin's functions, with every returned buffer handed back to the
//! plugin's own `free_buffer`; for `put_stream`, a [`BodySource`] lent to the plugin as a
//! `HostBody` whose callbacks catch panics (none unwinds into the plugin). Libraries are
//! never unloaded: a plugin's code stays mapped for the life of the process, so no instance
//! or thread can outlive it.
#![allow(unsafe_code)]

use std::ffi::{CStr, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use upgate_plugin_api::{
    ABI_VERSION, BODY_ABORTED, BODY_DATA, BODY_END, DescriptorHeader, ENTRY_SYMBOL, EntryFn, HostBody,
    PluginBuffer, ProviderDescriptor, STATUS_OK,
};

use super::PluginHostError;

/// A plugin library, opened and checked.
pub struct LoadedPlugin {
    pub path: PathBuf,
    pub name: String,
    pub version: String,
    descriptor: &'static ProviderDescriptor,
}

impl LoadedPlugin {
    /// Opens `path`, finds the entry symbol and checks the ABI.
    pub fn open(path: &Path) -> Result<Self, PluginHostError> {
        let file = path.display().to_string();
        // SAFETY: loading a library runs its initialisers; plugins are trusted code chosen by
        // the operator (they sit in `plugin_dir`).
        let library = unsafe { libloading::Library::new(path) }.map_err(|error| PluginHostError::Open {
            file: file.clone(),
            message: error.to_string(),
        })?;
        // Never unloaded (see the module docs).
        let library: &'static libloading::Library = Box::leak(Box::new(library));
        // SAFETY: the symbol's type is fixed by the ABI crate.
        let entry =
            unsafe { library.get::<EntryFn>(ENTRY_SYMBOL) }.map_err(|_| PluginHostError::NoEntry {
                file: file.clone(),
                symbol: String::from_utf8_lossy(&ENTRY_SYMBOL[..ENTRY_SYMBOL.len() - 1]).into_owned(),
            })?;
        // SAFETY: the entry function takes nothing and returns a pointer to static data.
        let descriptor = unsafe { entry() };
        if descriptor.is_null() {
            return Err(PluginHostError::Abi {
                file,
                message: "the entry function returned null".into(),
            });
        }
        // SAFETY: every ABI version starts with the same header; read only that first.
        let header = unsafe { *descriptor.cast::<DescriptorHeader>() };
        if header.abi_version != ABI_VERSION {
            return Err(PluginHostError::AbiVersion {
                file,
                plugin: header.abi_version,
                host: ABI_VERSION,
            });
        }
        let expected = std::mem::size_of::<ProviderDescriptor>();
        if (header.struct_size as usize) < expected {
            return Err(PluginHostError::Abi {
                file,
                message: format!(
                    "descriptor is {} bytes, ABI v{ABI_VERSION} needs {expected}",
                    header.struct_size
                ),
            });
        }
        // SAFETY: version and size checked: this is a v1 descriptor, static in a library that
        // stays loaded.
        let descriptor: &'static ProviderDescriptor = unsafe { &*descriptor };
        // SAFETY: v1 descriptors carry NUL-terminated static strings.
        let text = |pointer: *const std::ffi::c_char| unsafe {
            if pointer.is_null() {
                String::new()
            } else {
                CStr::from_ptr(pointer).to_string_lossy().into_owned()
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            name: text(descriptor.name),
            version: text(descriptor.version),
            descriptor,
        })
    }

    pub fn abi_version(&self) -> u32 {
        self.descriptor.header.abi_version
    }

    /// Whether the plugin declared [`upgate_plugin_api::FLAG_STREAMING`].
    pub fn streams(&self) -> bool {
        self.descriptor.flags & upgate_plugin_api::FLAG_STREAMING != 0
    }

    /// Whether the plugin declared [`upgate_plugin_api::FLAG_LOCAL_IO`].
    pub fn local_io(&self) -> bool {
        self.descriptor.flags & upgate_plugin_api::FLAG_LOCAL_IO != 0
    }

    /// Creates an instance from settings JSON.
    pub fn init(&self, settings: &[u8]) -> Result<RawInstance, Vec<u8>> {
        let mut out = PluginBuffer::empty();
        // SAFETY: settings outlive the call; `out` is a valid out-parameter.
        let instance = unsafe { (self.descriptor.init)(settings.as_ptr(), settings.len(), &mut out) };
        let bytes = self.take(out);
        if instance.is_null() {
            Err(bytes)
        } else {
            Ok(RawInstance {
                descriptor: self.descriptor,
                instance,
            })
        }
    }

    /// Copies a returned buffer and frees it on the plugin's side.
    fn take(&self, buffer: PluginBuffer) -> Vec<u8> {
        take(self.descriptor, buffer)
    }
}

fn take(descriptor: &ProviderDescriptor, buffer: PluginBuffer) -> Vec<u8> {
    // SAFETY: the buffer was just filled by the plugin and is freed exactly once below.
    let bytes = unsafe { buffer.as_slice() }.to_vec();
    // SAFETY: handing the plugin's own allocation back to it.
    unsafe { (descriptor.free_buffer)(buffer) };
    bytes
}

/// The three call kinds, each `(request JSON) -> (ok, response JSON)`.
#[derive(Debug, Clone, Copy)]
pub enum Call {
    Put,
    Delete,
    Health,
}

/// A plugin instance; dropped through the plugin's `drop_instance`.
pub struct RawInstance {
    descriptor: &'static ProviderDescriptor,
    instance: *mut c_void,
}

// SAFETY: plugin instances are `Send + Sync` by the `Provider` trait bound that the export
// macro enforces.
unsafe impl Send for RawInstance {}
// SAFETY: as above.
unsafe impl Sync for RawInstance {}

impl RawInstance {
    /// Calls the plugin; returns `(status, response bytes)`.
    pub fn call(&self, call: Call, request: &[u8]) -> (i32, Vec<u8>) {
        let function = match call {
            Call::Put => self.descriptor.put,
            Call::Delete => self.descriptor.delete,
            Call::Health => self.descriptor.health,
        };
        let mut out = PluginBuffer::empty();
        // SAFETY: a live instance of this descriptor; request bytes outlive the call.
        let status = unsafe { function(self.instance, request.as_ptr(), request.len(), &mut out) };
        (status, take(self.descriptor, out))
    }

    /// Calls `put_stream` with `body` lent to the plugin for the call; returns `(status,
    /// response bytes)`.
    pub fn put_stream(&self, request: &[u8], body: &mut dyn BodySource) -> (i32, Vec<u8>) {
        let mut context = StreamContext::new(body);
        let host = context.host_body();
        let mut out = PluginBuffer::empty();
        // SAFETY: a live instance of this descriptor; request bytes, `host` and the source it
        // points at outlive the call, and the plugin calls them only during it.
        let status = unsafe {
            (self.descriptor.put_stream)(self.instance, request.as_ptr(), request.len(), &host, &mut out)
        };
        (status, take(self.descriptor, out))
    }

    pub fn ok(status: i32) -> bool {
        status == STATUS_OK
    }
}

impl Drop for RawInstance {
    fn drop(&mut self) {
        // SAFETY: created by this descriptor's init, dropped once.
        unsafe { (self.descriptor.drop_instance)(self.instance) };
    }
}

/// What one read of a streamed body gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyRead {
    /// This many bytes (at least one) were written into the buffer.
    Data(usize),
    /// The body is complete and accepted.
    End,
    /// The upload was refused or its client went away.
    Aborted,
}

/// The host's side of a body a plugin reads while it arrives (blocking, on the plugin call's
/// thread).
pub trait BodySource {
    /// Fills `buffer` (non-empty) with the next bytes, or says the body ended or was aborted.
    fn read(&mut self, buffer: &mut [u8]) -> BodyRead;
    /// The final metadata as JSON, after [`BodyRead::End`] (empty before).
    fn metadata(&self) -> &[u8];
}

/// What a `HostBody`'s `context` points at: the source, and how the body finished once it
/// did (`BODY_END` or `BODY_ABORTED`, what every later read returns, as the ABI promises,
/// whatever the plugin passes then).
struct StreamContext<'a> {
    source: &'a mut dyn BodySource,
    finished: Option<i32>,
}

impl<'a> StreamContext<'a> {
    fn new(source: &'a mut dyn BodySource) -> Self {
        Self {
            source,
            finished: None,
        }
    }

    /// The callbacks over this context, valid while it is neither moved nor dropped.
    fn host_body(&mut self) -> HostBody {
        HostBody {
            context: (self as *mut Self).cast(),
            read: read_body,
            metadata: body_metadata,
        }
    }

    /// One read into `buffer`, or the body's end or abort: `(status, bytes written)`.
    fn read(&mut self, buffer: Option<&mut [u8]>) -> (i32, usize) {
        if let Some(finished) = self.finished {
            return (finished, 0);
        }
        let read = match buffer {
            // A plugin that passes no room is refused, for good.
            None => BodyRead::Aborted,
            Some(buffer) => {
                let capacity = buffer.len();
                match catch_unwind(AssertUnwindSafe(|| self.source.read(buffer))) {
                    Ok(BodyRead::Data(count)) if count > 0 && count <= capacity => BodyRead::Data(count),
                    Ok(BodyRead::End) => BodyRead::End,
                    // A source that panicked or wrote out of bounds ends the body as an abort.
                    Ok(BodyRead::Data(_) | BodyRead::Aborted) | Err(_) => BodyRead::Aborted,
                }
            }
        };
        match read {
            BodyRead::Data(count) => (BODY_DATA, count),
            BodyRead::End => (*self.finished.insert(BODY_END), 0),
            BodyRead::Aborted => (*self.finished.insert(BODY_ABORTED), 0),
        }
    }
}

/// The `HostBody::read` callback: `context` is a `*mut StreamContext`.
unsafe extern "C" fn read_body(
    context: *mut c_void,
    buffer: *mut u8,
    capacity: usize,
    filled: *mut usize,
) -> i32 {
    if context.is_null() {
        return BODY_ABORTED;
    }
    // SAFETY: `put_stream` made `context` from a `StreamContext` that outlives the call; the
    // plugin calls back on the calling thread only (`BodyReadFn` contract), so this is the
    // only reference in use.
    let context = unsafe { &mut *context.cast::<StreamContext>() };
    let buffer = (!buffer.is_null() && capacity > 0)
        // SAFETY: the plugin passes a buffer of initialised memory writable for `capacity`
        // bytes (`BodyReadFn`).
        .then(|| unsafe { std::slice::from_raw_parts_mut(buffer, capacity) });
    let (status, count) = context.read(buffer);
    if !filled.is_null() {
        // SAFETY: `filled` is non-null and writable (`BodyReadFn`).
        unsafe { *filled = count };
    }
    status
}

/// The `HostBody::metadata` callback.
unsafe extern "C" fn body_metadata(context: *mut c_void, json: *mut *const u8, len: *mut usize) {
    if context.is_null() || json.is_null() || len.is_null() {
        return;
    }
    // SAFETY: as in `read_body`; only a shared reference is taken.
    let context = unsafe { &*context.cast::<StreamContext>() };
    let bytes = catch_unwind(AssertUnwindSafe(|| context.source.metadata())).unwrap_or(&[]);
    // SAFETY: `json` and `len` are non-null and writable (`BodyMetadataFn`); the bytes belong
    // to the source, which outlives the `put_stream` call.
    unsafe {
        *json = bytes.as_ptr();
        *len = bytes.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gives `pieces`, then the end.
    struct Pieces(Vec<&'static [u8]>);

    impl BodySource for Pieces {
        fn read(&mut self, buffer: &mut [u8]) -> BodyRead {
            if self.0.is_empty() {
                return BodyRead::End;
            }
            let piece = self.0.remove(0);
            buffer[..piece.len()].copy_from_slice(piece);
            BodyRead::Data(piece.len())
        }

        fn metadata(&self) -> &[u8] {
            b"{}"
        }
    }

    /// One read through the C callback, as a plugin makes it.
    fn read(host: &HostBody, capacity: usize) -> (i32, Vec<u8>) {
        let mut buffer = vec![0u8; capacity];
        let mut filled = usize::MAX;
        // SAFETY: the context is alive for the test's calls, the buffer writable for
        // `capacity` bytes, `filled` writable.
        let status = unsafe { (host.read)(host.context, buffer.as_mut_ptr(), capacity, &mut filled) };
        buffer.truncate(if status == BODY_DATA { filled } else { 0 });
        (status, buffer)
    }

    #[test]
    fn the_end_and_an_abort_are_what_every_later_read_returns() {
        let mut source = Pieces(vec![b"abc", b"de"]);
        let mut context = StreamContext::new(&mut source);
        let host = context.host_body();
        assert_eq!(read(&host, 8), (BODY_DATA, b"abc".to_vec()));
        // No room: refused, and so is every read after, whatever room it brings.
        assert_eq!(read(&host, 0).0, BODY_ABORTED);
        assert_eq!(read(&host, 8).0, BODY_ABORTED);

        let mut source = Pieces(vec![b"abc"]);
        let mut context = StreamContext::new(&mut source);
        let host = context.host_body();
        assert_eq!(read(&host, 8), (BODY_DATA, b"abc".to_vec()));
        assert_eq!(read(&host, 8).0, BODY_END);
        assert_eq!(read(&host, 8).0, BODY_END);
        assert_eq!(read(&host, 0).0, BODY_END);
    }

    #[test]
    fn a_source_that_claims_more_than_the_room_aborts_the_body() {
        struct Liar;
        impl BodySource for Liar {
            fn read(&mut self, buffer: &mut [u8]) -> BodyRead {
                BodyRead::Data(buffer.len() + 1)
            }
            fn metadata(&self) -> &[u8] {
                b""
            }
        }
        let mut source = Liar;
        let mut context = StreamContext::new(&mut source);
        let host = context.host_body();
        assert_eq!(read(&host, 4).0, BODY_ABORTED);
        assert_eq!(read(&host, 4).0, BODY_ABORTED);
    }
}
