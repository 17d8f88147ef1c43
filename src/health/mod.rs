//! Continuous health tests on every received block, before any byte of it is used.
//!
//! After NIST SP 800-90B section 4.4, on 8-bit samples, run afresh on each 1 KiB block:
//!
//! - **Repetition Count Test**: fails when one byte value repeats `C` times in a row, with
//!   `C = 1 + ceil(-log2(alpha) / H)`.
//! - **Adaptive Proportion Test**: in each window of `W = 512` bytes, fails when the window's
//!   first byte value occurs `C` or more times, with `C = 1 + CRITBINOM(W, 2^-H, 1 - alpha)`.
//!
//! `H` is the assessed min-entropy per byte and `alpha` the false-alarm probability per test
//! (defaults and reasons in [`HealthConfig`]). On top of 90B, a block identical to one seen
//! recently is refused (a replaying or stuck upstream); only keyed hashes of past blocks are
//! kept, never the bytes, and with a state folder they outlive the process (see
//! [`replay`]).

pub mod replay;

use replay::ReplayRecord;

/// Window of the Adaptive Proportion Test for non-binary samples (SP 800-90B 4.4.2).
pub const APT_WINDOW: usize = 512;

/// How many recent blocks the replay check remembers.
pub const REPLAY_MEMORY: usize = 65_536;

/// The false-alarm probabilities the configuration accepts, 2^-64 ..= 2^-20. Below 2^-64 the
/// cutoffs would outgrow the block (at 1e-320 and `min_entropy = 1` no run in a 1 KiB block
/// could fail the repetition test).
pub const FALSE_ALARM_RANGE: std::ops::RangeInclusive<f64> =
    5.421010862427522e-20..=9.5367431640625e-7;

/// The assessed min-entropy per byte the configuration accepts, in bits: above 0.5, up to 8.
pub const MIN_ENTROPY_FLOOR: f64 = 0.5;

/// Whatever the parameters, a run of this many equal bytes fails the repetition test (the
/// formula's value at the most tolerant allowed parameters, 0.5 bits and 2^-64, is 129): a
/// constant or stuck block can never pass.
pub const RCT_CUTOFF_CAP: usize = 129;

/// Whatever the parameters, a window holding one value this often fails the adaptive
/// proportion test (15/16 of the window; the formula at the most tolerant allowed parameters
/// stays below it).
pub const APT_CUTOFF_CAP: usize = APT_WINDOW * 15 / 16;

/// Parameters of the tests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HealthConfig {
    /// Assessed min-entropy per byte, in bits (0 < H <= 8). Default 7.0: below the 8 bits a
    /// conditioned QRNG output claims, so that the cutoffs leave room for honest data, yet
    /// far above what stuck, constant or short-period output shows.
    pub min_entropy: f64,
    /// False-alarm probability per test, `alpha`: the chance that a *good* block is thrown
    /// away. Smaller is more tolerant, not stricter: the cutoffs rise so that honest data
    /// almost never reaches them. Default 2^-40, the low end of the range SP 800-90B suggests
    /// (2^-20 .. 2^-40): a false alarm throws away bytes that were paid for. The configuration
    /// allows [`FALSE_ALARM_RANGE`], and the cutoffs are capped (see [`RCT_CUTOFF_CAP`]).
    pub false_alarm: f64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            min_entropy: 7.0,
            false_alarm: 2f64.powi(-40),
        }
    }
}

/// Why a block was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HealthFailure {
    #[error("repetition count test: one byte value {run} times in a row (cutoff {cutoff})")]
    RepetitionCount { run: usize, cutoff: usize },
    #[error(
        "adaptive proportion test: one byte value {count} times in a {window}-byte window \
         (cutoff {cutoff})"
    )]
    AdaptiveProportion {
        count: usize,
        window: usize,
        cutoff: usize,
    },
    #[error("the block is identical to one received earlier (replayed or stuck upstream)")]
    Replayed,
}

/// The tests' cutoffs and the replay memory.
#[derive(Debug)]
pub struct HealthTests {
    rct_cutoff: usize,
    apt_cutoff: usize,
    /// `None` when a shared record does the replay check instead.
    replay: Option<ReplayRecord>,
}

