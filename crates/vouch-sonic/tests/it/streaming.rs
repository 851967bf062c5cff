//! Chunked feeding, progress reporting, truncation and back-to-back frames.

use vouch_sonic::{DecodeEvent, DecodedPayload, Encoder, Error, Profile, StreamDecoder, decode_all};

use crate::support::{NoiseRng, below, payloads, recording, stream_events};

/// Events other than progress, whose granularity follows the chunk size.
fn outcomes(events: Vec<DecodeEvent>) -> Vec<DecodeEvent> {
    events.into_iter().filter(|e| !matches!(e, DecodeEvent::Progress { .. })).collect()
}

#[test]
fn any_chunking_gives_the_same_outcomes() {
    let mut rng = NoiseRng::new(5);
    let payload = rng.bytes(90);
    let tx = Encoder::new(Profile::Audible, 44_100).unwrap().encode(&payload).unwrap();
    let rx = recording(&tx, 12_345, 3_000, Some(5.0), &mut rng);
    let whole = outcomes(stream_events(44_100, &[Profile::Audible], &rx, rx.len()));
    assert_eq!(payloads(&whole).len(), 1);
    assert_eq!(whole.len(), 2, "frame start and payload");
    for chunk in [1usize, 7, 128, 441, 4_096] {
        let chunked = outcomes(stream_events(44_100, &[Profile::Audible], &rx, chunk));
        assert_eq!(chunked, whole, "chunk {chunk}");
    }
    // Irregular chunks, as a microphone callback might deliver.
    let mut decoder = StreamDecoder::with_profiles(44_100, &[Profile::Audible]).unwrap();
    let (mut events, mut at) = (Vec::new(), 0);
    while at < rx.len() {
        let len = (1 + below(&mut rng, 3_000)).min(rx.len() - at);
        events.extend(decoder.push(&rx[at..at + len]));
        at += len;
    }
    events.extend(decoder.finish());
    assert_eq!(outcomes(events), whole);
}

#[test]
fn progress_is_reported_in_order_before_the_payload() {
    let tx = Encoder::new(Profile::Audible, 48_000).unwrap().encode(&[0xabu8; 120]).unwrap();
    let events = stream_events(48_000, &[Profile::Audible], &tx, 960);
    let mut last = 0;
    let mut total = None;
    for event in &events {
        if let DecodeEvent::FrameStarted { symbols_total, frame_index: 0, frame_count: 1, start_sample: 0, .. } = event
        {
            total = Some(*symbols_total);
        }
        if let DecodeEvent::Progress { symbols_received, symbols_total, .. } = event {
            assert_eq!(Some(*symbols_total), total, "progress follows the frame start");
            assert!(*symbols_received > last && symbols_received < symbols_total);
            last = *symbols_received;
        }
    }
    assert!(last > 0);
    assert!(matches!(events.last(), Some(DecodeEvent::Payload(_))));
}

#[test]
fn truncated_recording_is_a_clear_error() {
    let tx = Encoder::new(Profile::Ultrasonic, 48_000).unwrap().encode(&[1u8; 100]).unwrap();
    let cut = &tx[..tx.len() * 2 / 3];
    let err = decode_all(48_000, cut).unwrap_err();
    match err {
        Error::Truncated { received_symbols, expected_symbols } => {
            assert!(received_symbols < expected_symbols);
            assert!(received_symbols > 20);
        }
        other => panic!("expected Truncated, got {other:?}"),
    }
    assert!(err.to_string().contains("recording ends inside a frame"));
}

#[test]
fn missing_frame_of_a_long_payload_is_reported_not_guessed() {
    let payload = vec![0x42u8; 600];
    let tx = Encoder::new(Profile::Audible, 48_000).unwrap().encode(&payload).unwrap();
    // Blank out the middle of the recording, wiping the second of 3 frames.
    let mut rx = tx.clone();
    let third = rx.len() / 3;
    rx[third + 2_000..2 * third - 2_000].iter_mut().for_each(|s| *s = 0.0);
    let events = stream_events(48_000, &[Profile::Audible], &rx, 4800);
    assert!(payloads(&events).is_empty());
    assert!(events.iter().any(|e| matches!(
        e,
        DecodeEvent::FrameDropped { reason: Error::Incomplete { received_frames: 2, expected_frames: 3 }, .. }
    )));
}

#[test]
fn consecutive_payloads_in_one_stream_are_all_delivered() {
    let encoder = Encoder::new(Profile::Audible, 48_000).unwrap();
    let mut rx = Vec::new();
    for text in [&b"request 12.50"[..], b"approved", b"receipt"] {
        rx.extend(encoder.encode(text).unwrap());
        rx.extend(vec![0.0f32; 4_800]);
    }
    let found: Vec<Vec<u8>> = payloads(&stream_events(48_000, &[Profile::Audible], &rx, 2048))
        .into_iter()
        .map(|p: DecodedPayload| p.bytes)
        .collect();
    assert_eq!(found, vec![b"request 12.50".to_vec(), b"approved".to_vec(), b"receipt".to_vec()]);
}
