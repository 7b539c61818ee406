//! The host side of the plugin ABI: loads a plugin library and scores through it.

use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use anyhow::{anyhow, bail, Context, Result};
use libloading::Library;

use crate::plugin::{
    DestroyFn, ErrorBuf, PluginVTable, RStr, Row, ScoreFn, ABI_VERSION, ENTRY_SYMBOL, NO_ROW,
    STATUS_ERROR, STATUS_OK, STATUS_PANIC,
};
use crate::reward::{RewardBatch, RewardFn};

/// Size of the buffer a plugin writes its error messages into.
const ERROR_CAPACITY: usize = 4096;

/// A loaded reward plugin instance (see [`crate::plugin`] for the ABI).
pub struct PluginReward {
    name: String,
    path: PathBuf,
    instance: NonNull<c_void>,
    score_fn: ScoreFn,
    destroy_fn: DestroyFn,
    /// Declared last so the library is unloaded only after `Drop` destroyed the instance.
    _library: Library,
}

// SAFETY: the ABI requires plugin instances to be usable from any thread, concurrently
// (`score` from several threads; `destroy` once, exclusively, which `Drop` guarantees).
unsafe impl Send for PluginReward {}
// SAFETY: as above.
unsafe impl Sync for PluginReward {}

impl std::fmt::Debug for PluginReward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginReward")
            .field("name", &self.name)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl PluginReward {
    /// Loads the plugin at `path` and creates an instance with `config` (passed as JSON).
    ///
    /// Fails, naming `path`, when the file is missing, is not a shared library, does not export
    /// [`ENTRY_SYMBOL`], speaks another ABI version, or refuses `config`.
    pub fn load(path: &Path, config: &serde_json::Value) -> Result<Self> {
        let shown = path.display();
        // An absolute path keeps the dynamic loader from searching its library path.
        let absolute = path
            .canonicalize()
            .with_context(|| format!("reward plugin {shown}: cannot open the file"))?;
        // SAFETY: loading a library runs its initialisers; plugins are trusted code (see the
        // ABI's *Trust* section).
        let library = unsafe { Library::new(&absolute) }
            .map_err(|e| anyhow!("reward plugin {shown}: not a loadable shared library ({e})"))?;
        // SAFETY: the ABI fixes the entry point's signature.
        let entry = unsafe {
            library.get::<unsafe extern "C" fn() -> *const PluginVTable>(ENTRY_SYMBOL.as_bytes())
        }
        .map_err(|e| {
            anyhow!(
                "reward plugin {shown}: not an rlhf reward plugin: it does not export `{ENTRY_SYMBOL}` ({e})"
            )
        })?;
        // SAFETY: the entry point takes nothing and returns a pointer (ABI contract).
        let vtable = unsafe { entry() };
        if vtable.is_null() {
            bail!("reward plugin {shown}: `{ENTRY_SYMBOL}` returned a null vtable");
        }
        // Only the first field is common to every ABI version: read it alone first.
        // SAFETY: every version's vtable starts with a `u32` version (ABI contract).
        let version = unsafe { vtable.cast::<u32>().read() };
        if version != ABI_VERSION {
            bail!(
                "reward plugin {shown}: built for plugin ABI version {version}, but this trainer \
                 speaks version {ABI_VERSION}; rebuild it against rlhf-rewards {}",
                env!("CARGO_PKG_VERSION")
            );
        }
        // SAFETY: version 1 vtable layout, valid while the library is loaded.
        let vtable = unsafe { *vtable };
        // SAFETY: the name is static UTF-8 bytes owned by the plugin.
        let name_bytes = unsafe { vtable.name.as_bytes() };
        let name = std::str::from_utf8(name_bytes)
            .map_err(|_| anyhow!("reward plugin {shown}: its name is not valid UTF-8"))?
            .to_string();
        if name.is_empty() {
            bail!("reward plugin {shown}: its name is empty");
        }

        let config_json = config.to_string();
        let mut message = vec![0u8; ERROR_CAPACITY];
        let mut error = ErrorBuf {
            ptr: message.as_mut_ptr(),
            cap: message.len(),
            len: 0,
        };
        // SAFETY: the config string and error buffer outlive the call (ABI contract).
        let instance = unsafe { (vtable.create)(RStr::new(&config_json), &mut error) };
        let Some(instance) = NonNull::new(instance) else {
            bail!(
                "reward plugin `{name}` ({shown}) refused its config {config_json}: {}",
                read_message(&message, &error)
            );
        };
        Ok(PluginReward {
            name,
            path: path.to_path_buf(),
            instance,
            score_fn: vtable.score,
            destroy_fn: vtable.destroy,
            _library: library,
        })
    }

    /// Renames the reward (the run config's `name` overrides the plugin's own).
    pub fn set_name(&mut self, name: String) {
        self.name = name;
    }

    /// The path the plugin was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The message a plugin wrote, tolerating a bad length or invalid UTF-8.
fn read_message(buffer: &[u8], error: &ErrorBuf) -> String {
    let len = error.len.min(buffer.len());
    let text = String::from_utf8_lossy(&buffer[..len]).into_owned();
    if text.is_empty() {
        "(no message)".into()
    } else {
        text
    }
}

impl RewardFn for PluginReward {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, batch: &RewardBatch<'_>) -> Result<Vec<Option<f32>>> {
        let columns_json: Vec<String> = batch
            .columns()
            .iter()
            .map(|c| serde_json::Value::Object(c.clone()).to_string())
            .collect();
        let rows: Vec<Row> = batch
            .prompts()
            .iter()
            .zip(batch.completions())
            .zip(&columns_json)
            .map(|((prompt, completion), columns)| Row {
                prompt: RStr::new(prompt),
                completion: RStr::new(completion),
                columns_json: RStr::new(columns),
            })
            .collect();
        let mut scores = vec![f32::NAN; rows.len()];
        let mut failed_row = NO_ROW;
        let mut message = vec![0u8; ERROR_CAPACITY];
        let mut error = ErrorBuf {
            ptr: message.as_mut_ptr(),
            cap: message.len(),
            len: 0,
        };
        // SAFETY: `instance` is alive until `Drop`; every buffer outlives the call and holds
        // `rows.len()` elements (ABI contract).
        let status = unsafe {
            (self.score_fn)(
                self.instance.as_ptr(),
                rows.as_ptr(),
                rows.len(),
                scores.as_mut_ptr(),
                &mut failed_row,
                &mut error,
            )
        };
        if status == STATUS_OK {
            return Ok(scores
                .into_iter()
                .map(|s| if s.is_nan() { None } else { Some(s) })
                .collect());
        }
        let what = match status {
            STATUS_PANIC => "panicked".to_string(),
            STATUS_ERROR => "failed".to_string(),
            other => format!("failed with unknown status {other}"),
        };
        let place = if failed_row == NO_ROW {
            String::new()
        } else {
            format!(" on completion {failed_row}")
        };
        bail!(
            "reward plugin `{}` ({}) {what}{place}: {}",
            self.name,
            self.path.display(),
            read_message(&message, &error)
        )
    }
}

impl Drop for PluginReward {
    fn drop(&mut self) {
        // SAFETY: the instance came from this plugin's `create` and is destroyed exactly once;
        // `&mut self` means no `score` runs concurrently.
        unsafe { (self.destroy_fn)(self.instance.as_ptr()) }
    }
}
