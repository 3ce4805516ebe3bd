//! Per-segment ack files: after the 16-byte header, 8-byte entries
//! `offset: u32 LE | kind: u8 | check: 3 bytes` (check = low 24 bits of crc32c of the first
//! five bytes, little endian). `kind` 1 = acked, 2 = delivered. Entries are only ever appended;
//! reading stops at the first entry that fails its check (a torn or garbage tail).

/// Size of one entry.
pub const ACK_ENTRY_LEN: usize = 8;

/// What an entry records about the message at its offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AckKind {
    /// The message is gone: never recover it.
    Acked = 1,
    /// The message was handed to a consumer at least once: recover it as redelivered.
    Delivered = 2,
}

fn check(first5: &[u8]) -> [u8; 3] {
    let c = crc32c::crc32c(first5).to_le_bytes();
    [c[0], c[1], c[2]]
}

/// Encodes one entry.
pub fn encode_entry(offset: u32, kind: AckKind) -> [u8; ACK_ENTRY_LEN] {
    let mut e = [0u8; ACK_ENTRY_LEN];
    e[..4].copy_from_slice(&offset.to_le_bytes());
    e[4] = kind as u8;
    let c = check(&e[..5]);
    e[5..8].copy_from_slice(&c);
    e
}

/// Decodes one entry; `None` if it fails its check or has an unknown kind.
pub fn decode_entry(e: &[u8]) -> Option<(u32, AckKind)> {
    if e.len() != ACK_ENTRY_LEN || e[5..8] != check(&e[..5]) {
        return None;
    }
    let offset = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
    let kind = match e[4] {
        1 => AckKind::Acked,
        2 => AckKind::Delivered,
        _ => return None,
    };
    Some((offset, kind))
}

/// The decoded content of an ack file body (everything after the header).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AckEntries {
    /// Acked offsets, sorted, deduplicated.
    pub acked: Vec<u32>,
    /// Delivered offsets, sorted, deduplicated.
    pub delivered: Vec<u32>,
    /// Length of the valid prefix of `body` (a multiple of the entry size).
    pub valid_len: usize,
}

/// Decodes entries up to the first invalid one.
pub fn decode_entries(body: &[u8]) -> AckEntries {
    let mut out = AckEntries::default();
    for e in body.chunks_exact(ACK_ENTRY_LEN) {
        match decode_entry(e) {
            Some((off, AckKind::Acked)) => out.acked.push(off),
            Some((off, AckKind::Delivered)) => out.delivered.push(off),
            None => break,
        }
        out.valid_len += ACK_ENTRY_LEN;
    }
    out.acked.sort_unstable();
    out.acked.dedup();
    out.delivered.sort_unstable();
    out.delivered.dedup();
    out
}

/// One bit per possible record start in a segment, set when the record is acked; exact
/// double-ack detection at about 1 bit per 15 bytes of segment (70 KiB for 8 MiB), grown only
/// as far as the highest acked offset.
#[derive(Debug, Default, Clone)]
pub struct AckBits {
    words: Vec<u64>,
}

impl AckBits {
    fn index(slot: u64) -> (usize, u64) {
        ((slot / 64) as usize, 1u64 << (slot % 64))
    }

    /// Whether `slot` is set.
    pub fn get(&self, slot: u64) -> bool {
        let (w, m) = Self::index(slot);
        self.words.get(w).is_some_and(|x| x & m != 0)
    }

    /// Sets `slot`; returns false if it was already set.
    pub fn set(&mut self, slot: u64) -> bool {
        let (w, m) = Self::index(slot);
        if self.words.len() <= w {
            self.words.resize(w + 1, 0);
        }
        let was = self.words[w] & m != 0;
        self.words[w] |= m;
        !was
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn zeros_are_not_an_entry() {
        assert_eq!(decode_entry(&[0; 8]), None);
    }

    proptest! {
        #[test]
        fn entries_round_trip_and_stop_at_garbage(
            entries in proptest::collection::vec((16u32..u32::MAX, any::<bool>()), 0..50),
            cut in 0usize..8,
        ) {
            let mut body = Vec::new();
            for (off, acked) in &entries {
                let kind = if *acked { AckKind::Acked } else { AckKind::Delivered };
                body.extend_from_slice(&encode_entry(*off, kind));
            }
            // A torn trailing entry is ignored.
            body.extend_from_slice(&encode_entry(7, AckKind::Acked)[..cut]);
            let d = decode_entries(&body);
            prop_assert_eq!(d.valid_len, entries.len() * ACK_ENTRY_LEN);
            let mut acked: Vec<u32> = entries.iter().filter(|e| e.1).map(|e| e.0).collect();
            acked.sort_unstable();
            acked.dedup();
            prop_assert_eq!(d.acked, acked);
        }

        #[test]
        fn any_single_bit_flip_is_detected(off in any::<u32>(), bit in 0usize..64) {
            let mut e = encode_entry(off, AckKind::Acked);
            e[bit / 8] ^= 1 << (bit % 8);
            prop_assert_eq!(decode_entry(&e), None);
        }

        #[test]
        fn ack_bits_behave_like_a_set(slots in proptest::collection::vec(0u64..10_000, 0..200)) {
            let mut bits = AckBits::default();
            let mut model = std::collections::HashSet::new();
            for s in slots {
                prop_assert_eq!(bits.set(s), model.insert(s));
                prop_assert!(bits.get(s));
            }
        }
    }
}
