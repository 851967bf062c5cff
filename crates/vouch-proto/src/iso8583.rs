//! ISO 8583:1987 messages in the ASCII dialect a payment switch speaks to Vouch over TCP,
//! and the 2-byte length framing around them. Sans-IO: bytes in, messages or errors out;
//! the listener and the sender own the socket.
//!
//! # The dialect
//!
//! - **Frame**: a 2-byte big-endian binary length, then that many bytes of message. The
//!   length excludes itself. [`frame`] adds it, [`split_frame`] takes whole frames off the
//!   front of a byte stream. A message is at most [`MESSAGE_BYTES_MAX`] bytes; a header
//!   declaring more is refused before any of the body is buffered.
//! - **MTI**: 4 ASCII digits ([`Mti`]).
//! - **Bitmaps**: the primary bitmap as 16 ASCII hex characters. Bit 1 set means a
//!   secondary bitmap of 16 more hex characters follows, for fields 65-128. Hex is accepted
//!   in either case and always emitted upper-case. Bit 65 (a tertiary bitmap) is refused.
//!   A secondary bitmap with no bit set is accepted; [`Message::encode`] writes one only
//!   when a field 65-128 is present.
//! - **Fields**: in field-number order, every byte ASCII. Fixed fields carry exactly their
//!   length (the caller pads: `n` with leading zeros, `an`/`ans` with trailing spaces).
//!   LLVAR and LLLVAR fields carry a 2- or 3-digit ASCII decimal length, then that many
//!   characters. The format of each of fields 2-128 is the ISO 8583:1987 table in
//!   [`field_spec`], so a message carrying fields Vouch does not use is read and kept,
//!   not refused. Character classes: `n` digits; `an` letters and digits; `ans`
//!   printable ASCII 0x20-0x7E; `ns` digits and special characters; `z` the track 2/3
//!   code set (`0-9 : ; < = > ?`, and `D` as the ASCII field separator); `x+n` `C`
//!   (credit) or `D` (debit) then digits; `b` binary, written as hex characters, so
//!   DE 52 (b64) is 16 hex characters. Values are kept as received: `b` fields in the
//!   case they came in, nothing trimmed.
//! - **Departures from the 1987 table**, each to carry what real traffic puts there:
//!   DE 36 (track 3) is `z` rather than `n`; DE 45 (track 1) and DE 48 are `ans` rather
//!   than `an`.
//! - **DE 48** holds sub-elements: a 2-digit tag, a 2-digit length, then the value.
//!   Sub-element `01` is the device verification value (DVV), digits only:
//!   `0106123456` is the DVV `123456`. See [`AdditionalData`].
//!
//! A refused message still tells the caller what it could read ([`RefusedMessage`]), so a
//! format-error answer (response code `30`) can echo the MTI, the STAN (DE 11) and the
//! terminal (DE 41). Errors quote the offending character and its offset, never the
//! field's value, and `Debug` shows the PAN, track data, DE 48 and the PIN block only as
//! lengths: a value may be a card number, a PIN block or a DVV.
//!
//! # Why not a crate
//!
//! Of the ISO 8583 crates on crates.io, `iso8583-codec-rs` 0.1.0 returns untyped JSON
//! values, does not check character classes or trailing bytes on decode and has no length
//! framing, and `iso8583_rs` does its own TCP IO. This dialect fits in one spec-driven
//! module with no dependencies.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use crate::ProtoError;

/// The largest message body accepted or framed, in bytes (the length header excluded).
pub const MESSAGE_BYTES_MAX: usize = 4096;
/// The binary big-endian length header in front of each message.
pub const LENGTH_HEADER_BYTES: usize = 2;
/// DE 48 sub-element tag of the device verification value.
pub const DVV_TAG: u8 = 1;

const MTI_CHARS: usize = 4;
const BITMAP_CHARS: usize = 16;
/// Bit 1 of a bitmap: in the primary, a secondary bitmap follows; in the secondary,
/// field 65 (a tertiary bitmap).
const FIRST_BIT: u64 = 1 << 63;
const FIELD_MAX: u8 = 128;
const SUB_ELEMENT_HEADER_CHARS: usize = 4;
const SUB_ELEMENT_VALUE_CHARS_MAX: usize = 99;
const SUB_ELEMENT_TAG_MAX: u8 = 99;
const AMOUNT_FIELD: u8 = 4;
const AMOUNT_DIGITS: usize = 12;
const TRANSMISSION_TIME_FIELD: u8 = 7;
const TRANSMISSION_TIME_DIGITS: usize = 10;
const SECS_PER_DAY: i64 = 86_400;

/// What characters a field may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CharClass {
    /// `n`: digits.
    N,
    /// `an`: letters and digits.
    An,
    /// `ans`: printable ASCII, 0x20-0x7E.
    Ans,
    /// `ns`: digits and printable special characters (no letters).
    Ns,
    /// `z`: the track 2 and 3 code set, `0x30-0x3F`, and `D` as the ASCII separator.
    Z,
    /// `x+n`: `C` or `D`, then digits.
    XN,
    /// `b`: binary, written as hex characters (either case).
    B,
}

impl CharClass {
    fn admits(self, offset: usize, byte: u8) -> bool {
        match self {
            CharClass::N => byte.is_ascii_digit(),
            CharClass::An => byte.is_ascii_alphanumeric(),
            CharClass::Ans => is_printable(byte),
            CharClass::Ns => is_printable(byte) && !byte.is_ascii_alphabetic(),
            CharClass::Z => (0x30..=0x3F).contains(&byte) || byte == b'D',
            CharClass::XN if offset == 0 => byte == b'C' || byte == b'D',
            CharClass::XN => byte.is_ascii_digit(),
            CharClass::B => byte.is_ascii_hexdigit(),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            CharClass::N => "digits",
            CharClass::An => "letters or digits",
            CharClass::Ans => "printable ASCII characters",
            CharClass::Ns => "digits or special characters",
            CharClass::Z => "track data characters (0-9 : ; < = > ? D)",
            CharClass::XN => "characters, C or D then digits,",
            CharClass::B => "hex digits",
        }
    }
}

impl fmt::Display for CharClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

fn is_printable(byte: u8) -> bool {
    (0x20..=0x7E).contains(&byte)
}

/// How a field's length is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FieldLength {
    /// Exactly this many characters, no prefix.
    Fixed(u16),
    /// A 2-digit length prefix, then at most this many characters.
    Llvar(u16),
    /// A 3-digit length prefix, then at most this many characters.
    Lllvar(u16),
}

/// The format of one data element.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FieldSpec {
    pub class: CharClass,
    pub length: FieldLength,
}

const fn fixed(class: CharClass, chars: u16) -> FieldSpec {
    FieldSpec { class, length: FieldLength::Fixed(chars) }
}

const fn llvar(class: CharClass, max: u16) -> FieldSpec {
    FieldSpec { class, length: FieldLength::Llvar(max) }
}

const fn lllvar(class: CharClass, max: u16) -> FieldSpec {
    FieldSpec { class, length: FieldLength::Lllvar(max) }
}

