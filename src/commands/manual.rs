//! The man pages, generated so they never drift from what they describe: `qseed(8)` and one
//! `qseed-COMMAND(8)` per command from the clap definition (`--help`), `qseed.toml(5)` from
//! the README's configuration reference. Every page they refer to is one of them.

use clap::CommandFactory;
use roff::{bold, roman, Inline, Roff};

use crate::cli::{Cli, SECTIONS};

/// The README, whose "Configuration reference" becomes `qseed.toml(5)`.
const README: &str = include_str!("../../README.md");

/// The footer's source and the header's manual name, on every page.
const SOURCE: &str = concat!("qseed ", env!("CARGO_PKG_VERSION"));
const MANUAL: &str = "qseed manual";

/// Every page: (file name, roff source).
pub fn pages() -> Result<Vec<(String, Vec<u8>)>, std::io::Error> {
    let mut command = Cli::command().disable_help_subcommand(true);
    command.build();
    let mut pages = vec![("qseed.8".to_string(), main_page(&command)?)];
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        pages.push((format!("qseed-{}.8", sub.get_name()), command_page(sub)?));
        // `qseed audit verify`: the group's page refers to qseed-audit-verify(8).
        for nested in sub.get_subcommands().filter(|s| !s.is_hide_set()) {
            let name = format!("{}-{}", sub.get_name(), nested.get_name());
            let nested = nested.clone().name(name);
            pages.push((
                format!("qseed-{}.8", nested.get_name()),
                command_page(&nested)?,
            ));
        }
    }
    pages.push(("qseed.toml.5".to_string(), configuration_page()?));
    Ok(pages)
}

/// The sections clap describes (title to options, and the commands of `qseed` itself); the
/// rest of a page is written here.
fn clap_sections(command: &clap::Command) -> Result<Vec<u8>, std::io::Error> {
    let man = clap_mangen::Man::new(command.clone())
        .section("8")
        .source(SOURCE)
        .manual(MANUAL);
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    man.render_options_section(&mut page)?;
    if command.has_subcommands() {
        man.render_subcommands_section(&mut page)?;
    }
    Ok(page)
}

fn main_page(command: &clap::Command) -> Result<Vec<u8>, std::io::Error> {
    let mut page = clap_sections(command)?;
    let mut roff = Roff::default();
    for (heading, text) in SECTIONS {
        preformatted(&mut roff, heading, text);
    }
    let mut see_also: Vec<String> = command
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .map(|s| format!("qseed-{}(8)", s.get_name()))
        .collect();
    see_also.push("qseed.toml(5)".into());
    see_also_section(&mut roff, &see_also);
    roff.to_writer(&mut page)?;
    Ok(page)
}

fn command_page(sub: &clap::Command) -> Result<Vec<u8>, std::io::Error> {
    let mut page = clap_sections(sub)?;
    let mut roff = Roff::default();
    if let Some(examples) = sub.get_after_help() {
        // The help text heads its examples itself ("Examples:"); the page has a section.
        let text = examples.to_string();
        let body = text
            .split_once(":\n")
            .map_or(text.as_str(), |(_, rest)| rest);
        preformatted(&mut roff, "EXAMPLES", body);
    }
    if sub.get_name() == "run" {
        preformatted(&mut roff, "SIGNALS", RUN_SIGNALS);
        preformatted(&mut roff, "METRICS", &metrics_list());
    }
    if let Some((heading, text)) = SECTIONS.iter().find(|(h, _)| *h == "EXIT STATUS") {
        preformatted(&mut roff, heading, text);
    }
    see_also_section(&mut roff, &["qseed(8)".into(), "qseed.toml(5)".into()]);
    roff.to_writer(&mut page)?;
    Ok(page)
}

/// What `qseed run` does on each signal.
const RUN_SIGNALS: &str =
    "  SIGHUP   re-read the configuration file; targets whose settings did not change keep
           their session and schedule; a file that fails its checks is refused and the
           running configuration stays. At most one reload every 2 s. Under systemd,
           `systemctl reload qseed` runs `qseed reload --pid $MAINPID`, which waits for
           the outcome and fails when the file was refused.
  SIGTERM  stop: bytes still held are injected into the targets (pool.flush_timeout),
  SIGINT   the rest wiped, sessions closed, modules finalized; exit 0 (4 when every
           target had stopped). A PKCS#11 call that does not return is left behind after
           1.5 s (its module is not finalized).";

