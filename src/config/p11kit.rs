//! p11-kit module names: `module = "softhsm2"` means the library p11-kit's registered
//! `softhsm2.module` file names, as `p11-kit list-modules` shows it.
//!
//! Registration files are read from `/etc/pkcs11/modules/` (the administrator's, which override
//! the packages') and `/usr/share/p11-kit/modules/`; a relative `module:` path is taken from
//! p11-kit's module folder, as p11-kit does. Files are read bounded; lines other than `module:`
//! are p11-kit's business.

use std::path::{Path, PathBuf};

/// Where packages and administrators register modules, the administrator's first.
const REGISTRIES: &[&str] = &["/etc/pkcs11/modules", "/usr/share/p11-kit/modules"];

/// Where p11-kit looks for a `module:` given without a folder.
fn module_folder() -> PathBuf {
    for dir in [
        "/usr/lib/x86_64-linux-gnu/pkcs11",
        "/usr/lib/aarch64-linux-gnu/pkcs11",
        "/usr/lib64/pkcs11",
        "/usr/lib/pkcs11",
    ] {
        if Path::new(dir).is_dir() {
            return PathBuf::from(dir);
        }
    }
    PathBuf::from("/usr/lib/pkcs11")
}

/// The library of the p11-kit module `name`.
pub fn resolve(name: &str) -> Result<PathBuf, String> {
    resolve_in(name, REGISTRIES.iter().map(Path::new), &module_folder())
}

fn resolve_in<'a>(
    name: &str,
    registries: impl Iterator<Item = &'a Path> + Clone,
    folder: &Path,
) -> Result<PathBuf, String> {
    for dir in registries.clone() {
        let file = dir.join(format!("{name}.module"));
        if !file.is_file() {
            continue;
        }
        let text = read_bounded(&file)?;
        let module = text
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim() == "module")
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| format!("{} has no `module:` line", file.display()))?;
        let path = Path::new(module);
        return Ok(if path.is_absolute() {
            path.to_path_buf()
        } else {
            folder.join(path)
        });
    }
    let mut known: Vec<String> = registries
        .flat_map(|dir| std::fs::read_dir(dir).into_iter().flatten().flatten())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_suffix(".module").map(str::to_string)
        })
        .collect();
    known.sort();
    known.dedup();
    Err(format!(
        "module = {name:?} is neither a path nor a registered p11-kit module; registered: {}. \
         Give the library's path, or one of those names",
        if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        }
    ))
}

fn read_bounded(file: &Path) -> Result<String, String> {
    crate::files::read_text(file, crate::files::REGISTRATION_LIMIT)
        .map(|(text, _)| text.to_string())
        .map_err(|e| format!("cannot read {}: {e}", file.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_through_registration_files() {
        let admin = tempfile::tempdir().unwrap();
        let packages = tempfile::tempdir().unwrap();
        std::fs::write(
            packages.path().join("softhsm2.module"),
            "# comment\nmodule: /usr/lib/softhsm/libsofthsm2.so\n",
        )
        .unwrap();
        std::fs::write(
            packages.path().join("opensc.module"),
            "module: opensc-pkcs11.so\n",
        )
        .unwrap();
        std::fs::write(
            admin.path().join("opensc.module"),
            "module: /opt/opensc.so\n",
        )
        .unwrap();
        let dirs = [admin.path(), packages.path()];
        let folder = Path::new("/usr/lib/pkcs11");
        assert_eq!(
            resolve_in("softhsm2", dirs.iter().copied(), folder).unwrap(),
            PathBuf::from("/usr/lib/softhsm/libsofthsm2.so")
        );
        assert_eq!(
            resolve_in("opensc", dirs.iter().copied(), folder).unwrap(),
            PathBuf::from("/opt/opensc.so"),
            "the administrator's file wins"
        );
        std::fs::write(packages.path().join("rel.module"), "module: rel.so\n").unwrap();
        assert_eq!(
            resolve_in("rel", [packages.path()].into_iter(), folder).unwrap(),
            PathBuf::from("/usr/lib/pkcs11/rel.so")
        );
        let err = resolve_in("nope", dirs.iter().copied(), folder).unwrap_err();
        assert!(err.contains("registered: opensc, rel, softhsm2"), "{err}");
    }
}
