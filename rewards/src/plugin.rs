//! The reward plugin C ABI, version 1, and the Rust side that plugin authors use.
//!
//! This doc comment is the specification. A plugin written in another language only has to
//! follow it; a plugin written in Rust implements [`RewardPlugin`] and calls
//! [`export_plugin!`](crate::export_plugin), which follows it for them.
//!
//! # Shape
//!
//! A reward plugin is a shared library (a Rust `cdylib`: `.so` on Linux, `.dylib` on macOS,
//! `.dll` on Windows) that exports one C function named [`ENTRY_SYMBOL`]
//! (`rlhf_reward_plugin`):
//!
//! ```c
//! const PluginVTable *rlhf_reward_plugin(void);
//! ```
//!
//! It returns a pointer to a [`PluginVTable`]: the plugin's name and three functions,
//! `create`, `score` and `destroy`. All types are `#[repr(C)]`; strings are [`RStr`]
//! (pointer + length of UTF-8 bytes, no NUL terminator; when `len` is 0 the pointer is not read).
//!
//! # Versioning
//!
//! The symbol name never changes. In every version of this ABI the vtable starts with
//! `abi_version: u32`; the host reads that field first and refuses the plugin unless it equals
//! [`ABI_VERSION`], without reading the rest. Any incompatible change to the types or functions
//! below bumps [`ABI_VERSION`].
//!
//! # Calls
//!
//! 1. The host loads the library and calls `rlhf_reward_plugin()` once. It must return a
//!    non-null pointer to a vtable that stays valid and unchanged while the library is loaded.
//! 2. `create(config, error)`: `config` is the JSON text of the `config` value of the plugin's
//!    entry in the run config (`null` when there is none). It returns an opaque non-null
//!    instance handle, or null after writing a message into `error` (see *Errors*).
//! 3. `score(instance, rows, n_rows, scores, failed_row, error)`: `rows` points at `n_rows`
//!    [`Row`]s (prompt text, completion text, and the JSON text of an object holding the row's
//!    extra dataset columns, e.g. `{"answer": "... #### 42"}`). `scores` points at `n_rows`
//!    `f32`s. It returns a status:
//!    - [`STATUS_OK`]: all `n_rows` scores were written; NaN means "not applicable to this row"
//!      (TRL's `None`).
//!    - [`STATUS_ERROR`]: a message was written into `error`, and `*failed_row` was set to the
//!      index of the row being scored, or to [`NO_ROW`] when the failure concerns no single row.
//!    - [`STATUS_PANIC`]: as `STATUS_ERROR`, for a caught panic (its message is the error).
//!
//!    Any other value is treated as an error. After a failure the contents of `scores` are
//!    ignored. A failed call does not make the instance unusable.
//! 4. `destroy(instance)` frees an instance. It is called exactly once per instance returned by
//!    `create`, after the last `score` call on it; never with null.
//!
//! # Errors
//!
//! [`ErrorBuf`] is a buffer owned by the host: `ptr` points at `cap` writable bytes. The plugin
//! copies at most `cap` bytes of a UTF-8 message to `ptr` (cutting it on a character boundary)
//! and stores the number written in `len`. The host names the plugin and its path itself, so
//! the message need not.
//!
//! # Memory ownership
//!
//! Everything the host passes (strings, rows, the score array, the error buffer) is owned by
//! the host and valid only for the duration of the call: the plugin must not keep pointers to
//! it. The vtable and the name are owned by the plugin and must stay valid while it is loaded.
//! An instance is owned by the plugin and released only through `destroy`. No memory is ever
//! freed on the other side of the boundary, so host and plugin may use different allocators.
//!
//! # Threads
//!
//! The host may call `score` from any thread, and concurrently on the same instance: an
//! instance must be thread-safe (the Rust side requires `Send + Sync`). `create` and `destroy`
//! may run on any thread; `destroy` never runs concurrently with a `score` on that instance.
//!
//! # Panics and unwinding
//!
//! Nothing may unwind across these functions (in Rust, a panic escaping an `extern "C"`
//! function aborts the whole process). [`export_plugin!`](crate::export_plugin) catches a panic
//! around every row and reports it as [`STATUS_PANIC`] with the row's index, so the host can
//! turn it into an error naming the plugin and the completion. This needs the plugin to be
//! built with `panic = "unwind"` (Rust's default); with `panic = "abort"` a panic still kills
//! the trainer.
//!
//! # Trust
//!
//! Loading a plugin runs its code inside the trainer process with the trainer's rights. Load
//! only plugins you would run yourself.

use std::any::Any;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// The ABI version this crate speaks (host) and writes (plugins built with it).
pub const ABI_VERSION: u32 = 1;

/// Name of the function every plugin exports: `const PluginVTable *rlhf_reward_plugin(void)`.
pub const ENTRY_SYMBOL: &str = "rlhf_reward_plugin";

/// `score` succeeded and wrote every score.
pub const STATUS_OK: i32 = 0;
/// `score` failed with a message (and a row index, or [`NO_ROW`]).
pub const STATUS_ERROR: i32 = 1;
/// `score` caught a panic; the message is the panic's.
pub const STATUS_PANIC: i32 = 2;
/// `failed_row` value for a failure that concerns no single row.
pub const NO_ROW: usize = usize::MAX;

