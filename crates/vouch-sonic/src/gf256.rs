//! Arithmetic in GF(2^8) over the primitive polynomial x^8 + x^4 + x^3 + x^2 + 1
//! (0x11d), the field the Reed-Solomon code in [`crate::fec`] works in.
//!
//! Log/antilog tables are built at compile time; every lookup is indexed by a
//! `u8` or a sum of two logs, so no input can index out of range.

const PRIMITIVE_POLY: u16 = 0x11d;

/// `EXP[i] = alpha^i`, doubled so `EXP[log a + log b]` needs no reduction.
const EXP: [u8; 512] = build_exp();
/// `LOG[alpha^i] = i`; `LOG[0]` is unused.
const LOG: [u8; 256] = build_log();

const fn build_exp() -> [u8; 512] {
    let mut table = [0u8; 512];
    let mut value: u16 = 1;
    let mut i = 0;
    while i < 255 {
        table[i] = value as u8;
        table[i + 255] = value as u8;
        value <<= 1;
        if value & 0x100 != 0 {
            value ^= PRIMITIVE_POLY;
        }
        i += 1;
    }
    table[510] = table[0];
    table[511] = table[1];
    table
}

const fn build_log() -> [u8; 256] {
    let exp = build_exp();
    let mut table = [0u8; 256];
    let mut i = 0;
    while i < 255 {
        table[exp[i] as usize] = i as u8;
        i += 1;
    }
    table
}

pub(crate) fn mul(a: u8, b: u8) -> u8 {
    if a == 0 || b == 0 {
        return 0;
    }
    EXP[LOG[a as usize] as usize + LOG[b as usize] as usize]
}

/// Multiplicative inverse; `inv(0)` is defined as 0 so callers never panic,
/// and the decoder checks its result by recomputing syndromes.
pub(crate) fn inv(a: u8) -> u8 {
    if a == 0 {
        return 0;
    }
    EXP[255 - LOG[a as usize] as usize]
}

pub(crate) fn div(a: u8, b: u8) -> u8 {
    mul(a, inv(b))
}

/// `alpha^exponent` for any exponent (reduced modulo the group order 255).
pub(crate) fn alpha_pow(exponent: usize) -> u8 {
    EXP[exponent % 255]
}

/// `alpha^-exponent`.
pub(crate) fn alpha_pow_neg(exponent: usize) -> u8 {
    EXP[(255 - exponent % 255) % 255]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_a_permutation_of_the_nonzero_elements() {
        let mut seen = [false; 256];
        for value in EXP.iter().take(255) {
            assert!(!seen[*value as usize]);
            seen[*value as usize] = true;
        }
        assert!(!seen[0]);
    }

    #[test]
    fn inverse_and_division_agree_with_multiplication() {
        for a in 1..=255u8 {
            assert_eq!(mul(a, inv(a)), 1);
            for b in [1u8, 2, 29, 200, 255] {
                assert_eq!(mul(div(a, b), b), a);
            }
        }
        assert_eq!(mul(0, 7), 0);
        assert_eq!(alpha_pow(255), 1);
        assert_eq!(mul(alpha_pow(3), alpha_pow_neg(3)), 1);
    }
}