/// The metrics `/metrics` serves, with their help text, from the metrics themselves (a
/// series added to the code is listed here without anyone remembering to).
fn metrics_list() -> String {
    let metrics = crate::telemetry::metrics::Metrics::new(Some(std::sync::Arc::new(
        crate::pool::StatsSnapshot::default,
    )));
    // One target through each kind of round, so that every family has a series to show.
    metrics.target_started("TARGET", std::time::Duration::from_secs(10));
    metrics.injected("TARGET", 48);
    metrics.failed("TARGET", "source_error");
    metrics.flushed("TARGET", 0);
    crate::pool::RequestObserver::request(&*metrics, "200", 0.1);
    metrics.target_stopped("TARGET", "pin", "");
    let mut lines = vec![
        "Served at http://ADDRESS/metrics (telemetry.listen, default 127.0.0.1:9750), with"
            .to_string(),
        "/healthz (the process answers) and /readyz (every target seeded within twice its"
            .to_string(),
        "period; otherwise 503 and the reasons). Per-target and per-source series appear once"
            .to_string(),
        "the service runs.".to_string(),
        String::new(),
    ];
    for line in metrics.render().lines() {
        if let Some(help) = line.strip_prefix("# HELP ") {
            let (name, text) = help.split_once(' ').unwrap_or((help, ""));
            lines.push(format!("  {name}"));
            lines.push(format!("      {text}"));
        }
    }
    lines.join("\n")
}

/// A section whose text keeps its lines and columns (tables of codes, variables, files).
fn preformatted(roff: &mut Roff, heading: &str, text: &str) {
    roff.control("SH", [heading]);
    roff.control("nf", []);
    for line in text.lines() {
        roff.text([roman(line)]);
    }
    roff.control("fi", []);
}

fn see_also_section(roff: &mut Roff, pages: &[String]) {
    roff.control("SH", ["SEE ALSO"]);
    let mut inlines = Vec::new();
    for (i, page) in pages.iter().enumerate() {
        if i > 0 {
            inlines.push(roman(", "));
        }
        let (name, section) = page.split_once('(').unwrap_or((page, ""));
        inlines.push(bold(name));
        inlines.push(roman(format!("({section}")));
    }
    roff.text(inlines);
}

/// `qseed.toml(5)`: the README's "Configuration reference", its tables as tagged paragraphs.
fn configuration_page() -> Result<Vec<u8>, std::io::Error> {
    let mut roff = Roff::default();
    roff.control("TH", ["qseed.toml", "5", "", SOURCE, MANUAL]);
    roff.control("SH", ["NAME"]);
    roff.text([roman("qseed.toml - the configuration file of qseed(8)")]);
    roff.control("SH", ["SYNOPSIS"]);
    roff.text([bold("/etc/qseed/qseed.toml")]);
    roff.control("SH", ["DESCRIPTION"]);
    let reference = README
        .split_once("\n## Configuration reference\n")
        .map(|(_, rest)| {
            rest.split_once("\n## ")
                .map_or(rest, |(section, _)| section)
        })
        .unwrap_or_default();
    let mut paragraph: Vec<&str> = Vec::new();
    let flush = |roff: &mut Roff, paragraph: &mut Vec<&str>| {
        if !paragraph.is_empty() {
            roff.control("PP", []);
            roff.text(inline_markdown(&paragraph.join(" ")));
            paragraph.clear();
        }
    };
    for line in reference.lines() {
        let line = line.trim_end();
        if let Some(heading) = line.strip_prefix("### ") {
            flush(&mut roff, &mut paragraph);
            let heading = heading.replace('`', "");
            roff.control("SH", [heading.as_str()]);
        } else if line.starts_with('|') {
            flush(&mut roff, &mut paragraph);
            let cells: Vec<&str> = line.trim_matches('|').split(" | ").map(str::trim).collect();
            // The header row and the |---| row are the table's, not keys.
            if cells.len() < 3 || cells[0] == "key" || cells[0].starts_with("---") {
                continue;
            }
            roff.control("TP", []);
            let mut tag = inline_markdown(cells[0]);
            tag.push(roman(" (default: "));
            tag.extend(inline_markdown(cells[1]));
            tag.push(roman(")"));
            roff.text(tag);
            roff.text(inline_markdown(&cells[2..].join(" | ")));
        } else if line.is_empty() {
            flush(&mut roff, &mut paragraph);
        } else {
            paragraph.push(line);
        }
    }
    flush(&mut roff, &mut paragraph);
    for heading in ["ENVIRONMENT", "FILES"] {
        if let Some((heading, text)) = SECTIONS.iter().find(|(h, _)| *h == heading) {
            preformatted(&mut roff, heading, text);
        }
    }
    see_also_section(&mut roff, &["qseed(8)".into(), "qseed-doctor(8)".into()]);
    let mut page = Vec::new();
    roff.to_writer(&mut page)?;
    Ok(page)
}

