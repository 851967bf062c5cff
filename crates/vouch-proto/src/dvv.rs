//! Temporary device verification values (DVVs): short numeric values that a validated
//! phone hands to a point-of-sale terminal and that the terminal's authorization request
//! carries back to the server.
//!
//! A DVV is `digits` decimal digits long (6 by default, so it fits the legacy fields of
//! an authorization message). Its first digit is the [`Assurance`] level the server
//! found when it validated the phone; the others are an HMAC-SHA256 of a random issue
//! nonce, the account and that level, under a server key. Changing the assurance digit
//! therefore yields a value that matches nothing. The server stores only
//! [`DvvKeys::stored_hash`] of a value and of an account reference, never either one.

use std::fmt;

use aws_lc_rs::hmac;
use zeroize::Zeroizing;

use crate::ProtoError;

pub const ACCOUNT_REF_DIGITS: usize = 16;
pub const DIGITS_MIN: u8 = 4;
pub const DIGITS_MAX: u8 = 12;
pub const DIGITS_DEFAULT: u8 = 6;
pub const ISSUE_NONCE_BYTES: usize = 16;

const DERIVE_LABEL: &[u8] = b"vouch dvv value v1";
const VALUE_HASH_LABEL: &[u8] = b"vouch dvv stored value v1";
const ACCOUNT_HASH_LABEL: &[u8] = b"vouch dvv account ref v1";
const REQUEST_HASH_LABEL: &[u8] = b"vouch dvv authorization request v1";

/// A payment account as a 16-digit, Luhn-valid payment token (EMV tokenisation style).
/// Its `Debug` and `Display` show only the last four digits, so it cannot leak into a
/// log by accident; [`AccountRef::expose`] is the one way to the digits.
#[derive(Clone, PartialEq, Eq)]
pub struct AccountRef(String);

impl AccountRef {
    pub fn parse(text: &str) -> Result<Self, ProtoError> {
        if text.len() != ACCOUNT_REF_DIGITS || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ProtoError::malformed("account_ref", format!("expected {ACCOUNT_REF_DIGITS} digits")));
        }
        if !luhn_valid(text) {
            return Err(ProtoError::malformed("account_ref", "the Luhn check digit does not match"));
        }
        Ok(AccountRef(text.to_owned()))
    }

    /// Completes 15 digits with their Luhn check digit.
    pub fn with_check_digit(first_fifteen: &str) -> Result<Self, ProtoError> {
        if first_fifteen.len() != ACCOUNT_REF_DIGITS - 1 || !first_fifteen.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ProtoError::malformed("account_ref", format!("expected {} digits", ACCOUNT_REF_DIGITS - 1)));
        }
        let check = luhn_check_digit(first_fifteen);
        AccountRef::parse(&format!("{first_fifteen}{check}"))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn last4(&self) -> &str {
        &self.0[ACCOUNT_REF_DIGITS - 4..]
    }
}

impl fmt::Debug for AccountRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AccountRef(…{})", self.last4())
    }
}

impl fmt::Display for AccountRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "…{}", self.last4())
    }
}

/// Whether a string of ASCII digits passes the Luhn (mod 10) check.
pub fn luhn_valid(digits: &str) -> bool {
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) && luhn_sum(digits, false).is_multiple_of(10)
}

/// The digit that makes `payload` followed by it Luhn-valid.
fn luhn_check_digit(payload: &str) -> u8 {
    ((10 - luhn_sum(payload, true) % 10) % 10) as u8
}

/// Luhn sum, doubling every second digit from the right; `payload_only` means the
/// check digit is not yet appended, so doubling starts at the rightmost digit.
fn luhn_sum(digits: &str, payload_only: bool) -> u32 {
    digits
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            if (i % 2 == 1) != payload_only {
                let doubled = d * 2;
                if doubled > 9 { doubled - 9 } else { doubled }
            } else {
                d
            }
        })
        .sum()
}

/// How much the server trusted the phone when it issued a value: 1 (lowest) to 9.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Assurance(u8);

impl Assurance {
    pub const MIN: Assurance = Assurance(1);
    pub const MAX: Assurance = Assurance(9);

    pub fn new(level: u8) -> Result<Self, ProtoError> {
        if (1..=9).contains(&level) {
            Ok(Assurance(level))
        } else {
            Err(ProtoError::malformed("assurance level", format!("{level} is not between 1 and 9")))
        }
    }

    pub fn level(self) -> u8 {
        self.0
    }
}

/// How many digits a value has; between [`DIGITS_MIN`] and [`DIGITS_MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digits(u8);

impl Digits {
    pub fn new(count: u8) -> Result<Self, ProtoError> {
        if (DIGITS_MIN..=DIGITS_MAX).contains(&count) {
            Ok(Digits(count))
        } else {
            Err(ProtoError::malformed("DVV length", format!("{count} digits; expected {DIGITS_MIN} to {DIGITS_MAX}")))
        }
    }

