//! A simulated contactless card and the EMV-like card read a reader sends the POS app
//! over the channel: BER-TLV with the application PAN (`5A`), expiry date (`5F24`),
//! amount authorised (`9F02`), transaction currency (`5F2A`), application cryptogram
//! (`9F26`) and application transaction counter (`9F36`), each encoded as EMV Book 3
//! says (compressed numeric, numeric BCD, binary).
//!
//! The cryptogram is simulated: a real card computes a MAC under a key its issuer
//! holds; this one hashes the transaction data with a fixed card secret, so it changes
//! with every tap as a real one does, and only an issuer could check it.

use vouch_proto::crypto::sha256;

use vouch_proto::tlv::{self, Tag, Tlv, TlvError};

pub const TAG_PAN: Tag = Tag::new(0x5A);
pub const TAG_EXPIRY: Tag = Tag::new(0x5F24);
pub const TAG_CURRENCY: Tag = Tag::new(0x5F2A);
pub const TAG_AMOUNT: Tag = Tag::new(0x9F02);
pub const TAG_CRYPTOGRAM: Tag = Tag::new(0x9F26);
pub const TAG_ATC: Tag = Tag::new(0x9F36);

/// A test PAN from the card brands' published test ranges: never a real account.
pub const TEST_PAN: &str = "4761739001010010";
/// ISO 4217 numeric code of the euro.
pub const CURRENCY_EUR: u16 = 978;
const TEST_EXPIRY: &str = "311231";
const PAN_DIGITS_MIN: usize = 12;
const PAN_DIGITS_MAX: usize = 19;
/// `9F02` is n12: twelve digits.
pub const AMOUNT_MINOR_MAX: u64 = 999_999_999_999;
const AMOUNT_BYTES: usize = 6;
const EXPIRY_BYTES: usize = 3;
const CURRENCY_BYTES: usize = 2;
const CRYPTOGRAM_BYTES: usize = 8;
const SIMULATED_CARD_SECRET: &[u8] = b"vouch simulated card: not a key";

/// A contactless card as the simulator taps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimulatedCard {
    pan: String,
    /// YYMMDD.
    expiry: String,
    /// Taps so far; the next read carries one more.
    atc: u16,
}

impl SimulatedCard {
    /// A card with [`TEST_PAN`] that has never been tapped.
    pub fn test_card() -> Self {
        SimulatedCard { pan: TEST_PAN.into(), expiry: TEST_EXPIRY.into(), atc: 0 }
    }

    /// One tap: the card counts it and computes its cryptogram over the transaction.
    pub fn tap(&mut self, amount_minor: u64, currency: u16) -> Result<CardRead, TlvError> {
        if amount_minor > AMOUNT_MINOR_MAX {
            return Err(TlvError::BadValue { tag: TAG_AMOUNT, detail: format!("{amount_minor} is over 12 digits") });
        }
        // A card whose counter is spent refuses to transact, as EMV cards do.
        self.atc = self.atc.checked_add(1).ok_or_else(|| TlvError::BadValue {
            tag: TAG_ATC,
            detail: "the card's transaction counter is exhausted".into(),
        })?;
        let mut input = SIMULATED_CARD_SECRET.to_vec();
        input.extend_from_slice(self.pan.as_bytes());
        input.extend_from_slice(&amount_minor.to_be_bytes());
        input.extend_from_slice(&currency.to_be_bytes());
        input.extend_from_slice(&self.atc.to_be_bytes());
        let mut cryptogram = [0u8; CRYPTOGRAM_BYTES];
        cryptogram.copy_from_slice(&sha256(&input)[..CRYPTOGRAM_BYTES]);
        Ok(CardRead {
            pan: self.pan.clone(),
            expiry: self.expiry.clone(),
            amount_minor,
            currency,
            cryptogram,
            atc: self.atc,
        })
    }
}

/// What a reader read from a card for one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardRead {
    /// Digits only.
    pub pan: String,
    /// YYMMDD.
    pub expiry: String,
    pub amount_minor: u64,
    /// ISO 4217 numeric.
    pub currency: u16,
    pub cryptogram: [u8; CRYPTOGRAM_BYTES],
    pub atc: u16,
}

