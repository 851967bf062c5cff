//! Framing: how a payload becomes frames and frames become tone symbols, and
//! back.
//!
//! A payload gets a CRC-32 appended (the *message*), which is split into at
//! most [`SEGMENTS_MAX`] segments, one per frame. Each frame carries:
//!
//! * a 4-byte header (format version, profile, segment index/count, segment
//!   length, an 8-bit message tag) protected by RS(8, 4);
//! * the segment plus a CRC-32 over header and segment, protected by
//!   Reed-Solomon parity of about a quarter of its length, split into as
//!   many codewords as GF(256) needs and byte-interleaved.
//!
//! Both blocks are scrambled, then each byte becomes two 4-bit tone values
//! sent in the same symbol (so a lost symbol costs at most two bytes).

use crate::Error;
use crate::fec::{self, CODEWORD_BYTES_MAX, ReedSolomon};
use crate::profile::{GROUPS, Profile};

/// Largest payload one transmission carries.
pub const PAYLOAD_BYTES_MAX: usize = 1024;
/// Largest message slice one frame carries.
pub(crate) const SEGMENT_BYTES_MAX: usize = 240;
/// Frames per payload; the header spends 4 bits on index and on count.
pub(crate) const SEGMENTS_MAX: usize = 16;
const CRC_BYTES: usize = 4;
pub(crate) const HEADER_INFO_BYTES: usize = 4;
const HEADER_PARITY_BYTES: usize = 4;
const HEADER_BLOCK_BYTES: usize = HEADER_INFO_BYTES + HEADER_PARITY_BYTES;
/// Symbols the header occupies right after the preamble.
pub(crate) const HEADER_SYMBOLS: usize = HEADER_BLOCK_BYTES * 2 / GROUPS;
/// Parity is at least this and otherwise a quarter of the protected bytes.
const DATA_PARITY_BYTES_MIN: usize = 8;
const DATA_PARITY_DIVISOR: usize = 4;
const FORMAT_VERSION: u8 = 1;
const HEADER_SCRAMBLE_SEED: u16 = 0x1d2b;
const DATA_SCRAMBLE_SEED: u16 = 0x6a35;

/// Decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) profile: Profile,
    pub(crate) segment_index: u8,
    pub(crate) segment_count: u8,
    pub(crate) segment_len: usize,
    /// Low byte of the message CRC-32: tells frames of different messages
    /// apart before the whole message can be checked.
    pub(crate) message_tag: u8,
}

impl Header {
    fn to_bytes(self) -> [u8; HEADER_INFO_BYTES] {
        [
            (FORMAT_VERSION << 4) | self.profile.code(),
            (self.segment_index << 4) | (self.segment_count - 1),
            // Segment lengths are 1..=240 so they fit a byte.
            self.segment_len as u8,
            self.message_tag,
        ]
    }

    fn from_bytes(bytes: [u8; HEADER_INFO_BYTES]) -> Option<Self> {
        let [format, segments, segment_len, message_tag] = bytes;
        if format >> 4 != FORMAT_VERSION {
            return None;
        }
        let profile = Profile::from_code(format & 0x0f)?;
        let segment_index = segments >> 4;
        let segment_count = (segments & 0x0f) + 1;
        let segment_len = usize::from(segment_len);
        if segment_index >= segment_count || segment_len == 0 || segment_len > SEGMENT_BYTES_MAX {
            return None;
        }
        Some(Self { profile, segment_index, segment_count, segment_len, message_tag })
    }
}

/// Shape of a frame's data block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DataLayout {
    /// `(data bytes, parity bytes)` per codeword.
    pub(crate) codewords: Vec<(usize, usize)>,
    pub(crate) symbols: usize,
}

impl DataLayout {
    pub(crate) fn for_segment(segment_len: usize) -> Self {
        let protected = segment_len + CRC_BYTES;
        let parity = protected.div_ceil(DATA_PARITY_DIVISOR).max(DATA_PARITY_BYTES_MIN);
        let count = (protected + parity).div_ceil(CODEWORD_BYTES_MAX);
        let codewords = (0..count)
            .map(|i| ((protected - i).div_ceil(count), parity / count + usize::from(i < parity % count)))
            .collect();
        Self { codewords, symbols: ((protected + parity) * 2).div_ceil(GROUPS) }
    }

