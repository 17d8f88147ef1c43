//! Qrypt's C++ qseed's configuration: a flat YAML file (`/etc/qseed/qseed_config.yml`) with
//! `qrypt_token`, `size`, `period`, `cryptoki_lib`, `cryptoki_slot_id` and
//! `cryptoki_user_pin`, read with the old program's meaning (one target, a user login, Qrypt's
//! cloud with `POST /api/v1/entropy`) and checked as strictly as qseed's own TOML.
//!
//! The file is read at the YAML event level, not through serde: every value is kept as
//! written (an unquoted PIN `0123` stays `0123`, where a typed YAML loader would make it the
//! integer 123 and present the wrong PIN), every error names the key and its line, and no
//! error ever quotes the token's or the PIN's value.

use std::path::PathBuf;

use secrecy::SecretString;
use yaml_rust2::parser::{Event, Parser};
use zeroize::Zeroize;

use super::raw::{Login, RawConfig, RawTarget};
use super::values::{DurationValue, InlineSecret};
use crate::source::Dialect;

/// Where Qrypt's qseed looks for its file; qseed reads it there when `/etc/qseed/qseed.toml`
/// does not exist.
pub const DEFAULT_PATH: &str = "/etc/qseed/qseed_config.yml";

/// The name of the one target a legacy file describes, as it appears in logs.
pub const TARGET_NAME: &str = "hsm";

const KEYS: &[&str] = &[
    "qrypt_token",
    "size",
    "period",
    "cryptoki_lib",
    "cryptoki_slot_id",
    "cryptoki_user_pin",
];
const SECRET_KEYS: &[&str] = &["qrypt_token", "cryptoki_user_pin"];

/// Whether `text` is a YAML mapping (`key: value`) rather than TOML (`key = value`,
/// `[table]`): decided by the first line that is not blank, a comment or `---`.
pub fn looks_like_yaml(text: &str) -> bool {
    let Some(line) = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#') && *l != "---")
    else {
        return false;
    };
    if line.starts_with('[') {
        return false;
    }
    match (line.find(':'), line.find('=')) {
        (Some(colon), Some(equals)) => colon < equals,
        (Some(_), None) => true,
        _ => false,
    }
}

/// One `key: value` as written.
struct Entry {
    key: String,
    value: String,
    line: usize,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.value.zeroize();
    }
}

/// What a legacy file says, checked; secrets already in secret types.
#[derive(Debug)]
pub struct LegacyConfig {
    pub token: InlineSecret,
    pub size: Option<u64>,
    pub period: Option<u64>,
    pub module: PathBuf,
    pub slot_id: u64,
    pub pin: Option<InlineSecret>,
}

/// Reads a legacy file's text. Errors name the key and line, never a secret's value.
pub fn parse(text: &str) -> Result<LegacyConfig, String> {
    let entries = entries(text)?;
    let find = |key: &str| entries.iter().find(|e| e.key == key);
    let required = |key: &str, what: &str| {
        find(key).ok_or_else(|| format!("{key} is missing; add `{key}: {what}`"))
    };
    let token = required("qrypt_token", "<the token from Qrypt's portal>")?;
    if token.value.trim().is_empty() {
        return Err(format!(
            "line {}: qrypt_token is empty; put the token from Qrypt's portal there",
            token.line
        ));
    }
    let size = find("size")
        .map(|e| number(e, 1, 65536, "bytes per injection"))
        .transpose()?;
    let period = find("period")
        .map(|e| number(e, 1, 365 * 24 * 3600, "seconds between injections"))
        .transpose()?;
    let lib = required("cryptoki_lib", "/path/to/the/vendor/pkcs11/library.so")?;
    if lib.value.trim().is_empty() {
        return Err(format!(
            "line {}: cryptoki_lib is empty; set it to the HSM vendor's PKCS#11 library",
            lib.line
        ));
    }
    let slot = required("cryptoki_slot_id", "<slot id from `qseed slots`>")?;
    let slot_id = number(
        slot,
        0,
        u64::MAX,
        "a slot id (`qseed slots --module ...` lists them)",
    )?;
    let pin = match find("cryptoki_user_pin") {
        None => None,
        Some(e) if e.value.is_empty() => {
            return Err(format!(
                "line {}: cryptoki_user_pin is empty; put the user PIN there, or remove the line \
                 to seed without logging in",
                e.line
            ))
        }
        Some(e) => Some(InlineSecret(SecretString::from(e.value.as_str()))),
    };
    Ok(LegacyConfig {
        token: InlineSecret(SecretString::from(token.value.trim())),
        size,
        period,
        module: PathBuf::from(lib.value.trim()),
        slot_id,
        pin,
    })
}

