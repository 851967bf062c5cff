//! A simulated acoustic channel for tests, benchmarks and demos: silence around a
//! transmission and white Gaussian noise at a chosen SNR, from a seeded generator so
//! that every run hears the same recording.
//!
//! SNR is full-band: the noise is white from 0 Hz to Nyquist, with variance = mean
//! power of the transmitted waveform / 10^(SNR/10) (the definition
//! `bench/sonic_vs_ggwave.py` uses too).

/// xorshift64* with Box-Muller: reproducible payloads and noise from a seed, with no
/// RNG crate. Not for anything secret.
#[derive(Debug, Clone)]
pub struct NoiseRng(u64);

impl NoiseRng {
    pub fn new(seed: u64) -> Self {
        // A zero state would stay zero.
        Self(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Standard normal.
    pub fn gaussian(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}

pub fn mean_power(samples: &[f32]) -> f64 {
    samples.iter().map(|&s| f64::from(s).powi(2)).sum::<f64>() / samples.len().max(1) as f64
}

/// What a microphone hears: `signal` after `lead` samples of silence, `tail` more after
/// it, and, with `snr_db`, white Gaussian noise over all of it at that SNR relative to
/// the signal's mean power.
pub fn recording(signal: &[f32], lead: usize, tail: usize, snr_db: Option<f64>, rng: &mut NoiseRng) -> Vec<f32> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_is_reproducible_and_at_the_asked_snr() {
        let signal: Vec<f32> = (0..48_000).map(|i| (i as f32 * 0.1).sin() * 0.5).collect();
        let heard = recording(&signal, 100, 200, Some(0.0), &mut NoiseRng::new(7));
        assert_eq!(heard, recording(&signal, 100, 200, Some(0.0), &mut NoiseRng::new(7)));
        assert_ne!(heard, recording(&signal, 100, 200, Some(0.0), &mut NoiseRng::new(8)));
        assert_eq!(heard.len(), 100 + signal.len() + 200);
        // At 0 dB the noise carries the signal's power, within sampling error.
        let noise: Vec<f32> = heard[100..100 + signal.len()].iter().zip(&signal).map(|(h, s)| h - s).collect();
        let ratio = mean_power(&noise) / mean_power(&signal);
        assert!((0.95..1.05).contains(&ratio), "noise/signal power {ratio}");
        let quiet = recording(&signal, 3, 0, None, &mut NoiseRng::new(7));
        assert_eq!((&quiet[..3], &quiet[3..]), (&[0.0f32; 3][..], signal.as_slice()));
    }
}