    pub fn count(self) -> u8 {
        self.0
    }
}

impl Default for Digits {
    fn default() -> Self {
        Digits(DIGITS_DEFAULT)
    }
}

/// A device verification value. Zeroized on drop; `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Dvv(Zeroizing<String>);

impl Dvv {
    /// Parses what a terminal presents: exactly `digits` decimal digits whose first is
    /// an assurance level (1 to 9).
    pub fn parse(text: &str, digits: Digits) -> Result<Self, ProtoError> {
        if text.len() != usize::from(digits.count()) || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ProtoError::malformed("DVV", format!("expected {} digits", digits.count())));
        }
        let dvv = Dvv(Zeroizing::new(text.to_owned()));
        dvv.assurance()?;
        Ok(dvv)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The level encoded in the first digit.
    pub fn assurance(&self) -> Result<Assurance, ProtoError> {
        let first = self.0.bytes().next().ok_or_else(|| ProtoError::malformed("DVV", "empty"))?;
        Assurance::new(first.wrapping_sub(b'0'))
    }
}

impl fmt::Debug for Dvv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Dvv(redacted)")
    }
}

/// The server's DVV keys: one derives values, one hashes what is stored. Both come from
/// one secret shared by every server instance.
pub struct DvvKeys {
    derive: hmac::Key,
    store: hmac::Key,
}

impl fmt::Debug for DvvKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DvvKeys").finish_non_exhaustive()
    }
}

impl DvvKeys {
    /// `secret` must be at least 32 bytes of key material.
    pub fn new(secret: &[u8]) -> Result<Self, ProtoError> {
        if secret.len() < 32 {
            return Err(ProtoError::InvalidKey("a DVV key needs at least 32 bytes of secret".into()));
        }
        let root = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let subkey = |label: &[u8]| {
            let derived = Zeroizing::new(hmac::sign(&root, label).as_ref().to_vec());
            hmac::Key::new(hmac::HMAC_SHA256, &derived)
        };
        Ok(DvvKeys { derive: subkey(DERIVE_LABEL), store: subkey(VALUE_HASH_LABEL) })
    }

    /// The value for one issue. `nonce` is fresh random bytes per issue, so two issues
    /// for the same account never share a value except by chance.
    pub fn derive(
        &self,
        nonce: &[u8; ISSUE_NONCE_BYTES],
        account: &AccountRef,
        assurance: Assurance,
        digits: Digits,
    ) -> Dvv {
        let mut context = hmac::Context::with_key(&self.derive);
        context.update(nonce);
        context.update(account.expose().as_bytes());
        context.update(&[assurance.level()]);
        let mac = context.sign();
        let mut head = [0u8; 8];
        head.copy_from_slice(&mac.as_ref()[..8]);
        // 2^64 against at most 10^11 keeps the modulo bias below 10^-8.
        let modulus = 10u64.pow(u32::from(digits.count()) - 1);
        let tail = u64::from_be_bytes(head) % modulus;
        let width = usize::from(digits.count()) - 1;
        Dvv(Zeroizing::new(format!("{}{tail:0width$}", assurance.level())))
    }

    /// The keyed hash under which a value is stored and looked up.
    pub fn stored_hash(&self, dvv: &Dvv) -> [u8; 32] {
        self.tag(VALUE_HASH_LABEL, dvv.expose().as_bytes())
    }

    /// The keyed hash under which an account reference is stored and looked up.
    pub fn account_hash(&self, account: &AccountRef) -> [u8; 32] {
        self.tag(ACCOUNT_HASH_LABEL, account.expose().as_bytes())
    }