    fn codeword_lengths(&self) -> Vec<usize> {
        self.codewords.iter().map(|(d, p)| d + p).collect()
    }

    pub(crate) fn parity_bytes(&self) -> usize {
        self.codewords.iter().map(|(_, p)| p).sum()
    }
}

/// Splits a payload into frames: `(header, segment bytes)` pairs.
pub(crate) fn split_payload(profile: Profile, payload: &[u8]) -> Result<Vec<(Header, Vec<u8>)>, Error> {
    if payload.len() > PAYLOAD_BYTES_MAX {
        return Err(Error::PayloadTooLarge { len_bytes: payload.len(), max_bytes: PAYLOAD_BYTES_MAX });
    }
    let crc = crc32fast::hash(payload);
    let mut message = payload.to_vec();
    message.extend_from_slice(&crc.to_be_bytes());
    let count = message.len().div_ceil(SEGMENT_BYTES_MAX);
    if count > SEGMENTS_MAX {
        return Err(Error::PayloadTooLarge { len_bytes: payload.len(), max_bytes: PAYLOAD_BYTES_MAX });
    }
    // Even split, so no frame is a tiny tail.
    let segment_len = message.len().div_ceil(count);
    Ok(message
        .chunks(segment_len)
        .enumerate()
        .map(|(index, chunk)| {
            (
                Header {
                    profile,
                    segment_index: index as u8,
                    segment_count: count as u8,
                    segment_len: chunk.len(),
                    message_tag: crc as u8,
                },
                chunk.to_vec(),
            )
        })
        .collect())
}

/// Tone values (one per group) for every header and data symbol of a frame.
pub(crate) fn frame_symbols(header: Header, segment: &[u8]) -> Vec<[u8; GROUPS]> {
    let header_bytes = header.to_bytes();
    let mut header_block = ReedSolomon::new(HEADER_PARITY_BYTES).encode(&header_bytes);
    fec::scramble(&mut header_block, HEADER_SCRAMBLE_SEED);

    let mut protected = segment.to_vec();
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header_bytes);
    hasher.update(segment);
    protected.extend_from_slice(&hasher.finalize().to_be_bytes());
    let layout = DataLayout::for_segment(segment.len());
    let count = layout.codewords.len();
    let codewords: Vec<Vec<u8>> = layout
        .codewords
        .iter()
        .enumerate()
        .map(|(i, &(_, parity))| {
            let data: Vec<u8> = protected.iter().skip(i).step_by(count).copied().collect();
            ReedSolomon::new(parity).encode(&data)
        })
        .collect();
    let mut data_block = fec::interleave(&codewords);
    fec::scramble(&mut data_block, DATA_SCRAMBLE_SEED);

    let mut symbols = bytes_to_symbols(&header_block);
    symbols.extend(bytes_to_symbols(&data_block));
    symbols
}

fn bytes_to_symbols(bytes: &[u8]) -> Vec<[u8; GROUPS]> {
    let nibbles: Vec<u8> = bytes.iter().flat_map(|b| [b >> 4, b & 0x0f]).collect();
    nibbles
        .chunks(GROUPS)
        .map(|chunk| {
            let mut symbol = [0u8; GROUPS];
            symbol.iter_mut().zip(chunk).for_each(|(s, n)| *s = *n);
            symbol
        })
        .collect()
}

/// One demodulated symbol: the strongest tone per group and how much it
/// stood out (energy ratio to the runner-up, at least 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct SoftSymbol {
    pub(crate) values: [u8; GROUPS],
    pub(crate) margins: [f32; GROUPS],
}

/// Bytes and per-byte reliabilities (the weaker of the byte's two nibbles).
fn symbols_to_bytes(symbols: &[SoftSymbol], byte_count: usize) -> (Vec<u8>, Vec<f32>) {
    let nibbles: Vec<(u8, f32)> = symbols.iter().flat_map(|s| s.values.into_iter().zip(s.margins)).collect();
    nibbles
        .chunks_exact(2)
        .take(byte_count)
        .map(|pair| match pair {
            [(hi, r_hi), (lo, r_lo)] => ((hi << 4) | (lo & 0x0f), r_hi.min(*r_lo)),
            _ => (0, 0.0),
        })
        .unzip()
}

