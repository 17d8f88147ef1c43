//! Which way requests take to the entropy API: straight, or through an HTTP proxy.
//!
//! qseed decides this itself, once per client, instead of leaving it to the HTTP client's
//! reading of the environment: so the route can be shown (`doctor`, the start-up line), named
//! in connection errors, and a proxy variable that does not parse is an error rather than
//! silently ignored. `[source] proxy` wins over the environment; `"none"` turns proxies off.

use std::fmt;
use std::net::IpAddr;

use url::Url;

/// `[source] proxy` as configured.
#[derive(Clone, PartialEq, Eq, Default)]
pub enum ProxySetting {
    /// Unset: `HTTPS_PROXY`/`HTTP_PROXY`/`ALL_PROXY` and `NO_PROXY` (either case) decide.
    #[default]
    Environment,
    /// `"none"`: always straight to the API, whatever the environment says.
    Off,
    /// A proxy URL.
    Url(Url),
}

// A proxy URL may carry a password, and configurations are printed with `{:?}`.
impl fmt::Debug for ProxySetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProxySetting::Environment => f.write_str("Environment"),
            ProxySetting::Off => f.write_str("Off"),
            ProxySetting::Url(url) => write!(f, "Url({})", redacted(url)),
        }
    }
}

/// The way requests take.
#[derive(Clone, PartialEq, Eq)]
pub enum Route {
    Direct(DirectBecause),
    Proxy {
        url: Url,
        /// `source.proxy`, or the environment variable it came from.
        from: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirectBecause {
    NoProxySet,
    TurnedOff,
    /// `NO_PROXY` (or `no_proxy`) names the API's host.
    Excluded(String),
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Route::Proxy { url, from } => write!(f, "via proxy {} ({from})", redacted(url)),
            Route::Direct(DirectBecause::NoProxySet) => f.write_str("direct (no proxy set)"),
            Route::Direct(DirectBecause::TurnedOff) => {
                f.write_str("direct (source.proxy = \"none\")")
            }
            Route::Direct(DirectBecause::Excluded(var)) => {
                write!(f, "direct ({var} names the host)")
            }
        }
    }
}

// A proxy URL may carry a password: Debug prints what Display does.
impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Route {
    pub fn proxy(&self) -> Option<&Url> {
        match self {
            Route::Proxy { url, .. } => Some(url),
            Route::Direct(_) => None,
        }
    }
}

/// A proxy URL for display: a password in it becomes `***`.
pub fn redacted(url: &Url) -> String {
    let mut shown = url.clone();
    if url.password().is_some() {
        let _ = shown.set_password(Some("***"));
    }
    shown.as_str().trim_end_matches('/').to_string()
}