/// The ISO 8583:1987 format of data element `field`, in this dialect's characters;
/// `None` for 0, for the bitmap flags 1 and 65, and above 128.
pub const fn field_spec(field: u8) -> Option<FieldSpec> {
    use CharClass::{An, Ans, B, N, Ns, XN, Z};
    let spec = match field {
        2 => llvar(N, 19),             // primary account number (here the account_ref token)
        3 => fixed(N, 6),              // processing code
        4..=6 => fixed(N, 12),         // amounts: transaction, settlement, cardholder billing
        7 => fixed(N, 10),             // transmission date and time, MMDDhhmmss
        8..=10 => fixed(N, 8),         // billing fee amount, conversion rates
        11 => fixed(N, 6),             // systems trace audit number
        12 => fixed(N, 6),             // local time, hhmmss
        13..=18 => fixed(N, 4),        // local date, expiry, settlement/conversion/capture dates, MCC
        19..=24 => fixed(N, 3),        // country codes, POS entry mode, card sequence number, NII
        25 | 26 => fixed(N, 2),        // POS condition code, PIN capture code
        27 => fixed(N, 1),             // authorization id response length
        28..=31 => fixed(XN, 9),       // fee amounts
        32 | 33 => llvar(N, 11),       // acquiring, forwarding institution id
        34 => llvar(Ns, 28),           // extended PAN
        35 => llvar(Z, 37),            // track 2
        36 => lllvar(Z, 104),          // track 3 (n in the table; track data carries separators)
        37 => fixed(An, 12),           // retrieval reference number
        38 => fixed(An, 6),            // authorization id response
        39 => fixed(An, 2),            // response code
        40 => fixed(An, 3),            // service restriction code
        41 => fixed(Ans, 8),           // card acceptor terminal id
        42 => fixed(Ans, 15),          // card acceptor id code
        43 => fixed(Ans, 40),          // card acceptor name and location
        44 => llvar(An, 25),           // additional response data
        45 => llvar(Ans, 76),          // track 1 (an in the table; track 1 carries '^' and spaces)
        46 | 47 => lllvar(An, 999),    // additional data, ISO and national
        48 => lllvar(Ans, 999),        // additional data, private: Vouch's sub-elements (an in the table)
        49..=51 => fixed(An, 3),       // currency codes, e.g. 978
        52 => fixed(B, 16),            // PIN data, b64
        53 => fixed(N, 16),            // security related control information
        54 => lllvar(An, 120),         // additional amounts
        55..=63 => lllvar(Ans, 999),   // reserved ISO, national and private
        64 => fixed(B, 16),            // MAC, b64
        66 => fixed(N, 1),             // settlement code
        67 => fixed(N, 2),             // extended payment code
        68..=70 => fixed(N, 3),        // country codes, network management information code
        71 | 72 => fixed(N, 4),        // message numbers
        73 => fixed(N, 6),             // date, action
        74..=81 => fixed(N, 10),       // reconciliation counts
        82..=85 => fixed(N, 12),       // reconciliation fee amounts
        86..=89 => fixed(N, 16),       // reconciliation amounts
        90 => fixed(N, 42),            // original data elements
        91 => fixed(An, 1),            // file update code
        92 => fixed(An, 2),            // file security code
        93 => fixed(An, 5),            // response indicator
        94 => fixed(An, 7),            // service indicator
        95 => fixed(An, 42),           // replacement amounts
        96 => fixed(B, 16),            // message security code, b64
        97 => fixed(XN, 17),           // net settlement amount
        98 => fixed(Ans, 25),          // payee
        99 | 100 => llvar(N, 11),      // settlement, receiving institution id
        101 => llvar(Ans, 17),         // file name
        102 | 103 => llvar(Ans, 28),   // account identifications
        104 => lllvar(Ans, 100),       // transaction description
        105..=127 => lllvar(Ans, 999), // reserved ISO, national and private
        128 => fixed(B, 16),           // MAC, b64
        _ => return None,
    };
    Some(spec)
}

/// Which part of a message, or of DE 48, an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Part {
    Mti,
    PrimaryBitmap,
    SecondaryBitmap,
    /// The LL or LLL digits in front of a variable field.
    LengthPrefix(u8),
    Field(u8),
    /// The 4-digit tag and length of a DE 48 sub-element starting at this offset of DE 48.
    SubElementHeader {
        offset: usize,
    },
    /// The value of the DE 48 sub-element with this tag.
    SubElement(u8),
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Part::Mti => f.write_str("MTI"),
            Part::PrimaryBitmap => f.write_str("primary bitmap"),
            Part::SecondaryBitmap => f.write_str("secondary bitmap"),
            Part::LengthPrefix(field) => write!(f, "field {field} length prefix"),
            Part::Field(field) => write!(f, "field {field}"),
            Part::SubElementHeader { offset } => write!(f, "DE 48 sub-element header at offset {offset}"),
            Part::SubElement(tag) => write!(f, "DE 48 sub-element {tag:02}"),
        }
    }
}

/// A byte quoted in an error: the character when printable, its hex value otherwise.
struct Found(u8);

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if is_printable(self.0) { write!(f, "'{}'", char::from(self.0)) } else { write!(f, "byte 0x{:02X}", self.0) }
    }
}

/// What was wrong with an ISO 8583 message, a frame or a DE 48 sub-element.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Iso8583Error {
    #[error("{part}: expected {len} {expected}, found {} at offset {offset}", Found(*found))]
    BadCharacter { part: Part, expected: CharClass, len: usize, found: u8, offset: usize },
    #[error("{part}: needs {needed} bytes, only {available} left")]
    Truncated { part: Part, needed: usize, available: usize },
    #[error("{part}: length {len} is over the maximum {max}")]
    TooLong { part: Part, len: usize, max: usize },
    #[error("{part}: expected exactly {expected} characters, found {len}")]
    WrongLength { part: Part, expected: usize, len: usize },
    #[error("{part}: expected {expected}")]
    OutOfRange { part: Part, expected: &'static str },
    #[error("secondary bitmap sets bit 65 (a tertiary bitmap); this dialect ends at field 128")]
    TertiaryBitmap,
    #[error("field {field} is not a data element: data elements are 2 to 128 except 65")]
    NotADataElement { field: u8 },
    #[error("{count} bytes after the last field")]
    TrailingBytes { count: usize },
    #[error("message is {len} bytes, over the limit of {max}")]
    MessageTooLarge { len: usize, max: usize },
    #[error("length header declares {declared} bytes, over the limit of {max}")]
    DeclaredTooLarge { declared: usize, max: usize },
    #[error("DE 48 sub-element {tag:02} appears twice")]
    DuplicateSubElement { tag: u8 },
}

/// A message type indicator: 4 digits (version, class, function, origin).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mti(u16);

impl Mti {
    pub const AUTHORIZATION_REQUEST: Mti = Mti(100);
    pub const AUTHORIZATION_RESPONSE: Mti = Mti(110);
    pub const NETWORK_MANAGEMENT_REQUEST: Mti = Mti(800);
    pub const NETWORK_MANAGEMENT_RESPONSE: Mti = Mti(810);

    /// The MTI whose four digits are `value`, if it has at most four.
    pub const fn new(value: u16) -> Option<Mti> {
        if value <= 9999 { Some(Mti(value)) } else { None }
    }

    pub const fn value(self) -> u16 {
        self.0
    }

    /// The MTI answering this one: a request (function digit 0) gets its response (1),
    /// an advice (2) its advice response (3); 0100 gives 0110, 0800 gives 0810. `None`
    /// for MTIs that are themselves answers or notifications.
    pub const fn response_mti(self) -> Option<Mti> {
        match (self.0 / 10) % 10 {
            0 | 2 => Some(Mti(self.0 + 10)),
            _ => None,
        }
    }
}

impl fmt::Display for Mti {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}", self.0)
    }
}

impl FromStr for Mti {
    type Err = ProtoError;

    fn from_str(s: &str) -> Result<Mti, ProtoError> {
        let bytes = exact_len(Part::Mti, s.as_bytes(), MTI_CHARS)?;
        // Invariant: four digits are at most 9999.
        Ok(Mti(digits_value(Part::Mti, bytes)? as u16))
    }
}

/// Fields whose values `Debug` does not show: the PAN, track data, DE 48 (the DVV) and
/// the PIN block.
const REDACTED_FIELDS: [u8; 6] = [2, 35, 36, 45, 48, 52];

/// An ISO 8583 message: an MTI and data elements 2-128 (except 65), each holding a value
/// valid for its format in [`field_spec`]. `Debug` shows the values of fields that can
/// hold a card number, track data, a DVV or a PIN block only as their length.
#[derive(Clone, PartialEq, Eq)]
pub struct Message {
    mti: Mti,
    fields: BTreeMap<u8, String>,
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message").field("mti", &self.mti).field("fields", &Redacted(&self.fields)).finish()
    }
}