/// Decodes the header from its symbols.
pub(crate) fn decode_header(symbols: &[SoftSymbol]) -> Result<Header, Error> {
    let (mut block, reliability) = symbols_to_bytes(symbols, HEADER_BLOCK_BYTES);
    if block.len() != HEADER_BLOCK_BYTES {
        return Err(Error::HeaderUnreadable);
    }
    fec::scramble(&mut block, HEADER_SCRAMBLE_SEED);
    let rs = ReedSolomon::new(HEADER_PARITY_BYTES);
    // At most two erasures: the header must keep redundancy to reject the
    // noise that occasionally passes the preamble test.
    let decoded = rs.decode(&mut block, &[]).or_else(|| {
        let mut order: Vec<usize> = (0..HEADER_BLOCK_BYTES).collect();
        order.sort_by(|&a, &b| {
            let ra = reliability.get(a).copied().unwrap_or(0.0);
            let rb = reliability.get(b).copied().unwrap_or(0.0);
            ra.total_cmp(&rb)
        });
        rs.decode(&mut block, order.get(..2).unwrap_or(&[]))
    });
    decoded.ok_or(Error::HeaderUnreadable)?;
    let mut info = [0u8; HEADER_INFO_BYTES];
    info.iter_mut().zip(&block).for_each(|(i, b)| *i = *b);
    Header::from_bytes(info).ok_or(Error::HeaderUnreadable)
}

/// Recovers and checks a frame's segment from its data symbols.
pub(crate) fn decode_data(header: Header, symbols: &[SoftSymbol]) -> Result<Vec<u8>, Error> {
    let layout = DataLayout::for_segment(header.segment_len);
    let lengths = layout.codeword_lengths();
    let total: usize = lengths.iter().sum();
    let truncated = Error::Truncated { received_symbols: symbols.len(), expected_symbols: layout.symbols };
    let (mut stream, reliability) = symbols_to_bytes(symbols, total);
    if stream.len() != total {
        return Err(truncated);
    }
    fec::scramble(&mut stream, DATA_SCRAMBLE_SEED);
    let codewords = fec::deinterleave(&stream, &lengths).ok_or_else(|| truncated.clone())?;
    let reliabilities = fec::deinterleave(&reliability, &lengths).ok_or(truncated)?;

    let count = codewords.len();
    let protected_len = header.segment_len + CRC_BYTES;
    let mut protected = vec![0u8; protected_len];
    for (i, ((mut codeword, reliability), &(data_len, parity))) in
        codewords.into_iter().zip(reliabilities).zip(&layout.codewords).enumerate()
    {
        ReedSolomon::new(parity)
            .decode_soft(&mut codeword, &reliability)
            .ok_or(Error::DataUncorrectable { parity_bytes: layout.parity_bytes() })?;
        for (k, &byte) in codeword.iter().take(data_len).enumerate() {
            if let Some(slot) = protected.get_mut(i + k * count) {
                *slot = byte;
            }
        }
    }
    let (segment, crc_bytes) = protected.split_at(header.segment_len);
    let mut expected = [0u8; CRC_BYTES];
    expected.iter_mut().zip(crc_bytes).for_each(|(e, b)| *e = *b);
    let expected = u32::from_be_bytes(expected);
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header.to_bytes());
    hasher.update(segment);
    let actual = hasher.finalize();
    if actual != expected {
        return Err(Error::FrameCrcMismatch { expected, actual });
    }
    Ok(segment.to_vec())
}

/// Collects the frames of one message and checks the whole payload.
#[derive(Debug, Default)]
pub(crate) struct Reassembler {
    pending: Option<Pending>,
}

#[derive(Debug)]
struct Pending {
    message_tag: u8,
    segments: Vec<Option<Vec<u8>>>,
}

/// What accepting a segment produced.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Assembled {
    /// More frames are needed.
    Waiting,
    /// The message is complete: its payload, or why it was refused.
    Done(Result<Vec<u8>, Error>),
}

