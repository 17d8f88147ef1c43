//! PKCS#11 URIs (RFC 7512) as the ecosystem's names for tokens:
//! `pkcs11:token=My%20Token;serial=96feeeeb657661d5?module-path=/usr/lib/softhsm/libsofthsm2.so`.
//!
//! Only the subset that names a token is accepted: the token, slot and library path
//! attributes, and the `module-path`, `module-name`, `pin-source` and `pin-value` query
//! attributes. An attribute qseed does not know is an error rather than, as in p11-kit, a
//! silent "matches nothing"; vendor attributes (`x-...`) are ignored, as the RFC asks. Object
//! attributes (`object`, `id`, `type`) name keys, not tokens, and are refused. A `pin-value`
//! never appears in `Debug`, `Display` or an error.

use std::fmt;

use secrecy::SecretString;

/// A parsed token URI.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Pkcs11Uri {
    /// Path attributes that a token must match, by name, decoded.
    pub path: Vec<(String, String)>,
    pub module_path: Option<String>,
    pub module_name: Option<String>,
    /// `pin-source`, decoded (`file:/etc/qseed/pin` or a path).
    pub pin_source: Option<String>,
    /// `pin-value`: a secret, compared and printed never.
    pin_value: Option<SecretValue>,
}

#[derive(Clone)]
struct SecretValue(SecretString);

impl PartialEq for SecretValue {
    fn eq(&self, other: &Self) -> bool {
        use secrecy::ExposeSecret;
        self.0.expose_secret() == other.0.expose_secret()
    }
}
impl Eq for SecretValue {}
impl std::hash::Hash for SecretValue {
    fn hash<H: std::hash::Hasher>(&self, _: &mut H) {}
}

/// Path attributes that describe a token, its slot or its library.
pub const TOKEN_ATTRIBUTES: &[&str] = &[
    "token",
    "manufacturer",
    "serial",
    "model",
    "slot-id",
    "slot-description",
    "slot-manufacturer",
    "library-description",
    "library-manufacturer",
    "library-version",
];
const OBJECT_ATTRIBUTES: &[&str] = &["object", "id", "type"];
const QUERY_ATTRIBUTES: &[&str] = &["module-path", "module-name", "pin-source", "pin-value"];

/// What a token shows, as the URI attributes name it (`token` is the label).
pub trait UriAttributes {
    fn attribute(&self, name: &str) -> Option<String>;
}

impl Pkcs11Uri {
    /// Parses `text`. Errors name the attribute, never a `pin-value`.
    pub fn parse(text: &str) -> Result<Self, String> {
        // A mistyped separator (`&` for `;`, `:` for `=`) can put a PIN anywhere in the text:
        // so no error quotes what the operator wrote, only the attribute names qseed knows.
        // A name of lowercase letters and hyphens is a misspelt attribute, worth showing;
        // anything else may be a PIN typed where a name goes.
        let shown = |name: &str| {
            if !name.is_empty()
                && name.len() <= 32
                && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
            {
                format!("{name:?}")
            } else {
                "(name not shown)".to_string()
            }
        };
        let rest = text
            .strip_prefix("pkcs11:")
            .ok_or("a PKCS#11 URI starts with \"pkcs11:\"")?;
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        let mut uri = Pkcs11Uri::default();
        for (number, part) in path.split(';').filter(|p| !p.is_empty()).enumerate() {
            let (name, value) = part.split_once('=').ok_or_else(|| {
                format!(
                    "path attribute #{} has no '=' (text not shown); write name=value pairs \
                     separated by ';'",
                    number + 1
                )
            })?;
            if name.starts_with("x-") {
                continue;
            }
            if OBJECT_ATTRIBUTES.contains(&name) {
                return Err(format!(
                    "the attribute {name:?} names an object (a key), not a token; remove it"
                ));
            }
            if !TOKEN_ATTRIBUTES.contains(&name) {
                return Err(format!(
                    "unknown path attribute {}; a token is named with {}",
                    shown(name),
                    TOKEN_ATTRIBUTES.join(", ")
                ));
            }
            if uri.path.iter().any(|(n, _)| n == name) {
                return Err(format!("the attribute {name:?} is given twice"));
            }
            let value = decode(value).map_err(|e| format!("attribute {name:?}: {e}"))?;
            if name == "slot-id" && value.parse::<u64>().is_err() {
                return Err("slot-id is not a decimal number (value not shown)".into());
            }
            refuse_misplaced_pin(name, &value)?;
            uri.path.push((name.to_string(), value));
        }
        for (number, part) in query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter(|p| !p.is_empty())
            .enumerate()
        {
            let (name, value) = part.split_once('=').ok_or_else(|| {
                format!(
                    "query attribute #{} has no '=' (text not shown); write name=value pairs \
                     separated by '&'",
                    number + 1
                )
            })?;
            if name.starts_with("x-") {
                continue;
            }
            if !QUERY_ATTRIBUTES.contains(&name) {
                return Err(format!(
                    "unknown query attribute {}; qseed knows {}",
                    shown(name),
                    QUERY_ATTRIBUTES.join(", ")
                ));
            }
            let decoded = decode(value).map_err(|e| {
                if name == "pin-value" {
                    "attribute \"pin-value\" is not well percent-encoded (value not shown)"
                        .to_string()
                } else {
                    format!("attribute {name:?}: {e}")
                }
            })?;
            if name != "pin-value" {
                refuse_misplaced_pin(name, &decoded)?;
            }
            if name == "module-path" && !decoded.starts_with('/') {
                return Err(
                    "module-path must be an absolute path (a relative one would load a library \
                     from whatever folder qseed is started in); write the module's full path"
                        .into(),
                );
            }
            let slot = match name {
                "module-path" => &mut uri.module_path,
                "module-name" => &mut uri.module_name,
                "pin-source" => &mut uri.pin_source,
                _ => {
                    if uri.pin_value.is_some() {
                        return Err("the attribute \"pin-value\" is given twice".into());
                    }
                    uri.pin_value = Some(SecretValue(SecretString::from(decoded)));
                    continue;
                }
            };
            if slot.is_some() {
                return Err(format!("the attribute {name:?} is given twice"));
            }
            *slot = Some(decoded);
        }
        if uri.path.is_empty() {
            return Err(
                "the URI names no token: add token=LABEL or serial=SERIAL (or both)".into(),
            );
        }
        if uri.pin_source.is_some() && uri.pin_value.is_some() {
            return Err("pin-source and pin-value are both given; keep one".into());
        }
        Ok(uri)
    }

