//! The table's maps keyed by kernel socket address, with a hasher made for such keys.
//!
//! std's SipHash resists keys chosen to collide, which kernel addresses are not (a sender
//! cannot pick where the kernel allocates its socket), and it cost the agent about a tenth of
//! its time at full churn. One multiply spreads a key over the high bits; the rotation brings
//! them down to the low bits the map indexes by, because socket addresses are slab objects
//! aligned to at least a cache line, so their own low bits are always 0.
use std::{
    collections::HashMap,
    hash::{BuildHasherDefault, Hasher},
};

/// A map keyed by kernel socket address.
pub type SocketMap<V> = HashMap<u64, V, BuildHasherDefault<SocketHasher>>;

/// The multiplier of FxHash (rustc's hasher): odd, with its bits well spread.
const K: u64 = 0xf135_7aea_2e62_a9c5;

#[derive(Clone, Copy, Debug, Default)]
pub struct SocketHasher(u64);

impl Hasher for SocketHasher {
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(K);
    }

    /// Only u64 keys come here; any other key is folded in a byte at a time.
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn finish(&self) -> u64 {
        self.0.rotate_left(26)
    }
}

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher;

    use super::*;

    #[test]
    fn cache_line_aligned_addresses_spread_over_the_low_bits() {
        let build = BuildHasherDefault::<SocketHasher>::default();
        let mut buckets = [0u32; 256];
        let base = 0xffff_8880_1234_0000u64;
        for i in 0..(256 * 16) {
            let hash = build.hash_one(base + i * 2048);
            buckets[(hash & 255) as usize] += 1;
        }
        // 16 per bucket if evenly spread; SipHash-like spreading stays well within 2x.
        assert!(
            buckets.iter().all(|&n| (4..=40).contains(&n)),
            "{buckets:?}"
        );
    }
}
