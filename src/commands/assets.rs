//! `qseed generate-assets --out DIR` (hidden): the man page and shell completions, generated
//! from the clap definition so they never drift from `--help`. Used by scripts/package. The
//! page is `qseed(8)`: qseed is a system daemon, run by the administrator.

use std::path::Path;

use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::Cli;
use crate::error::Error;

pub fn generate(out: &Path) -> Result<(), Error> {
    let fail = |what: &str, e: std::io::Error| Error::Failed(format!("cannot write {what}: {e}"));
    std::fs::create_dir_all(out).map_err(|e| fail(&out.display().to_string(), e))?;
    let command = Cli::command();
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone())
        .section("8")
        .render(&mut page)
        .map_err(|e| fail("the man page", e))?;
    std::fs::write(out.join("qseed.8"), page).map_err(|e| fail("qseed.8", e))?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let mut command = command.clone();
        clap_complete::generate_to(shell, &mut command, "qseed", out)
            .map_err(|e| fail(&format!("{shell} completions"), e))?;
    }
    Ok(())
}