    /// The inline PIN of `pin-value`, if any.
    pub fn pin_value(&self) -> Option<SecretString> {
        self.pin_value.as_ref().map(|v| v.0.clone())
    }

    /// Whether a token with these attributes is the one the URI names: every path attribute
    /// given must be equal.
    pub fn matches(&self, token: &impl UriAttributes) -> bool {
        self.path
            .iter()
            .all(|(name, value)| token.attribute(name).as_deref() == Some(value.as_str()))
    }

    /// The URI naming a token by its model, manufacturer, serial and label (as `qseed slots`
    /// prints it for copy and paste).
    pub fn for_token(token: &impl UriAttributes) -> String {
        let mut parts = Vec::new();
        for name in ["model", "manufacturer", "serial", "token"] {
            if let Some(value) = token.attribute(name) {
                parts.push(format!("{name}={}", encode(&value)));
            }
        }
        format!("pkcs11:{}", parts.join(";"))
    }
}

impl fmt::Display for Pkcs11Uri {
    /// The URI without any PIN (`pin-value` shown as `...`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path: Vec<String> = self
            .path
            .iter()
            .map(|(n, v)| format!("{n}={}", encode(v)))
            .collect();
        write!(f, "pkcs11:{}", path.join(";"))?;
        let mut query = Vec::new();
        if let Some(p) = &self.module_path {
            query.push(format!("module-path={}", encode(p)));
        }
        if let Some(n) = &self.module_name {
            query.push(format!("module-name={}", encode(n)));
        }
        if let Some(s) = &self.pin_source {
            query.push(format!("pin-source={}", encode(s)));
        }
        if self.pin_value.is_some() {
            query.push("pin-value=...".into());
        }
        if !query.is_empty() {
            write!(f, "?{}", query.join("&"))?;
        }
        Ok(())
    }
}

impl fmt::Debug for Pkcs11Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pkcs11Uri({self})")
    }
}

/// RFC 3986 percent-decoding into UTF-8 text.
fn decode(value: &str) -> Result<String, String> {
    let bytes = value.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && !(bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
        {
            return Err(format!(
                "a '%' at position {i} is not followed by two hex digits"
            ));
        }
        i += 1;
    }
    percent_encoding::percent_decode_str(value)
        .decode_utf8()
        .map(|v| v.into_owned())
        .map_err(|_| "the decoded value is not UTF-8 text".to_string())
}

/// A value that holds another attribute's `pin-value=` is a separator typed wrong
/// (`token=a&pin-value=1234`): the PIN would be used as a label, and shown wherever the label
/// is. Refused without showing the value.
fn refuse_misplaced_pin(name: &str, value: &str) -> Result<(), String> {
    if value.to_ascii_lowercase().contains("pin-value") {
        return Err(format!(
            "the value of {name:?} holds \"pin-value\" (value not shown): query attributes \
             follow a '?' and are separated by '&', path attributes by ';'"
        ));
    }
    Ok(())
}

