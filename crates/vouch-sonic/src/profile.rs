//! Tone plans: which frequencies each profile uses and how long symbols last
//! at each supported sample rate.
//!
//! Everything is defined in hertz and seconds, never in samples, so a sender
//! at 48 kHz and a receiver at 44.1 kHz (or with a clock off by a few ppm)
//! agree on the signal. Both profiles share one layout: 64 tones 75 Hz apart,
//! split into 4 groups of 16; each symbol sends one tone per group, i.e.
//! 4 bits per group and 16 bits per symbol.

use std::fmt;
use std::str::FromStr;

use crate::Error;

/// Sample rates the modem is specified and tested for.
pub const SAMPLE_RATES_HZ: [u32; 2] = [44_100, 48_000];

/// Parallel tone groups per symbol.
pub(crate) const GROUPS: usize = 4;
/// Tones per group; one of them is sent per symbol, so 4 bits.
pub(crate) const TONES_PER_GROUP: usize = 16;
pub(crate) const TONES: usize = GROUPS * TONES_PER_GROUP;
/// Spacing of adjacent tones. The analysis window lasts exactly
/// `1 / TONE_SPACING_HZ`, which makes all tones orthogonal over it.
pub(crate) const TONE_SPACING_HZ: f64 = 75.0;
/// Duration of one data symbol: the 13.3 ms analysis window plus a 1.7 ms
/// guard that absorbs timing error, clock drift and early echoes.
pub(crate) const SYMBOL_SECS: f64 = 0.015;
/// Preamble symbols; they last one analysis window each, without a guard, so
/// the detector's score peaks sharply at the right start.
pub(crate) const PREAMBLE_SYMBOLS: usize = 6;
/// Tone value each group sends in each preamble symbol. Chosen so that no
/// group repeats a tone and no shifted copy of the pattern matches itself in
/// any position, so partial overlaps score low.
pub(crate) const PREAMBLE_PATTERN: [[u8; GROUPS]; PREAMBLE_SYMBOLS] =
    [[3, 10, 12, 13], [6, 13, 0, 5], [13, 11, 10, 1], [0, 9, 1, 4], [8, 4, 3, 10], [5, 2, 9, 8]];
/// Raised-cosine fade at both ends of a frame, against clicks.
pub(crate) const RAMP_SECS: f64 = 0.002;
/// Silence between the frames of a multi-frame payload, so echoes of one
/// frame die down before the next preamble.
pub(crate) const FRAME_GAP_SECS: f64 = 0.02;
/// Sub-blocks per analysis window in the preamble search; sets the coarse
/// timing step (about 1.7 ms).
const DETECTOR_HOPS_PER_WINDOW_TARGET: usize = 8;

/// A frequency band the modem transmits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Profile {
    /// 1.5 - 6.3 kHz: heard as a short chirpy burst; carries through phone
    /// speakers and microphones of every grade.
    Audible,
    /// 15 - 19.8 kHz: inaudible to most adults; needs hardware that still
    /// responds near 20 kHz.
    Ultrasonic,
}

impl Profile {
    /// Every profile, in header-code order.
    pub const ALL: [Profile; 2] = [Profile::Audible, Profile::Ultrasonic];

    /// Lowest tone of the profile.
    pub fn base_hz(self) -> f64 {
        match self {
            Profile::Audible => 1_500.0,
            Profile::Ultrasonic => 15_000.0,
        }
    }

    /// Highest tone of the profile.
    pub fn top_hz(self) -> f64 {
        self.base_hz() + (TONES - 1) as f64 * TONE_SPACING_HZ
    }

    /// Name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Profile::Audible => "audible",
            Profile::Ultrasonic => "ultrasonic",
        }
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            Profile::Audible => 0,
            Profile::Ultrasonic => 1,
        }
    }

    pub(crate) fn from_code(code: u8) -> Option<Self> {
        Profile::ALL.into_iter().find(|p| p.code() == code)
    }

    /// Frequency of tone `index` (0..64).
    pub(crate) fn tone_hz(self, index: usize) -> f64 {
        self.base_hz() + index as f64 * TONE_SPACING_HZ
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Profile {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self, Error> {
        Profile::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(name))
            .ok_or_else(|| Error::UnknownProfile { name: name.to_owned() })
    }
}

/// Tone index carrying `value` in `group`. Groups interleave across the band
/// (tone `value * GROUPS + group`) so a notch in the room or speaker response
/// costs every group a little instead of one group everything.
pub(crate) fn tone_index(group: usize, value: u8) -> usize {
    usize::from(value) * GROUPS + group
}

