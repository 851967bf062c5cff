//! Vouch's data-over-sound modem, sans IO: [`Encoder`] turns a payload into
//! `f32` audio samples and [`StreamDecoder`] turns samples, fed in chunks of
//! any size, back into payloads. A point-of-sale terminal and a phone use it
//! to pass a payment request and its signed approval across a shop counter.
//!
//! # Signal
//! Multi-tone FSK: 64 tones 75 Hz apart in four interleaved groups of 16;
//! every 15 ms symbol sends one tone per group (16 bits). Two bands
//! ([`Profile::Audible`] 1.5-6.3 kHz, [`Profile::Ultrasonic`] 15-19.8 kHz),
//! at 44.1 or 48 kHz. A frame is an 80 ms preamble (detection and timing), a
//! Reed-Solomon-protected header (profile, frame index/count, length) and a
//! data block: segment + CRC-32, Reed-Solomon parity of about 25%,
//! interleaved and scrambled. Payloads up to [`PAYLOAD_BYTES_MAX`] bytes
//! carry a CRC-32 of their own and span up to five frames.
//!
//! # Guarantees
//! A payload is only reported after its frame CRC-32s and the payload CRC-32
//! check; anything else is reported as [`DecodeEvent::FrameDropped`] with the
//! reason. Oversize payloads are refused, never truncated. Untrusted samples
//! never panic the decoder.
//!
//! [`channel`] simulates what lies between: silence and white noise at a given SNR,
//! from a seeded generator, for tests, benchmarks and demos.

pub mod channel;
mod demodulate;
mod fec;
mod frame;
mod gf256;
mod modulate;
mod profile;

pub use demodulate::StreamDecoder;
pub use frame::PAYLOAD_BYTES_MAX;
pub use modulate::{Encoder, PEAK_AMPLITUDE};
pub use profile::{Profile, SAMPLE_RATES_HZ};

/// Everything that can go wrong encoding or decoding; also the reason a
/// dropped frame carries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("unsupported sample rate {sample_rate_hz} Hz: expected 44100 or 48000")]
    UnsupportedSampleRate { sample_rate_hz: u32 },
    #[error("unknown profile {name:?}: expected \"audible\" or \"ultrasonic\"")]
    UnknownProfile { name: String },
    #[error("payload is {len_bytes} bytes: at most {max_bytes} bytes fit in one transmission")]
    PayloadTooLarge { len_bytes: usize, max_bytes: usize },
    #[error(
        "frame header unreadable: a preamble was found but the header failed its \
         Reed-Solomon check or does not name a known format"
    )]
    HeaderUnreadable,
    #[error(
        "frame data uncorrectable: more symbol errors than its {parity_bytes} \
         Reed-Solomon parity bytes can repair"
    )]
    DataUncorrectable { parity_bytes: usize },
    #[error("frame CRC-32 mismatch: expected {expected:#010x}, computed {actual:#010x}")]
    FrameCrcMismatch { expected: u32, actual: u32 },
    #[error("payload CRC-32 mismatch: expected {expected:#010x}, computed {actual:#010x}")]
    PayloadCrcMismatch { expected: u32, actual: u32 },
    #[error(
        "recording ends inside a frame: {received_symbols} of {expected_symbols} \
         symbols arrived"
    )]
    Truncated { received_symbols: usize, expected_symbols: usize },
    #[error("payload incomplete: {received_frames} of its {expected_frames} frames arrived")]
    Incomplete { received_frames: usize, expected_frames: usize },
    #[error("no frame found: no preamble rose above the detection threshold")]
    NoSignal,
}

/// A payload that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedPayload {
    pub profile: Profile,
    pub bytes: Vec<u8>,
}

/// What [`StreamDecoder::push`] and [`StreamDecoder::finish`] report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeEvent {
    /// A preamble and a valid header arrived: a frame is coming in.
    FrameStarted {
        profile: Profile,
        /// Index of the preamble's first sample in the stream.
        start_sample: u64,
        frame_index: u8,
        frame_count: u8,
        symbols_total: usize,
    },
    /// More of the current frame arrived (at most once per push).
    Progress { profile: Profile, symbols_received: usize, symbols_total: usize },
    /// A frame (or a payload assembled from frames) was discarded.
    FrameDropped { profile: Profile, start_sample: u64, reason: Error },
    /// A complete, checked payload.
    Payload(DecodedPayload),
}

/// Decodes a whole recording at once: every payload found, or the reason
/// none was (the last dropped frame's, else [`Error::NoSignal`]).
pub fn decode_all(sample_rate_hz: u32, samples: &[f32]) -> Result<Vec<DecodedPayload>, Error> {
    let mut decoder = StreamDecoder::new(sample_rate_hz)?;
    let mut events = decoder.push(samples);
    events.extend(decoder.finish());
    let mut payloads = Vec::new();
    let mut last_reason = None;
    for event in events {
        match event {
            DecodeEvent::Payload(payload) => payloads.push(payload),
            DecodeEvent::FrameDropped { reason, .. } => last_reason = Some(reason),
            DecodeEvent::FrameStarted { .. } | DecodeEvent::Progress { .. } => {}
        }
    }
    if payloads.is_empty() {
        return Err(last_reason.unwrap_or(Error::NoSignal));
    }
    Ok(payloads)
}