impl LegacyConfig {
    /// The same configuration in qseed's terms: Qrypt's cloud in the `entropy` dialect with
    /// the inline token, one target on the slot, a user login when a PIN is given.
    pub fn into_raw(self) -> RawConfig {
        let mut raw = RawConfig::default();
        if let Some(source) = raw.source.single_mut() {
            source.dialect = Some(Dialect::Entropy);
            source.inline_token = Some(self.token);
        }
        let login = self.pin.as_ref().map(|_| Login::User);
        raw.targets.push(RawTarget {
            name: Some(TARGET_NAME.into()),
            kind: None,
            credit: None,
            check_output: None,
            module: Some(self.module),
            token: None,
            token_label: None,
            slot_id: i64::try_from(self.slot_id).ok(),
            serial: None,
            login,
            pin_file: None,
            pin_env: None,
            pin: self.pin,
            size: self.size.map(|s| s as i64),
            period: self
                .period
                .map(|p| DurationValue(std::time::Duration::from_secs(p))),
            offset: None,
            timeout: None,
            max_seed: None,
            init_args: None,
        });
        raw
    }
}

/// A non-negative integer in `min..=max`, written in decimal digits (quoted or not), as the
/// old program read it; its messages may quote the value (none of these keys is a secret).
fn number(entry: &Entry, min: u64, max: u64, what: &str) -> Result<u64, String> {
    let (key, line, text) = (&entry.key, entry.line, entry.value.trim());
    if text.is_empty() {
        return Err(format!(
            "line {line}: {key} has no value; give it a number ({what}), or remove the line"
        ));
    }
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "line {line}: {key}: {text:?} is not a whole number of {what}{}",
            if text.starts_with('-') {
                " (it is negative)"
            } else {
                ""
            }
        ));
    }
    match text.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!(
            "line {line}: {key}: {text} is out of range: allowed {min}..={max} ({what})"
        )),
    }
}