/// A message [`Message::decode_or_salvage`] refused, with what it could read first, so the
/// answer can echo it. `Debug` redacts as [`Message`]'s does.
#[derive(Clone, PartialEq, Eq)]
pub struct RefusedMessage {
    /// The MTI, when the first four bytes were digits.
    pub mti: Option<Mti>,
    /// The fields before the one that failed, each valid for its format.
    pub fields: BTreeMap<u8, String>,
    pub error: ProtoError,
}

impl fmt::Debug for RefusedMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefusedMessage")
            .field("mti", &self.mti)
            .field("fields", &Redacted(&self.fields))
            .field("error", &self.error)
            .finish()
    }
}

struct Redacted<'a>(&'a BTreeMap<u8, String>);

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        for (field, value) in self.0 {
            if REDACTED_FIELDS.contains(field) {
                map.entry(field, &format_args!("<{} characters>", value.len()));
            } else {
                map.entry(field, value);
            }
        }
        map.finish()
    }
}

impl Message {
    pub fn new(mti: Mti) -> Message {
        Message { mti, fields: BTreeMap::new() }
    }

    pub fn mti(&self) -> Mti {
        self.mti
    }

    /// Sets data element `field` to `value`, refusing a field number that is not a data
    /// element and a value that does not fit the field's format.
    pub fn set(&mut self, field: u8, value: impl Into<String>) -> Result<&mut Message, ProtoError> {
        let value = value.into();
        let spec = field_spec(field).ok_or(Iso8583Error::NotADataElement { field })?;
        let part = Part::Field(field);
        let bytes = value.as_bytes();
        match spec.length {
            FieldLength::Fixed(len) => {
                exact_len(part, bytes, usize::from(len))?;
            }
            FieldLength::Llvar(max) | FieldLength::Lllvar(max) => {
                if bytes.len() > usize::from(max) {
                    return Err(Iso8583Error::TooLong { part, len: bytes.len(), max: usize::from(max) }.into());
                }
            }
        }
        check_class(part, spec.class, bytes)?;
        self.fields.insert(field, value);
        Ok(self)
    }

    pub fn get(&self, field: u8) -> Option<&str> {
        self.fields.get(&field).map(String::as_str)
    }

    pub fn remove(&mut self, field: u8) -> Option<String> {
        self.fields.remove(&field)
    }

    /// The fields present, in field-number order.
    pub fn fields(&self) -> impl Iterator<Item = (u8, &str)> + '_ {
        self.fields.iter().map(|(field, value)| (*field, value.as_str()))
    }

    /// The message body, without the length header. It can exceed
    /// [`MESSAGE_BYTES_MAX`]; [`frame`] refuses it then.
    pub fn encode(&self) -> Vec<u8> {
        let (mut primary, mut secondary) = (0u64, 0u64);
        for &field in self.fields.keys() {
            if field <= 64 {
                primary |= 1 << (64 - u32::from(field));
            } else {
                secondary |= 1 << (128 - u32::from(field));
            }
        }
        if secondary != 0 {
            primary |= FIRST_BIT;
        }
        let mut out = format!("{}{primary:016X}", self.mti);
        if secondary != 0 {
            out.push_str(&format!("{secondary:016X}"));
        }
        for (&field, value) in &self.fields {
            match field_spec(field).map(|spec| spec.length) {
                Some(FieldLength::Llvar(_)) => out.push_str(&format!("{:02}", value.len())),
                Some(FieldLength::Lllvar(_)) => out.push_str(&format!("{:03}", value.len())),
                Some(FieldLength::Fixed(_)) | None => {}
            }
            out.push_str(value);
        }
        out.into_bytes()
    }

    /// Reads a message body (no length header), refusing anything outside the dialect.
    pub fn decode(body: &[u8]) -> Result<Message, ProtoError> {
        Message::decode_or_salvage(body).map_err(|refused| refused.error)
    }

    /// [`Message::decode`], but a refusal keeps the MTI and the fields read before the
    /// error, for a format-error answer.
    pub fn decode_or_salvage(body: &[u8]) -> Result<Message, RefusedMessage> {
        let mut mti = None;
        let mut fields = BTreeMap::new();
        match decode_into(body, &mut mti, &mut fields) {
            Ok(mti) => Ok(Message { mti, fields }),
            Err(error) => Err(RefusedMessage { mti, fields, error: error.into() }),
        }
    }
}

fn decode_into(body: &[u8], mti_out: &mut Option<Mti>, fields: &mut BTreeMap<u8, String>) -> Result<Mti, Iso8583Error> {
    let mut reader = Reader { rest: body };
    // Invariant: four digits are at most 9999.
    let mti = Mti(digits_value(Part::Mti, reader.take(Part::Mti, MTI_CHARS)?)? as u16);
    *mti_out = Some(mti);
    if body.len() > MESSAGE_BYTES_MAX {
        return Err(Iso8583Error::MessageTooLarge { len: body.len(), max: MESSAGE_BYTES_MAX });
    }
    let primary = read_bitmap(&mut reader, Part::PrimaryBitmap)?;
    let secondary = if primary & FIRST_BIT != 0 { read_bitmap(&mut reader, Part::SecondaryBitmap)? } else { 0 };
    if secondary & FIRST_BIT != 0 {
        return Err(Iso8583Error::TertiaryBitmap);
    }
    for field in 2..=FIELD_MAX {
        let present = if field <= 64 {
            primary & (1 << (64 - u32::from(field)))
        } else {
            secondary & (1 << (128 - u32::from(field)))
        };
        if present == 0 {
            continue;
        }
        let spec = field_spec(field).ok_or(Iso8583Error::NotADataElement { field })?;
        let len = match spec.length {
            FieldLength::Fixed(len) => usize::from(len),
            FieldLength::Llvar(max) => read_length_prefix(&mut reader, field, 2, max)?,
            FieldLength::Lllvar(max) => read_length_prefix(&mut reader, field, 3, max)?,
        };
        let part = Part::Field(field);
        let value = reader.take(part, len)?;
        check_class(part, spec.class, value)?;
        fields.insert(field, ascii_string(value));
    }
    if !reader.rest.is_empty() {
        return Err(Iso8583Error::TrailingBytes { count: reader.rest.len() });
    }
    Ok(mti)
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, part: Part, needed: usize) -> Result<&'a [u8], Iso8583Error> {
        let (head, tail) = self.rest.split_at_checked(needed).ok_or(Iso8583Error::Truncated {
            part,
            needed,
            available: self.rest.len(),
        })?;
        self.rest = tail;
        Ok(head)
    }
}

fn read_bitmap(reader: &mut Reader<'_>, part: Part) -> Result<u64, Iso8583Error> {
    let chars = reader.take(part, BITMAP_CHARS)?;
    check_class(part, CharClass::B, chars)?;
    // Invariant: every character is a hex digit, so each `to_digit(16)` is `Some`.
    Ok(chars.iter().fold(0u64, |bits, &c| (bits << 4) | u64::from(char::from(c).to_digit(16).unwrap_or(0))))
}

fn read_length_prefix(reader: &mut Reader<'_>, field: u8, digits: usize, max: u16) -> Result<usize, Iso8583Error> {
    let part = Part::LengthPrefix(field);
    let len = digits_value(part, reader.take(part, digits)?)?;
    if len > usize::from(max) {
        return Err(Iso8583Error::TooLong { part: Part::Field(field), len, max: usize::from(max) });
    }
    Ok(len)
}

fn check_class(part: Part, class: CharClass, bytes: &[u8]) -> Result<(), Iso8583Error> {
    match bytes.iter().enumerate().find(|&(offset, &byte)| !class.admits(offset, byte)) {
        Some((offset, &found)) => {
            Err(Iso8583Error::BadCharacter { part, expected: class, len: bytes.len(), found, offset })
        }
        None => Ok(()),
    }
}

fn exact_len(part: Part, bytes: &[u8], expected: usize) -> Result<&[u8], Iso8583Error> {
    if bytes.len() == expected {
        Ok(bytes)
    } else {
        Err(Iso8583Error::WrongLength { part, expected, len: bytes.len() })
    }
}