impl HealthTests {
    pub fn new(config: HealthConfig) -> Self {
        Self::with_memory(config, REPLAY_MEMORY)
    }

    /// Remembers the last `memory` blocks for the replay check, in this process only.
    pub fn with_memory(config: HealthConfig, memory: usize) -> Self {
        Self::with_record(config, ReplayRecord::in_memory(memory))
    }

    /// Checks replays against `replay` (which may outlive the process).
    pub fn with_record(config: HealthConfig, replay: ReplayRecord) -> Self {
        Self {
            rct_cutoff: rct_cutoff(config),
            apt_cutoff: apt_cutoff(config),
            replay: Some(replay),
        }
    }

    /// Leaves the replay check to a record shared with other processes (the state folder's,
    /// [`replay::SharedRecord`], consulted before these tests): this one's memory is freed.
    pub fn leave_replays_to_shared_record(&mut self) {
        self.replay = None;
    }

    /// New cutoffs; the replay memory stays.
    pub fn set_config(&mut self, config: HealthConfig) {
        self.rct_cutoff = rct_cutoff(config);
        self.apt_cutoff = apt_cutoff(config);
    }

    pub fn cutoffs(&self) -> (usize, usize) {
        (self.rct_cutoff, self.apt_cutoff)
    }

    /// Runs every test on `block`; a block that passes is remembered for the replay check.
    pub fn check(&mut self, block: &[u8]) -> Result<(), HealthFailure> {
        self.statistical(block)?;
        if let Some(replay) = &mut self.replay {
            if replay.check_and_remember(block) {
                return Err(HealthFailure::Replayed);
            }
        }
        Ok(())
    }

    /// The repetition count and adaptive proportion tests (SP 800-90B 4.4).
    fn statistical(&self, block: &[u8]) -> Result<(), HealthFailure> {
        self.repetition_count(block)?;
        self.adaptive_proportion(block)
    }

    fn repetition_count(&self, block: &[u8]) -> Result<(), HealthFailure> {
        let mut run = 0;
        let mut previous = None;
        for &b in block {
            if Some(b) == previous {
                run += 1;
            } else {
                previous = Some(b);
                run = 1;
            }
            if run >= self.rct_cutoff {
                return Err(HealthFailure::RepetitionCount {
                    run,
                    cutoff: self.rct_cutoff,
                });
            }
        }
        Ok(())
    }

    fn adaptive_proportion(&self, block: &[u8]) -> Result<(), HealthFailure> {
        for window in block.chunks(APT_WINDOW) {
            let first = window[0];
            let count = window.iter().filter(|&&b| b == first).count();
            if count >= self.apt_cutoff {
                return Err(HealthFailure::AdaptiveProportion {
                    count,
                    window: window.len(),
                    cutoff: self.apt_cutoff,
                });
            }
        }
        Ok(())
    }
}

/// Runs the tests on each `block_len`-byte block of `bytes`, drops (and wipes) the blocks
/// that fail, and moves the passing ones together, in order, at the front. Returns the kept
/// bytes and why each dropped block failed.
pub fn screen(
    tests: &mut HealthTests,
    mut bytes: crate::secret::EntropyBytes,
    block_len: usize,
) -> (crate::secret::EntropyBytes, Vec<HealthFailure>) {
    use zeroize::Zeroize;
    let blocks = bytes.len() / block_len;
    let mut failures = Vec::new();
    // The statistical tests block by block, then the replay check of the blocks that passed,
    // all at once (one pass over the record per answer).
    let mut passed = Vec::with_capacity(blocks);
    for (i, block) in bytes.expose().chunks_exact(block_len).enumerate() {
        match tests.statistical(block) {
            Ok(()) => passed.push(i),
            Err(failure) => failures.push(failure),
        }
    }
    let new = match &mut tests.replay {
        Some(replay) => {
            let bytes = bytes.expose();
            replay.admit(
                passed
                    .iter()
                    .map(|&i| &bytes[i * block_len..(i + 1) * block_len]),
            )
        }
        None => vec![true; passed.len()],
    };
    let mut kept = 0;
    for (i, new) in passed.into_iter().zip(new) {
        if !new {
            failures.push(HealthFailure::Replayed);
            continue;
        }
        if kept != i {
            bytes
                .expose_mut()
                .copy_within(i * block_len..(i + 1) * block_len, kept * block_len);
        }
        kept += 1;
    }
    bytes.expose_mut()[kept * block_len..].zeroize();
    bytes.truncate(kept * block_len);
    (bytes, failures)
}

