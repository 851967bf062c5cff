//! What must never happen: false frames from silence or noise, wrong
//! payloads from a damaged signal, silent truncation of a large payload.

use vouch_sonic::{DecodeEvent, Encoder, Error, PAYLOAD_BYTES_MAX, Profile, StreamDecoder, decode_all};

use crate::support::{NoiseRng, payloads, recording, stream_events};

#[test]
fn silence_yields_no_signal() {
    assert_eq!(decode_all(48_000, &vec![0.0f32; 96_000]), Err(Error::NoSignal));
    assert_eq!(decode_all(44_100, &[]), Err(Error::NoSignal));
}

#[test]
fn pure_noise_yields_no_events_at_all() {
    let mut rng = NoiseRng::new(99);
    for rate in [44_100u32, 48_000] {
        let noise: Vec<f32> = (0..rate as usize * 3).map(|_| (rng.gaussian() * 0.3) as f32).collect();
        let events = stream_events(rate, &Profile::ALL, &noise, 4096);
        assert_eq!(events, Vec::<DecodeEvent>::new(), "{rate} Hz");
    }
}

#[test]
fn heavy_noise_never_produces_a_wrong_payload() {
    let mut rng = NoiseRng::new(1234);
    let encoder = Encoder::new(Profile::Audible, 48_000).unwrap();
    for snr_db in [-12.0, -14.0, -16.0] {
        let payload = rng.bytes(64);
        let tx = encoder.encode(&payload).unwrap();
        let rx = recording(&tx, 500, 500, Some(snr_db), &mut rng);
        for found in payloads(&stream_events(48_000, &[Profile::Audible], &rx, 4096)) {
            assert_eq!(found.bytes, payload, "at {snr_db} dB");
        }
    }
}

#[test]
fn damaged_frames_are_dropped_with_a_reason() {
    let encoder = Encoder::new(Profile::Audible, 48_000).unwrap();
    let mut tx = encoder.encode(&[7u8; 150]).unwrap();
    // Overwrite a long stretch of data symbols with a loud steady tone.
    let len = tx.len();
    for (i, s) in tx[len / 3..len / 3 + 20_000].iter_mut().enumerate() {
        *s = 0.9 * (i as f32 * 0.37).sin();
    }
    let events = stream_events(48_000, &[Profile::Audible], &tx, 4800);
    assert!(payloads(&events).is_empty());
    assert!(events.iter().any(|e| matches!(
        e,
        DecodeEvent::FrameDropped { reason: Error::DataUncorrectable { .. } | Error::FrameCrcMismatch { .. }, .. }
    )));
    assert!(matches!(decode_all(48_000, &tx), Err(Error::DataUncorrectable { .. } | Error::FrameCrcMismatch { .. })));
}

#[test]
fn oversize_payload_is_refused_and_unsupported_rates_are_errors() {
    let encoder = Encoder::new(Profile::Audible, 48_000).unwrap();
    assert_eq!(
        encoder.encode(&vec![0u8; PAYLOAD_BYTES_MAX + 1]),
        Err(Error::PayloadTooLarge { len_bytes: PAYLOAD_BYTES_MAX + 1, max_bytes: PAYLOAD_BYTES_MAX })
    );
    assert!(matches!(
        Encoder::new(Profile::Audible, 8_000),
        Err(Error::UnsupportedSampleRate { sample_rate_hz: 8_000 })
    ));
    assert!(StreamDecoder::new(96_000).is_err());
    assert!(decode_all(16_000, &[0.0; 10]).is_err());
}