impl CardRead {
    pub fn to_tlv(&self) -> Result<Vec<u8>, TlvError> {
        tlv::encode(&[
            Tlv::new(TAG_PAN, compressed_numeric(TAG_PAN, &self.pan)?),
            Tlv::new(TAG_EXPIRY, numeric(TAG_EXPIRY, &self.expiry, EXPIRY_BYTES)?),
            Tlv::new(TAG_AMOUNT, numeric(TAG_AMOUNT, &format!("{:012}", self.amount_minor), AMOUNT_BYTES)?),
            Tlv::new(TAG_CURRENCY, numeric(TAG_CURRENCY, &format!("{:04}", self.currency), CURRENCY_BYTES)?),
            Tlv::new(TAG_CRYPTOGRAM, self.cryptogram),
            Tlv::new(TAG_ATC, self.atc.to_be_bytes()),
        ])
    }

    /// Parses a card read; tags it does not know are skipped, as EMV readers do.
    pub fn from_tlv(bytes: &[u8]) -> Result<Self, TlvError> {
        let items = tlv::decode(bytes)?;
        let pan = digits_of_compressed(TAG_PAN, tlv::find(&items, TAG_PAN)?)?;
        if !(PAN_DIGITS_MIN..=PAN_DIGITS_MAX).contains(&pan.len()) {
            return Err(TlvError::BadValue { tag: TAG_PAN, detail: format!("{} digits", pan.len()) });
        }
        let expiry = digits_of_numeric(TAG_EXPIRY, tlv::find(&items, TAG_EXPIRY)?, EXPIRY_BYTES)?;
        let amount = digits_of_numeric(TAG_AMOUNT, tlv::find(&items, TAG_AMOUNT)?, AMOUNT_BYTES)?;
        let currency = digits_of_numeric(TAG_CURRENCY, tlv::find(&items, TAG_CURRENCY)?, CURRENCY_BYTES)?;
        Ok(CardRead {
            pan,
            expiry,
            amount_minor: parse_digits(TAG_AMOUNT, &amount)?,
            currency: u16::try_from(parse_digits(TAG_CURRENCY, &currency)?)
                .map_err(|_| TlvError::BadValue { tag: TAG_CURRENCY, detail: "over four digits".into() })?,
            cryptogram: fixed(TAG_CRYPTOGRAM, tlv::find(&items, TAG_CRYPTOGRAM)?)?,
            atc: u16::from_be_bytes(fixed(TAG_ATC, tlv::find(&items, TAG_ATC)?)?),
        })
    }

    /// The PAN as receipts show it: the first six and last four digits.
    pub fn masked_pan(&self) -> String {
        let digits = self.pan.len();
        self.pan.chars().enumerate().map(|(i, c)| if i < 6 || i + 4 >= digits { c } else { '*' }).collect()
    }
}

/// The POS app's acknowledgement of a card read: the read's ATC echoed.
pub fn acknowledgement(read: &CardRead) -> Result<Vec<u8>, TlvError> {
    tlv::encode(&[Tlv::new(TAG_ATC, read.atc.to_be_bytes())])
}

/// The ATC an acknowledgement echoes.
pub fn acknowledged_atc(bytes: &[u8]) -> Result<u16, TlvError> {
    let items = tlv::decode(bytes)?;
    Ok(u16::from_be_bytes(fixed(TAG_ATC, tlv::find(&items, TAG_ATC)?)?))
}

fn bad(tag: Tag, detail: impl Into<String>) -> TlvError {
    TlvError::BadValue { tag, detail: detail.into() }
}

fn fixed<const N: usize>(tag: Tag, value: &[u8]) -> Result<[u8; N], TlvError> {
    value.try_into().map_err(|_| bad(tag, format!("{} bytes, expected {N}", value.len())))
}

fn nibbles_of(tag: Tag, digits: &str) -> Result<Vec<u8>, TlvError> {
    digits
        .chars()
        .map(|c| c.to_digit(10).map(|d| d as u8).ok_or_else(|| bad(tag, format!("{c:?} is not a digit"))))
        .collect()
}

