//! What a paid source allows: the API token's lifetime, when the token is a JWT, and the
//! bytes bought this month against `[source] monthly_budget`.
//!
//! The token's payload is decoded only for its `exp` claim, in memory that is wiped, with no
//! signature check (qseed is not the party that trusts the token) and nothing of it logged
//! but the expiry time. The month's count is kept per source URL in the state folder
//! (`sources/budget-<hash>`: `YYYY-MM bytes`), so restarts and `once` runs add up.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use secrecy::ExposeSecret;
use zeroize::Zeroizing;

use crate::folder::StateFolder;

/// The days before a token's expiry at which qseed warns.
pub const EXPIRY_WARNINGS: [u64; 3] = [30, 7, 1];

/// The `exp` claim of `token` when it is a JWT (`header.payload.signature`, base64url).
pub fn token_expiry(token: &secrecy::SecretString) -> Option<SystemTime> {
    let text = token.expose_secret();
    let mut parts = text.split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || payload.len() > 64 * 1024 {
        return None;
    }
    let decoded = Zeroizing::new(
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .ok()?,
    );
    #[derive(serde::Deserialize)]
    struct Claims {
        exp: Option<f64>,
    }
    let claims: Claims = serde_json::from_slice(&decoded).ok()?;
    let exp = claims
        .exp
        .filter(|e| e.is_finite() && *e > 0.0 && *e < 1e11)?;
    Some(UNIX_EPOCH + Duration::from_secs(exp as u64))
}

/// How a token's expiry stands `now`: `None` when it is more than 30 days away.
pub fn expiry_warning(expiry: SystemTime, now: SystemTime) -> Option<String> {
    let when = humantime::format_rfc3339_seconds(expiry);
    match expiry.duration_since(now) {
        Err(_) => Some(format!(
            "the API token expired on {when}: every request will be refused. Create a new token \
             in Qrypt's portal and put it in the token file"
        )),
        Ok(left) => {
            let days = left.as_secs() / 86_400;
            (days < EXPIRY_WARNINGS[0]).then(|| {
                format!(
                    "the API token expires on {when} (in {}): create a new one in Qrypt's portal \
                     and put it in the token file before then",
                    if days == 0 {
                        crate::units::short_duration(Duration::from_secs(left.as_secs().max(1)))
                    } else {
                        format!("{days} day(s)")
                    }
                )
            })
        }
    }
}

/// The threshold (30, 7, 1 days, or 0 when expired) a token's expiry has crossed `now`;
/// `None` before 30 days.
pub fn expiry_stage(expiry: SystemTime, now: SystemTime) -> Option<u64> {
    let days = match expiry.duration_since(now) {
        Err(_) => return Some(0),
        Ok(left) => left.as_secs() / 86_400,
    };
    EXPIRY_WARNINGS
        .iter()
        .rev()
        .find(|limit| days < **limit)
        .copied()
}

/// The bytes bought from one source this month, and its budget.
#[derive(Debug)]
pub struct MonthlyCount {
    budget: Option<u64>,
    folder: Option<StateFolder>,
    file: String,
    state: Mutex<CountState>,
}

#[derive(Debug, Default)]
struct CountState {
    month: String,
    bytes: u64,
    /// The highest warning given this month (0: none, 1: forecast over, 2: 90 %, 3: over).
    warned: u8,
}

/// A month's figures, for doctor and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MonthFigures {
    pub bytes: u64,
    pub forecast: u64,
    pub budget: Option<u64>,
}

impl MonthlyCount {
    /// The count for `url`, kept in `state`'s `sources` folder when there is one.
    pub fn new(url: &str, budget: Option<u64>, state: Option<&std::path::Path>) -> Self {
        // `https://host/` and `https://host` are one source.
        let digest =
            ring::digest::digest(&ring::digest::SHA256, url.trim_end_matches('/').as_bytes());
        let file = format!("budget-{}", hex::encode(&digest.as_ref()[..8]));
        let folder = state.and_then(|dir| {
            StateFolder::open(dir)
                .and_then(|f| f.subfolder("sources"))
                .map_err(|e| tracing::debug!("the month's count stays in memory: {e}"))
                .ok()
        });
        let count = Self {
            budget,
            folder,
            file,
            state: Mutex::new(CountState::default()),
        };
        count.load(SystemTime::now());
        count
    }