/// Parses a proxy as written in `source.proxy` or a variable (`what` names it in errors). A
/// value without a scheme is `http://` (as curl reads it).
pub fn parse_proxy(value: &str, what: &str) -> Result<Url, String> {
    // The value may hold a password: errors show only what follows its last '@'.
    let shown = match value.rfind('@') {
        Some(at) => format!("…@{}", &value[at + 1..]),
        None => value.to_string(),
    };
    let text = if value.contains("://") {
        value.to_string()
    } else {
        format!("http://{value}")
    };
    let url = Url::parse(&text).map_err(|e| {
        format!(
            "{what} = {shown:?} is not a proxy URL ({e}); write it like \
             \"http://proxy.example.com:3128\""
        )
    })?;
    match url.scheme() {
        "http" | "https" => {}
        other => {
            return Err(format!(
                "{what} = {shown:?}: {other}:// proxies are not supported; qseed uses HTTP \
                 proxies (CONNECT), written like \"http://proxy.example.com:3128\""
            ))
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!(
            "{what} = {shown:?} names no host; write it like \"http://proxy.example.com:3128\""
        ));
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() {
        return Err(format!(
            "{what} = {shown:?} has a path; a proxy is a host and port, like \
             \"http://proxy.example.com:3128\""
        ));
    }
    Ok(url)
}

/// The route to `api` under `setting`, reading variables through `var` (the process
/// environment, or a test's).
pub fn route(
    setting: &ProxySetting,
    api: &Url,
    var: impl Fn(&str) -> Option<String>,
) -> Result<Route, String> {
    match setting {
        ProxySetting::Off => return Ok(Route::Direct(DirectBecause::TurnedOff)),
        ProxySetting::Url(url) => {
            return Ok(Route::Proxy {
                url: url.clone(),
                from: "source.proxy".into(),
            })
        }
        ProxySetting::Environment => {}
    }
    // Lower case first, as curl reads them; an empty variable is an unset one.
    let lookup = |name: &str| {
        [name.to_ascii_lowercase(), name.to_string()]
            .into_iter()
            .find_map(|n| var(&n).filter(|v| !v.trim().is_empty()).map(|v| (n, v)))
    };
    let scheme_var = if api.scheme() == "http" {
        "HTTP_PROXY"
    } else {
        "HTTPS_PROXY"
    };
    let Some((name, value)) = lookup(scheme_var).or_else(|| lookup("ALL_PROXY")) else {
        return Ok(Route::Direct(DirectBecause::NoProxySet));
    };
    let url = parse_proxy(value.trim(), &name)?;
    if let Some((no_proxy, list)) = lookup("NO_PROXY") {
        if let Some(host) = api.host_str() {
            if excluded(&list, host) {
                return Ok(Route::Direct(DirectBecause::Excluded(no_proxy)));
            }
        }
    }
    Ok(Route::Proxy { url, from: name })
}

/// Whether a `NO_PROXY` list names `host`: `*`; a host name, which also covers its
/// subdomains (a leading dot is optional); an IP address; an IP network (`10.0.0.0/8`).
fn excluded(list: &str, host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host_ip: Option<IpAddr> = host.parse().ok();
    list.split(',').map(str::trim).any(|entry| {
        if entry == "*" {
            return true;
        }
        if let Some(ip) = host_ip {
            if let Some((net, bits)) = entry.split_once('/') {
                return match (net.parse::<IpAddr>(), bits.parse::<u32>()) {
                    (Ok(net), Ok(bits)) => in_network(ip, net, bits),
                    _ => false,
                };
            }
            let entry = entry.trim_start_matches('[').trim_end_matches(']');
            return entry.parse::<IpAddr>().is_ok_and(|e| e == ip);
        }
        let name = entry.trim_start_matches('.').to_ascii_lowercase();
        let host = host.to_ascii_lowercase();
        !name.is_empty() && (host == name || host.ends_with(&format!(".{name}")))
    })
}

fn in_network(ip: IpAddr, net: IpAddr, bits: u32) -> bool {
    match (ip, net) {
        (IpAddr::V4(ip), IpAddr::V4(net)) if bits <= 32 => {
            let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) if bits <= 128 => {
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        }
    }

    fn api() -> Url {
        Url::parse("https://api-eus.qrypt.com").unwrap()
    }

    #[test]
    fn the_environment_decides_unless_the_file_says_otherwise() {
        let vars = [("HTTPS_PROXY", "proxy.corp:3128")];
        let r = route(&ProxySetting::Environment, &api(), env(&vars)).unwrap();
        assert_eq!(
            r.to_string(),
            "via proxy http://proxy.corp:3128 (HTTPS_PROXY)"
        );
        let r = route(&ProxySetting::Off, &api(), env(&vars)).unwrap();
        assert_eq!(r, Route::Direct(DirectBecause::TurnedOff));
        let own = Url::parse("http://other:8080").unwrap();
        let r = route(&ProxySetting::Url(own.clone()), &api(), env(&vars)).unwrap();
        assert_eq!(r.proxy(), Some(&own));
        let r = route(&ProxySetting::Environment, &api(), env(&[])).unwrap();
        assert_eq!(r, Route::Direct(DirectBecause::NoProxySet));
        // Lower case wins; empty is unset; ALL_PROXY is the fallback; HTTP_PROXY is for http.
        let vars = [
            ("https_proxy", ""),
            ("HTTP_PROXY", "http://plain:1"),
            ("all_proxy", "http://all:2"),
        ];
        let r = route(&ProxySetting::Environment, &api(), env(&vars)).unwrap();
        assert_eq!(r.to_string(), "via proxy http://all:2 (all_proxy)");
        let plain = Url::parse("http://appliance:8080").unwrap();
        let r = route(&ProxySetting::Environment, &plain, env(&vars)).unwrap();
        assert_eq!(r.to_string(), "via proxy http://plain:1 (HTTP_PROXY)");
    }

    #[test]
    fn no_proxy_takes_names_suffixes_addresses_and_networks() {
        for (list, host, expected) in [
            ("*", "api-eus.qrypt.com", true),
            ("qrypt.com", "api-eus.qrypt.com", true),
            (".qrypt.com", "api-eus.qrypt.com", true),
            ("example.com, api-eus.qrypt.com", "api-eus.qrypt.com", true),
            ("rypt.com", "api-eus.qrypt.com", false),
            ("10.0.0.0/8", "10.1.2.3", true),
            ("10.0.0.0/8", "11.1.2.3", false),
            ("127.0.0.1", "127.0.0.1", true),
            ("::1", "[::1]", true),
            ("fd00::/8", "[fd12::1]", true),
            ("10.0.0.0/8", "api-eus.qrypt.com", false),
        ] {
            assert_eq!(excluded(list, host), expected, "{list} / {host}");
        }
        let vars = [
            ("HTTPS_PROXY", "http://proxy:3128"),
            ("no_proxy", "qrypt.com"),
        ];
        let r = route(&ProxySetting::Environment, &api(), env(&vars)).unwrap();
        assert_eq!(r.to_string(), "direct (no_proxy names the host)");
    }

    #[test]
    fn bad_proxies_are_errors_that_never_show_a_password() {
        for (value, says) in [
            ("http://[bad", "is not a proxy URL"),
            ("socks5://proxy:1080", "socks5:// proxies are not supported"),
            ("http://proxy:3128/path", "has a path"),
            ("http://user:hunter2@[bad", "is not a proxy URL"),
        ] {
            let vars = [("HTTPS_PROXY", value)];
            let e = route(&ProxySetting::Environment, &api(), env(&vars)).unwrap_err();
            assert!(e.starts_with("HTTPS_PROXY = "), "{e}");
            assert!(e.contains(says), "{value}: {e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
        let vars = [("HTTPS_PROXY", "http://user:hunter2@proxy:3128")];
        let r = route(&ProxySetting::Environment, &api(), env(&vars)).unwrap();
        assert_eq!(
            format!("{r} {r:?}"),
            "via proxy http://user:***@proxy:3128 (HTTPS_PROXY) \
             via proxy http://user:***@proxy:3128 (HTTPS_PROXY)"
        );
        assert_eq!(
            r.proxy().unwrap().password(),
            Some("hunter2"),
            "kept for the proxy"
        );
        let setting =
            ProxySetting::Url(parse_proxy("http://user:hunter2@proxy:3128", "x").unwrap());
        assert_eq!(format!("{setting:?}"), "Url(http://user:***@proxy:3128)");
    }
}