    /// A keyed fingerprint of an authorization request's fields, so a retry can be told
    /// from a different request under the same retry key without storing the fields.
    /// Each part is length-prefixed, so no two lists of parts share a fingerprint.
    pub fn request_fingerprint(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut context = hmac::Context::with_key(&self.store);
        context.update(REQUEST_HASH_LABEL);
        for part in parts {
            context.update(&(part.len() as u64).to_be_bytes());
            context.update(part);
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(context.sign().as_ref());
        out
    }

    fn tag(&self, label: &[u8], data: &[u8]) -> [u8; 32] {
        let mut context = hmac::Context::with_key(&self.store);
        context.update(label);
        context.update(data);
        let mut out = [0u8; 32];
        out.copy_from_slice(context.sign().as_ref());
        out
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn keys() -> DvvKeys {
        DvvKeys::new(&[7u8; 32]).unwrap()
    }

    fn account() -> AccountRef {
        AccountRef::parse("4895370012003478").unwrap()
    }

    #[test]
    fn luhn_accepts_published_examples_and_refuses_changed_digits() {
        // Well-known Luhn-valid test numbers.
        for valid in ["79927398713", "4111111111111111", "5555555555554444", "4895370012003478"] {
            assert!(luhn_valid(valid), "{valid}");
        }
        for invalid in ["79927398710", "4111111111111112", "", "41111111111111a1"] {
            assert!(!luhn_valid(invalid), "{invalid}");
        }
        assert_eq!(luhn_check_digit("7992739871"), 3);
    }

    #[test]
    fn account_refs_are_sixteen_luhn_valid_digits() {
        let cases: &[(&str, &str)] = &[
            ("411111111111111", "expected 16 digits"),
            ("41111111111111111", "expected 16 digits"),
            ("411111111111111x", "expected 16 digits"),
            ("4111111111111112", "Luhn"),
        ];
        for (text, why) in cases {
            let err = AccountRef::parse(text).unwrap_err().to_string();
            assert!(err.contains(why), "{text}: {err}");
        }
        let made = AccountRef::with_check_digit("489537001200347").unwrap();
        assert_eq!(made, account());
    }

    #[test]
    fn account_refs_never_print_their_digits() {
        let shown = format!("{:?} {}", account(), account());
        assert!(!shown.contains("48953700"), "{shown}");
        assert!(shown.contains("3478"));
        assert_eq!(format!("{:?}", Dvv::parse("312345", Digits::default()).unwrap()), "Dvv(redacted)");
    }

    #[test]
    fn values_carry_their_assurance_in_the_first_digit() {
        let dvv = keys().derive(&[1; 16], &account(), Assurance::new(3).unwrap(), Digits::default());
        assert_eq!(dvv.expose().len(), 6);
        assert!(dvv.expose().starts_with('3'));
        assert_eq!(dvv.assurance().unwrap(), Assurance::new(3).unwrap());
    }

    #[test]
    fn derivation_depends_on_every_input() {
        let k = keys();
        let a3 = Assurance::new(3).unwrap();
        let base = k.derive(&[1; 16], &account(), a3, Digits::new(12).unwrap());
        let other_account = AccountRef::parse("4111111111111111").unwrap();
        assert_ne!(base, k.derive(&[2; 16], &account(), a3, Digits::new(12).unwrap()));
        assert_ne!(base, k.derive(&[1; 16], &other_account, a3, Digits::new(12).unwrap()));
        let other_key = DvvKeys::new(&[8u8; 32]).unwrap();
        assert_ne!(base, other_key.derive(&[1; 16], &account(), a3, Digits::new(12).unwrap()));
        let lower = k.derive(&[1; 16], &account(), Assurance::new(2).unwrap(), Digits::new(12).unwrap());
        assert_ne!(base.expose()[1..], lower.expose()[1..], "the level feeds the MAC, not only the first digit");
    }

    #[test]
    fn parse_refuses_what_a_terminal_could_send_wrong() {
        let six = Digits::default();
        for bad in ["", "12345", "1234567", "12345a", "012345", " 12345", "１２３４５６"] {
            assert!(Dvv::parse(bad, six).is_err(), "{bad:?}");
        }
        assert!(Digits::new(3).is_err());
        assert!(Digits::new(13).is_err());
        assert!(Assurance::new(0).is_err());
        assert!(DvvKeys::new(&[0u8; 31]).is_err());
    }

    #[test]
    fn stored_hashes_are_domain_separated() {
        let k = keys();
        let dvv = Dvv::parse("3478", Digits::new(4).unwrap()).unwrap();
        assert_ne!(k.stored_hash(&dvv), k.account_hash(&account()));
        assert_eq!(k.stored_hash(&dvv), k.stored_hash(&Dvv::parse("3478", Digits::new(4).unwrap()).unwrap()));
    }

    #[test]
    fn request_fingerprints_keep_parts_apart() {
        let k = keys();
        assert_ne!(k.request_fingerprint(&[b"ab", b"c"]), k.request_fingerprint(&[b"a", b"bc"]));
        assert_eq!(k.request_fingerprint(&[b"ab", b"c"]), k.request_fingerprint(&[b"ab", b"c"]));
    }

    proptest! {
        #[test]
        fn derived_values_parse_back(nonce in any::<[u8; 16]>(), level in 1u8..=9, count in DIGITS_MIN..=DIGITS_MAX) {
            let digits = Digits::new(count).unwrap();
            let assurance = Assurance::new(level).unwrap();
            let dvv = keys().derive(&nonce, &account(), assurance, digits);
            let parsed = Dvv::parse(dvv.expose(), digits).unwrap();
            prop_assert_eq!(parsed.assurance().unwrap(), assurance);
            prop_assert_eq!(parsed, dvv);
        }

        #[test]
        fn check_digits_make_valid_refs(payload in "[0-9]{15}") {
            let made = AccountRef::with_check_digit(&payload).unwrap();
            prop_assert!(luhn_valid(made.expose()));
        }
    }
}