    fn load(&self, now: SystemTime) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.month = month_of(now);
        if let Some(folder) = &self.folder {
            if let Ok(Some(bytes)) = folder.read(&self.file, 256) {
                let text = String::from_utf8_lossy(&bytes);
                let mut fields = text.split_whitespace();
                if fields.next() == Some(state.month.as_str()) {
                    state.bytes = fields.next().and_then(|b| b.parse().ok()).unwrap_or(0);
                }
            }
        }
    }

    /// `bytes` were bought now: counted, saved, and warned about when the month's forecast
    /// or count passes the budget.
    pub fn bought(&self, bytes: u64) {
        self.bought_at(bytes, SystemTime::now());
    }

    fn bought_at(&self, bytes: u64, now: SystemTime) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let month = month_of(now);
        if state.month != month {
            *state = CountState {
                month,
                ..CountState::default()
            };
        }
        // Another process (a `once`) may have counted too: add to what the file says.
        if let Some(folder) = &self.folder {
            if let Ok(Some(saved)) = folder.read(&self.file, 256) {
                let text = String::from_utf8_lossy(&saved);
                let mut fields = text.split_whitespace();
                if fields.next() == Some(state.month.as_str()) {
                    let on_disk: u64 = fields.next().and_then(|b| b.parse().ok()).unwrap_or(0);
                    state.bytes = state.bytes.max(on_disk);
                }
            }
        }
        state.bytes += bytes;
        if let Some(folder) = &self.folder {
            let text = format!("{} {}\n", state.month, state.bytes);
            if let Err(e) = folder.write_atomic(&self.file, text.as_bytes()) {
                tracing::debug!("cannot save the month's count: {e}");
            }
        }
        let Some(budget) = self.budget else {
            return;
        };
        let forecast = forecast(state.bytes, now);
        let (stage, message) = if state.bytes >= budget {
            (
                3,
                format!(
                    "{} bytes bought this month, past source.monthly_budget ({budget})",
                    state.bytes
                ),
            )
        } else if state.bytes * 10 >= budget * 9 {
            (
                2,
                format!(
                    "{} bytes bought this month: 90 % of source.monthly_budget ({budget}) is used",
                    state.bytes
                ),
            )
        } else if forecast > budget {
            (
                1,
                format!(
                    "at this month's pace, {forecast} bytes will be bought by its end, more than \
                     source.monthly_budget ({budget}); {} so far",
                    state.bytes
                ),
            )
        } else {
            (0, String::new())
        };
        if stage > state.warned {
            state.warned = stage;
            tracing::warn!("{message}");
        }
    }

    pub fn figures(&self) -> MonthFigures {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let now = SystemTime::now();
        let bytes = if state.month == month_of(now) {
            state.bytes
        } else {
            0
        };
        MonthFigures {
            bytes,
            forecast: forecast(bytes, now),
            budget: self.budget,
        }
    }
}

/// `YYYY-MM` of `time`, UTC.
fn month_of(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()[..7].to_string()
}

/// The month's total at its present pace.
fn forecast(bytes: u64, now: SystemTime) -> u64 {
    let text = humantime::format_rfc3339_seconds(now).to_string();
    let year: u64 = text[..4].parse().unwrap_or(1970);
    let month: u64 = text[5..7].parse().unwrap_or(1);
    let day: u64 = text[8..10].parse().unwrap_or(1);
    let days_in_month = match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let elapsed = (day - 1) * 86_400 + secs % 86_400;
    // The first hour of a month says too little to extrapolate from.
    let elapsed = elapsed.max(3600);
    (bytes as u128 * (days_in_month * 86_400) as u128 / elapsed as u128) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(payload: &str) -> secrecy::SecretString {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        secrecy::SecretString::from(format!(
            "{}.{}.c2lnbmF0dXJl",
            b64(r#"{"alg":"RS256","typ":"JWT"}"#),
            b64(payload)
        ))
    }

    #[test]
    fn a_jwt_gives_its_expiry_and_anything_else_gives_none() {
        let token = jwt(r#"{"sub":"someone","exp":1800000000}"#);
        assert_eq!(
            token_expiry(&token),
            Some(UNIX_EPOCH + Duration::from_secs(1_800_000_000))
        );
        for other in ["opaque-token-123", "a.b", "a.b.c.d", "x.!!!.y", &{
            let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
            format!("h.{}.s", b64(r#"{"exp":"soon"}"#))
        }] {
            assert_eq!(
                token_expiry(&secrecy::SecretString::from(other.to_string())),
                None,
                "{other}"
            );
        }
    }

    #[test]
    fn expiry_warnings_come_at_30_7_and_1_days() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let day = Duration::from_secs(86_400);
        assert_eq!(expiry_stage(now + 40 * day, now), None);
        assert_eq!(expiry_stage(now + 29 * day, now), Some(30));
        assert_eq!(expiry_stage(now + 3 * day, now), Some(7));
        assert_eq!(expiry_stage(now + day / 2, now), Some(1));
        assert_eq!(expiry_stage(now - day, now), Some(0));
        let text = expiry_warning(now + 3 * day, now).unwrap();
        assert!(text.contains("in 3 day(s)"), "{text}");
        assert!(expiry_warning(now + 40 * day, now).is_none());
    }

    #[test]
    fn the_forecast_extrapolates_the_month() {
        // 2027-01-11T00:00:00Z: 10 of 31 days elapsed.
        let now = UNIX_EPOCH + Duration::from_secs(1_799_625_600);
        assert_eq!(month_of(now), "2027-01");
        assert_eq!(forecast(10_000, now), 31_000);
    }

    #[test]
    fn the_count_adds_up_across_processes_and_per_source() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        let a = MonthlyCount::new("https://x/", Some(10_000), Some(dir.path()));
        a.bought(4096);
        let b = MonthlyCount::new("https://x/", Some(10_000), Some(dir.path()));
        assert_eq!(
            b.figures().bytes,
            4096,
            "a second process reads the month so far"
        );
        b.bought(4096);
        a.bought(1024);
        assert_eq!(a.figures().bytes, 9216);
        let other = MonthlyCount::new("https://y/", None, Some(dir.path()));
        assert_eq!(other.figures().bytes, 0, "counted per source URL");
    }
}