impl Reassembler {
    /// Adds a checked segment. A frame from a different message abandons the
    /// incomplete one, which is returned as an error alongside.
    pub(crate) fn accept(&mut self, header: Header, segment: Vec<u8>) -> (Option<Error>, Assembled) {
        let mut abandoned = None;
        let matches = self.pending.as_ref().is_some_and(|p| {
            p.message_tag == header.message_tag && p.segments.len() == usize::from(header.segment_count)
        });
        if !matches {
            abandoned = self.take_incomplete();
            self.pending = Some(Pending {
                message_tag: header.message_tag,
                segments: vec![None; usize::from(header.segment_count)],
            });
        }
        let Some(pending) = self.pending.as_mut() else {
            return (abandoned, Assembled::Waiting);
        };
        if let Some(slot) = pending.segments.get_mut(usize::from(header.segment_index)) {
            *slot = Some(segment);
        }
        if pending.segments.iter().any(Option::is_none) {
            return (abandoned, Assembled::Waiting);
        }
        let message: Vec<u8> = pending.segments.iter().flatten().flatten().copied().collect();
        self.pending = None;
        (abandoned, Assembled::Done(check_message(message)))
    }

    /// Drops an incomplete message, reporting how much of it arrived.
    pub(crate) fn take_incomplete(&mut self) -> Option<Error> {
        let pending = self.pending.take()?;
        Some(Error::Incomplete {
            received_frames: pending.segments.iter().filter(|s| s.is_some()).count(),
            expected_frames: pending.segments.len(),
        })
    }
}

