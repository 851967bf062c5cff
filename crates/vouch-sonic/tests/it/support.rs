//! Test channel: deterministic noise, offsets and clock-rate changes.

use vouch_sonic::{DecodeEvent, DecodedPayload, Profile, StreamDecoder};

/// xorshift64* with Box-Muller: deterministic, no RNG crate needed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }

    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    pub fn gaussian(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

pub fn mean_power(samples: &[f32]) -> f64 {
    samples.iter().map(|&s| f64::from(s).powi(2)).sum::<f64>() / samples.len().max(1) as f64
}

/// Puts `signal` after `lead` samples of silence, adds `tail` more, then
/// white Gaussian noise over everything at `snr_db` relative to the signal's
/// mean power (full-band SNR).
pub fn recording(signal: &[f32], lead: usize, tail: usize, snr_db: Option<f64>, rng: &mut Rng) -> Vec<f32> {
    let mut out = vec![0.0f32; lead];
    out.extend_from_slice(signal);
    out.resize(out.len() + tail, 0.0);
    if let Some(snr_db) = snr_db {
        let sigma = (mean_power(signal) / 10f64.powf(snr_db / 10.0)).sqrt();
        for s in &mut out {
            *s += (rng.gaussian() * sigma) as f32;
        }
    }
    out
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