/// Sample-domain timing for one sample rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Timing {
    pub(crate) sample_rate_hz: u32,
    /// Analysis window (and preamble symbol) length.
    pub(crate) window_samples: usize,
    /// Data symbol length; fractional at 44.1 kHz, rounded per symbol.
    pub(crate) symbol_samples: f64,
    /// Sub-block length of the preamble search.
    pub(crate) hop_samples: usize,
    pub(crate) hops_per_window: usize,
    pub(crate) ramp_samples: usize,
    pub(crate) gap_samples: usize,
}

impl Timing {
    pub(crate) fn new(sample_rate_hz: u32) -> Result<Self, Error> {
        if !SAMPLE_RATES_HZ.contains(&sample_rate_hz) {
            return Err(Error::UnsupportedSampleRate { sample_rate_hz });
        }
        let rate = f64::from(sample_rate_hz);
        let window_samples = (rate / TONE_SPACING_HZ).round() as usize;
        // The search hop must divide the window so preamble windows sit on
        // the hop grid; pick the divisor closest to the target count.
        let hops_per_window = (1..=window_samples)
            .filter(|d| window_samples.is_multiple_of(*d))
            .min_by_key(|&d| d.abs_diff(DETECTOR_HOPS_PER_WINDOW_TARGET))
            .unwrap_or(1);
        Ok(Self {
            sample_rate_hz,
            window_samples,
            symbol_samples: rate * SYMBOL_SECS,
            hop_samples: window_samples / hops_per_window,
            hops_per_window,
            ramp_samples: (rate * RAMP_SECS).round() as usize,
            gap_samples: (rate * FRAME_GAP_SECS).round() as usize,
        })
    }

    pub(crate) fn preamble_samples(&self) -> usize {
        PREAMBLE_SYMBOLS * self.window_samples
    }

    /// Offset from the frame start to the first sample of symbol `k` (header
    /// and data symbols counted together).
    pub(crate) fn symbol_start(&self, k: usize) -> usize {
        self.preamble_samples() + (k as f64 * self.symbol_samples).round() as usize
    }

    /// Offset from the frame start to the analysis window of symbol `k`,
    /// centred in the symbol so the guard splits evenly on both sides.
    pub(crate) fn symbol_window_start(&self, k: usize) -> usize {
        let guard = self.symbol_samples - self.window_samples as f64;
        self.preamble_samples() + (k as f64 * self.symbol_samples + guard / 2.0).round() as usize
    }

    /// Frame length in samples for `symbols` header+data symbols, including
    /// the closing fade.
    pub(crate) fn frame_samples(&self, symbols: usize) -> usize {
        self.symbol_start(symbols) + self.ramp_samples
    }

    /// Angular frequency in radians per sample.
    pub(crate) fn omega(&self, hz: f64) -> f64 {
        std::f64::consts::TAU * hz / f64::from(self.sample_rate_hz)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timing_is_consistent_at_both_rates() {
        for rate in SAMPLE_RATES_HZ {
            let t = Timing::new(rate).unwrap();
            assert_eq!(t.window_samples as f64, f64::from(rate) / TONE_SPACING_HZ);
            assert_eq!(t.hop_samples * t.hops_per_window, t.window_samples);
            assert!((6..=10).contains(&t.hops_per_window));
            assert!(t.symbol_samples > t.window_samples as f64);
        }
        assert_eq!(Timing::new(22_050), Err(Error::UnsupportedSampleRate { sample_rate_hz: 22_050 }));
    }

    #[test]
    fn every_tone_is_below_nyquist_and_bands_match_the_profiles() {
        for profile in Profile::ALL {
            assert!(profile.top_hz() < 44_100.0 / 2.0 * 0.95);
        }
        assert!(Profile::Audible.top_hz() <= 6_500.0);
        assert!(Profile::Ultrasonic.base_hz() >= 15_000.0);
        assert_eq!("Ultrasonic".parse::<Profile>(), Ok(Profile::Ultrasonic));
        assert!("loud".parse::<Profile>().is_err());
    }

    #[test]
    fn tone_indices_cover_the_plan_once() {
        let mut seen = [false; TONES];
        for group in 0..GROUPS {
            for value in 0..TONES_PER_GROUP as u8 {
                let index = tone_index(group, value);
                assert!(!seen[index]);
                seen[index] = true;
            }
        }
    }

    #[test]
    fn preamble_pattern_has_no_shifted_self_match() {
        for shift in 1..PREAMBLE_SYMBOLS {
            for (early, late) in PREAMBLE_PATTERN.iter().zip(&PREAMBLE_PATTERN[shift..]) {
                assert!(early.iter().zip(late).all(|(a, b)| a != b), "shift {shift}");
            }
        }
    }
}
