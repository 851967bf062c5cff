//! BER-TLV as EMV uses it (EMV Book 3, annex B): tags of one to three bytes, lengths
//! in short form or long form with one or two length bytes. Enough for the card data a
//! reader sends; not a general ASN.1 decoder.
//!
//! Decoding is bounded — input size, item count, tag and length sizes — and never
//! panics, whatever the bytes: a constructed item's value is kept whole, and the
//! caller decodes it again if it wants its children.

use thiserror::Error;

/// The most bytes one TLV sequence may hold.
pub const TLV_BYTES_MAX: usize = 4096;
/// The most items one TLV sequence may hold.
pub const TLV_ITEMS_MAX: usize = 64;
/// The longest tag: a first byte and up to two subsequent bytes.
const TAG_BYTES_MAX: usize = 3;
/// Low five bits of a tag's first byte that say "more tag bytes follow".
const TAG_NUMBER_MASK: u8 = 0x1F;
/// Bit 8 of a subsequent tag byte: another follows.
const TAG_MORE: u8 = 0x80;
/// Bit 6 of a tag's first byte: the value is itself TLV.
const TAG_CONSTRUCTED: u8 = 0x20;
const LENGTH_LONG_FORM: u8 = 0x80;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum TlvError {
    #[error("TLV data is {len} bytes, over the limit of {TLV_BYTES_MAX}")]
    TooLarge { len: usize },
    #[error("TLV data holds more than {TLV_ITEMS_MAX} items")]
    TooManyItems,
    #[error("tag at offset {offset} is longer than {TAG_BYTES_MAX} bytes")]
    TagTooLong { offset: usize },
    #[error("length at offset {offset} uses {form:#04x}, expected a short form or 0x81/0x82")]
    UnsupportedLength { offset: usize, form: u8 },
    #[error("item at offset {offset} runs past the end of the data")]
    Truncated { offset: usize },
    #[error("tag {0} appears more than once")]
    Duplicate(Tag),
    #[error("tag {0} is missing")]
    Missing(Tag),
    #[error("tag {tag}: {detail}")]
    BadValue { tag: Tag, detail: String },
    #[error("a value of {len} bytes is too long for BER-TLV")]
    ValueTooLong { len: usize },
    #[error("{0:#x} is not a BER-TLV tag")]
    InvalidTag(u32),
}

/// A tag, as the number its bytes spell big-endian: `0x5A`, `0x5F24`, `0x9F02`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(u32);

impl Tag {
    /// A tag from its bytes read big-endian; checked when encoded.
    pub const fn new(number: u32) -> Self {
        Tag(number)
    }

    pub fn number(self) -> u32 {
        self.0
    }

    /// The tag's bytes: as many as its number needs, at least one.
    fn bytes(self) -> Vec<u8> {
        let all = self.0.to_be_bytes();
        let first = all.iter().position(|b| *b != 0).unwrap_or(all.len() - 1);
        all[first..].to_vec()
    }

    /// Whether the value is itself a TLV sequence.
    pub fn is_constructed(self) -> bool {
        self.bytes().first().is_some_and(|b| b & TAG_CONSTRUCTED != 0)
    }

    /// Whether the bytes read back as this tag: a first byte announcing exactly the
    /// subsequent bytes that follow it.
    fn check(self) -> Result<Vec<u8>, TlvError> {
        let bytes = self.bytes();
        match parse_tag(&bytes, 0) {
            Ok((_, end)) if end == bytes.len() => Ok(bytes),
            _ => Err(TlvError::InvalidTag(self.0)),
        }
    }
}

impl std::fmt::Display for Tag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for byte in self.bytes() {
            write!(f, "{byte:02X}")?;
        }
        Ok(())
    }
}

/// One data object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tlv {
    pub tag: Tag,
    pub value: Vec<u8>,
}

impl Tlv {
    pub fn new(tag: Tag, value: impl Into<Vec<u8>>) -> Self {
        Tlv { tag, value: value.into() }
    }
}

