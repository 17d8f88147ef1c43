//! A buffer of entropy bytes: never printed, wiped when dropped.

use std::fmt;

use zeroize::Zeroizing;

/// Entropy bytes in memory. `Debug` shows only the length; the bytes are zeroized on drop.
///
/// The buffer is allocated at its final size before any byte is written into it, so no
/// reallocation can leave an unwiped copy behind.
pub struct EntropyBytes(Zeroizing<Vec<u8>>);

impl EntropyBytes {
    /// A zero-filled buffer of `len` bytes, to be written in place.
    pub fn zeroed(len: usize) -> Self {
        Self(Zeroizing::new(vec![0u8; len]))
    }

    /// Takes ownership of bytes that already live in a wiping buffer.
    pub fn from_zeroizing(bytes: Zeroizing<Vec<u8>>) -> Self {
        Self(bytes)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Shortens the buffer in place; the cut-off bytes stay in the wiped allocation.
    pub fn truncate(&mut self, len: usize) {
        self.0.truncate(len);
    }

    /// The bytes themselves: for `C_SeedRandom`, writing a fetched file, and tests only.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn expose_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

impl fmt::Debug for EntropyBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EntropyBytes({} bytes, redacted)", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_bytes() {
        let mut bytes = EntropyBytes::zeroed(4);
        bytes
            .expose_mut()
            .copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        let shown = format!("{bytes:?}");
        assert_eq!(shown, "EntropyBytes(4 bytes, redacted)");
    }
}
