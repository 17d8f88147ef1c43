//! `qseed audit verify [FILE...]` and `qseed audit export --since T --until T`: the audit
//! ledger (see [`crate::telemetry::ledger`]) checked, and its records printed for an auditor.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use crate::error::Error;
use crate::telemetry::ledger::{self, Verdict};

/// The ledger files: those given, or the state folder's, oldest first.
fn ledger_files(config_path: &Path, given: &[PathBuf]) -> Result<Vec<PathBuf>, Error> {
    if !given.is_empty() {
        return Ok(given.to_vec());
    }
    let state = super::service_state_dir(config_path);
    let Some(dir) = state.folder() else {
        return Err(Error::Config(
            "no state folder, so no ledger: name the ledger files (FILE...)".into(),
        ));
    };
    let files = ledger::files_in(dir);
    if files.is_empty() {
        return Err(Error::Failed(format!(
            "no audit ledger in {} yet (it is written by `run` and `once`)",
            dir.join(ledger::FOLDER).display()
        )));
    }
    Ok(files)
}

pub fn verify(
    config_path: &Path,
    given: &[PathBuf],
    public_key: Option<&Path>,
) -> Result<(), Error> {
    let files = ledger_files(config_path, given)?;
    match ledger::verify(&files).map_err(Error::Failed)? {
        Verdict::Intact { lines, head } => {
            say!(
                "{lines} record(s) in {} file(s): the chain is intact; head {head}",
                files.len()
            );
            if let Some(pem_path) = public_key {
                let (pem, _) = crate::files::read_text(pem_path, 64 * 1024).map_err(|e| {
                    Error::Config(format!("--public-key {}: {e}", pem_path.display()))
                })?;
                let point = ledger::p256_point_from_pem(&pem).map_err(|e| {
                    Error::Config(format!("--public-key {}: {e}", pem_path.display()))
                })?;
                match ledger::verify_signatures(&files, &point).map_err(Error::Failed)? {
                    Ok(0) => {
                        return Err(Error::Failed(
                            "no signature record in the ledger ([audit] sign_with signs the head \
                             every sign_every)"
                                .into(),
                        ))
                    }
                    Ok(good) => say!("{good} signature(s) verify with the public key"),
                    Err((line, why)) => {
                        return Err(Error::Failed(format!(
                            "signature record {line} does not verify: {why}"
                        )))
                    }
                }
            }
            Ok(())
        }
        Verdict::Broken { line, why } => Err(Error::Failed(format!(
            "the chain breaks at record {line} (counting from the first line of {}): {why}",
            files[0].display()
        ))),
    }
}

pub fn export(
    config_path: &Path,
    given: &[PathBuf],
    since: Option<&str>,
    until: Option<&str>,
) -> Result<(), Error> {
    let parse = |flag: &str, text: Option<&str>| -> Result<Option<std::time::SystemTime>, Error> {
        text.map(|t| {
            humantime::parse_rfc3339_weak(t).map_err(|e| {
                Error::Config(format!(
                    "--{flag} {t:?}: {e}; write a time like 2026-12-01T00:00:00Z or \
                     \"2026-12-01 00:00:00\" (UTC)"
                ))
            })
        })
        .transpose()
    };
    let since = parse("since", since)?;
    let until = parse("until", until)?;
    let files = ledger_files(config_path, given)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for path in files {
        let file = std::fs::File::open(&path)
            .map_err(|e| Error::Failed(format!("{}: {e}", path.display())))?;
        for line in std::io::BufReader::new(file).split(b'\n') {
            let line = line.map_err(|e| Error::Failed(format!("{}: {e}", path.display())))?;
            let Ok(record) = serde_json::from_slice::<ledger::Record>(&line) else {
                continue;
            };
            let Ok(time) = humantime::parse_rfc3339_weak(&record.time) else {
                continue;
            };
            if since.is_some_and(|s| time < s) || until.is_some_and(|u| time >= u) {
                continue;
            }
            ledger::write_line(&mut out, &line)
                .map_err(|e| Error::Failed(format!("cannot write: {e}")))?;
        }
    }
    Ok(())
}