/// Markdown's inline marks in roff: `code` and **strong** in bold, [text](link) as text.
fn inline_markdown(text: &str) -> Vec<Inline> {
    let mut plain = String::with_capacity(text.len());
    let mut rest = text;
    // Links: keep the text, drop the address (a README anchor means nothing in a man page).
    while let Some(open) = rest.find('[') {
        match rest[open..].find("](").and_then(|close| {
            let after = open + close + 2;
            rest[after..]
                .find(')')
                .map(|end| (open + close, after + end))
        }) {
            Some((close, end)) if !rest[open + 1..close].contains(']') => {
                plain.push_str(&rest[..open]);
                plain.push_str(&rest[open + 1..close]);
                plain.push_str(&where_installed(&rest[close + 2..end]));
                rest = &rest[end + 1..];
            }
            _ => {
                plain.push_str(&rest[..=open]);
                rest = &rest[open + 1..];
            }
        }
    }
    plain.push_str(rest);
    let plain = plain.replace("\\|", "|");
    // Code spans first: what is inside them is literal (`***` is three stars, not a mark).
    let mut inlines = Vec::new();
    for (i, piece) in plain.split('`').enumerate() {
        if i % 2 == 1 {
            if !piece.is_empty() {
                inlines.push(bold(piece));
            }
            continue;
        }
        for (j, part) in piece.split("**").enumerate() {
            if !part.is_empty() {
                inlines.push(if j % 2 == 1 { bold(part) } else { roman(part) });
            }
        }
    }
    inlines
}

/// Where a README link's target is on an installed system, said after the link's text: a
/// man page cannot follow a README anchor or a path in the source tree.
fn where_installed(target: &str) -> String {
    const DOC: &str = "/usr/share/doc/qseed";
    if target.starts_with('#') {
        format!(" (in {DOC}/README.md)")
    } else if let Some(rest) = target.strip_prefix("packaging/monitoring/") {
        format!(" ({DOC}/monitoring/{rest})")
    } else if target.starts_with("examples/") {
        format!(" ({DOC}/{target})")
    } else if target.starts_with("http://") || target.starts_with("https://") {
        format!(" <{target}>")
    } else {
        format!(" ({target} in qseed's source)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 22, item 15: stars inside a code span are literal, and a README anchor is said
    /// to be in the installed README.
    #[test]
    fn code_spans_keep_their_stars_and_anchors_name_the_readme() {
        let text = Roff::new()
            .text(inline_markdown(
                "sent to the proxy, shown as `***`), or **none** (see [Several sources](#several-sources))",
            ))
            .to_roff();
        assert!(
            text.contains("shown as \\fB***\\fR), or \\fBnone\\fR (see Several sources (in /usr/share/doc/qseed/README.md))"),
            "{text}"
        );
    }

    /// Issue 22, item 15: qseed-run(8) has the signals and every metric.
    #[test]
    fn the_run_page_lists_signals_and_metrics() {
        let pages = pages().unwrap();
        let (_, run) = pages
            .iter()
            .find(|(name, _)| name == "qseed-run.8")
            .unwrap();
        let run = String::from_utf8_lossy(run);
        assert!(
            run.contains(".SH SIGNALS") && run.contains("SIGHUP"),
            "{run}"
        );
        assert!(run.contains(".SH METRICS"), "{run}");
        for metric in [
            "qseed_injections",
            "qseed_target_state",
            "qseed_entropy_simulated",
            "qseed_source_up",
        ] {
            assert!(run.contains(metric), "{metric}");
        }
    }

    #[test]
    fn markdown_marks_become_roff_fonts() {
        let text = Roff::new()
            .text(inline_markdown(
                "see [examples/qseed.toml](examples/qseed.toml), `size` and **The guard.** a|b",
            ))
            .to_roff();
        assert!(text.contains(
            "see examples/qseed.toml (/usr/share/doc/qseed/examples/qseed.toml), \\fBsize\\fR and \\fBThe guard.\\fR"
        ));
        assert!(!text.contains("]("), "{text}");
    }

    /// The keys a table of the configuration accepts, as serde lists them when it meets an
    /// unknown one (so a key added to the code and not to the README fails this test).
    fn accepted_keys(table: &str) -> Vec<String> {
        let text = format!("{table}\nno_such_key_zz = 1\n");
        let e = toml::from_str::<crate::config::raw::RawConfig>(&text)
            .unwrap_err()
            .to_string();
        // "expected one of `a`, `b`", or "expected `a`" for a table of one key.
        let expected = e.split_once("expected").map_or("", |(_, keys)| keys);
        let keys: Vec<String> = expected
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect();
        assert!(!keys.is_empty(), "{e}");
        keys
    }

    #[test]
    fn every_configuration_key_is_in_the_manual() {
        let page = String::from_utf8(configuration_page().unwrap()).unwrap();
        for table in [
            "[source]",
            "[pool]",
            "[telemetry]",
            "[service]",
            "[audit]",
            "[[target]]",
        ] {
            assert!(
                page.contains(&format!(".SH {table}")) || page.contains(&format!(".SH \"{table} ")),
                "{table}"
            );
            for key in accepted_keys(table) {
                assert!(
                    page.contains(&format!("\\fB{key}\\fR")),
                    "{table} {key}: {page}"
                );
            }
        }
    }
}
