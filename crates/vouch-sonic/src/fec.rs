//! Forward error correction: a systematic Reed-Solomon code over GF(256)
//! (errors and erasures), the byte interleaver that spreads a frame over
//! several codewords, and the scrambler that whitens bytes before they become
//! tones.
//!
//! Codewords are shortened RS(n, n - parity) codes with generator roots
//! `alpha^0 .. alpha^(parity-1)`; byte `j` of an `n`-byte codeword is the
//! coefficient of `x^(n-1-j)`.

use crate::gf256;

/// Longest codeword the field allows.
pub(crate) const CODEWORD_BYTES_MAX: usize = 255;

/// Reed-Solomon encoder/decoder for one parity length.
#[derive(Debug, Clone)]
pub(crate) struct ReedSolomon {
    parity_bytes: usize,
    /// Generator polynomial, highest degree first, monic (`generator[0] == 1`).
    generator: Vec<u8>,
}

impl ReedSolomon {
    pub(crate) fn new(parity_bytes: usize) -> Self {
        let mut generator = vec![1u8];
        for root in 0..parity_bytes {
            // Multiply by (x - alpha^root); subtraction is addition in GF(2^8).
            let alpha = gf256::alpha_pow(root);
            let mut next = vec![0u8; generator.len() + 1];
            for (i, &coef) in generator.iter().enumerate() {
                next[i] ^= coef;
                next[i + 1] ^= gf256::mul(coef, alpha);
            }
            generator = next;
        }
        Self { parity_bytes, generator }
    }

    /// Returns `data` followed by its parity bytes.
    pub(crate) fn encode(&self, data: &[u8]) -> Vec<u8> {
        let mut remainder = vec![0u8; self.parity_bytes];
        for &byte in data {
            let feedback = byte ^ remainder.first().copied().unwrap_or(0);
            remainder.rotate_left(1);
            if let Some(last) = remainder.last_mut() {
                *last = 0;
            }
            if feedback != 0 {
                for (slot, &coef) in remainder.iter_mut().zip(self.generator.iter().skip(1)) {
                    *slot ^= gf256::mul(coef, feedback);
                }
            }
        }
        let mut codeword = Vec::with_capacity(data.len() + self.parity_bytes);
        codeword.extend_from_slice(data);
        codeword.extend_from_slice(&remainder);
        codeword
    }

    fn syndromes(&self, codeword: &[u8]) -> Vec<u8> {
        (0..self.parity_bytes)
            .map(|root| {
                let alpha = gf256::alpha_pow(root);
                codeword.iter().fold(0u8, |acc, &byte| gf256::mul(acc, alpha) ^ byte)
            })
            .collect()
    }

    /// Corrects `codeword` in place given the indices of bytes known to be
    /// unreliable (`erasures`). Succeeds when `2 * errors + erasures <= parity`
    /// and returns how many bytes changed; otherwise leaves `codeword`
    /// untouched and returns `None`.
    pub(crate) fn decode(&self, codeword: &mut [u8], erasures: &[usize]) -> Option<usize> {
        let n = codeword.len();
        if n <= self.parity_bytes || n > CODEWORD_BYTES_MAX {
            return None;
        }
        let syndromes = self.syndromes(codeword);
        if syndromes.iter().all(|&s| s == 0) {
            return Some(0);
        }
        let mut erasures: Vec<usize> = erasures.iter().copied().filter(|&e| e < n).collect();
        erasures.sort_unstable();
        erasures.dedup();
        let erasure_count = erasures.len();
        if erasure_count > self.parity_bytes {
            return None;
        }

        // Erasure locator Gamma(x) = prod (1 + X_e x), lowest degree first.
        let mut locator = vec![1u8];
        for &position in &erasures {
            let x = gf256::alpha_pow(n - 1 - position);
            locator = poly_mul_ascending(&locator, &[1, x]);
        }

        // Berlekamp-Massey, started from the erasure locator.
        let mut previous = locator.clone();
        let mut degree = erasure_count;
        for r in erasure_count..self.parity_bytes {
            let discrepancy = locator
                .iter()
                .enumerate()
                .filter(|(i, _)| *i <= r)
                .fold(0u8, |acc, (i, &coef)| acc ^ gf256::mul(coef, syndromes.get(r - i).copied().unwrap_or(0)));
            // previous <- x * previous
            previous.insert(0, 0);
            if discrepancy == 0 {
                continue;
            }
            let mut next = locator.clone();
            if next.len() < previous.len() {
                next.resize(previous.len(), 0);
            }
            for (slot, &coef) in next.iter_mut().zip(previous.iter()) {
                *slot ^= gf256::mul(discrepancy, coef);
            }
            if 2 * degree <= r + erasure_count {
                let scale = gf256::inv(discrepancy);
                previous = locator.iter().map(|&c| gf256::mul(c, scale)).collect();
                degree = r + 1 + erasure_count - degree;
            }
            locator = next;
        }
        while locator.len() > 1 && locator.last() == Some(&0) {
            locator.pop();
        }
        let locator_degree = locator.len() - 1;
        if locator_degree != degree || 2 * (degree - erasure_count) + erasure_count > self.parity_bytes {
            return None;
        }

        // Chien search over the (shortened) codeword positions.
        let positions: Vec<usize> =
            (0..n).filter(|&j| poly_eval_ascending(&locator, gf256::alpha_pow_neg(n - 1 - j)) == 0).collect();
        if positions.len() != locator_degree {
            return None;
        }

        // Error evaluator Omega(x) = S(x) * Lambda(x) mod x^parity.
        let mut evaluator = poly_mul_ascending(&syndromes, &locator);
        evaluator.truncate(self.parity_bytes);
        let derivative: Vec<u8> =
            locator.iter().enumerate().skip(1).map(|(i, &c)| if i % 2 == 1 { c } else { 0 }).collect();

        let mut corrected = codeword.to_vec();
        for &j in &positions {
            let x = gf256::alpha_pow(n - 1 - j);
            let x_inv = gf256::inv(x);
            let denominator = poly_eval_ascending(&derivative, x_inv);
            if denominator == 0 {
                return None;
            }
            // Forney with first consecutive root alpha^0: e = X * Omega(X^-1) / Lambda'(X^-1).
            let magnitude = gf256::div(gf256::mul(x, poly_eval_ascending(&evaluator, x_inv)), denominator);
            if let Some(byte) = corrected.get_mut(j) {
                *byte ^= magnitude;
            }
        }
        if self.syndromes(&corrected).iter().any(|&s| s != 0) {
            return None;
        }
        let changed = corrected.iter().zip(codeword.iter()).filter(|(a, b)| a != b).count();
        codeword.copy_from_slice(&corrected);
        Some(changed)
    }