/// Encodes `items` in order, lengths in their shortest form.
pub fn encode(items: &[Tlv]) -> Result<Vec<u8>, TlvError> {
    if items.len() > TLV_ITEMS_MAX {
        return Err(TlvError::TooManyItems);
    }
    let mut out = Vec::new();
    for item in items {
        out.extend_from_slice(&item.tag.check()?);
        let len = item.value.len();
        match u8::try_from(len) {
            Ok(short) if short < LENGTH_LONG_FORM => out.push(short),
            Ok(one) => out.extend_from_slice(&[LENGTH_LONG_FORM | 1, one]),
            Err(_) => {
                let two = u16::try_from(len).map_err(|_| TlvError::ValueTooLong { len })?;
                out.push(LENGTH_LONG_FORM | 2);
                out.extend_from_slice(&two.to_be_bytes());
            }
        }
        out.extend_from_slice(&item.value);
    }
    if out.len() > TLV_BYTES_MAX {
        return Err(TlvError::TooLarge { len: out.len() });
    }
    Ok(out)
}

/// Decodes a sequence of data objects; every byte must belong to one.
pub fn decode(bytes: &[u8]) -> Result<Vec<Tlv>, TlvError> {
    if bytes.len() > TLV_BYTES_MAX {
        return Err(TlvError::TooLarge { len: bytes.len() });
    }
    let mut items = Vec::new();
    let mut offset = 0;
    while offset < bytes.len() {
        if items.len() == TLV_ITEMS_MAX {
            return Err(TlvError::TooManyItems);
        }
        let (tag, after_tag) = parse_tag(bytes, offset)?;
        let (len, after_length) = parse_length(bytes, after_tag)?;
        let end = after_length.checked_add(len).filter(|end| *end <= bytes.len());
        let value = end.and_then(|end| bytes.get(after_length..end)).ok_or(TlvError::Truncated { offset })?;
        items.push(Tlv { tag, value: value.to_vec() });
        offset = after_length + len;
    }
    Ok(items)
}

/// The tag starting at `offset`, and the offset after it.
fn parse_tag(bytes: &[u8], offset: usize) -> Result<(Tag, usize), TlvError> {
    let first = *bytes.get(offset).ok_or(TlvError::Truncated { offset })?;
    let mut number = u32::from(first);
    let mut next = offset + 1;
    if first & TAG_NUMBER_MASK == TAG_NUMBER_MASK {
        loop {
            if next - offset == TAG_BYTES_MAX {
                return Err(TlvError::TagTooLong { offset });
            }
            let byte = *bytes.get(next).ok_or(TlvError::Truncated { offset })?;
            number = (number << 8) | u32::from(byte);
            next += 1;
            if byte & TAG_MORE == 0 {
                break;
            }
        }
    }
    Ok((Tag(number), next))
}

/// The length starting at `offset`, and the offset after it.
fn parse_length(bytes: &[u8], offset: usize) -> Result<(usize, usize), TlvError> {
    let form = *bytes.get(offset).ok_or(TlvError::Truncated { offset })?;
    if form & LENGTH_LONG_FORM == 0 {
        return Ok((usize::from(form), offset + 1));
    }
    let count = usize::from(form & !LENGTH_LONG_FORM);
    if !(1..=2).contains(&count) {
        return Err(TlvError::UnsupportedLength { offset, form });
    }
    let length_bytes = bytes.get(offset + 1..offset + 1 + count).ok_or(TlvError::Truncated { offset })?;
    let len = length_bytes.iter().fold(0usize, |len, b| (len << 8) | usize::from(*b));
    Ok((len, offset + 1 + count))
}

/// The value of the one item tagged `tag`: refused when missing or repeated.
pub fn find(items: &[Tlv], tag: Tag) -> Result<&[u8], TlvError> {
    let mut found = items.iter().filter(|item| item.tag == tag);
    let first = found.next().ok_or(TlvError::Missing(tag))?;
    if found.next().is_some() {
        return Err(TlvError::Duplicate(tag));
    }
    Ok(&first.value)
}