fn check_message(mut message: Vec<u8>) -> Result<Vec<u8>, Error> {
    if message.len() < CRC_BYTES || message.len() > PAYLOAD_BYTES_MAX + CRC_BYTES {
        return Err(Error::PayloadTooLarge {
            len_bytes: message.len().saturating_sub(CRC_BYTES),
            max_bytes: PAYLOAD_BYTES_MAX,
        });
    }
    let crc_bytes = message.split_off(message.len() - CRC_BYTES);
    let mut expected = [0u8; CRC_BYTES];
    expected.iter_mut().zip(&crc_bytes).for_each(|(e, b)| *e = *b);
    let expected = u32::from_be_bytes(expected);
    let actual = crc32fast::hash(&message);
    if actual != expected {
        return Err(Error::PayloadCrcMismatch { expected, actual });
    }
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hard(symbols: &[[u8; GROUPS]]) -> Vec<SoftSymbol> {
        symbols.iter().map(|&values| SoftSymbol { values, margins: [10.0; GROUPS] }).collect()
    }

    #[test]
    fn header_round_trips_and_rejects_bad_fields() {
        let header = Header {
            profile: Profile::Ultrasonic,
            segment_index: 3,
            segment_count: 5,
            segment_len: 206,
            message_tag: 0xa7,
        };
        assert_eq!(Header::from_bytes(header.to_bytes()), Some(header));
        assert_eq!(Header::from_bytes([0x21, 0x04, 10, 0]), None, "version");
        assert_eq!(Header::from_bytes([0x19, 0x04, 10, 0]), None, "profile");
        assert_eq!(Header::from_bytes([0x10, 0x54, 10, 0]), None, "index");
        assert_eq!(Header::from_bytes([0x10, 0x04, 0, 0]), None, "length");
    }

    #[test]
    fn split_refuses_oversize_and_bounds_frames() {
        assert_eq!(
            split_payload(Profile::Audible, &[0u8; PAYLOAD_BYTES_MAX + 1]),
            Err(Error::PayloadTooLarge { len_bytes: PAYLOAD_BYTES_MAX + 1, max_bytes: PAYLOAD_BYTES_MAX })
        );
        let frames = split_payload(Profile::Audible, &[7u8; PAYLOAD_BYTES_MAX]).unwrap();
        assert!(frames.len() <= SEGMENTS_MAX);
        assert!(frames.iter().all(|(h, s)| h.segment_len == s.len() && s.len() <= SEGMENT_BYTES_MAX));
        let empty = split_payload(Profile::Audible, &[]).unwrap();
        assert_eq!(empty.len(), 1);
        assert_eq!(empty[0].1.len(), CRC_BYTES);
    }

    #[test]
    fn layout_keeps_codewords_within_the_field() {
        for len in 1..=SEGMENT_BYTES_MAX {
            let layout = DataLayout::for_segment(len);
            let data: usize = layout.codewords.iter().map(|(d, _)| d).sum();
            assert_eq!(data, len + CRC_BYTES);
            assert!(layout.codewords.iter().all(|(d, p)| d + p <= CODEWORD_BYTES_MAX && *p >= 4));
        }
    }

    #[test]
    fn frame_round_trips_through_symbols_with_errors() {
        let payload: Vec<u8> = (0..=255u8).cycle().take(700).collect();
        let frames = split_payload(Profile::Audible, &payload).unwrap();
        let mut reassembler = Reassembler::default();
        let mut result = None;
        for (header, segment) in frames {
            let mut symbols = hard(&frame_symbols(header, &segment));
            // Wreck a few data symbols.
            for k in [HEADER_SYMBOLS + 1, HEADER_SYMBOLS + 9, HEADER_SYMBOLS + 40] {
                symbols[k].values = [0, 1, 2, 3];
            }
            let decoded_header = decode_header(&symbols[..HEADER_SYMBOLS]).unwrap();
            assert_eq!(decoded_header, header);
            let data = decode_data(decoded_header, &symbols[HEADER_SYMBOLS..]).unwrap();
            assert_eq!(data, segment);
            let (abandoned, assembled) = reassembler.accept(decoded_header, data);
            assert_eq!(abandoned, None);
            if let Assembled::Done(r) = assembled {
                result = Some(r);
            }
        }
        assert_eq!(result, Some(Ok(payload)));
    }

    #[test]
    fn corrupted_segment_fails_crc_not_silently() {
        let frames = split_payload(Profile::Audible, b"approve 12.50 EUR").unwrap();
        let (header, segment) = &frames[0];
        let symbols = hard(&frame_symbols(*header, segment));
        // Decoding with a different header (as if the header lied) must fail
        // the frame CRC even though the codewords are clean.
        let mut other = *header;
        other.message_tag ^= 1;
        assert!(matches!(decode_data(other, &symbols[HEADER_SYMBOLS..]), Err(Error::FrameCrcMismatch { .. })));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 48, ..Default::default() })]

        /// Any payload survives framing when up to 1 in 12 data symbols is
        /// replaced by garbage; a lying reliability never causes a wrong
        /// segment, only a refusal.
        #[test]
        fn frames_survive_scattered_symbol_errors(
            payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..=PAYLOAD_BYTES_MAX),
            seed in proptest::prelude::any::<u64>(),
        ) {
            let mut state = seed | 1;
            let mut next = move || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state
            };
            let mut reassembler = Reassembler::default();
            let mut outcome = None;
            for (header, segment) in split_payload(Profile::Audible, &payload).unwrap() {
                let mut symbols = hard(&frame_symbols(header, &segment));
                let data_symbols = symbols.len() - HEADER_SYMBOLS;
                for _ in 0..data_symbols / 12 {
                    let k = HEADER_SYMBOLS + (next() as usize) % data_symbols;
                    symbols[k].values = [next() as u8 & 15, next() as u8 & 15, 3, 9];
                }
                let header = decode_header(&symbols[..HEADER_SYMBOLS]).unwrap();
                let data = decode_data(header, &symbols[HEADER_SYMBOLS..]).unwrap();
                proptest::prop_assert_eq!(&data, &segment);
                if let (_, Assembled::Done(result)) = reassembler.accept(header, data) {
                    outcome = Some(result);
                }
            }
            proptest::prop_assert_eq!(outcome, Some(Ok(payload)));
        }
    }

    #[test]
    fn reassembler_abandons_mixed_messages_and_checks_the_payload() {
        let a = split_payload(Profile::Audible, &[1u8; 500]).unwrap();
        let b = split_payload(Profile::Audible, &[2u8; 10]).unwrap();
        let mut r = Reassembler::default();
        assert_eq!(r.accept(a[0].0, a[0].1.clone()), (None, Assembled::Waiting));
        let (abandoned, done) = r.accept(b[0].0, b[0].1.clone());
        assert_eq!(abandoned, Some(Error::Incomplete { received_frames: 1, expected_frames: 3 }));
        assert_eq!(done, Assembled::Done(Ok(vec![2u8; 10])));
        let mut tampered = b[0].1.clone();
        tampered[0] ^= 1;
        let (_, done) = r.accept(b[0].0, tampered);
        assert!(matches!(done, Assembled::Done(Err(Error::PayloadCrcMismatch { .. }))));
    }
}