/// Percent-encodes all but RFC 7512's unreserved characters (and the few it allows in paths).
fn encode(value: &str) -> String {
    use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
    const KEEP: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~')
        .remove(b':')
        .remove(b'[')
        .remove(b']')
        .remove(b'@')
        .remove(b'!')
        .remove(b'$')
        .remove(b'\'')
        .remove(b'(')
        .remove(b')')
        .remove(b'*')
        .remove(b'+')
        .remove(b',')
        .remove(b'/');
    utf8_percent_encode(value, KEEP).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    struct Token(&'static [(&'static str, &'static str)]);
    impl UriAttributes for Token {
        fn attribute(&self, name: &str) -> Option<String> {
            self.0
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn rfc_7512_examples_that_name_tokens() {
        // RFC 7512 section 3 examples.
        let uri = Pkcs11Uri::parse(
            "pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;\
             manufacturer=Snake%20Oil,%20Inc.;model=1.0;object=my-certificate;type=cert",
        );
        assert!(uri.unwrap_err().contains("names an object"));
        let uri = Pkcs11Uri::parse(
            "pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;\
             manufacturer=Snake%20Oil,%20Inc.;model=1.0",
        )
        .unwrap();
        assert_eq!(
            uri.path,
            [
                ("token".into(), "The Software PKCS#11 Softtoken".into()),
                ("manufacturer".into(), "Snake Oil, Inc.".into()),
                ("model".into(), "1.0".into())
            ]
        );
        let uri = Pkcs11Uri::parse("pkcs11:token=Software%20PKCS%2311%20softtoken;manufacturer=Snake%20Oil,%20Inc.?pin-value=the-pin")
            .unwrap();
        assert_eq!(uri.pin_value().unwrap().expose_secret(), "the-pin");
        assert!(!format!("{uri} {uri:?}").contains("the-pin"));
        let uri = Pkcs11Uri::parse(
            "pkcs11:slot-description=Sun%20Metaslot?module-path=/usr/lib/libpkcs11.so.1",
        )
        .unwrap();
        assert_eq!(uri.module_path.as_deref(), Some("/usr/lib/libpkcs11.so.1"));
        let uri =
            Pkcs11Uri::parse("pkcs11:token=Name%20with%20a%20small%20A%20with%20acute:%20%C3%A1")
                .unwrap();
        assert_eq!(uri.path[0].1, "Name with a small A with acute: á");
        let uri =
            Pkcs11Uri::parse("pkcs11:token=my-token;x-vendor-aaa=value-a?x-vendor-b=1").unwrap();
        assert_eq!(uri.path.len(), 1, "vendor attributes are ignored");
    }

    #[test]
    fn bad_uris_are_named_and_never_show_a_pin() {
        for (text, expected) in [
            ("token=x", "starts with \"pkcs11:\""),
            ("pkcs11:", "names no token"),
            ("pkcs11:tokn=x", "unknown path attribute \"tokn\""),
            ("pkcs11:T0k3n=x", "unknown path attribute (name not shown)"),
            ("pkcs11:token=a;token=b", "\"token\" is given twice"),
            ("pkcs11:token=a%2", "not followed by two hex digits"),
            ("pkcs11:slot-id=x", "slot-id is not a decimal number"),
            ("pkcs11:token=a?pin=1", "unknown query attribute \"pin\""),
            ("pkcs11:token=a?pin-value=12%G4", "value not shown"),
            ("pkcs11:token=a?pin-value=1&pin-source=file:/p", "keep one"),
        ] {
            let err = Pkcs11Uri::parse(text).unwrap_err();
            assert!(err.contains(expected), "{text}: {err}");
            assert!(!err.contains("12%G4"), "{err}");
        }
    }

    /// Issue 21, item 9: a separator typed wrong puts the PIN where a value is expected; no
    /// error shows it, and a relative module-path is refused.
    #[test]
    fn item_09_malformed_uris_never_show_the_pin_and_module_path_is_absolute() {
        for text in [
            "pkcs11:token=a?pin-value:8642975",
            "pkcs11:token=a&pin-value=8642975",
            "pkcs11:token=a;8642975",
            "pkcs11:8642975=a",
            "pkcs11:slot-id=8642975x",
            "pkcs11:token=a?8642975",
            "pkcs11:token=a?8642975=1",
            "pkcs11:token=a?module-path=/m.so;pin-value=8642975",
        ] {
            let err = Pkcs11Uri::parse(text).expect_err(text);
            assert!(!err.contains("8642975"), "{text}: {err}");
        }
        let err = Pkcs11Uri::parse("pkcs11:token=a?module-path=libsofthsm2.so").unwrap_err();
        assert!(err.contains("absolute path"), "{err}");
        let err = Pkcs11Uri::parse("pkcs11:token=a?module-path=./lib/x.so").unwrap_err();
        assert!(err.contains("absolute path"), "{err}");
    }

    #[test]
    fn matching_and_printing_tokens() {
        let token = Token(&[
            ("token", "my token"),
            ("serial", "96feeeeb657661d5"),
            ("model", "SoftHSM v2"),
            ("manufacturer", "SoftHSM project"),
            ("slot-id", "3"),
        ]);
        let uri = Pkcs11Uri::parse("pkcs11:token=my%20token;serial=96feeeeb657661d5").unwrap();
        assert!(uri.matches(&token));
        assert!(!Pkcs11Uri::parse("pkcs11:token=other")
            .unwrap()
            .matches(&token));
        assert!(Pkcs11Uri::parse("pkcs11:slot-id=3")
            .unwrap()
            .matches(&token));
        let printed = Pkcs11Uri::for_token(&token);
        assert_eq!(
            printed,
            "pkcs11:model=SoftHSM%20v2;manufacturer=SoftHSM%20project;serial=96feeeeb657661d5;token=my%20token"
        );
        assert!(Pkcs11Uri::parse(&printed).unwrap().matches(&token));
    }
}
