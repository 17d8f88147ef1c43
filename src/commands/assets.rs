//! `qseed generate-assets --out DIR` (hidden): the man pages (see [`super::manual`]) and shell
//! completions, for packagers (scripts/package); `qseed completions SHELL` prints one shell's.

use std::path::Path;

use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::Cli;
use crate::error::Error;

pub fn generate(out: &Path) -> Result<(), Error> {
    let fail = |what: &str, e: std::io::Error| Error::Failed(format!("cannot write {what}: {e}"));
    std::fs::create_dir_all(out).map_err(|e| fail(&out.display().to_string(), e))?;
    for (name, page) in super::manual::pages().map_err(|e| fail("the man pages", e))? {
        std::fs::write(out.join(&name), page).map_err(|e| fail(&name, e))?;
    }
    let command = Cli::command();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let mut command = command.clone();
        clap_complete::generate_to(shell, &mut command, "qseed", out)
            .map_err(|e| fail(&format!("{shell} completions"), e))?;
    }
    Ok(())
}

/// `qseed completions SHELL`: the completion script on standard output.
pub fn completions(shell: Shell) -> Result<(), Error> {
    let mut command = Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, "qseed", &mut script);
    use std::io::Write;
    std::io::stdout()
        .write_all(&script)
        .map_err(|e| Error::Failed(format!("cannot write the completions: {e}")))
}