fn pack(nibbles: &[u8]) -> Vec<u8> {
    nibbles
        .chunks(2)
        .map(|pair| (pair.first().copied().unwrap_or(0xF) << 4) | pair.get(1).copied().unwrap_or(0xF))
        .collect()
}

/// EMV `n`: BCD right-aligned in `bytes`, padded with leading zeros.
fn numeric(tag: Tag, digits: &str, bytes: usize) -> Result<Vec<u8>, TlvError> {
    let nibbles = nibbles_of(tag, digits)?;
    if nibbles.len() > bytes * 2 {
        return Err(bad(tag, format!("{} digits, at most {}", nibbles.len(), bytes * 2)));
    }
    let mut padded = vec![0u8; bytes * 2 - nibbles.len()];
    padded.extend(nibbles);
    Ok(pack(&padded))
}

/// EMV `cn`: BCD left-aligned, padded with trailing `F` nibbles.
fn compressed_numeric(tag: Tag, digits: &str) -> Result<Vec<u8>, TlvError> {
    let nibbles = nibbles_of(tag, digits)?;
    if nibbles.is_empty() || nibbles.len() > PAN_DIGITS_MAX {
        return Err(bad(tag, format!("{} digits", nibbles.len())));
    }
    Ok(pack(&nibbles))
}

fn unpack(value: &[u8]) -> impl Iterator<Item = u8> + '_ {
    value.iter().flat_map(|byte| [byte >> 4, byte & 0x0F])
}

fn digits_of_numeric(tag: Tag, value: &[u8], bytes: usize) -> Result<String, TlvError> {
    if value.len() != bytes {
        return Err(bad(tag, format!("{} bytes, expected {bytes}", value.len())));
    }
    unpack(value)
        .map(|n| char::from_digit(u32::from(n), 10).ok_or_else(|| bad(tag, format!("nibble {n:X} is not a digit"))))
        .collect()
}

fn digits_of_compressed(tag: Tag, value: &[u8]) -> Result<String, TlvError> {
    let mut digits = String::new();
    let mut padding = false;
    for nibble in unpack(value) {
        match (nibble, padding) {
            (0xF, _) => padding = true,
            (0..=9, false) => digits.push(char::from(b'0' + nibble)),
            _ => return Err(bad(tag, "digits after padding, or a nibble that is not a digit")),
        }
    }
    Ok(digits)
}

