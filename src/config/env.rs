//! `QSEED_<TABLE>_<KEY>` environment variables: every key of `[source]`, `[pool]`,
//! `[telemetry]` and `[service]` can be set or overridden from the environment (containers
//! configure that way, and Qrypt's old YAML file has no URL or CA key), for TOML and YAML
//! files alike. A value is checked like the file's own, and errors name the variable.
//!
//! A `QSEED_SOURCE_…`, `QSEED_POOL_…`, `QSEED_TELEMETRY_…` or `QSEED_SERVICE_…` variable that
//! names no key is an error, as an unknown key in the file is.

use serde::de::DeserializeOwned;

use super::raw::RawConfig;

/// How a variable's text becomes a value of the key's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Integer,
    Float,
    Bool,
    /// `"10s"`, `"5m"`, or a number of seconds.
    Duration,
}

/// Every key that may come from the environment: (table, key, kind).
const KEYS: &[(&str, &str, Kind)] = &[
    ("source", "url", Kind::Text),
    ("source", "dialect", Kind::Text),
    ("source", "block_unit", Kind::Text),
    ("source", "auth", Kind::Text),
    ("source", "token_file", Kind::Text),
    ("source", "ca_file", Kind::Text),
    ("source", "timeout", Kind::Duration),
    ("source", "allow_http", Kind::Bool),
    ("source", "allow_simulated", Kind::Bool),
    ("source", "monthly_budget", Kind::Text),
    ("source", "path", Kind::Text),
    ("pool", "max_bytes", Kind::Integer),
    ("pool", "max_age", Kind::Duration),
    ("pool", "horizon", Kind::Duration),
    ("pool", "flush_timeout", Kind::Duration),
    ("pool", "min_entropy", Kind::Float),
    ("pool", "false_alarm", Kind::Float),
    ("pool", "sources", Kind::Text),
    ("pool", "mix_fallback", Kind::Text),
    ("telemetry", "listen", Kind::Text),
    ("service", "state_dir", Kind::Text),
    ("service", "log_repeat", Kind::Duration),
];

/// One key set from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Override {
    /// `QSEED_SOURCE_URL`
    pub variable: String,
    /// `source.url`
    pub key: String,
    /// The value as given (none of these keys holds a secret).
    pub value: String,
}

/// The variable for `table.key`: `QSEED_SOURCE_CA_FILE`.
pub fn variable(table: &str, key: &str) -> String {
    format!("QSEED_{}_{}", table, key).to_ascii_uppercase()
}