    /// Decodes using per-byte reliabilities (higher is more trustworthy):
    /// first errors only, then erasing growing sets of the least reliable
    /// bytes. Erasures stop short of the full parity so every accepted
    /// codeword still had redundancy left to check it.
    pub(crate) fn decode_soft(&self, codeword: &mut [u8], reliability: &[f32]) -> Option<usize> {
        let mut order: Vec<usize> = (0..codeword.len()).collect();
        order.sort_by(|&a, &b| {
            let ra = reliability.get(a).copied().unwrap_or(0.0);
            let rb = reliability.get(b).copied().unwrap_or(0.0);
            ra.total_cmp(&rb)
        });
        let max_erasures = self.parity_bytes.saturating_sub(2) * 3 / 4;
        let mut tried: Vec<usize> = Vec::new();
        for step in 0..=4 {
            let erasure_count = max_erasures * step / 4;
            if tried.contains(&erasure_count) {
                continue;
            }
            tried.push(erasure_count);
            let erasures = order.get(..erasure_count).unwrap_or(&[]);
            if let Some(changed) = self.decode(codeword, erasures) {
                return Some(changed);
            }
        }
        None
    }
}

fn poly_mul_ascending(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; a.len() + b.len() - 1];
    for (i, &x) in a.iter().enumerate() {
        for (j, &y) in b.iter().enumerate() {
            if let Some(slot) = out.get_mut(i + j) {
                *slot ^= gf256::mul(x, y);
            }
        }
    }
    out
}

fn poly_eval_ascending(poly: &[u8], x: u8) -> u8 {
    poly.iter().rev().fold(0u8, |acc, &c| gf256::mul(acc, x) ^ c)
}

/// XORs `bytes` with a fixed pseudo-random sequence so that runs of equal
/// bytes (zeros, padding) do not become runs of one tone, which room echoes
/// and steady interferers would then blur. Applying it twice restores the
/// input.
pub(crate) fn scramble(bytes: &mut [u8], seed: u16) {
    let mut state = seed | 1;
    for byte in bytes {
        state ^= state << 7;
        state ^= state >> 9;
        state ^= state << 8;
        *byte ^= (state >> 8) as u8;
    }
}

/// Interleaves several codewords byte by byte (`cw0[0], cw1[0], cw0[1], ...`)
/// so a burst of bad symbols is shared among them instead of sinking one.
pub(crate) fn interleave(codewords: &[Vec<u8>]) -> Vec<u8> {
    let longest = codewords.iter().map(Vec::len).max().unwrap_or(0);
    let mut out = Vec::with_capacity(codewords.iter().map(Vec::len).sum());
    for index in 0..longest {
        for codeword in codewords {
            if let Some(&byte) = codeword.get(index) {
                out.push(byte);
            }
        }
    }
    out
}

