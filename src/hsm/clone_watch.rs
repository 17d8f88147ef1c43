//! Cloned generator detection (`[[target]] check_output = true`): after a seed, a few bytes
//! of the token's own output (`C_GenerateRandom`) are read and remembered by their SHA-256
//! only (the token's output may become someone's key: it is never kept, logged or compared
//! raw). The same output from two tokens, or twice from one, means their generator state was
//! cloned (an HA clone, a restored backup, a VM snapshot): an alert in the log, in
//! `qseed_generator_output_alert{target}` and in `/readyz`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};

/// Bytes of output read after each seed: 2^-128 for two honest generators to agree.
pub const OUTPUT_LEN: usize = 16;
/// Digests remembered, over all targets (oldest forgotten first).
const REMEMBERED: usize = 65_536;

#[derive(Debug, Default)]
struct Seen {
    by_digest: HashMap<[u8; 32], String>,
    order: VecDeque<[u8; 32]>,
    /// Each alerted target and why (kept until the process ends: a clone does not heal).
    alerts: BTreeMap<String, String>,
}

static SEEN: Mutex<Option<Seen>> = Mutex::new(None);

/// Checks `output` read from `target`'s token just now; an alert is logged once per target.
pub fn check(target: &str, output: &[u8]) {
    let digest: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, output)
        .as_ref()
        .try_into()
        .unwrap_or([0; 32]);
    let mut guard = SEEN.lock().unwrap_or_else(PoisonError::into_inner);
    let seen = guard.get_or_insert_with(Seen::default);
    let alert = match seen.by_digest.get(&digest) {
        Some(earlier) if earlier == target => Some(format!(
            "{target}: the token's generator returned the same {OUTPUT_LEN} bytes twice after \
             seeding: its state repeats (restored from a backup or a VM snapshot?). Do not use \
             this token for keys until its generator is re-initialized"
        )),
        Some(earlier) => Some(format!(
            "{target}: the token's generator returned the same {OUTPUT_LEN} bytes as {earlier}'s: \
             the two share cloned generator state (an HA clone, a restored backup, a VM \
             snapshot). Do not use either for keys until their generators are re-initialized"
        )),
        None => {
            seen.by_digest.insert(digest, target.to_string());
            seen.order.push_back(digest);
            if seen.order.len() > REMEMBERED {
                if let Some(old) = seen.order.pop_front() {
                    seen.by_digest.remove(&old);
                }
            }
            None
        }
    };
    if let Some(message) = alert {
        if !seen.alerts.contains_key(target) {
            tracing::error!(target_name = %target, "cloned generator: {message}");
            seen.alerts.insert(target.to_string(), message);
        }
    }
}

/// Every alerted target and why.
pub fn alerts() -> BTreeMap<String, String> {
    SEEN.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
        .map(|s| s.alerts.clone())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_output_from_two_targets_or_twice_from_one_is_an_alert() {
        check("cw-a", &[1; OUTPUT_LEN]);
        check("cw-b", &[2; OUTPUT_LEN]);
        assert!(!alerts().contains_key("cw-a") && !alerts().contains_key("cw-b"));
        check("cw-b", &[1; OUTPUT_LEN]);
        assert!(alerts()["cw-b"].contains("as cw-a's"), "{:?}", alerts());
        check("cw-c", &[3; OUTPUT_LEN]);
        check("cw-c", &[3; OUTPUT_LEN]);
        assert!(alerts()["cw-c"].contains("twice"), "{:?}", alerts());
    }
}