/// The decimal value of a run of at most a few digits (callers bound the count).
fn digits_value(part: Part, bytes: &[u8]) -> Result<usize, Iso8583Error> {
    check_class(part, CharClass::N, bytes)?;
    // Invariant: every byte is a digit, so `d - b'0'` is 0-9.
    Ok(bytes.iter().fold(0usize, |n, &d| n.saturating_mul(10).saturating_add(usize::from(d - b'0'))))
}

/// Bytes already checked to be ASCII, as a `String`.
fn ascii_string(bytes: &[u8]) -> String {
    bytes.iter().copied().map(char::from).collect()
}

/// `body` with its 2-byte big-endian length header in front.
pub fn frame(body: &[u8]) -> Result<Vec<u8>, ProtoError> {
    if body.len() > MESSAGE_BYTES_MAX {
        return Err(Iso8583Error::MessageTooLarge { len: body.len(), max: MESSAGE_BYTES_MAX }.into());
    }
    // MESSAGE_BYTES_MAX is below u16::MAX, so the length fits.
    let len = u16::try_from(body.len())
        .map_err(|_| Iso8583Error::MessageTooLarge { len: body.len(), max: MESSAGE_BYTES_MAX })?;
    let mut out = Vec::with_capacity(LENGTH_HEADER_BYTES + body.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
    Ok(out)
}

/// Takes one frame off the front of a received byte stream: `Some((consumed, body))`
/// when `buf` holds a whole frame (drop `consumed` bytes afterwards), `None` when more
/// bytes are needed. A header declaring more than [`MESSAGE_BYTES_MAX`] is refused: the
/// stream cannot be trusted past it.
pub fn split_frame(buf: &[u8]) -> Result<Option<(usize, &[u8])>, ProtoError> {
    let Some((header, rest)) = buf.split_first_chunk::<LENGTH_HEADER_BYTES>() else {
        return Ok(None);
    };
    let declared = usize::from(u16::from_be_bytes(*header));
    if declared > MESSAGE_BYTES_MAX {
        return Err(Iso8583Error::DeclaredTooLarge { declared, max: MESSAGE_BYTES_MAX }.into());
    }
    Ok(rest.get(..declared).map(|body| (LENGTH_HEADER_BYTES + declared, body)))
}

/// DE 48 as sub-elements: each a 2-digit tag, a 2-digit length and a printable value, in
/// the order received. A tag appears at most once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdditionalData {
    elements: Vec<(u8, String)>,
}

impl AdditionalData {
    pub fn new() -> AdditionalData {
        AdditionalData::default()
    }

    /// Reads DE 48, refusing a malformed tag or length, a length beyond the end, a
    /// non-printable value and a repeated tag.
    pub fn parse(de48: &str) -> Result<AdditionalData, ProtoError> {
        let mut data = AdditionalData::new();
        let mut reader = Reader { rest: de48.as_bytes() };
        while !reader.rest.is_empty() {
            let part = Part::SubElementHeader { offset: de48.len() - reader.rest.len() };
            let header = digits_value(part, reader.take(part, SUB_ELEMENT_HEADER_CHARS)?)?;
            // Four digits: the tag is the first two, at most 99; the length the last two.
            let (tag, len) = (u8::try_from(header / 100).unwrap_or(u8::MAX), header % 100);
            let value = reader.take(Part::SubElement(tag), len)?;
            data.insert(tag, ascii_string_checked(Part::SubElement(tag), value)?)?;
        }
        Ok(data)
    }

    pub fn get(&self, tag: u8) -> Option<&str> {
        self.elements.iter().find(|(t, _)| *t == tag).map(|(_, value)| value.as_str())
    }

    /// Appends a sub-element, refusing a tag over 99, a repeated tag, and a value over 99
    /// characters or not printable ASCII.
    pub fn insert(&mut self, tag: u8, value: impl Into<String>) -> Result<&mut AdditionalData, ProtoError> {
        let value = value.into();
        let part = Part::SubElement(tag);
        if tag > SUB_ELEMENT_TAG_MAX {
            return Err(Iso8583Error::OutOfRange { part, expected: "a tag of two digits, 00 to 99" }.into());
        }
        if self.get(tag).is_some() {
            return Err(Iso8583Error::DuplicateSubElement { tag }.into());
        }
        if value.len() > SUB_ELEMENT_VALUE_CHARS_MAX {
            return Err(Iso8583Error::TooLong { part, len: value.len(), max: SUB_ELEMENT_VALUE_CHARS_MAX }.into());
        }
        check_class(part, CharClass::Ans, value.as_bytes())?;
        self.elements.push((tag, value));
        Ok(self)
    }

    /// The sub-elements, in order.
    pub fn iter(&self) -> impl Iterator<Item = (u8, &str)> + '_ {
        self.elements.iter().map(|(tag, value)| (*tag, value.as_str()))
    }

    /// The DVV (sub-element 01), checked to be digits; `None` when absent.
    pub fn dvv(&self) -> Result<Option<&str>, ProtoError> {
        match self.get(DVV_TAG) {
            Some(dvv) => Ok(Some(check_dvv(dvv)?)),
            None => Ok(None),
        }
    }

    /// The DE 48 value: the sub-elements in order.
    pub fn encode(&self) -> String {
        self.elements.iter().map(|(tag, value)| format!("{tag:02}{:02}{value}", value.len())).collect()
    }
}

fn ascii_string_checked(part: Part, bytes: &[u8]) -> Result<String, Iso8583Error> {
    check_class(part, CharClass::Ans, bytes)?;
    Ok(ascii_string(bytes))
}

fn check_dvv(dvv: &str) -> Result<&str, ProtoError> {
    let part = Part::SubElement(DVV_TAG);
    if dvv.is_empty() {
        return Err(Iso8583Error::OutOfRange { part, expected: "a DVV of at least one digit" }.into());
    }
    check_class(part, CharClass::N, dvv.as_bytes())?;
    Ok(dvv)
}

/// The DVV carried in DE 48 sub-element 01, refusing malformed sub-elements and a DVV
/// that is not digits; `None` when DE 48 has no sub-element 01.
pub fn dvv_from_additional_data(de48: &str) -> Result<Option<String>, ProtoError> {
    Ok(AdditionalData::parse(de48)?.dvv()?.map(str::to_owned))
}

/// A DE 48 value carrying only the DVV: `"01"`, its 2-digit length, its digits.
pub fn additional_data_with_dvv(dvv: &str) -> Result<String, ProtoError> {
    let mut data = AdditionalData::new();
    data.insert(DVV_TAG, check_dvv(dvv)?)?;
    Ok(data.encode())
}

/// DE 4 as minor units of the currency in DE 49: exactly 12 digits.
pub fn parse_amount_minor(de4: &str) -> Result<u64, ProtoError> {
    let part = Part::Field(AMOUNT_FIELD);
    let digits = exact_len(part, de4.as_bytes(), AMOUNT_DIGITS)?;
    check_class(part, CharClass::N, digits)?;
    // Invariant: 12 checked digits, so no byte is below b'0' and the value fits in a u64.
    Ok(digits.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0')))
}

/// An amount in minor units as DE 4, refusing one of more than 12 digits.
pub fn format_amount_minor(amount_minor: u64) -> Result<String, ProtoError> {
    let text = format!("{amount_minor:012}");
    if text.len() > AMOUNT_DIGITS {
        return Err(
            Iso8583Error::TooLong { part: Part::Field(AMOUNT_FIELD), len: text.len(), max: AMOUNT_DIGITS }.into()
        );
    }
    Ok(text)
}

/// DE 7, transmission date and time in UTC, `MMDDhhmmss`: a real month and day (29
/// February included, the year being unknown) and time of day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TransmissionTime {
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
}

