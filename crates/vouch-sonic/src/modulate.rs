//! The encoder: payload bytes to audio samples.
//!
//! Each of the four tone groups is one phase-continuous oscillator that hops
//! between its 16 tones (CPFSK), so the waveform never jumps and the signal
//! stays compact in frequency. Amplitudes are fixed so the sum of the four
//! tones never exceeds [`PEAK_AMPLITUDE`].

use crate::Error;
use crate::frame::{self};
use crate::profile::{GROUPS, PREAMBLE_PATTERN, Profile, Timing, tone_index};

/// Largest absolute sample value the encoder produces.
pub const PEAK_AMPLITUDE: f32 = 0.9;
/// Starting phases of the four oscillators, spread to lower the crest factor.
const INITIAL_PHASES: [f64; GROUPS] = [0.0, 1.7, 3.3, 4.9];

/// Turns payloads into samples for one profile and sample rate.
#[derive(Debug, Clone)]
pub struct Encoder {
    profile: Profile,
    timing: Timing,
}

impl Encoder {
    /// Fails with [`Error::UnsupportedSampleRate`] unless the rate is one of
    /// [`crate::SAMPLE_RATES_HZ`].
    pub fn new(profile: Profile, sample_rate_hz: u32) -> Result<Self, Error> {
        Ok(Self { profile, timing: Timing::new(sample_rate_hz)? })
    }

    pub fn profile(&self) -> Profile {
        self.profile
    }

    pub fn sample_rate_hz(&self) -> u32 {
        self.timing.sample_rate_hz
    }

    /// Samples (mono, in `[-PEAK_AMPLITUDE, PEAK_AMPLITUDE]`) that carry
    /// `payload`. Payloads over [`crate::PAYLOAD_BYTES_MAX`] are refused with
    /// [`Error::PayloadTooLarge`]; nothing is ever truncated.
    pub fn encode(&self, payload: &[u8]) -> Result<Vec<f32>, Error> {
        let frames = frame::split_payload(self.profile, payload)?;
        let mut samples = Vec::new();
        for (index, (header, segment)) in frames.iter().enumerate() {
            if index > 0 {
                samples.resize(samples.len() + self.timing.gap_samples, 0.0);
            }
            let symbols = frame::frame_symbols(*header, segment);
            samples.extend(synthesize_frame(self.profile, &self.timing, &symbols, 0.0));
        }
        Ok(samples)
    }
}

/// Tone values for one group across preamble and symbols, with the sample
/// span each occupies.
fn segments(timing: &Timing, symbols: &[[u8; GROUPS]]) -> Vec<(usize, usize, [u8; GROUPS])> {
    let n = timing.window_samples;
    let mut out: Vec<(usize, usize, [u8; GROUPS])> =
        PREAMBLE_PATTERN.iter().enumerate().map(|(j, values)| (j * n, (j + 1) * n, *values)).collect();
    for (k, values) in symbols.iter().enumerate() {
        out.push((timing.symbol_start(k), timing.symbol_start(k + 1), *values));
    }
    // The last tone rings on through the closing fade.
    if let Some(last) = out.last_mut() {
        last.1 += timing.ramp_samples;
    }
    out
}

/// Samples of one frame (preamble, then `symbols`). `phase_shift` rotates
/// every oscillator; the decoder uses a quarter-turn copy of the preamble as
/// the quadrature half of its timing template.
pub(crate) fn synthesize_frame(
    profile: Profile,
    timing: &Timing,
    symbols: &[[u8; GROUPS]],
    phase_shift: f64,
) -> Vec<f32> {
    let spans = segments(timing, symbols);
    let total = spans.last().map_or(0, |s| s.1);
    let amplitude = f64::from(PEAK_AMPLITUDE) / GROUPS as f64;
    let mut out = vec![0.0f32; total];
    let mut phases = INITIAL_PHASES.map(|p| p + phase_shift);
    for (start, end, values) in spans {
        let steps: Vec<f64> = (0..GROUPS).map(|g| timing.omega(profile.tone_hz(tone_index(g, values[g])))).collect();
        for sample in out.iter_mut().take(end).skip(start) {
            let mut acc = 0.0f64;
            for (phase, step) in phases.iter_mut().zip(&steps) {
                acc += phase.sin();
                *phase += step;
            }
            *sample = (acc * amplitude) as f32;
        }
        // Keep phases small so precision does not erode over long frames.
        phases.iter_mut().for_each(|p| *p %= std::f64::consts::TAU);
    }
    apply_ramps(&mut out, timing.ramp_samples);
    out
}

fn apply_ramps(samples: &mut [f32], ramp: usize) {
    let len = samples.len();
    if ramp == 0 || len < 2 * ramp {
        return;
    }
    for i in 0..ramp {
        let gain = 0.5 - 0.5 * (std::f64::consts::PI * (i as f64 + 0.5) / ramp as f64).cos();
        let gain = gain as f32;
        if let Some(s) = samples.get_mut(i) {
            *s *= gain;
        }
        if let Some(s) = samples.get_mut(len - 1 - i) {
            *s *= gain;
        }
    }
}

/// The preamble waveform as transmitted (in-phase) and a quarter turn later
/// (quadrature): the decoder correlates against both to time a frame to the
/// sample without knowing the channel's phase.
pub(crate) fn preamble_templates(profile: Profile, timing: &Timing) -> (Vec<f32>, Vec<f32>) {
    let len = timing.preamble_samples();
    let mut in_phase = synthesize_frame(profile, timing, &[], 0.0);
    let mut quadrature = synthesize_frame(profile, timing, &[], std::f64::consts::FRAC_PI_2);
    in_phase.truncate(len);
    quadrature.truncate(len);
    (in_phase, quadrature)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PAYLOAD_BYTES_MAX;

    #[test]
    fn output_is_bounded_and_sized_as_planned() {
        for rate in crate::SAMPLE_RATES_HZ {
            for profile in Profile::ALL {
                let encoder = Encoder::new(profile, rate).unwrap();
                let samples = encoder.encode(b"0123456789").unwrap();
                assert!(samples.iter().all(|s| s.abs() <= PEAK_AMPLITUDE));
                let (header, segment) = frame::split_payload(profile, b"0123456789").unwrap()[0].clone();
                let symbols = frame::frame_symbols(header, &segment).len();
                assert_eq!(samples.len(), Timing::new(rate).unwrap().frame_samples(symbols));
            }
        }
    }

    #[test]
    fn oversize_payload_is_refused() {
        let encoder = Encoder::new(Profile::Audible, 48_000).unwrap();
        assert!(matches!(encoder.encode(&vec![0u8; PAYLOAD_BYTES_MAX + 1]), Err(Error::PayloadTooLarge { .. })));
    }

    #[test]
    fn templates_match_the_transmitted_preamble() {
        let timing = Timing::new(44_100).unwrap();
        let (in_phase, quadrature) = preamble_templates(Profile::Audible, &timing);
        let encoder = Encoder::new(Profile::Audible, 44_100).unwrap();
        let samples = encoder.encode(b"x").unwrap();
        assert_eq!(&samples[..in_phase.len()], &in_phase[..]);
        assert_eq!(quadrature.len(), in_phase.len());
    }
}
