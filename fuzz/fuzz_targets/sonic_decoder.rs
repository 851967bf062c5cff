//! Fuzzes the vouch-sonic streaming decoder with hostile audio.
//!
//! Input layout: byte 0 picks the mode, sample rate and profiles; bytes 1-2
//! the chunk size the samples are pushed in; the rest are samples:
//!
//! * mode 0: raw little-endian `f32` (NaN, infinities, huge values);
//! * mode 1: little-endian `i16` PCM;
//! * mode 2: a real transmission of a known payload with the input added to
//!   it as `i8` noise; any payload that decodes must be that payload.
//!
//! Invariants checked besides "never panics": progress never exceeds the
//! frame length, and no payload is larger than the modem allows.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vouch_sonic::{DecodeEvent, Encoder, PAYLOAD_BYTES_MAX, Profile, SAMPLE_RATES_HZ, StreamDecoder};

const KNOWN_PAYLOAD: &[u8] = b"vouch fuzz payload";
const SAMPLES_MAX: usize = 200_000;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let Some((chunk_bytes, body)) = rest.split_first_chunk::<2>() else {
        return;
    };
    let mode = selector % 3;
    let rate = SAMPLE_RATES_HZ[usize::from(selector >> 2) % SAMPLE_RATES_HZ.len()];
    let profiles: &[Profile] = match (selector >> 3) % 3 {
        0 => &Profile::ALL,
        1 => &[Profile::Audible],
        _ => &[Profile::Ultrasonic],
    };
    let chunk = usize::from(u16::from_le_bytes(*chunk_bytes)).max(1);

    let samples: Vec<f32> = match mode {
        0 => body.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        1 => body.chunks_exact(2).map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32_768.0).collect(),
        _ => {
            let profile = profiles[0];
            let Ok(encoder) = Encoder::new(profile, rate) else {
                return;
            };
            let Ok(mut clean) = encoder.encode(KNOWN_PAYLOAD) else {
                return;
            };
            for (sample, &noise) in clean.iter_mut().zip(body) {
                *sample += f32::from(noise as i8) / 64.0;
            }
            clean
        }
    };
    let samples = &samples[..samples.len().min(SAMPLES_MAX)];

    let Ok(mut decoder) = StreamDecoder::with_profiles(rate, profiles) else {
        return;
    };
    let mut events = Vec::new();
    for piece in samples.chunks(chunk) {
        events.extend(decoder.push(piece));
    }
    events.extend(decoder.finish());
    for event in events {
        match event {
            DecodeEvent::Progress { symbols_received, symbols_total, .. } => {
                assert!(symbols_received < symbols_total);
            }
            DecodeEvent::Payload(payload) => {
                assert!(payload.bytes.len() <= PAYLOAD_BYTES_MAX);
                if mode == 2 {
                    assert_eq!(payload.bytes, KNOWN_PAYLOAD, "wrong payload accepted");
                }
            }
            DecodeEvent::FrameStarted { .. } | DecodeEvent::FrameDropped { .. } => {}
        }
    }
});