impl TransmissionTime {
    pub fn new(month: u8, day: u8, hour: u8, minute: u8, second: u8) -> Result<TransmissionTime, ProtoError> {
        let days_in_month = match month {
            1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
            4 | 6 | 9 | 11 => 30,
            2 => 29,
            _ => 0,
        };
        if day == 0 || day > days_in_month || hour > 23 || minute > 59 || second > 59 {
            return Err(Iso8583Error::OutOfRange {
                part: Part::Field(TRANSMISSION_TIME_FIELD),
                expected: "MMDDhhmmss with month 01-12, a day of that month, hour 00-23, minute and second 00-59",
            }
            .into());
        }
        Ok(TransmissionTime { month, day, hour, minute, second })
    }

    pub fn parse(de7: &str) -> Result<TransmissionTime, ProtoError> {
        let part = Part::Field(TRANSMISSION_TIME_FIELD);
        let digits = exact_len(part, de7.as_bytes(), TRANSMISSION_TIME_DIGITS)?;
        check_class(part, CharClass::N, digits)?;
        // Invariant: ten checked digits, so `d - b'0'` is 0-9 and a pair at most 99.
        let pair = |at: usize| match digits.get(at..at + 2) {
            Some(&[tens, units]) => (tens - b'0') * 10 + (units - b'0'),
            _ => u8::MAX,
        };
        TransmissionTime::new(pair(0), pair(2), pair(4), pair(6), pair(8))
    }

    /// The UTC date and time of a Unix timestamp, the year dropped.
    pub fn from_unix_secs(unix_secs: i64) -> TransmissionTime {
        let days = unix_secs.div_euclid(SECS_PER_DAY);
        let secs_of_day = unix_secs.rem_euclid(SECS_PER_DAY);
        // Howard Hinnant's civil_from_days: month and day of a count of days since 1970-01-01.
        let z = days + 719_468;
        let day_of_era = z.rem_euclid(146_097);
        let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
        let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
        let shifted_month = (5 * day_of_year + 2) / 153;
        let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
        let month = if shifted_month < 10 { shifted_month + 3 } else { shifted_month - 9 };
        // Invariant: month 1-12, day 1-31, hour 0-23, minute and second 0-59.
        TransmissionTime {
            month: month as u8,
            day: day as u8,
            hour: (secs_of_day / 3600) as u8,
            minute: (secs_of_day / 60 % 60) as u8,
            second: (secs_of_day % 60) as u8,
        }
    }

    pub fn month(self) -> u8 {
        self.month
    }

    pub fn day(self) -> u8 {
        self.day
    }

    pub fn hour(self) -> u8 {
        self.hour
    }

    pub fn minute(self) -> u8 {
        self.minute
    }

    pub fn second(self) -> u8 {
        self.second
    }
}

impl fmt::Display for TransmissionTime {
    /// `MMDDhhmmss`, the DE 7 value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02}{:02}{:02}{:02}{:02}", self.month, self.day, self.hour, self.minute, self.second)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::{collection, sample};