/// A borrowed UTF-8 string: `len` bytes at `ptr`, no NUL terminator.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct RStr {
    pub ptr: *const u8,
    pub len: usize,
}

impl RStr {
    /// Borrows `s` (usable in `const` context, so a plugin's name can live in a `static`).
    pub const fn new(s: &str) -> Self {
        RStr {
            ptr: s.as_ptr(),
            len: s.len(),
        }
    }

    /// The bytes behind this string.
    ///
    /// # Safety
    /// `ptr` must point at `len` readable bytes that outlive `'a` (or `len` must be 0).
    pub unsafe fn as_bytes<'a>(self) -> &'a [u8] {
        if self.len == 0 {
            &[]
        } else {
            // SAFETY: the caller guarantees `len` readable bytes at `ptr`.
            unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
        }
    }
}

/// One row to score: the rendered prompt, the completion, and the JSON text of an object with
/// the row's extra dataset columns.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Row {
    pub prompt: RStr,
    pub completion: RStr,
    pub columns_json: RStr,
}

/// A host-owned buffer for an error message (see the module docs, *Errors*).
#[repr(C)]
#[derive(Debug)]
pub struct ErrorBuf {
    pub ptr: *mut u8,
    pub cap: usize,
    pub len: usize,
}

/// `create(config_json, error) -> instance or null`.
pub type CreateFn = unsafe extern "C" fn(config_json: RStr, error: *mut ErrorBuf) -> *mut c_void;
/// `score(instance, rows, n_rows, scores, failed_row, error) -> status`.
pub type ScoreFn = unsafe extern "C" fn(
    instance: *mut c_void,
    rows: *const Row,
    n_rows: usize,
    scores: *mut f32,
    failed_row: *mut usize,
    error: *mut ErrorBuf,
) -> i32;
/// `destroy(instance)`.
pub type DestroyFn = unsafe extern "C" fn(instance: *mut c_void);

/// What `rlhf_reward_plugin()` returns. `abi_version` must stay the first field.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PluginVTable {
    pub abi_version: u32,
    /// The reward's name, used in metrics (`rewards/<name>/mean`) and errors.
    pub name: RStr,
    pub create: CreateFn,
    pub score: ScoreFn,
    pub destroy: DestroyFn,
}

// SAFETY: a vtable holds only a pointer to immutable static bytes (the name) and function
// pointers, so sharing it between threads is sound. This lets plugins keep it in a `static`.
unsafe impl Sync for PluginVTable {}

impl PluginVTable {
    /// The vtable for a Rust plugin type; [`export_plugin!`](crate::export_plugin) puts it in
    /// a `static`.
    pub const fn for_plugin<P: RewardPlugin>() -> Self {
        PluginVTable {
            abi_version: ABI_VERSION,
            name: RStr::new(P::NAME),
            create: create_instance::<P>,
            score: score_rows::<P>,
            destroy: destroy_instance::<P>,
        }
    }
}

/// A reward function written as a plugin. Implement it and call
/// [`export_plugin!`](crate::export_plugin) with the type.
///
/// Both methods report problems as `Err(message)`; panics are caught too. The trainer turns
/// either into an error naming the plugin (and, for `score`, the completion's index).
pub trait RewardPlugin: Sized + Send + Sync + 'static {
    /// The reward's name in metrics (`rewards/<NAME>/mean`); the run config may override it.
    const NAME: &'static str;

    /// Builds the reward from the `config` value of its entry in the run config
    /// ([`serde_json::Value::Null`] when there is none).
    fn new(config: &serde_json::Value) -> Result<Self, String>;

    /// Scores one completion. `columns` holds the row's extra dataset columns (for example
    /// `answer`). `Ok(None)` means "not applicable to this row", like TRL's `None`.
    fn score(
        &self,
        prompt: &str,
        completion: &str,
        columns: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Option<f32>, String>;
}

/// Exports a [`RewardPlugin`] type as the plugin of this `cdylib`: defines the
/// `rlhf_reward_plugin` entry function of the ABI described in [`plugin`](crate::plugin).
/// Call it once, at the crate root of the plugin crate.
///
/// ```
/// use rlhf_rewards::plugin::RewardPlugin;
/// use serde_json::{Map, Value};
///
/// struct Shouting;
///
/// impl RewardPlugin for Shouting {
///     const NAME: &'static str = "shouting";
///     fn new(_config: &Value) -> Result<Self, String> {
///         Ok(Shouting)
///     }
///     fn score(&self, _p: &str, completion: &str, _c: &Map<String, Value>) -> Result<Option<f32>, String> {
///         Ok(Some(completion.chars().filter(|c| c.is_uppercase()).count() as f32))
///     }
/// }
///
/// rlhf_rewards::export_plugin!(Shouting);
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        /// Entry point of the rlhf reward plugin ABI (see `rlhf_rewards::plugin`).
        #[unsafe(no_mangle)]
        pub extern "C" fn rlhf_reward_plugin() -> *const $crate::plugin::PluginVTable {
            static VTABLE: $crate::plugin::PluginVTable =
                $crate::plugin::PluginVTable::for_plugin::<$plugin>();
            &VTABLE
        }
    };
}

