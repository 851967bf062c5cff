//! Payload in, samples, payload out: every rate and profile, random payloads
//! and lengths, and the multi-frame limit.

use proptest::prelude::*;
use vouch_sonic::{DecodedPayload, Encoder, PAYLOAD_BYTES_MAX, Profile, SAMPLE_RATES_HZ, decode_all};

use crate::support::{NoiseRng, payloads, recording, stream_events};

proptest! {
    // Each case synthesises and decodes up to ~2 s of audio in a debug
    // build, so the case count stays small.
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    #[test]
    fn random_payloads_round_trip(
        payload in proptest::collection::vec(any::<u8>(), 0..=160),
        lead in 0usize..20_000,
        ultrasonic in any::<bool>(),
        rate_index in 0usize..2,
    ) {
        let profile = if ultrasonic { Profile::Ultrasonic } else { Profile::Audible };
        let rate = SAMPLE_RATES_HZ[rate_index];
        let tx = Encoder::new(profile, rate).unwrap().encode(&payload).unwrap();
        let rx = recording(&tx, lead, 2_000, None, &mut NoiseRng::new(1));
        let events = stream_events(rate, &[profile], &rx, 4096);
        prop_assert_eq!(payloads(&events), vec![DecodedPayload { profile, bytes: payload }]);
    }
}

#[test]
fn every_rate_and_profile_round_trips_through_decode_all() {
    let mut rng = NoiseRng::new(7);
    for rate in SAMPLE_RATES_HZ {
        for profile in Profile::ALL {
            let payload = rng.bytes(48);
            let tx = Encoder::new(profile, rate).unwrap().encode(&payload).unwrap();
            let rx = recording(&tx, 3_333, 1_000, Some(20.0), &mut rng);
            let found = decode_all(rate, &rx).unwrap();
            assert_eq!(found, vec![DecodedPayload { profile, bytes: payload }], "{rate} {profile}");
        }
    }
}

#[test]
fn largest_payload_spans_frames_and_reassembles() {
    let mut rng = NoiseRng::new(11);
    let payload = rng.bytes(PAYLOAD_BYTES_MAX);
    let tx = Encoder::new(Profile::Ultrasonic, 48_000).unwrap().encode(&payload).unwrap();
    let events = stream_events(48_000, &[Profile::Ultrasonic], &tx, 48_000);
    let frames = events.iter().filter(|e| matches!(e, vouch_sonic::DecodeEvent::FrameStarted { .. })).count();
    assert_eq!(frames, 5);
    assert_eq!(payloads(&events), vec![DecodedPayload { profile: Profile::Ultrasonic, bytes: payload }]);
}

#[test]
fn empty_payload_round_trips() {
    let tx = Encoder::new(Profile::Audible, 44_100).unwrap().encode(&[]).unwrap();
    let found = decode_all(44_100, &tx).unwrap();
    assert_eq!(found, vec![DecodedPayload { profile: Profile::Audible, bytes: Vec::new() }]);
}