    /// Data elements, or DE 48 sub-elements, in order.
    type Fields = &'static [(u8, &'static str)];

    /// An 0100 authorization request carrying the fields Vouch reads. Primary bitmap,
    /// bit by bit (bit 1 is the top bit of the first hex digit):
    ///   bits  1-8:  2, 3, 4, 7      -> 0111 0010 = 72
    ///   bits  9-16: 11, 14          -> 0010 0100 = 24
    ///   bits 17-24: 22              -> 0000 0100 = 04
    ///   bits 25-32: none            -> 00
    ///   bits 33-40: 37              -> 0000 1000 = 08
    ///   bits 41-48: 41, 42, 48      -> 1100 0001 = C1
    ///   bits 49-56: 49              -> 1000 0000 = 80
    ///   bits 57-64: none            -> 00
    const AUTHORIZATION_REQUEST: &str = concat!(
        "0100",
        "7224040008C18000",
        "16",
        "4000001234567899", // DE 2, LLVAR
        "000000",           // DE 3
        "000000012550",     // DE 4: 125.50
        "1124103015",       // DE 7: 24 November 10:30:15
        "123456",           // DE 11
        "2812",             // DE 14
        "051",              // DE 22
        "633010123456",     // DE 37
        "TERM0001",         // DE 41
        "MERCHANT0000001",  // DE 42
        "010",
        "0106123456", // DE 48, LLLVAR: sub-element 01, 6 digits, DVV 123456
        "978",        // DE 49
    );

    /// An 0800 echo test with a secondary bitmap.
    ///   primary   bits 1-8:  1 (secondary present), 7 -> 1000 0010 = 82
    ///   primary   bits 9-16: 11                      -> 0010 0000 = 20
    ///   secondary bits 65-72: 70 (6th bit)           -> 0000 0100 = 04
    const ECHO_TEST: &str = concat!(
        "0800",
        "8220000000000000",
        "0400000000000000",
        "1124103015", // DE 7
        "000001",     // DE 11
        "301",        // DE 70: echo test
    );

    /// A request carrying fields Vouch does not use, which are read and kept.
    ///   primary   bits 1-8:   1, 3       -> 1010 0000 = A0
    ///   primary   bits 9-16:  11         -> 0010 0000 = 20
    ///   primary   bits 33-40: 35         -> 0010 0000 = 20
    ///   primary   bits 49-56: 52, 55     -> 0001 0010 = 12
    ///   secondary bits 121-128: 128      -> 0000 0001 = 01
    const UNUSED_FIELDS: &str = concat!(
        "0100",
        "A020000020001200",
        "0000000000000001",
        "000000", // DE 3
        "000002", // DE 11
        "24",
        "4000001234567899=2812101", // DE 35, track 2
        "0123456789abcdef",         // DE 52, b64 as hex, kept in its case
        "006",
        "9F2701",           // DE 55
        "A1B2C3D4E5F60718", // DE 128, b64 as hex
    );

    #[test]
    fn known_answers_decode_and_re_encode_byte_exactly() {
        let cases: [(&str, u16, Fields); 3] = [
            (
                AUTHORIZATION_REQUEST,
                100,
                &[
                    (2, "4000001234567899"),
                    (3, "000000"),
                    (4, "000000012550"),
                    (7, "1124103015"),
                    (11, "123456"),
                    (14, "2812"),
                    (22, "051"),
                    (37, "633010123456"),
                    (41, "TERM0001"),
                    (42, "MERCHANT0000001"),
                    (48, "0106123456"),
                    (49, "978"),
                ],
            ),
            (ECHO_TEST, 800, &[(7, "1124103015"), (11, "000001"), (70, "301")]),
            (
                UNUSED_FIELDS,
                100,
                &[
                    (3, "000000"),
                    (11, "000002"),
                    (35, "4000001234567899=2812101"),
                    (52, "0123456789abcdef"),
                    (55, "9F2701"),
                    (128, "A1B2C3D4E5F60718"),
                ],
            ),
        ];
        for (wire, mti, fields) in cases {
            let message = Message::decode(wire.as_bytes()).unwrap();
            assert_eq!(message.mti(), Mti::new(mti).unwrap(), "{wire}");
            assert_eq!(message.fields().collect::<Vec<_>>(), fields.to_vec(), "{wire}");
            assert_eq!(message.encode(), wire.as_bytes(), "{wire}");

            let mut built = Message::new(message.mti());
            for &(field, value) in fields {
                built.set(field, value).unwrap();
            }
            assert_eq!(built, message, "{wire}");
        }
    }

    #[test]
    fn authorization_request_helpers_read_its_fields() {
        let message = Message::decode(AUTHORIZATION_REQUEST.as_bytes()).unwrap();
        assert_eq!(message.mti().response_mti(), Some(Mti::AUTHORIZATION_RESPONSE));
        assert_eq!(parse_amount_minor(message.get(4).unwrap()), Ok(12_550));
        let time = TransmissionTime::parse(message.get(7).unwrap()).unwrap();
        assert_eq!((time.month(), time.day(), time.hour(), time.minute(), time.second()), (11, 24, 10, 30, 15));
        assert_eq!(dvv_from_additional_data(message.get(48).unwrap()), Ok(Some("123456".to_owned())));
    }

    #[test]
    fn lower_case_bitmaps_are_read_and_written_upper_case() {
        let cases = [(AUTHORIZATION_REQUEST, "7224040008C18000"), (UNUSED_FIELDS, "A020000020001200")];
        for (wire, bitmap) in cases {
            let lower = wire.replacen(bitmap, &bitmap.to_lowercase(), 1);
            assert_ne!(lower, wire);
            assert_eq!(Message::decode(lower.as_bytes()).unwrap().encode(), wire.as_bytes());
        }
    }

    #[test]
    fn an_empty_secondary_bitmap_is_read_and_not_written() {
        let wire = concat!("0800", "A000000000000000", "0000000000000000", "000000");
        let message = Message::decode(wire.as_bytes()).unwrap();
        assert_eq!(message.fields().collect::<Vec<_>>(), [(3, "000000")]);
        assert_eq!(message.encode(), concat!("0800", "2000000000000000", "000000").as_bytes());
    }

    fn iso_error(error: ProtoError) -> Iso8583Error {
        match error {
            ProtoError::Iso8583(error) => error,
            other => panic!("expected an ISO 8583 error, got {other:?}"),
        }
    }

    fn bad_char(part: Part, expected: CharClass, len: usize, found: u8, offset: usize) -> Iso8583Error {
        Iso8583Error::BadCharacter { part, expected, len, found, offset }
    }

    #[test]
    fn malformed_messages_are_refused_naming_what_is_wrong() {
        let oversized = format!("0800{}{}", "0000000000000000", "0".repeat(MESSAGE_BYTES_MAX));
        let cases: Vec<(&str, Vec<u8>, Iso8583Error)> = vec![
            ("empty", b"".to_vec(), Iso8583Error::Truncated { part: Part::Mti, needed: 4, available: 0 }),
            ("short MTI", b"01".to_vec(), Iso8583Error::Truncated { part: Part::Mti, needed: 4, available: 2 }),
            ("MTI not digits", b"01A00000000000000000".to_vec(), bad_char(Part::Mti, CharClass::N, 4, b'A', 2)),
            (
                "no bitmap",
                b"0800".to_vec(),
                Iso8583Error::Truncated { part: Part::PrimaryBitmap, needed: 16, available: 0 },
            ),
            (
                "bitmap not hex",
                b"0800822G000000000000".to_vec(),
                bad_char(Part::PrimaryBitmap, CharClass::B, 16, b'G', 3),
            ),
            (
                "secondary bitmap not hex",
                b"08008000000000000000 000000000000000".to_vec(),
                bad_char(Part::SecondaryBitmap, CharClass::B, 16, b' ', 0),
            ),
            (
                "secondary bitmap missing",
                b"08008000000000000000".to_vec(),
                Iso8583Error::Truncated { part: Part::SecondaryBitmap, needed: 16, available: 0 },
            ),
            ("bitmap names field 65", b"080080000000000000008000000000000000".to_vec(), Iso8583Error::TertiaryBitmap),
            (
                "truncated fixed field",
                b"080020000000000000000000".to_vec(),
                Iso8583Error::Truncated { part: Part::Field(3), needed: 6, available: 4 },
            ),
            (
                "truncated length prefix",
                b"010040000000000000001".to_vec(),
                Iso8583Error::Truncated { part: Part::LengthPrefix(2), needed: 2, available: 1 },
            ),
            (
                "truncated variable field",
                b"0100400000000000000016123456".to_vec(),
                Iso8583Error::Truncated { part: Part::Field(2), needed: 16, available: 6 },
            ),
            (
                "length prefix not digits",
                b"010040000000000000001x4000001234567899".to_vec(),
                bad_char(Part::LengthPrefix(2), CharClass::N, 2, b'x', 1),
            ),
            (
                "length over the field's maximum",
                b"010040000000000000002012345678901234567890".to_vec(),
                Iso8583Error::TooLong { part: Part::Field(2), len: 20, max: 19 },
            ),
            (
                "LLLVAR length over the field's maximum",
                [b"01000000000000000400".as_slice(), b"999", "0".repeat(999).as_bytes()].concat(),
                Iso8583Error::TooLong { part: Part::Field(54), len: 999, max: 120 },
            ),
            (
                "non-digit in an n field",
                b"01001000000000000000000000001a00".to_vec(),
                bad_char(Part::Field(4), CharClass::N, 12, b'a', 9),
            ),
            (
                "space in an an field",
                b"01100000000002000000 5".to_vec(),
                bad_char(Part::Field(39), CharClass::An, 2, b' ', 0),
            ),
            (
                "non-printable in an ans field",
                b"01000000000000800000TERM\x00001".to_vec(),
                bad_char(Part::Field(41), CharClass::Ans, 8, 0x00, 4),
            ),
            (
                "byte over 0x7E in an ans field",
                b"01000000000000800000TERM\xC3\xA901".to_vec(),
                bad_char(Part::Field(41), CharClass::Ans, 8, 0xC3, 4),
            ),
            (
                "x+n field without C or D",
                b"01000000001000000000X00000100".to_vec(),
                bad_char(Part::Field(28), CharClass::XN, 9, b'X', 0),
            ),
            (
                "b field not hex",
                b"010000000000000010000123456789ABCDEZ".to_vec(),
                bad_char(Part::Field(52), CharClass::B, 16, b'Z', 15),
            ),
            ("trailing bytes", b"08002000000000000000000000\r\n".to_vec(), Iso8583Error::TrailingBytes { count: 2 }),
            (
                "oversized message",
                oversized.clone().into_bytes(),
                Iso8583Error::MessageTooLarge { len: oversized.len(), max: MESSAGE_BYTES_MAX },
            ),
        ];
        for (name, wire, expected) in cases {
            assert_eq!(Message::decode(&wire).map_err(iso_error), Err(expected), "{name}");
        }
    }

    #[test]
    fn errors_say_which_field_what_was_expected_and_what_was_found() {
        let error = Message::decode(b"01001000000000000000000000001a00").unwrap_err();
        assert_eq!(error.to_string(), "ISO 8583 field 4: expected 12 digits, found 'a' at offset 9");
        let error = Message::decode(b"01000000000000800000TERM\x00001").unwrap_err();
        assert_eq!(
            error.to_string(),
            "ISO 8583 field 41: expected 8 printable ASCII characters, found byte 0x00 at offset 4"
        );
    }

    #[test]
    fn a_refused_message_keeps_its_mti_and_the_fields_before_the_error() {
        // DE 11, DE 41 and a DE 48 whose length runs past the end.
        //   bits 9-16: 11 -> 20; bits 41-48: 41, 48 -> 81
        let wire = b"01000020000000810000123456TERM0001050012";
        let refused = Message::decode_or_salvage(wire).unwrap_err();
        assert_eq!(refused.mti, Some(Mti::AUTHORIZATION_REQUEST));
        assert_eq!(refused.fields, BTreeMap::from([(11, "123456".to_owned()), (41, "TERM0001".to_owned())]));
        assert_eq!(
            iso_error(refused.error),
            Iso8583Error::Truncated { part: Part::Field(48), needed: 50, available: 3 }
        );

        let refused = Message::decode_or_salvage(b"01x0").unwrap_err();
        assert_eq!((refused.mti, refused.fields.len()), (None, 0));
    }

    #[test]
    fn set_refuses_what_the_field_cannot_hold() {
        let cases: [(u8, &str, Iso8583Error); 9] = [
            (0, "1", Iso8583Error::NotADataElement { field: 0 }),
            (1, "1", Iso8583Error::NotADataElement { field: 1 }),
            (65, "1", Iso8583Error::NotADataElement { field: 65 }),
            (129, "1", Iso8583Error::NotADataElement { field: 129 }),
            (4, "12550", Iso8583Error::WrongLength { part: Part::Field(4), expected: 12, len: 5 }),
            (4, "00000001255a", bad_char(Part::Field(4), CharClass::N, 12, b'a', 11)),
            (2, "12345678901234567890", Iso8583Error::TooLong { part: Part::Field(2), len: 20, max: 19 }),
            (41, "TERM\t001", bad_char(Part::Field(41), CharClass::Ans, 8, b'\t', 4)),
            (52, "0123456789ABCDEG", bad_char(Part::Field(52), CharClass::B, 16, b'G', 15)),
        ];
        for (field, value, expected) in cases {
            let mut message = Message::new(Mti::AUTHORIZATION_REQUEST);
            assert_eq!(message.set(field, value).map(|_| ()).map_err(iso_error), Err(expected), "{field} {value:?}");
            assert_eq!(message.fields().count(), 0);
        }
    }

    #[test]
    fn debug_shows_card_numbers_dvvs_and_pins_only_as_lengths() {
        let message = Message::decode(AUTHORIZATION_REQUEST.as_bytes()).unwrap();
        let shown = format!("{message:?}");
        assert!(shown.contains("2: <16 characters>") && shown.contains("48: <10 characters>"), "{shown}");
        assert!(!shown.contains("4000001234567899") && !shown.contains("0106123456"), "{shown}");
        assert!(shown.contains("41: \"TERM0001\""), "{shown}");
        let refused = Message::decode_or_salvage(format!("{AUTHORIZATION_REQUEST}0").as_bytes()).unwrap_err();
        assert!(!format!("{refused:?}").contains("4000001234567899"));
    }

    #[test]
    fn every_data_element_has_a_format_and_the_bitmap_flags_none() {
        for field in 0..=u8::MAX {
            let expected = (2..=128).contains(&field) && field != 65;
            assert_eq!(field_spec(field).is_some(), expected, "field {field}");
        }
        let cases = [
            (2, llvar(CharClass::N, 19)),
            (4, fixed(CharClass::N, 12)),
            (7, fixed(CharClass::N, 10)),
            (37, fixed(CharClass::An, 12)),
            (42, fixed(CharClass::Ans, 15)),
            (48, lllvar(CharClass::Ans, 999)),
            (49, fixed(CharClass::An, 3)),
            (52, fixed(CharClass::B, 16)),
            (70, fixed(CharClass::N, 3)),
            (128, fixed(CharClass::B, 16)),
        ];
        for (field, spec) in cases {
            assert_eq!(field_spec(field), Some(spec), "field {field}");
        }
    }

    #[test]
    fn mti_parse_display_and_response() {
        assert_eq!("0100".parse::<Mti>(), Ok(Mti::AUTHORIZATION_REQUEST));
        assert_eq!(Mti::NETWORK_MANAGEMENT_RESPONSE.to_string(), "0810");
        assert_eq!(
            "100".parse::<Mti>().map_err(iso_error),
            Err(Iso8583Error::WrongLength { part: Part::Mti, expected: 4, len: 3 })
        );
        assert_eq!("01a0".parse::<Mti>().map_err(iso_error), Err(bad_char(Part::Mti, CharClass::N, 4, b'a', 2)));
        assert_eq!(Mti::new(10_000), None);
        let cases = [(100, Some(110)), (800, Some(810)), (200, Some(210)), (120, Some(130)), (110, None), (140, None)];
        for (request, response) in cases {
            assert_eq!(Mti::new(request).unwrap().response_mti(), response.and_then(Mti::new), "{request:04}");
        }
    }

    #[test]
    fn frames_are_built_and_split() {
        let body = ECHO_TEST.as_bytes();
        let framed = frame(body).unwrap();
        assert_eq!(framed.get(..2), Some([0x00, 0x37].as_slice()), "55 bytes");
        assert_eq!(split_frame(&framed), Ok(Some((57, body))));

        let mut stream = framed.clone();
        stream.extend_from_slice(&frame(b"").unwrap());
        stream.extend_from_slice(&framed[..10]);
        assert_eq!(split_frame(&stream), Ok(Some((57, body))));
        assert_eq!(split_frame(&stream[57..]), Ok(Some((2, b"".as_slice()))));
        assert_eq!(split_frame(&stream[59..]), Ok(None), "a partial frame waits for more");
        assert_eq!(split_frame(&[0x00]), Ok(None));
        assert_eq!(split_frame(&[]), Ok(None));

        let cases: [(&[u8], Iso8583Error); 2] = [
            (&[0x10, 0x01], Iso8583Error::DeclaredTooLarge { declared: 4097, max: MESSAGE_BYTES_MAX }),
            (&[0xFF, 0xFF, b'0'], Iso8583Error::DeclaredTooLarge { declared: 65_535, max: MESSAGE_BYTES_MAX }),
        ];
        for (stream, expected) in cases {
            assert_eq!(split_frame(stream).map_err(iso_error), Err(expected));
        }
        assert_eq!(
            frame(&[b'0'; MESSAGE_BYTES_MAX + 1]).map_err(iso_error),
            Err(Iso8583Error::MessageTooLarge { len: MESSAGE_BYTES_MAX + 1, max: MESSAGE_BYTES_MAX })
        );
        assert_eq!(frame(&[b'0'; MESSAGE_BYTES_MAX]).map(|f| f.len()), Ok(MESSAGE_BYTES_MAX + 2));
    }

    #[test]
    fn additional_data_sub_elements_are_read() {
        let cases: [(&str, Fields, Option<&str>); 4] = [
            ("0106123456", &[(1, "123456")], Some("123456")),
            ("0203AB 010498769900", &[(2, "AB "), (1, "9876"), (99, "")], Some("9876")),
            ("0203ABC", &[(2, "ABC")], None),
            ("", &[], None),
        ];
        for (de48, elements, dvv) in cases {
            let data = AdditionalData::parse(de48).unwrap();
            assert_eq!(data.iter().collect::<Vec<_>>(), elements.to_vec(), "{de48:?}");
            assert_eq!(data.dvv(), Ok(dvv), "{de48:?}");
            assert_eq!(data.encode(), de48);
            assert_eq!(dvv_from_additional_data(de48), Ok(dvv.map(str::to_owned)));
        }
        assert_eq!(additional_data_with_dvv("123456").as_deref(), Ok("0106123456"));
    }

    #[test]
    fn malformed_additional_data_is_refused() {
        let header = |offset| Part::SubElementHeader { offset };
        let cases: [(&str, Iso8583Error); 7] = [
            ("0A06123456", bad_char(header(0), CharClass::N, 4, b'A', 1)),
            ("01x6123456", bad_char(header(0), CharClass::N, 4, b'x', 2)),
            ("0106123", Iso8583Error::Truncated { part: Part::SubElement(1), needed: 6, available: 3 }),
            ("010612345602", Iso8583Error::Truncated { part: header(10), needed: 4, available: 2 }),
            ("010612345X", bad_char(Part::SubElement(1), CharClass::N, 6, b'X', 5)),
            ("0100", Iso8583Error::OutOfRange { part: Part::SubElement(1), expected: "a DVV of at least one digit" }),
            ("01011010212", Iso8583Error::DuplicateSubElement { tag: 1 }),
        ];
        for (de48, expected) in cases {
            assert_eq!(dvv_from_additional_data(de48).map_err(iso_error), Err(expected), "{de48:?}");
        }
        assert_eq!(
            AdditionalData::parse("0203A\u{7}C").map_err(iso_error),
            Err(bad_char(Part::SubElement(2), CharClass::Ans, 3, 0x07, 1))
        );

        let mut data = AdditionalData::new();
        let cases: [(u8, String, Iso8583Error); 3] = [
            (
                100,
                "1".into(),
                Iso8583Error::OutOfRange { part: Part::SubElement(100), expected: "a tag of two digits, 00 to 99" },
            ),
            (2, "9".repeat(100), Iso8583Error::TooLong { part: Part::SubElement(2), len: 100, max: 99 }),
            (2, "\n".into(), bad_char(Part::SubElement(2), CharClass::Ans, 1, b'\n', 0)),
        ];
        for (tag, value, expected) in cases {
            assert_eq!(data.insert(tag, value).map(|_| ()).map_err(iso_error), Err(expected));
        }
        assert_eq!(
            additional_data_with_dvv("12a").map_err(iso_error),
            Err(bad_char(Part::SubElement(1), CharClass::N, 3, b'a', 2))
        );
    }

    #[test]
    fn amounts_are_minor_units_in_twelve_digits() {
        assert_eq!(parse_amount_minor("000000012550"), Ok(12_550));
        assert_eq!(parse_amount_minor("999999999999"), Ok(999_999_999_999));
        assert_eq!(format_amount_minor(12_550).as_deref(), Ok("000000012550"));
        assert_eq!(format_amount_minor(999_999_999_999).as_deref(), Ok("999999999999"));
        let refused: [(Result<_, ProtoError>, Iso8583Error); 3] = [
            (parse_amount_minor("12550"), Iso8583Error::WrongLength { part: Part::Field(4), expected: 12, len: 5 }),
            (parse_amount_minor("-00000012550"), bad_char(Part::Field(4), CharClass::N, 12, b'-', 0)),
            (
                format_amount_minor(1_000_000_000_000).map(|_| 0),
                Iso8583Error::TooLong { part: Part::Field(4), len: 13, max: 12 },
            ),
        ];
        for (result, expected) in refused {
            assert_eq!(result.map_err(iso_error), Err(expected));
        }
    }

    #[test]
    fn transmission_time_parses_formats_and_follows_the_clock() {
        for de7 in ["1124103015", "0229000000", "1231235959", "0101000000"] {
            assert_eq!(TransmissionTime::parse(de7).map(|t| t.to_string()).as_deref(), Ok(de7));
        }
        let out_of_range = Iso8583Error::OutOfRange {
            part: Part::Field(7),
            expected: "MMDDhhmmss with month 01-12, a day of that month, hour 00-23, minute and second 00-59",
        };
        let refused = [
            ("1324103015", out_of_range),
            ("0024103015", out_of_range),
            ("0230000000", out_of_range),
            ("0431000000", out_of_range),
            ("1100103015", out_of_range),
            ("1124243015", out_of_range),
            ("1124106015", out_of_range),
            ("1124103060", out_of_range),
            ("11241030", Iso8583Error::WrongLength { part: Part::Field(7), expected: 10, len: 8 }),
            ("11241030a5", bad_char(Part::Field(7), CharClass::N, 10, b'a', 8)),
        ];
        for (de7, expected) in refused {
            assert_eq!(TransmissionTime::parse(de7).map_err(iso_error), Err(expected), "{de7}");
        }
        let clock = [
            (0, "0101000000"),
            (-1, "1231235959"),
            (951_782_400, "0229000000"),   // 2000-02-29T00:00:00Z
            (1_700_000_000, "1114221320"), // 2023-11-14T22:13:20Z
            (1_795_516_215, "1124103015"), // 2026-11-24T10:30:15Z
            (4_107_542_399, "0228235959"), // 2100-02-28T23:59:59Z
        ];
        for (unix_secs, de7) in clock {
            assert_eq!(TransmissionTime::from_unix_secs(unix_secs).to_string(), de7, "{unix_secs}");
        }
    }

    fn class_byte(class: CharClass) -> BoxedStrategy<u8> {
        const DIGITS: &[u8] = b"0123456789";
        match class {
            CharClass::N | CharClass::XN => sample::select(DIGITS).boxed(),
            CharClass::An => {
                sample::select(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz".as_slice()).boxed()
            }
            CharClass::Ans => (0x20u8..=0x7E).boxed(),
            CharClass::Ns => {
                sample::select((0x20u8..=0x7E).filter(|b| !b.is_ascii_alphabetic()).collect::<Vec<u8>>()).boxed()
            }
            CharClass::Z => sample::select(b"0123456789:;<=>?D".as_slice()).boxed(),
            CharClass::B => sample::select(b"0123456789ABCDEFabcdef".as_slice()).boxed(),
        }
    }

    fn field_value(field: u8) -> BoxedStrategy<(u8, String)> {
        let Some(spec) = field_spec(field) else { unreachable!("fields come from the data elements") };
        let lengths = match spec.length {
            FieldLength::Fixed(len) => usize::from(len)..=usize::from(len),
            FieldLength::Llvar(max) | FieldLength::Lllvar(max) => 0..=usize::from(max).min(48),
        };
        (lengths, any::<bool>())
            .prop_flat_map(move |(len, debit)| {
                collection::vec(class_byte(spec.class), len).prop_map(move |mut bytes| {
                    if let (CharClass::XN, Some(first)) = (spec.class, bytes.first_mut()) {
                        *first = if debit { b'D' } else { b'C' };
                    }
                    (field, ascii_string(&bytes))
                })
            })
            .boxed()
    }

    fn valid_message() -> impl Strategy<Value = Message> {
        let field = (2u8..=128).prop_filter("65 is the tertiary bitmap flag", |f| *f != 65);
        (0u16..=9999, collection::vec(field.prop_flat_map(field_value), 0..16)).prop_map(|(mti, fields)| {
            let mut message = Message::new(Mti(mti));
            for (field, value) in fields {
                message.set(field, value).unwrap();
            }
            message
        })
    }

    /// Bytes that look like a message up to the fields, so decoding gets past the
    /// bitmaps and into field parsing.
    fn near_message() -> impl Strategy<Value = Vec<u8>> {
        let hex = || collection::vec(sample::select(b"0123456789ABCDEFabcdef".as_slice()), 16);
        let tail = collection::vec(sample::select(b"0123456789AZaz =\x00\x7F\xFF".as_slice()), 0..300);
        (collection::vec(sample::select(b"0123456789".as_slice()), 4), hex(), proptest::option::of(hex()), tail)
            .prop_map(|(mti, primary, secondary, tail)| [mti, primary, secondary.unwrap_or_default(), tail].concat())
    }

    fn assert_stable_if_accepted(bytes: &[u8]) -> Result<(), TestCaseError> {
        if let Ok(message) = Message::decode(bytes) {
            let encoded = message.encode();
            prop_assert_eq!(Message::decode(&encoded), Ok(message));
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn valid_messages_round_trip(message in valid_message()) {
            let body = message.encode();
            prop_assert_eq!(Message::decode(&body), Ok(message));
            let framed = frame(&body).unwrap();
            prop_assert_eq!(split_frame(&framed), Ok(Some((body.len() + LENGTH_HEADER_BYTES, body.as_slice()))));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in collection::vec(any::<u8>(), 0..MESSAGE_BYTES_MAX + 64)) {
            let _ = Message::decode_or_salvage(&bytes);
            let _ = split_frame(&bytes);
            let text = String::from_utf8_lossy(&bytes);
            let _ = AdditionalData::parse(&text);
            let _ = TransmissionTime::parse(&text);
            let _ = parse_amount_minor(&text);
            let _ = text.parse::<Mti>();
            assert_stable_if_accepted(&bytes)?;
        }

        #[test]
        fn near_messages_never_panic_and_re_encode_stably(bytes in near_message()) {
            let _ = Message::decode_or_salvage(&bytes);
            assert_stable_if_accepted(&bytes)?;
        }

        #[test]
        fn altered_known_messages_never_panic(index in any::<proptest::sample::Index>(), byte in any::<u8>()) {
            for wire in [AUTHORIZATION_REQUEST, ECHO_TEST, UNUSED_FIELDS] {
                let mut bytes = wire.as_bytes().to_vec();
                let at = index.index(bytes.len());
                bytes[at] = byte;
                assert_stable_if_accepted(&bytes)?;
                assert_stable_if_accepted(&bytes[..at])?;
            }
        }

        #[test]
        fn additional_data_round_trips(elements in collection::btree_map(0u8..=99, collection::vec(0x20u8..=0x7E, 0..=99), 0..8)) {
            let mut data = AdditionalData::new();
            for (tag, value) in elements {
                data.insert(tag, ascii_string(&value)).unwrap();
            }
            prop_assert_eq!(AdditionalData::parse(&data.encode()), Ok(data));
        }

        #[test]
        fn transmission_time_from_any_instant_parses_back(unix_secs in -10_000_000_000i64..10_000_000_000) {
            let time = TransmissionTime::from_unix_secs(unix_secs);
            prop_assert_eq!(TransmissionTime::parse(&time.to_string()), Ok(time));
        }
    }
}
