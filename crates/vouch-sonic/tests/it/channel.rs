//! Imperfect channels: noise, clock drift, mismatched sample rates, and two
//! transmissions at once.

use vouch_sonic::{DecodedPayload, Encoder, Profile, SAMPLE_RATES_HZ};

use crate::support::{NoiseRng, below, payloads, recording, resample, stream_events};

#[test]
fn decodes_at_minus_6_db_full_band_snr_on_every_rate_and_profile() {
    let mut rng = NoiseRng::new(0x5eed);
    for rate in SAMPLE_RATES_HZ {
        for profile in Profile::ALL {
            let payload = rng.bytes(64);
            let tx = Encoder::new(profile, rate).unwrap().encode(&payload).unwrap();
            let lead = below(&mut rng, rate as usize / 2);
            let rx = recording(&tx, lead, 2_000, Some(-6.0), &mut rng);
            let events = stream_events(rate, &[profile], &rx, 1024);
            assert_eq!(payloads(&events), vec![DecodedPayload { profile, bytes: payload }], "{rate} Hz {profile}");
        }
    }
}

#[test]
fn tolerates_plus_minus_100_ppm_clock_drift_with_margin() {
    let mut rng = NoiseRng::new(3);
    // A 240-byte payload is the longest single frame (about 2.4 s), where
    // drift accumulates most; 300 ppm shows the margin beyond the spec.
    let payload = rng.bytes(200);
    for profile in Profile::ALL {
        let tx = Encoder::new(profile, 48_000).unwrap().encode(&payload).unwrap();
        for ppm in [-300.0, -100.0, 100.0, 300.0] {
            let drifted = resample(&tx, 1.0 / (1.0 + ppm * 1e-6));
            let rx = recording(&drifted, 777, 1_000, Some(0.0), &mut rng);
            let events = stream_events(48_000, &[profile], &rx, 8192);
            assert_eq!(
                payloads(&events),
                vec![DecodedPayload { profile, bytes: payload.clone() }],
                "{profile} {ppm} ppm"
            );
        }
    }
}

#[test]
fn sender_and_receiver_may_use_different_sample_rates() {
    let mut rng = NoiseRng::new(9);
    let payload = rng.bytes(40);
    for profile in Profile::ALL {
        let at_48k = Encoder::new(profile, 48_000).unwrap().encode(&payload).unwrap();
        let heard_at_44k = resample(&at_48k, 48_000.0 / 44_100.0);
        let events = stream_events(44_100, &[profile], &heard_at_44k, 2048);
        assert_eq!(payloads(&events).len(), 1, "48k -> 44.1k {profile}");

        let at_44k = Encoder::new(profile, 44_100).unwrap().encode(&payload).unwrap();
        let heard_at_48k = resample(&at_44k, 44_100.0 / 48_000.0);
        let events = stream_events(48_000, &[profile], &heard_at_48k, 2048);
        assert_eq!(payloads(&events).len(), 1, "44.1k -> 48k {profile}");
    }
}

#[test]
fn audible_and_ultrasonic_transmissions_overlapping_in_time_both_decode() {
    let mut rng = NoiseRng::new(21);
    let (a, u) = (rng.bytes(30), rng.bytes(50));
    let audible = Encoder::new(Profile::Audible, 48_000).unwrap().encode(&a).unwrap();
    let ultrasonic = Encoder::new(Profile::Ultrasonic, 48_000).unwrap().encode(&u).unwrap();
    let mut mix = vec![0.0f32; 5_000 + audible.len().max(ultrasonic.len()) + 5_000];
    for (i, s) in audible.iter().enumerate() {
        mix[1_000 + i] += s;
    }
    for (i, s) in ultrasonic.iter().enumerate() {
        mix[5_000 + i] += s;
    }
    let found = payloads(&stream_events(48_000, &Profile::ALL, &mix, 4800));
    assert!(found.contains(&DecodedPayload { profile: Profile::Audible, bytes: a }));
    assert!(found.contains(&DecodedPayload { profile: Profile::Ultrasonic, bytes: u }));
    assert_eq!(found.len(), 2);
}