/// Inverse of [`interleave`] for codewords of the given lengths; carries a
/// per-byte value (reliability) along. Returns `None` if `stream` is shorter
/// than the lengths require.
pub(crate) fn deinterleave<T: Copy>(stream: &[T], lengths: &[usize]) -> Option<Vec<Vec<T>>> {
    let longest = lengths.iter().copied().max().unwrap_or(0);
    let mut out: Vec<Vec<T>> = lengths.iter().map(|&len| Vec::with_capacity(len)).collect();
    let mut source = stream.iter();
    for index in 0..longest {
        for (codeword, &len) in out.iter_mut().zip(lengths) {
            if index < len {
                codeword.push(*source.next()?);
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small deterministic generator so the tests need no RNG crate.
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    fn distinct_positions(rng: &mut XorShift, n: usize, count: usize) -> Vec<usize> {
        let mut positions = Vec::new();
        while positions.len() < count {
            let p = rng.below(n);
            if !positions.contains(&p) {
                positions.push(p);
            }
        }
        positions
    }

    #[test]
    fn clean_codeword_has_zero_syndromes_and_decodes_unchanged() {
        let rs = ReedSolomon::new(8);
        let mut codeword = rs.encode(b"vouch sonic");
        assert_eq!(rs.syndromes(&codeword), vec![0; 8]);
        assert_eq!(rs.decode(&mut codeword, &[]), Some(0));
        assert_eq!(&codeword[..11], b"vouch sonic");
    }

    #[test]
    fn corrects_any_mix_within_the_bound() {
        let mut rng = XorShift(0x5eed);
        for trial in 0..300 {
            let parity = 2 + rng.below(40);
            let n = parity + 1 + rng.below(CODEWORD_BYTES_MAX - parity);
            let data: Vec<u8> = (0..n - parity).map(|_| rng.next() as u8).collect();
            let rs = ReedSolomon::new(parity);
            let clean = rs.encode(&data);
            let erasure_count = rng.below(parity + 1);
            let error_count = (parity - erasure_count) / 2;
            let positions = distinct_positions(&mut rng, n, erasure_count + error_count);
            let mut received = clean.clone();
            for &p in &positions {
                // Erased bytes may or may not actually be wrong.
                received[p] ^= (rng.next() as u8) | u8::from(p % 3 != 0);
            }
            let erasures = &positions[..erasure_count];
            let result = rs.decode(&mut received, erasures);
            assert!(result.is_some(), "trial {trial}: n={n} parity={parity}");
            assert_eq!(received, clean, "trial {trial}");
        }
    }

    #[test]
    fn refuses_or_flags_too_many_errors() {
        let mut rng = XorShift(77);
        let rs = ReedSolomon::new(16);
        let data: Vec<u8> = (0..100).map(|_| rng.next() as u8).collect();
        let clean = rs.encode(&data);
        let mut refused = 0;
        for _ in 0..50 {
            let mut received = clean.clone();
            for p in distinct_positions(&mut rng, clean.len(), 20) {
                received[p] ^= (rng.next() as u8) | 1;
            }
            let before = received.clone();
            match rs.decode(&mut received, &[]) {
                None => {
                    refused += 1;
                    assert_eq!(received, before, "a refused decode leaves bytes untouched");
                }
                Some(_) => assert_ne!(received, clean),
            }
        }
        assert!(refused >= 45, "refused {refused}/50");
    }

    #[test]
    fn soft_decoding_uses_reliability_to_go_past_half_the_parity() {
        let rs = ReedSolomon::new(16);
        let data: Vec<u8> = (0..60u8).collect();
        let clean = rs.encode(&data);
        let mut received = clean.clone();
        let mut reliability = vec![10.0f32; clean.len()];
        // 10 errors: more than the 8 an errors-only decoder fixes.
        for p in [0usize, 5, 9, 14, 22, 31, 40, 51, 60, 70] {
            received[p] ^= 0x5a;
            reliability[p] = 1.1;
        }
        assert!(rs.clone().decode(&mut received.clone(), &[]).is_none());
        assert!(rs.decode_soft(&mut received, &reliability).is_some());
        assert_eq!(received, clean);
    }

    #[test]
    fn malformed_lengths_are_refused_not_panicking() {
        let rs = ReedSolomon::new(8);
        assert_eq!(rs.decode(&mut [0u8; 8], &[]), None);
        assert_eq!(rs.decode(&mut [1u8; 300], &[]), None);
        let mut cw = rs.encode(&[1, 2, 3]);
        assert!(rs.decode(&mut cw, &[0, 0, 99, 1]).is_some());
    }

    #[test]
    fn interleave_round_trips_uneven_codewords() {
        let codewords = vec![vec![1u8, 2, 3], vec![4, 5], vec![6, 7, 8]];
        let stream = interleave(&codewords);
        assert_eq!(stream, vec![1, 4, 6, 2, 5, 7, 3, 8]);
        assert_eq!(deinterleave(&stream, &[3, 2, 3]), Some(codewords));
        assert_eq!(deinterleave(&stream[..5], &[3, 2, 3]), None);
    }

    #[test]
    fn scramble_is_an_involution_and_breaks_runs() {
        let mut bytes = vec![0u8; 64];
        scramble(&mut bytes, 0xace1);
        let distinct = bytes.iter().collect::<std::collections::BTreeSet<_>>().len();
        assert!(distinct > 32);
        scramble(&mut bytes, 0xace1);
        assert_eq!(bytes, vec![0u8; 64]);
    }
}
