//! Loaded PKCS#11 modules: each library loaded and `C_Initialize`d once per process, shared by
//! every target that uses it, and `C_Finalize`d once at the end.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};

use super::error::{from_cryptoki, HsmError};

/// The process's loaded modules, by path. Cloning shares the same set.
#[derive(Debug, Clone, Default)]
pub struct Modules {
    loaded: Arc<Mutex<HashMap<PathBuf, Pkcs11>>>,
}

impl Modules {
    pub fn new() -> Self {
        Self::default()
    }

    /// The module at `path`, loaded and initialized on first use.
    pub fn get(&self, path: &Path) -> Result<Pkcs11, HsmError> {
        let mut loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(module) = loaded.get(path) {
            return Ok(module.clone());
        }
        let module = load(path)?;
        loaded.insert(path.to_path_buf(), module.clone());
        Ok(module)
    }

    /// Forgets a module whose state is suspect so that the next [`Modules::get`] loads and
    /// initializes it afresh. Sessions still open on it become invalid.
    pub fn reset(&self, path: &Path) {
        let module = self
            .loaded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(path);
        if let Some(module) = module {
            let _ = module.finalize();
        }
    }

    /// `C_Finalize` on every module. Call only once no session is in use.
    pub fn finalize_all(&self) {
        self.finalize_all_except(&std::collections::HashSet::new());
    }

    /// `C_Finalize` on every module but those in `busy` (a thread may still be inside them).
    pub fn finalize_all_except(&self, busy: &std::collections::HashSet<PathBuf>) {
        let modules: Vec<_> = self
            .loaded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .filter(|(path, _)| !busy.contains(path))
            .collect();
        for (path, module) in modules {
            if let Err(e) = module.finalize() {
                tracing::warn!(
                    "C_Finalize on {} failed: {}",
                    path.display(),
                    from_cryptoki(e)
                );
            }
        }
    }
}

/// Loads the library and initializes it for a threaded caller.
pub fn load(path: &Path) -> Result<Pkcs11, HsmError> {
    let fail = |reason: String| HsmError::ModuleLoad {
        path: path.display().to_string(),
        reason,
    };
    if !path.exists() {
        return Err(fail("the file does not exist".into()));
    }
    let module = Pkcs11::new(path).map_err(|e| match e {
        CkError::LibraryLoading(e) => fail(e.to_string()),
        CkError::MissingSymbol(name) => {
            fail(format!("it is not a PKCS#11 library (no {name} function)"))
        }
        other => fail(other.to_string()),
    })?;
    // qseed calls the module from several threads: let it use the OS's locks.
    match module.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(module),
        // The module says only that it failed; the usual cause on a new host is a user that
        // may not read the client's files.
        Err(CkError::Pkcs11(rv, _)) => Err(HsmError::InitializeRefused {
            code: super::error::rv_name(rv),
            diagnosis: super::quirks::diagnose_initialize(path),
        }),
        Err(e) => Err(from_cryptoki(e)),
    }
}