/// The file's top-level `key: value` pairs, in order. Only a flat mapping of scalars is a
/// legacy file; anything else is refused with the key (and line) where it starts.
fn entries(text: &str) -> Result<Vec<Entry>, String> {
    let mut parser = Parser::new_from_str(text);
    let mut entries: Vec<Entry> = Vec::new();
    let mut depth = 0usize;
    let mut pending_key: Option<(String, usize)> = None;
    let mut documents = 0;
    loop {
        let (event, mark) = parser
            .next_token()
            .map_err(|e| format!("line {}: not valid YAML: {}", e.marker().line(), e.info()))?;
        let line = mark.line();
        match event {
            Event::StreamEnd => break,
            Event::StreamStart | Event::DocumentEnd | Event::Nothing => {}
            Event::DocumentStart => {
                documents += 1;
                if documents > 1 {
                    return Err(format!(
                        "line {line}: a second YAML document; the file holds one"
                    ));
                }
            }
            Event::MappingStart(..) if depth == 0 => depth = 1,
            Event::MappingEnd if depth == 1 => depth = 0,
            Event::Scalar(mut value, _, _, _) if depth == 1 => match pending_key.take() {
                None => {
                    if !KEYS.contains(&value.as_str()) {
                        // A key is quoted only when it looks like one: a typo such as
                        // `cryptoki_user_pin:1234: x` makes the PIN part of the "key".
                        let shown = if value
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                        {
                            format!("{value:?}")
                        } else {
                            "(not shown: it may hold a value)".to_string()
                        };
                        value.zeroize();
                        return Err(format!(
                            "line {line}: unknown key {shown}; the keys of Qrypt's qseed \
                             configuration are {}",
                            KEYS.join(", ")
                        ));
                    }
                    if let Some(first) = entries.iter().find(|e| e.key == value) {
                        return Err(format!(
                            "line {line}: {value} is set twice (first on line {})",
                            first.line
                        ));
                    }
                    pending_key = Some((value, line));
                }
                Some((key, key_line)) => {
                    // `key:` with nothing after it, or `~`/`null`, has no value.
                    if matches!(value.as_str(), "~" | "null" | "Null" | "NULL")
                        && !SECRET_KEYS.contains(&key.as_str())
                    {
                        value.clear();
                    }
                    entries.push(Entry {
                        key,
                        value,
                        line: key_line,
                    });
                }
            },
            Event::Alias(_) => {
                return Err(format!(
                    "line {line}: YAML aliases are not supported here; write the value"
                ))
            }
            Event::SequenceStart(..) | Event::MappingStart(..) => {
                let key = pending_key
                    .as_ref()
                    .map_or_else(|| "a key".to_string(), |(k, _)| k.clone());
                return Err(format!(
                    "line {line}: {key} must be a single value, not a list or a table"
                ));
            }
            Event::Scalar(mut value, ..) => {
                value.zeroize();
                return Err(format!(
                    "line {line}: the file must be `key: value` lines (Qrypt's qseed \
                     configuration)"
                ));
            }
            Event::SequenceEnd | Event::MappingEnd => {}
        }
    }
    if entries.is_empty() && pending_key.is_none() {
        return Err("the file holds no `key: value` line".into());
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    /// As in Qrypt's qseed's own example file.
    const OLD_EXAMPLE: &str = "qrypt_token: qrypttokenfromportal\nsize: 48      # In bytes\n\
        period: 10    # In seconds\ncryptoki_lib: /usr/local/lib/softhsm/libsofthsm2.so\n\
        cryptoki_slot_id: 0\ncryptoki_user_pin: 1234\n";

    #[test]
    fn the_old_example_reads_with_its_meaning() {
        assert!(looks_like_yaml(OLD_EXAMPLE));
        let c = parse(OLD_EXAMPLE).unwrap();
        assert_eq!(c.token.0.expose_secret(), "qrypttokenfromportal");
        assert_eq!((c.size, c.period, c.slot_id), (Some(48), Some(10), 0));
        assert_eq!(
            c.module,
            PathBuf::from("/usr/local/lib/softhsm/libsofthsm2.so")
        );
        assert_eq!(c.pin.unwrap().0.expose_secret(), "1234");
    }

    #[test]
    fn values_are_kept_as_written() {
        let c = parse(&OLD_EXAMPLE.replace("1234", "0123")).unwrap();
        assert_eq!(
            c.pin.unwrap().0.expose_secret(),
            "0123",
            "not the integer 123"
        );
        let c = parse(&OLD_EXAMPLE.replace("1234", "\"12 34\"")).unwrap();
        assert_eq!(c.pin.unwrap().0.expose_secret(), "12 34");
    }

    #[test]
    fn toml_is_not_taken_for_yaml() {
        assert!(!looks_like_yaml("[source]\nurl = \"https://x:1\"\n"));
        assert!(!looks_like_yaml("# comment\nkey = \"a:b\"\n"));
        assert!(!looks_like_yaml(""));
        assert!(looks_like_yaml("---\n# c\nqrypt_token: x\n"));
    }

    #[test]
    fn bad_values_name_the_key_and_line_and_never_a_secret() {
        for (change, expected) in [
            (
                ("size: 48", "size: -1"),
                "line 2: size: \"-1\" is not a whole number",
            ),
            (("size: 48", "size: 0"), "line 2: size: 0 is out of range"),
            (
                ("size: 48", "size: 65537"),
                "line 2: size: 65537 is out of range",
            ),
            (("size: 48", "size:"), "line 2: size has no value"),
            (
                ("period: 10", "period: 1.5"),
                "line 3: period: \"1.5\" is not a whole number",
            ),
            (
                ("period: 10", "period: 0"),
                "line 3: period: 0 is out of range",
            ),
            (
                ("cryptoki_slot_id: 0", "cryptoki_slot_id: -3"),
                "line 5: cryptoki_slot_id: \"-3\" is not a whole number",
            ),
            (
                ("qrypt_token: qrypttokenfromportal", "qrypt_token: \"\""),
                "line 1: qrypt_token is empty",
            ),
            (
                ("cryptoki_lib", "cryptoki_library"),
                "line 4: unknown key \"cryptoki_library\"",
            ),
            (("cryptoki_slot_id: 0\n", ""), "cryptoki_slot_id is missing"),
            (
                ("size: 48", "size: [1, 2]"),
                "line 2: size must be a single value",
            ),
            (
                (
                    "cryptoki_user_pin: 1234",
                    "cryptoki_user_pin: 1234\nsize: 1",
                ),
                "line 7: size is set twice (first on line 2)",
            ),
        ] {
            let text = OLD_EXAMPLE.replace(change.0, change.1);
            let err = parse(&text).unwrap_err();
            assert!(err.contains(expected), "{change:?}: {err}");
            assert!(
                !err.contains("qrypttokenfromportal") && !err.contains("1234"),
                "{err}"
            );
        }
        // A typo that glues a PIN to its key is not quoted as an unknown key.
        let err =
            parse(&OLD_EXAMPLE.replace("cryptoki_user_pin: 1234", "cryptoki_user_pin:1234: x"))
                .unwrap_err();
        assert!(err.contains("unknown key (not shown"), "{err}");
        assert!(!err.contains("1234"), "{err}");
        // A PIN written as a list is refused without quoting it.
        let err =
            parse(&OLD_EXAMPLE.replace("cryptoki_user_pin: 1234", "cryptoki_user_pin: [1234]"))
                .unwrap_err();
        assert!(!err.contains("1234"), "{err}");
    }
}