fn parse_digits(tag: Tag, digits: &str) -> Result<u64, TlvError> {
    digits.parse().map_err(|_| bad(tag, format!("{digits:?} is not a number")))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Bytes from hex digits, spaces allowed between them.
    fn hex(text: &str) -> Vec<u8> {
        let text: String = text.split_whitespace().collect();
        vouch_proto::hex::decode(&text).expect("hex digits")
    }

    #[test]
    fn a_card_read_encodes_as_emv_says_and_reads_back() {
        let mut card = SimulatedCard::test_card();
        let read = card.tap(340, CURRENCY_EUR).unwrap();
        assert_eq!(read.atc, 1);
        let bytes = read.to_tlv().unwrap();
        let items = tlv::decode(&bytes).unwrap();
        assert_eq!(tlv::find(&items, TAG_PAN).unwrap(), hex("47 61 73 90 01 01 00 10"));
        assert_eq!(tlv::find(&items, TAG_EXPIRY).unwrap(), hex("31 12 31"));
        assert_eq!(tlv::find(&items, TAG_AMOUNT).unwrap(), hex("00 00 00 00 03 40"));
        assert_eq!(tlv::find(&items, TAG_CURRENCY).unwrap(), hex("09 78"));
        assert_eq!(tlv::find(&items, TAG_ATC).unwrap(), hex("00 01"));
        assert_eq!(CardRead::from_tlv(&bytes).unwrap(), read);
        assert_eq!(read.masked_pan(), "476173******0010");

        let next = card.tap(340, CURRENCY_EUR).unwrap();
        assert_eq!(next.atc, 2);
        assert_ne!(next.cryptogram, read.cryptogram, "each tap has its own cryptogram");
        assert_eq!(acknowledged_atc(&acknowledgement(&next).unwrap()).unwrap(), 2);
    }

    #[test]
    fn an_odd_length_pan_is_padded_with_f() {
        let read = CardRead {
            pan: "4761739001010".into(),
            expiry: "311231".into(),
            amount_minor: 1,
            currency: CURRENCY_EUR,
            cryptogram: [0; 8],
            atc: 9,
        };
        let bytes = read.to_tlv().unwrap();
        assert_eq!(tlv::find(&tlv::decode(&bytes).unwrap(), TAG_PAN).unwrap(), hex("47 61 73 90 01 01 0F"));
        assert_eq!(CardRead::from_tlv(&bytes).unwrap(), read);
    }

    #[test]
    fn malformed_card_reads_are_refused() {
        let good = SimulatedCard::test_card().tap(340, CURRENCY_EUR).unwrap();
        let replace = |tag: Tag, value: Vec<u8>| {
            let items: Vec<Tlv> = tlv::decode(&good.to_tlv().unwrap())
                .unwrap()
                .into_iter()
                .map(|item| if item.tag == tag { Tlv::new(tag, value.clone()) } else { item })
                .collect();
            CardRead::from_tlv(&tlv::encode(&items).unwrap())
        };
        let cases = [
            ("PAN with a letter nibble", replace(TAG_PAN, hex("47 61 73 90 01 A1 00 10"))),
            ("PAN with digits after padding", replace(TAG_PAN, hex("47 61 73 90 01 F1 00 10"))),
            ("short PAN", replace(TAG_PAN, hex("47 61 FF"))),
            ("amount of 5 bytes", replace(TAG_AMOUNT, hex("00 00 00 03 40"))),
            ("amount with a letter nibble", replace(TAG_AMOUNT, hex("00 00 00 00 03 4C"))),
            ("cryptogram of 7 bytes", replace(TAG_CRYPTOGRAM, vec![0; 7])),
            ("ATC of 3 bytes", replace(TAG_ATC, vec![0; 3])),
        ];
        for (name, result) in cases {
            assert!(matches!(result, Err(TlvError::BadValue { .. })), "{name}: {result:?}");
        }
        let without_atc: Vec<Tlv> =
            tlv::decode(&good.to_tlv().unwrap()).unwrap().into_iter().filter(|i| i.tag != TAG_ATC).collect();
        assert_eq!(CardRead::from_tlv(&tlv::encode(&without_atc).unwrap()), Err(TlvError::Missing(TAG_ATC)));
        assert!(CardRead::from_tlv(b"not tlv at all").is_err());
        assert!(SimulatedCard::test_card().tap(AMOUNT_MINOR_MAX + 1, CURRENCY_EUR).is_err());
    }

    #[test]
    fn a_card_refuses_to_tap_once_its_counter_is_spent() {
        let mut card = SimulatedCard { atc: u16::MAX - 1, ..SimulatedCard::test_card() };
        assert_eq!(card.tap(1, CURRENCY_EUR).unwrap().atc, u16::MAX);
        assert!(matches!(card.tap(1, CURRENCY_EUR), Err(TlvError::BadValue { tag: TAG_ATC, .. })));
    }

    proptest! {
        /// Hostile values under the right tags fail as bad values, never as a panic.
        #[test]
        fn any_values_under_the_card_read_tags_parse_or_fail(
            values in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..24), 6),
        ) {
            let tags = [TAG_PAN, TAG_EXPIRY, TAG_AMOUNT, TAG_CURRENCY, TAG_CRYPTOGRAM, TAG_ATC];
            let items: Vec<Tlv> = tags.iter().zip(values).map(|(tag, value)| Tlv::new(*tag, value)).collect();
            if let Ok(read) = CardRead::from_tlv(&tlv::encode(&items).unwrap()) {
                prop_assert_eq!(CardRead::from_tlv(&read.to_tlv().unwrap()).unwrap(), read);
            }
        }
    }
}
