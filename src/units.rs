//! Units as an operator reads and writes them; below every other module.

use std::time::Duration;

/// `365d`, `10m`, `1s`: the largest whole unit, as an operator would write it.
pub fn short_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if d.subsec_nanos() != 0 || secs == 0 {
        return humantime::format_duration(d).to_string();
    }
    for (unit, len) in [("d", 86_400), ("h", 3_600), ("m", 60)] {
        if secs % len == 0 {
            return format!("{}{unit}", secs / len);
        }
    }
    format!("{secs}s")
}

/// A byte count as an operator writes it: `4096`, `1K`, `4MiB`, `1G`. `K`, `M`, `G` and their
/// `KiB`/`MiB`/`GiB` forms are powers of 1024; `KB`, `MB`, `GB` powers of 1000 (as dd reads
/// them). Case does not matter; a space before the unit is allowed.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let explain = || {
        format!(
            "{text:?} is not a byte count; write it like 4096, 1K, 64KiB, 4MiB or 1G \
             (K, M, G are 1024-based; KB, MB, GB 1000-based)"
        )
    };
    let number: u64 = number.parse().map_err(|_| explain())?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => return Err(explain()),
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_take_units() {
        for (text, bytes) in [
            ("4096", 4096),
            ("1K", 1024),
            ("1k", 1024),
            ("64KiB", 65536),
            ("4MiB", 4 << 20),
            ("4 MiB", 4 << 20),
            ("1G", 1 << 30),
            ("2KB", 2000),
            ("1MB", 1_000_000),
            ("48B", 48),
        ] {
            assert_eq!(parse_bytes(text), Ok(bytes), "{text}");
        }
        for bad in ["", "K", "1.5K", "-1", "1T", "4 MiBs", "0x10"] {
            let e = parse_bytes(bad).unwrap_err();
            assert!(e.contains("not a byte count"), "{bad}: {e}");
        }
        assert!(parse_bytes("99999999999999999999G").is_err());
    }

    #[test]
    fn durations_use_the_largest_whole_unit() {
        assert_eq!(short_duration(Duration::from_secs(365 * 86_400)), "365d");
        assert_eq!(short_duration(Duration::from_secs(600)), "10m");
        assert_eq!(short_duration(Duration::from_secs(90)), "90s");
        assert_eq!(short_duration(Duration::from_millis(250)), "250ms");
    }
}