/// `C = 1 + ceil(-log2(alpha) / H)` (SP 800-90B 4.4.1), at most [`RCT_CUTOFF_CAP`].
pub fn rct_cutoff(config: HealthConfig) -> usize {
    let c = 1.0 + (-config.false_alarm.log2() / config.min_entropy).ceil();
    // NaN and infinities (never allowed by the configuration) land on the cap too.
    if c.is_finite() && c >= 2.0 {
        (c as usize).min(RCT_CUTOFF_CAP)
    } else {
        RCT_CUTOFF_CAP
    }
}

/// `C = 1 + CRITBINOM(W, 2^-H, 1 - alpha)` (SP 800-90B 4.4.2): one more than the smallest `k`
/// with `P(X > k) <= alpha` for `X ~ Binomial(W, 2^-H)`; at most [`APT_CUTOFF_CAP`].
pub fn apt_cutoff(config: HealthConfig) -> usize {
    apt_formula(config).min(APT_CUTOFF_CAP)
}

fn apt_formula(config: HealthConfig) -> usize {
    let n = APT_WINDOW;
    let p = 2f64.powf(-config.min_entropy);
    // Probabilities in log space; the upper tail summed from the top keeps its precision.
    let ln_pmf =
        |k: usize| -> f64 { ln_choose(n, k) + k as f64 * p.ln() + (n - k) as f64 * (1.0 - p).ln() };
    let mut tail = 0.0; // P(X > k)
    for k in (0..n).rev() {
        tail += ln_pmf(k + 1).exp();
        if tail > config.false_alarm {
            return 1 + k + 1;
        }
    }
    1
}

fn ln_choose(n: usize, k: usize) -> f64 {
    ln_factorial(n) - ln_factorial(k) - ln_factorial(n - k)
}