/// Copies `message` into the host's buffer, cut on a character boundary to fit.
///
/// # Safety
/// `error` must be null or point at a valid [`ErrorBuf`] whose `ptr` has `cap` writable bytes.
unsafe fn write_error(error: *mut ErrorBuf, message: &str) {
    // SAFETY: the caller guarantees `error` is null or valid.
    let Some(buf) = (unsafe { error.as_mut() }) else {
        return;
    };
    if buf.ptr.is_null() {
        buf.len = 0;
        return;
    }
    let mut n = message.len().min(buf.cap);
    while !message.is_char_boundary(n) {
        n -= 1;
    }
    // SAFETY: `n <= cap` bytes fit in the buffer; host memory never overlaps `message`.
    unsafe { std::ptr::copy_nonoverlapping(message.as_ptr(), buf.ptr, n) };
    buf.len = n;
}

/// The message of a caught panic (panics carry a `&str` or a `String`, or anything else).
fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}

/// Reads a host string as `&str`, refusing invalid UTF-8.
///
/// # Safety
/// As [`RStr::as_bytes`].
unsafe fn read_str<'a>(s: RStr, what: &str) -> Result<&'a str, String> {
    // SAFETY: forwarded to the caller.
    let bytes = unsafe { s.as_bytes() };
    std::str::from_utf8(bytes).map_err(|e| format!("{what} is not valid UTF-8: {e}"))
}

unsafe extern "C" fn create_instance<P: RewardPlugin>(
    config_json: RStr,
    error: *mut ErrorBuf,
) -> *mut c_void {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the host passes a valid string for the duration of this call.
        let text = unsafe { read_str(config_json, "plugin config") }?;
        let config: serde_json::Value = if text.trim().is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(text).map_err(|e| format!("plugin config is not JSON: {e}"))?
        };
        P::new(&config)
    }));
    let message = match outcome {
        Ok(Ok(plugin)) => return Box::into_raw(Box::new(plugin)).cast::<c_void>(),
        Ok(Err(message)) => message,
        Err(payload) => format!("panicked while loading: {}", panic_message(&*payload)),
    };
    // SAFETY: the host passes a valid error buffer.
    unsafe { write_error(error, &message) };
    std::ptr::null_mut()
}

unsafe extern "C" fn score_rows<P: RewardPlugin>(
    instance: *mut c_void,
    rows: *const Row,
    n_rows: usize,
    scores: *mut f32,
    failed_row: *mut usize,
    error: *mut ErrorBuf,
) -> i32 {
    let fail = |status: i32, row: usize, message: &str| {
        // SAFETY: the host passes a valid `failed_row` and error buffer (or nulls).
        unsafe {
            if let Some(slot) = failed_row.as_mut() {
                *slot = row;
            }
            write_error(error, message);
        }
        status
    };
    if n_rows == 0 {
        return STATUS_OK;
    }
    if instance.is_null() || rows.is_null() || scores.is_null() {
        return fail(STATUS_ERROR, NO_ROW, "score called with a null pointer");
    }
    // SAFETY: `instance` came from `create_instance::<P>` and is alive (ABI contract); `rows`
    // and `scores` hold `n_rows` elements for the duration of this call.
    let (plugin, rows, scores) = unsafe {
        (
            &*instance.cast::<P>(),
            std::slice::from_raw_parts(rows, n_rows),
            std::slice::from_raw_parts_mut(scores, n_rows),
        )
    };
    for (index, (row, slot)) in rows.iter().zip(scores.iter_mut()).enumerate() {
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: the host's strings are valid for the duration of this call.
            let (prompt, completion, columns) = unsafe {
                (
                    read_str(row.prompt, "prompt")?,
                    read_str(row.completion, "completion")?,
                    read_str(row.columns_json, "columns")?,
                )
            };
            let columns: serde_json::Map<String, serde_json::Value> = serde_json::from_str(columns)
                .map_err(|e| format!("columns are not a JSON object: {e}"))?;
            plugin.score(prompt, completion, &columns)
        }));
        match outcome {
            Ok(Ok(score)) => *slot = score.unwrap_or(f32::NAN),
            Ok(Err(message)) => return fail(STATUS_ERROR, index, &message),
            Err(payload) => return fail(STATUS_PANIC, index, &panic_message(&*payload)),
        }
    }
    STATUS_OK
}

unsafe extern "C" fn destroy_instance<P: RewardPlugin>(instance: *mut c_void) {
    if instance.is_null() {
        return;
    }
    // A panicking `Drop` must not unwind into the host; there is nobody to report it to.
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `instance` came from `Box::into_raw` in `create_instance::<P>` and is
        // destroyed exactly once (ABI contract).
        drop(unsafe { Box::from_raw(instance.cast::<P>()) });
    }));
}
