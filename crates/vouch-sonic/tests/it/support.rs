//! Test channel: deterministic noise, offsets and clock-rate changes.

pub use vouch_sonic::channel::{NoiseRng, recording};
use vouch_sonic::{DecodeEvent, DecodedPayload, Profile, StreamDecoder};

/// Uniform in `0..n`, from the channel's seeded generator.
pub fn below(rng: &mut NoiseRng, n: usize) -> usize {
    (rng.next_u64() % n as u64) as usize
}

/// Band-limited resampling by windowed-sinc interpolation: output sample `i`
/// is the input at position `i * step`. `step = 1 / (1 + ppm * 1e-6)` models
/// a receiver clock that runs `ppm` fast; `step = 48000 / 44100` converts
/// 48 kHz to 44.1 kHz.
pub fn resample(input: &[f32], step: f64) -> Vec<f32> {
    // 16 taps keep interpolation error near -40 dB up to 0.42 fs (19.8 kHz at
    // 48 kHz), well below the noise the tests add, and cheap in debug builds.
    const HALF_TAPS: isize = 8;
    let out_len = ((input.len() as f64 - 1.0) / step).floor().max(0.0) as usize;
    // Anti-aliasing when shrinking: lower the sinc cutoff.
    let cutoff = (1.0 / step).min(1.0);
    (0..out_len)
        .map(|i| {
            let t = i as f64 * step;
            let base = t.floor() as isize;
            let mut acc = 0.0f64;
            for k in (base - HALF_TAPS + 1)..=(base + HALF_TAPS) {
                let Some(&x) = usize::try_from(k).ok().and_then(|k| input.get(k)) else {
                    continue;
                };
                let d = t - k as f64;
                let window = 0.5 + 0.5 * (std::f64::consts::PI * d / HALF_TAPS as f64).cos();
                let arg = std::f64::consts::PI * d * cutoff;
                let sinc = if arg.abs() < 1e-9 { 1.0 } else { arg.sin() / arg };
                acc += f64::from(x) * sinc * cutoff * window;
            }
            acc as f32
        })
        .collect()
}

/// Feeds `samples` in `chunk`-sized pieces and finishes the stream.
pub fn stream_events(rate: u32, profiles: &[Profile], samples: &[f32], chunk: usize) -> Vec<DecodeEvent> {
    let mut decoder = StreamDecoder::with_profiles(rate, profiles).expect("supported rate");
    let mut events = Vec::new();
    for piece in samples.chunks(chunk.max(1)) {
        events.extend(decoder.push(piece));
    }
    events.extend(decoder.finish());
    events
}

pub fn payloads(events: &[DecodeEvent]) -> Vec<DecodedPayload> {
    events
        .iter()
        .filter_map(|e| match e {
            DecodeEvent::Payload(p) => Some(p.clone()),
            _ => None,
        })
        .collect()
}