fn ln_factorial(n: usize) -> f64 {
    (2..=n).map(|i| (i as f64).ln()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_block() -> Vec<u8> {
        let mut b = vec![0u8; 1024];
        getrandom::fill(&mut b).unwrap();
        b
    }

    #[test]
    fn cutoffs_follow_the_formulas() {
        let default = HealthConfig::default();
        // 1 + ceil(40 / 7) = 7.
        assert_eq!(rct_cutoff(default), 7);
        let full = HealthConfig {
            min_entropy: 8.0,
            ..default
        };
        assert_eq!(rct_cutoff(full), 6);
        // The APT cutoff sits far above the mean (512 / 128 = 4) and tightens with H.
        let c7 = apt_cutoff(default);
        let c8 = apt_cutoff(full);
        assert!((20..40).contains(&c7), "{c7}");
        assert!(c8 < c7, "{c8} < {c7}");
        // A looser alpha gives a lower cutoff.
        let loose = HealthConfig {
            false_alarm: 2f64.powi(-20),
            ..default
        };
        assert!(apt_cutoff(loose) < c7);
    }

    /// Hole found in review: `min_entropy = 1.0` with `false_alarm = 1e-320` let an all-zero
    /// block through. Now every value the configuration allows refuses constant and stuck
    /// blocks, and the caps hold whatever the parameters.
    #[test]
    fn no_allowed_parameters_let_a_constant_or_stuck_block_through() {
        let (low, high) = (*FALSE_ALARM_RANGE.start(), *FALSE_ALARM_RANGE.end());
        let mut extremes = Vec::new();
        for h in [MIN_ENTROPY_FLOOR + 1e-9, 1.0, 4.0, 8.0] {
            for a in [low, 1e-12, high] {
                extremes.push((h, a));
            }
        }
        // Outside the allowed ranges too: the caps hold.
        extremes.extend([(1.0, 1e-320), (1e-9, 1e-300), (0.5, f64::MIN_POSITIVE)]);
        for (h, a) in extremes {
            let config = HealthConfig {
                min_entropy: h,
                false_alarm: a,
            };
            assert!(rct_cutoff(config) <= RCT_CUTOFF_CAP);
            assert!(apt_cutoff(config) <= APT_CUTOFF_CAP);
            let mut tests = HealthTests::new(config);
            assert!(tests.check(&[0u8; 1024]).is_err(), "H={h} alpha={a}: zeros");
            let mut stuck = random_block();
            stuck[1024 - RCT_CUTOFF_CAP..].fill(0x5a);
            assert!(tests.check(&stuck).is_err(), "H={h} alpha={a}: stuck");
        }
        // Within the ranges the formula itself stays under the caps: they never loosen a test.
        for h in [MIN_ENTROPY_FLOOR + 1e-9, 1.0, 8.0] {
            let config = HealthConfig {
                min_entropy: h,
                false_alarm: low,
            };
            assert!(apt_formula(config) <= APT_CUTOFF_CAP, "H={h}");
            let c = 1.0 + (-low.log2() / h).ceil();
            assert!(c as usize <= RCT_CUTOFF_CAP, "H={h}: {c}");
        }
    }

    #[test]
    fn bad_blocks_are_refused() {
        let mut tests = HealthTests::new(HealthConfig::default());
        let all_zero = vec![0u8; 1024];
        assert!(matches!(
            tests.check(&all_zero),
            Err(HealthFailure::RepetitionCount { .. })
        ));
        // Stuck after a good start.
        let mut stuck = random_block();
        stuck[600..].fill(0xa5);
        assert!(matches!(
            tests.check(&stuck),
            Err(HealthFailure::RepetitionCount { .. })
        ));
        // A short period: no long runs, but each value far too often.
        let period: Vec<u8> = (0..1024)
            .map(|i| [3u8, 141, 59, 26, 53, 89, 79, 32][i % 8])
            .collect();
        assert!(matches!(
            tests.check(&period),
            Err(HealthFailure::AdaptiveProportion { .. })
        ));
        // A replay of a block that passed.
        let good = random_block();
        tests.check(&good).unwrap();
        assert_eq!(tests.check(&good), Err(HealthFailure::Replayed));
    }

    #[test]
    fn screening_keeps_good_blocks_in_order_and_wipes_the_rest() {
        let mut tests = HealthTests::new(HealthConfig::default());
        let (a, b) = (random_block(), random_block());
        let mut bytes = crate::secret::EntropyBytes::zeroed(3 * 1024);
        bytes.expose_mut()[..1024].copy_from_slice(&a);
        // Block 1 stays all zero: it fails.
        bytes.expose_mut()[2048..].copy_from_slice(&b);
        let (kept, failures) = screen(&mut tests, bytes, 1024);
        assert_eq!(failures.len(), 1);
        assert_eq!(kept.len(), 2048);
        assert_eq!(&kept.expose()[..1024], &a[..]);
        assert_eq!(&kept.expose()[1024..], &b[..]);
    }

    #[test]
    fn good_random_blocks_pass() {
        // The measured false-reject rate (BENCHMARKS.md) comes from a far larger run of
        // `cargo bench --bench pool`; this is a quick guard that the cutoffs leave room.
        let mut tests = HealthTests::new(HealthConfig::default());
        for _ in 0..2000 {
            tests.check(&random_block()).unwrap();
        }
    }

    #[test]
    fn replay_memory_is_bounded() {
        let mut tests = HealthTests::with_memory(HealthConfig::default(), 100);
        let first = random_block();
        tests.check(&first).unwrap();
        for _ in 0..110 {
            tests.check(&random_block()).unwrap();
        }
        assert_eq!(tests.replay.as_ref().map(ReplayRecord::len), Some(100));
        // Forgotten after 100 newer blocks: only the recent past is checked.
        tests.check(&first).unwrap();
    }
}