/// Sets the keys that `vars` (the process environment, or a test's) name on `raw`.
pub fn apply(
    raw: &mut RawConfig,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<Override>, String> {
    let mut overrides = Vec::new();
    let mut vars: Vec<(String, String)> = vars.into_iter().collect();
    vars.sort();
    for (name, text) in vars {
        let Some((table, _)) = ["source", "pool", "telemetry", "service"]
            .iter()
            .map(|t| (*t, format!("QSEED_{}_", t.to_ascii_uppercase())))
            .find(|(_, prefix)| name.starts_with(prefix.as_str()))
        else {
            continue;
        };
        let Some((_, key, kind)) = KEYS
            .iter()
            .find(|(t, k, _)| *t == table && variable(t, k) == name)
        else {
            let known: Vec<String> = KEYS
                .iter()
                .filter(|(t, _, _)| *t == table)
                .map(|(t, k, _)| variable(t, k))
                .collect();
            return Err(format!(
                "environment variable {name} names no key of [{table}]; the variables for \
                 [{table}] are {}",
                known.join(", ")
            ));
        };
        let value = typed(&name, &text, *kind)?;
        let mut one = toml::Table::new();
        one.insert((*key).to_string(), value);
        let fail = |e: toml::de::Error| format!("{name} = {text:?}: {}", e.message().trim());
        match table {
            "source" => match raw.source.single_mut() {
                Some(source) => source.merge(from_table(one).map_err(fail)?),
                None => {
                    return Err(format!(
                        "{name} cannot say which of the {} [[source]] tables it sets; set the \
                         key in the configuration file",
                        raw.source.list.len()
                    ))
                }
            },
            "pool" => raw.pool.merge(from_table(one).map_err(fail)?),
            "telemetry" => raw.telemetry.merge(from_table(one).map_err(fail)?),
            _ => raw.service.merge(from_table(one).map_err(fail)?),
        }
        overrides.push(Override {
            variable: name,
            key: format!("{table}.{key}"),
            value: text,
        });
    }
    Ok(overrides)
}

/// Names the variables instead of the keys they set in a message about those keys.
pub fn rename(message: String, overrides: &[Override]) -> String {
    let mut message = message;
    for o in overrides {
        let written = format!("{} =", o.key);
        if message.contains(&written) {
            message = message.replacen(&written, &format!("{} =", o.variable), 1);
        }
    }
    message
}

fn from_table<T: DeserializeOwned>(table: toml::Table) -> Result<T, toml::de::Error> {
    toml::Value::Table(table).try_into()
}

fn typed(name: &str, text: &str, kind: Kind) -> Result<toml::Value, String> {
    let trimmed = text.trim();
    match kind {
        Kind::Text => Ok(toml::Value::String(text.to_string())),
        Kind::Integer => trimmed
            .parse::<i64>()
            .map(toml::Value::Integer)
            .map_err(|_| format!("{name} = {text:?} is not a whole number")),
        Kind::Float => trimmed
            .parse::<f64>()
            .map(toml::Value::Float)
            .map_err(|_| format!("{name} = {text:?} is not a number")),
        Kind::Bool => match trimmed {
            "true" => Ok(toml::Value::Boolean(true)),
            "false" => Ok(toml::Value::Boolean(false)),
            _ => Err(format!("{name} = {text:?}: write true or false")),
        },
        Kind::Duration => Ok(match trimmed.parse::<i64>() {
            Ok(seconds) => toml::Value::Integer(seconds),
            Err(_) => toml::Value::String(text.to_string()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readme_names_every_variable() {
        let readme = include_str!("../../README.md");
        for (table, key, _) in KEYS {
            let name = variable(table, key);
            assert!(
                readme.contains(&format!("`{name}`")),
                "{name} in the README"
            );
        }
    }

    fn vars(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn variables_set_keys_of_every_table() {
        let mut raw = RawConfig::default();
        let o = apply(
            &mut raw,
            vars(&[
                ("QSEED_SOURCE_URL", "https://localhost:8443"),
                ("QSEED_SOURCE_CA_FILE", "/tmp/ca.pem"),
                ("QSEED_SOURCE_TIMEOUT", "30"),
                ("QSEED_SOURCE_ALLOW_HTTP", "false"),
                ("QSEED_POOL_MAX_BYTES", "131072"),
                ("QSEED_POOL_MIN_ENTROPY", "7.5"),
                ("QSEED_TELEMETRY_LISTEN", "off"),
                ("QSEED_SERVICE_STATE_DIR", "/srv/qseed"),
                ("QSEED_CONFIG_FILE", "/etc/qseed/qseed.toml"),
                ("QSEED_LOG", "debug"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(o.len(), 8);
        assert_eq!(
            raw.source.list[0].url.as_deref(),
            Some("https://localhost:8443")
        );
        assert_eq!(
            raw.source.list[0].timeout.map(|t| t.0),
            Some(std::time::Duration::from_secs(30))
        );
        assert_eq!(raw.pool.max_bytes, Some(131072));
        assert_eq!(raw.pool.min_entropy, Some(7.5));
        assert_eq!(raw.telemetry.listen.as_deref(), Some("off"));
        assert_eq!(
            raw.service.state_dir.as_deref(),
            Some(std::path::Path::new("/srv/qseed"))
        );
    }

    #[test]
    fn bad_variables_are_named() {
        for (name, value, expected) in [
            (
                "QSEED_SOURCE_URLL",
                "x",
                "QSEED_SOURCE_URLL names no key of [source]",
            ),
            (
                "QSEED_POOL_MAX_BYTES",
                "lots",
                "QSEED_POOL_MAX_BYTES = \"lots\" is not a whole",
            ),
            (
                "QSEED_SOURCE_ALLOW_HTTP",
                "yes",
                "QSEED_SOURCE_ALLOW_HTTP = \"yes\": write true",
            ),
            (
                "QSEED_SOURCE_DIALECT",
                "grpc",
                "QSEED_SOURCE_DIALECT = \"grpc\"",
            ),
            (
                "QSEED_POOL_HORIZON",
                "soon",
                "QSEED_POOL_HORIZON = \"soon\"",
            ),
        ] {
            let err = apply(&mut RawConfig::default(), vars(&[(name, value)])).unwrap_err();
            assert!(err.contains(expected), "{name}: {err}");
        }
    }

    #[test]
    fn messages_name_the_variable() {
        let o = vec![Override {
            variable: "QSEED_POOL_MAX_BYTES".into(),
            key: "pool.max_bytes".into(),
            value: "5".into(),
        }];
        assert_eq!(
            rename("pool.max_bytes = 5 is out of range".into(), &o),
            "QSEED_POOL_MAX_BYTES = 5 is out of range"
        );
    }
}
