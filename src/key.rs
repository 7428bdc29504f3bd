//! Client ids become 64-bit keyed hashes before they reach the store.
//!
//! The store and the wire never hold client ids, only `SipHash-1-3(secret, id)`: 8 bytes
//! per key whatever the id's length, no heap string per key, and a hash that an attacker
//! who does not know the secret cannot steer into collisions. Two ids collide with
//! probability 2⁻⁶⁴; among `n` active keys the chance that any two share a counter is
//! about `n²/2⁶⁵` (2.7·10⁻⁸ at one million keys). A collision merges two clients'
//! counts, so it can only make the limiter stricter for them, never looser.

use std::hash::{BuildHasher, Hasher};

use siphasher::sip::SipHasher13;

/// Hashes client ids with a 128-bit secret. All members of a cluster must share it.
#[derive(Clone, Copy)]
pub(crate) struct KeyHasher {
    k0: u64,
    k1: u64,
}

impl KeyHasher {
    pub(crate) fn new(secret: [u8; 16]) -> Self {
        let (a, b) = secret.split_at(8);
        let word = |s: &[u8]| u64::from_le_bytes(s.try_into().unwrap_or([0; 8]));
        Self { k0: word(a), k1: word(b) }
    }

    /// A secret drawn from the process's random hash seed (for a limiter on its own).
    pub(crate) fn random_secret() -> [u8; 16] {
        let state = std::collections::hash_map::RandomState::new();
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&state.hash_one(0x5eed_u64).to_le_bytes());
        out[8..].copy_from_slice(&state.hash_one(0xfeed_u64).to_le_bytes());
        out
    }

    /// The key of `id`: never 0, which the store's table reserves for empty slots (so
    /// hash 0 and hash 1 share a counter, one more 2⁻⁶⁴ collision).
    #[inline]
    pub(crate) fn hash(&self, id: &[u8]) -> u64 {
        let mut h = SipHasher13::new_with_keys(self.k0, self.k1);
        h.write(id);
        h.finish().max(1)
    }
}

impl std::fmt::Debug for KeyHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyHasher { .. }")
    }
}

/// SplitMix64: a well-mixed 64-bit function of its input.
pub(crate) fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