#[cfg(test)]
pub(super) mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Bytes from hex digits, spaces allowed between them.
    fn hex(text: &str) -> Vec<u8> {
        let text: String = text.split_whitespace().collect();
        crate::hex::decode(&text).expect("hex digits")
    }

    /// Known encodings: one- and two-byte tags, short and long lengths, a constructed
    /// template whose value decodes again.
    #[test]
    fn known_encodings_decode_and_encode_back() {
        let cases: [(&str, Vec<Tlv>); 4] = [
            ("5A 08 4761739001010010", vec![Tlv::new(Tag::new(0x5A), hex("4761739001010010"))]),
            (
                "5F24 03 311231 9F02 06 000000000340",
                vec![Tlv::new(Tag::new(0x5F24), hex("311231")), Tlv::new(Tag::new(0x9F02), hex("000000000340"))],
            ),
            ("9F36 02 0001 DF8101 00", vec![Tlv::new(Tag::new(0x9F36), hex("0001")), Tlv::new(Tag::new(0xDF8101), [])]),
            ("70 09 5F24 03 311231 9F36 00", vec![Tlv::new(Tag::new(0x70), hex("5F2403311231 9F3600"))]),
        ];
        for (bytes, items) in cases {
            assert_eq!(decode(&hex(bytes)).unwrap(), items, "{bytes}");
            assert_eq!(encode(&items).unwrap(), hex(bytes), "{bytes}");
        }
        let template = decode(&hex("70 09 5F24 03 311231 9F36 00")).unwrap();
        assert!(template[0].tag.is_constructed());
        assert_eq!(decode(&template[0].value).unwrap().len(), 2);
        assert_eq!(Tag::new(0x9F02).to_string(), "9F02");
    }

    #[test]
    fn long_lengths_use_one_or_two_length_bytes() {
        for (len, prefix) in
            [(127, hex("C1 7F")), (128, hex("C1 81 80")), (255, hex("C1 81 FF")), (300, hex("C1 82 012C"))]
        {
            let item = Tlv::new(Tag::new(0xC1), vec![7; len]);
            let encoded = encode(std::slice::from_ref(&item)).unwrap();
            assert_eq!(encoded[..prefix.len()], prefix[..], "{len}");
            assert_eq!(decode(&encoded).unwrap(), [item]);
        }
        let huge = Tlv::new(Tag::new(0xC1), vec![0; TLV_BYTES_MAX]);
        assert!(matches!(encode(&[huge]), Err(TlvError::TooLarge { .. })));
    }

    #[test]
    fn malformed_data_is_refused_with_its_reason() {
        let cases: [(&str, TlvError); 7] = [
            ("5A 08 4761", TlvError::Truncated { offset: 0 }),
            ("5F", TlvError::Truncated { offset: 0 }),
            ("5A", TlvError::Truncated { offset: 1 }),
            ("5A 81", TlvError::Truncated { offset: 1 }),
            ("5A 80", TlvError::UnsupportedLength { offset: 1, form: 0x80 }),
            ("5A 83 000001 00", TlvError::UnsupportedLength { offset: 1, form: 0x83 }),
            ("9F 81 82 83 01 00", TlvError::TagTooLong { offset: 0 }),
        ];
        for (bytes, expected) in cases {
            assert_eq!(decode(&hex(bytes)), Err(expected), "{bytes}");
        }
        assert_eq!(decode(&[0xC1, 0x00].repeat(TLV_ITEMS_MAX + 1)), Err(TlvError::TooManyItems));
        assert!(matches!(decode(&vec![0; TLV_BYTES_MAX + 1]), Err(TlvError::TooLarge { .. })));
    }

    #[test]
    fn tags_that_would_not_read_back_are_not_encoded() {
        // 0x1F announces a subsequent byte that is missing; 0x9F81 announces a third.
        for number in [0x1F, 0x9F81, 0x5A01, 0x9F_81_81_01] {
            assert_eq!(encode(&[Tlv::new(Tag::new(number), [])]), Err(TlvError::InvalidTag(number)), "{number:#x}");
        }
    }

    #[test]
    fn find_wants_exactly_one() {
        let items = decode(&hex("5A 01 00 9F36 01 01 9F36 01 02")).unwrap();
        assert_eq!(find(&items, Tag::new(0x5A)), Ok(&[0u8][..]));
        assert_eq!(find(&items, Tag::new(0x9F36)), Err(TlvError::Duplicate(Tag::new(0x9F36))));
        assert_eq!(find(&items, Tag::new(0x5F24)), Err(TlvError::Missing(Tag::new(0x5F24))));
    }

    proptest! {
        #[test]
        fn any_bytes_decode_or_fail_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(items) = decode(&bytes) {
                // Whatever decodes re-encodes, lengths in their shortest form, and decodes the same.
                let encoded = encode(&items).unwrap();
                prop_assert_eq!(decode(&encoded).unwrap(), items);
            }
        }

        #[test]
        fn encoded_items_decode_back(values in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8)) {
            let tags = [0x5A, 0x5F24, 0x9F02, 0x9F26, 0x9F36, 0xDF8101, 0x70];
            let items: Vec<Tlv> = values.into_iter().zip(tags.iter().cycle()).map(|(v, t)| Tlv::new(Tag::new(*t), v)).collect();
            let encoded = encode(&items).unwrap();
            prop_assert_eq!(decode(&encoded).unwrap(), items);
        }
    }
}
