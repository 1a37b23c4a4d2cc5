//! Assigned Randoms: a per-group permutation of counters keyed by the database's own secret
//! ([`RandomKey`]), so values never repeat within a group and two databases collide no more often
//! than chance.

/// The Random assigned to the `counter`-th message of a group without a caller's value, in a
/// database whose key is `legacy` (one that assigned Randoms before keys existed; see
/// [`RandomKey`]). Every newer database derives its values from its own secret instead.
///
/// A bijection of the counter (offset by a per-group seed, then murmur3's fmix32 finaliser, which
/// is invertible), so two messages of one group never get the same value until 2^32 assignments,
/// whatever their SendTimes and whenever they arrive at the server. The seed spreads different
/// groups over the space so values do not look alike across groups.
///
/// ```
/// use timport::store::{RandomKey, assigned_random};
/// let a: Vec<u32> = (0..1000).map(|c| assigned_random("team-general", c)).collect();
/// let distinct: std::collections::HashSet<_> = a.iter().collect();
/// assert_eq!(distinct.len(), 1000);
/// assert_eq!(assigned_random("team-general", 7), a[7], "the same counter gives the same value");
/// assert_eq!(RandomKey::Legacy.sequence("team-general").at(7), a[7]);
/// ```
pub fn assigned_random(group_id: &str, counter: u64) -> u32 {
    // Truncation is the point: the counter wraps modulo 2^32.
    RandomKey::Legacy
        .sequence(group_id)
        .at((counter & 0xffff_ffff) as u32)
}

/// murmur3's 32-bit finaliser: a bijection of u32.
const fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(FMIX_M1);
    h ^= h >> 13;
    h = h.wrapping_mul(FMIX_M2);
    h ^= h >> 16;
    h
}

/// The inverse of [`fmix32`].
const fn unfmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(inverse_mod_2_32(FMIX_M2));
    h ^= (h >> 13) ^ (h >> 26);
    h = h.wrapping_mul(inverse_mod_2_32(FMIX_M1));
    h ^= h >> 16;
    h
}

const FMIX_M1: u32 = 0x85eb_ca6b;

const FMIX_M2: u32 = 0xc2b2_ae35;

/// The multiplicative inverse of an odd number modulo 2^32 (Newton's iteration: each step doubles
/// the correct low bits, from the 3 that `a` itself gets right).
const fn inverse_mod_2_32(a: u32) -> u32 {
    let mut x = a;
    let mut i = 0;
    while i < 5 {
        x = x.wrapping_mul(2u32.wrapping_sub(a.wrapping_mul(x)));
        i += 1;
    }
    x
}

/// The secret behind a database's assigned Randoms, stored in `meta` as `random_key`.
///
/// Migration 0004 draws 128 random bits when a database is created, so two databases (a fresh one
/// after a lost disk, a second team's) importing into the same group assign unrelated sequences
/// and collide no more often than chance. A database that had assigned Randoms before keys existed
/// keeps `legacy`, the sequence it started ([`assigned_random`]), so that no value repeats within
/// a group across the upgrade. The key is never printed: its `Debug` says only which kind it is.
#[derive(Clone, PartialEq, Eq)]
pub enum RandomKey {
    Legacy,
    Keyed([u8; 16]),
}

impl std::fmt::Debug for RandomKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RandomKey::Legacy => f.write_str("RandomKey::Legacy"),
            RandomKey::Keyed(_) => f.write_str("RandomKey::Keyed(<redacted>)"),
        }
    }
}

impl RandomKey {
    /// Parses the `meta` value: `legacy`, or 32 hex digits.
    pub fn parse(value: &str) -> Option<RandomKey> {
        if value == "legacy" {
            return Some(RandomKey::Legacy);
        }
        let mut key = [0u8; 16];
        hex::decode_to_slice(value, &mut key).ok()?;
        Some(RandomKey::Keyed(key))
    }

    /// The group's sequence of assigned values under this key.
    ///
    /// Keyed: three rounds of (add a round key, fmix32, xor a round key), the six round keys taken
    /// from HMAC-SHA256(key, group). Each round is invertible, so the sequence is a permutation of
    /// u32 (no repeat within 2^32 assignments) with an inverse ([`RandomSequence::counter_of`]),
    /// and without the key two groups' or two databases' sequences look unrelated.
    ///
    /// ```
    /// use timport::store::RandomKey;
    /// let a = RandomKey::parse("000102030405060708090a0b0c0d0e0f").unwrap().sequence("g");
    /// let b = RandomKey::parse("ff0102030405060708090a0b0c0d0e0f").unwrap().sequence("g");
    /// let va: Vec<u32> = (0..1000).map(|c| a.at(c)).collect();
    /// let vb: std::collections::HashSet<u32> = (0..1000).map(|c| b.at(c)).collect();
    /// assert_eq!(va.iter().collect::<std::collections::HashSet<_>>().len(), 1000);
    /// assert!(va.iter().filter(|v| vb.contains(v)).count() < 3, "two keys, unrelated values");
    /// assert_eq!(a.counter_of(va[123]), 123);
    /// ```
    pub fn sequence(&self, group_id: &str) -> RandomSequence {
        match self {
            RandomKey::Legacy => {
                // FNV-1a of the group id as the seed.
                let mut seed: u32 = 0x811c_9dc5;
                for b in group_id.as_bytes() {
                    seed ^= u32::from(*b);
                    seed = seed.wrapping_mul(0x0100_0193);
                }
                RandomSequence {
                    rounds: [(seed, 0), (0, 0), (0, 0)],
                    count: 1,
                }
            }
            RandomKey::Keyed(key) => {
                use hmac::{KeyInit, Mac};
                let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key)
                    .expect("HMAC takes a key of any length");
                mac.update(b"timport assigned Random v1\0");
                mac.update(group_id.as_bytes());
                let out = mac.finalize().into_bytes();
                let word = |i: usize| {
                    u32::from_le_bytes([out[4 * i], out[4 * i + 1], out[4 * i + 2], out[4 * i + 3]])
                };
                RandomSequence {
                    rounds: [(word(0), word(1)), (word(2), word(3)), (word(4), word(5))],
                    count: 3,
                }
            }
        }
    }
}

/// One group's assigned Randoms: a permutation of the u32 counter, and its inverse.
#[derive(Clone, Copy)]
pub struct RandomSequence {
    /// (added before, xored after) fmix32, per round.
    rounds: [(u32, u32); 3],
    count: usize,
}

impl std::fmt::Debug for RandomSequence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RandomSequence(<redacted>)")
    }
}

impl RandomSequence {
    /// The value assigned at `counter`.
    pub fn at(&self, counter: u32) -> u32 {
        let mut x = counter;
        for (add, xor) in &self.rounds[..self.count] {
            x = fmix32(x.wrapping_add(*add)) ^ xor;
        }
        x
    }

    /// The counter at which `value` is (or would be) assigned: a caller's value X repeats an
    /// assigned one exactly when `counter_of(X)` is below the group's counter.
    pub fn counter_of(&self, value: u32) -> u32 {
        let mut x = value;
        for (add, xor) in self.rounds[..self.count].iter().rev() {
            x = unfmix32(x ^ xor).wrapping_sub(*add);
        }
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverses_modulo_2_32() {
        for a in [FMIX_M1, FMIX_M2, 1, 3, u32::MAX] {
            assert_eq!(a.wrapping_mul(inverse_mod_2_32(a)), 1, "{a:#x}");
        }
        for h in (0..u32::MAX).step_by(4_099) {
            assert_eq!(unfmix32(fmix32(h)), h);
        }
    }
}
