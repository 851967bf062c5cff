//! The streaming decoder: audio samples in, events out.
//!
//! Per profile ("lane") it runs three stages over one shared sample buffer:
//!
//! 1. **Search**: a hop-by-hop DFT of the 64 tone bins (sub-block partial
//!    sums, so each sample is touched once per tone) scores how much energy
//!    sits on the preamble's tone pattern. The score is a ratio, so it does
//!    not depend on volume; noise averages 1/16 and a preamble at -6 dB SNR
//!    scores about 0.5.
//! 2. **Timing**: around the best-scoring hop the preamble is located to the
//!    sample by correlating against its known waveform (in-phase and
//!    quadrature, so the channel's phase does not matter).
//! 3. **Symbols**: each symbol's window sits in the middle of its slot; the
//!    guard on either side absorbs residual timing error and the drift of a
//!    clock off by +-100 ppm over the longest frame (about 12 samples at
//!    48 kHz against a 40-sample half-guard). Goertzel filters give each
//!    tone's energy; the strongest per group wins and the ratio to the
//!    runner-up becomes the soft reliability used for erasures.
//!
//! Nothing here indexes with input-derived values except through checked
//! accessors; arbitrary samples (NaN, huge values) cannot panic it.

use std::collections::VecDeque;

use crate::frame::{self, Assembled, DataLayout, HEADER_SYMBOLS, Header, Reassembler, SoftSymbol};
use crate::profile::{GROUPS, PREAMBLE_PATTERN, PREAMBLE_SYMBOLS, Profile, TONES, Timing, tone_index};
use crate::{DecodeEvent, DecodedPayload, Error, modulate};

/// Preamble score a hop must reach to be taken as a frame start. Pure noise
/// averages 1/16 with a spread of about 0.013 over the 24 tone slots.
const DETECT_SCORE_MIN: f32 = 0.2;
/// Samples are clamped to this magnitude so sums of squares stay finite.
const SAMPLE_ABS_MAX: f32 = 1.0e4;
/// Samples no stage needs any more are dropped in batches of at least this.
const DISCARD_BATCH_SAMPLES: u64 = 16_384;
/// Coarse step of the timing correlation; its main lobe is ~10 samples wide.
const REFINE_COARSE_STEP: usize = 3;

/// Incremental decoder for one sample rate, listening on one or more
/// profiles at once.
#[derive(Debug)]
pub struct StreamDecoder {
    timing: Timing,
    buffer: SampleBuffer,
    lanes: Vec<Lane>,
}

impl StreamDecoder {
    /// Listens for every [`Profile`].
    pub fn new(sample_rate_hz: u32) -> Result<Self, Error> {
        Self::with_profiles(sample_rate_hz, &Profile::ALL)
    }

    /// Listens only for `profiles` (half the work when one is known).
    pub fn with_profiles(sample_rate_hz: u32, profiles: &[Profile]) -> Result<Self, Error> {
        let timing = Timing::new(sample_rate_hz)?;
        let mut lanes: Vec<Lane> = Vec::new();
        for &profile in profiles {
            if lanes.iter().all(|lane| lane.profile != profile) {
                lanes.push(Lane::new(profile, &timing));
            }
        }
        Ok(Self { timing, buffer: SampleBuffer::default(), lanes })
    }

    pub fn sample_rate_hz(&self) -> u32 {
        self.timing.sample_rate_hz
    }

    /// Samples pushed so far.
    pub fn samples_seen(&self) -> u64 {
        self.buffer.end()
    }

    /// Feeds the next chunk of mono samples (any length, including empty)
    /// and returns what was found in it.
    pub fn push(&mut self, samples: &[f32]) -> Vec<DecodeEvent> {
        self.buffer.extend(samples);
        let mut events = Vec::new();
        for lane in &mut self.lanes {
            lane.process(&self.timing, &self.buffer, &mut events);
        }
        let keep_from =
            self.lanes.iter().map(|lane| lane.oldest_needed(&self.timing)).min().unwrap_or_else(|| self.buffer.end());
        self.buffer.discard_before(keep_from);
        events
    }

    /// Ends the stream: reports a frame cut off by the end of the recording
    /// and a payload still missing frames, then resets for a new stream
    /// position (sample counting continues).
    pub fn finish(&mut self) -> Vec<DecodeEvent> {
        let mut events = Vec::new();
        for lane in &mut self.lanes {
            lane.finish(self.buffer.end(), &mut events);
        }
        events
    }
}

/// Recent samples, addressed by absolute sample index.
#[derive(Debug, Default)]
struct SampleBuffer {
    start: u64,
    samples: Vec<f32>,
}

impl SampleBuffer {
    fn end(&self) -> u64 {
        self.start + self.samples.len() as u64
    }

    fn extend(&mut self, samples: &[f32]) {
        self.samples.extend(
            samples.iter().map(|&s| if s.is_finite() { s.clamp(-SAMPLE_ABS_MAX, SAMPLE_ABS_MAX) } else { 0.0 }),
        );
    }

    fn get(&self, from: u64, len: usize) -> Option<&[f32]> {
        let offset = usize::try_from(from.checked_sub(self.start)?).ok()?;
        self.samples.get(offset..offset.checked_add(len)?)
    }

    fn discard_before(&mut self, keep_from: u64) {
        let surplus = keep_from.saturating_sub(self.start).min(self.samples.len() as u64);
        if surplus >= DISCARD_BATCH_SAMPLES {
            // `surplus` is at most `samples.len()`, so it fits a usize.
            let count = usize::try_from(surplus).unwrap_or(self.samples.len());
            self.samples.drain(..count);
            self.start += count as u64;
        }
    }
}

/// Goertzel energy of each tone over one window.
fn tone_energies(window: &[f32], coefficients: &[f64; TONES]) -> [f64; TONES] {
    let mut energies = [0.0f64; TONES];
    for (energy, &c) in energies.iter_mut().zip(coefficients) {
        let (mut s1, mut s2) = (0.0f64, 0.0f64);
        for &x in window {
            let s0 = f64::from(x) + c * s1 - s2;
            s2 = s1;
            s1 = s0;
        }
        *energy = s1 * s1 + s2 * s2 - c * s1 * s2;
    }
    energies
}

fn demodulate_symbol(window: &[f32], coefficients: &[f64; TONES]) -> SoftSymbol {
    let energies = tone_energies(window, coefficients);
    let mut values = [0u8; GROUPS];
    let mut margins = [1.0f32; GROUPS];
    for group in 0..GROUPS {
        let (mut best, mut best_energy, mut runner_up) = (0u8, -1.0f64, 0.0f64);
        for value in 0..crate::profile::TONES_PER_GROUP as u8 {
            let energy = energies.get(tone_index(group, value)).copied().unwrap_or(0.0);
            if energy > best_energy {
                runner_up = best_energy.max(0.0);
                best_energy = energy;
                best = value;
            } else if energy > runner_up {
                runner_up = energy;
            }
        }
        let floor = 1e-12;
        values[group] = best;
        margins[group] = ((best_energy.max(0.0) + floor) / (runner_up + floor)) as f32;
    }
    SoftSymbol { values, margins }
}

/// A frame being received.
#[derive(Debug)]
struct FrameRx {
    start: u64,
    /// Known once the header decoded: the header and the data symbol count.
    header: Option<(Header, usize)>,
    symbols: Vec<SoftSymbol>,
    reported: usize,
}

impl FrameRx {
    fn expected_symbols(&self) -> usize {
        HEADER_SYMBOLS + self.header.map_or(0, |(_, data)| data)
    }
}

/// Search, timing and symbol state for one profile.
#[derive(Debug)]
struct Lane {
    profile: Profile,
    detector: Detector,
    goertzel: [f64; TONES],
    template_in_phase: Vec<f32>,
    template_quadrature: Vec<f32>,
    rx: Option<FrameRx>,
    reassembler: Reassembler,
}

impl Lane {
    fn new(profile: Profile, timing: &Timing) -> Self {
        let mut goertzel = [0.0f64; TONES];
        for (i, c) in goertzel.iter_mut().enumerate() {
            *c = 2.0 * timing.omega(profile.tone_hz(i)).cos();
        }
        let (template_in_phase, template_quadrature) = modulate::preamble_templates(profile, timing);
        Self {
            profile,
            detector: Detector::new(profile, timing),
            goertzel,
            template_in_phase,
            template_quadrature,
            rx: None,
            reassembler: Reassembler::default(),
        }
    }

    fn oldest_needed(&self, timing: &Timing) -> u64 {
        match &self.rx {
            // Until the header checks out, the search may have to resume
            // right after this preamble.
            Some(rx) if rx.header.is_none() => rx.start + timing.preamble_samples() as u64,
            Some(rx) => rx.start + timing.symbol_window_start(rx.symbols.len()) as u64,
            None => self.detector.oldest_needed(timing),
        }
    }

    fn process(&mut self, timing: &Timing, buffer: &SampleBuffer, events: &mut Vec<DecodeEvent>) {
        loop {
            let Some(rx) = self.rx.as_mut() else {
                let Some(coarse) = self.detector.advance(buffer) else {
                    return;
                };
                let start = self.refine(timing, buffer, coarse);
                self.rx = Some(FrameRx { start, header: None, symbols: Vec::new(), reported: 0 });
                continue;
            };
            let expected = rx.expected_symbols();
            while rx.symbols.len() < expected {
                let from = rx.start + timing.symbol_window_start(rx.symbols.len()) as u64;
                let Some(window) = buffer.get(from, timing.window_samples) else {
                    break;
                };
                rx.symbols.push(demodulate_symbol(window, &self.goertzel));
            }
            if rx.symbols.len() < expected {
                if rx.header.is_some() && rx.symbols.len() > rx.reported {
                    rx.reported = rx.symbols.len();
                    events.push(DecodeEvent::Progress {
                        profile: self.profile,
                        symbols_received: rx.symbols.len(),
                        symbols_total: expected,
                    });
                }
                return;
            }
            let start = rx.start;
            match rx.header {
                None => match frame::decode_header(&rx.symbols) {
                    Ok(header) if header.profile == self.profile => {
                        let data_symbols = DataLayout::for_segment(header.segment_len).symbols;
                        rx.header = Some((header, data_symbols));
                        events.push(DecodeEvent::FrameStarted {
                            profile: self.profile,
                            start_sample: start,
                            frame_index: header.segment_index,
                            frame_count: header.segment_count,
                            symbols_total: HEADER_SYMBOLS + data_symbols,
                        });
                    }
                    _ => {
                        events.push(DecodeEvent::FrameDropped {
                            profile: self.profile,
                            start_sample: start,
                            reason: Error::HeaderUnreadable,
                        });
                        self.rx = None;
                        self.detector.restart_at(start + timing.preamble_samples() as u64);
                    }
                },
                Some((header, _)) => {
                    let data = frame::decode_data(header, rx.symbols.get(HEADER_SYMBOLS..).unwrap_or(&[]));
                    let end = start + timing.frame_samples(expected) as u64;
                    self.rx = None;
                    self.detector.restart_at(end);
                    self.deliver(start, header, data, events);
                }
            }
        }
    }

    fn deliver(&mut self, start: u64, header: Header, data: Result<Vec<u8>, Error>, events: &mut Vec<DecodeEvent>) {
        let profile = self.profile;
        let segment = match data {
            Ok(segment) => segment,
            Err(reason) => {
                events.push(DecodeEvent::FrameDropped { profile, start_sample: start, reason });
                return;
            }
        };
        let (abandoned, assembled) = self.reassembler.accept(header, segment);
        if let Some(reason) = abandoned {
            events.push(DecodeEvent::FrameDropped { profile, start_sample: start, reason });
        }
        match assembled {
            Assembled::Waiting => {}
            Assembled::Done(Ok(bytes)) => {
                events.push(DecodeEvent::Payload(DecodedPayload { profile, bytes }));
            }
            Assembled::Done(Err(reason)) => {
                events.push(DecodeEvent::FrameDropped { profile, start_sample: start, reason })
            }
        }
    }

    fn finish(&mut self, end: u64, events: &mut Vec<DecodeEvent>) {
        let profile = self.profile;
        if let Some(rx) = self.rx.take() {
            events.push(DecodeEvent::FrameDropped {
                profile,
                start_sample: rx.start,
                reason: Error::Truncated {
                    received_symbols: rx.symbols.len(),
                    expected_symbols: rx.expected_symbols(),
                },
            });
        } else if let Some(start) = self.detector.pending_peak() {
            events.push(DecodeEvent::FrameDropped {
                profile,
                start_sample: start,
                reason: Error::Truncated { received_symbols: 0, expected_symbols: HEADER_SYMBOLS },
            });
        }
        if let Some(reason) = self.reassembler.take_incomplete() {
            events.push(DecodeEvent::FrameDropped { profile, start_sample: end, reason });
        }
        self.detector.restart_at(end);
    }

    /// Finds the sample where the preamble starts, near the coarse estimate,
    /// by maximising the envelope of the correlation with the preamble.
    fn refine(&self, timing: &Timing, buffer: &SampleBuffer, coarse: u64) -> u64 {
        let reach = 2 * timing.hop_samples as u64;
        let len = self.template_in_phase.len();
        let score = |t: u64| -> f64 {
            let Some(x) = buffer.get(t, len) else {
                return -1.0;
            };
            let (mut i, mut q) = (0.0f64, 0.0f64);
            for ((&s, &a), &b) in x.iter().zip(&self.template_in_phase).zip(&self.template_quadrature) {
                i += f64::from(s * a);
                q += f64::from(s * b);
            }
            i * i + q * q
        };
        let best_of = |candidates: &mut dyn Iterator<Item = u64>| -> (u64, f64) {
            candidates.map(|t| (t, score(t))).fold((coarse, -1.0), |best, c| if c.1 > best.1 { c } else { best })
        };
        let low = coarse.saturating_sub(reach).max(buffer.start);
        let (rough, _) = best_of(&mut (low..=coarse + reach).step_by(REFINE_COARSE_STEP));
        let step = REFINE_COARSE_STEP as u64;
        let (fine, _) = best_of(&mut (rough.saturating_sub(step)..=rough + step));
        fine
    }
}

/// Hop-by-hop preamble search for one profile.
#[derive(Debug)]
struct Detector {
    hop: usize,
    hops_per_window: usize,
    /// `cos/sin(omega_t * n)` for tone `t`, sample `n` of a hop: row-major.
    cos_table: Vec<f32>,
    sin_table: Vec<f32>,
    /// `exp(-i omega_t * b * hop)`: phase of sub-block `b` within a window.
    rotation: Vec<(f32, f32)>,
    /// Tone index expected in each preamble symbol and group.
    expected: [[usize; GROUPS]; PREAMBLE_SYMBOLS],
    next_block: u64,
    partials: VecDeque<Vec<(f32, f32)>>,
    /// Tone energies of consecutive windows, oldest first.
    energies: VecDeque<[f32; TONES]>,
    /// Best hop above the threshold so far, waiting to be confirmed.
    best: Option<(u64, f32)>,
}

impl Detector {
    fn new(profile: Profile, timing: &Timing) -> Self {
        let hop = timing.hop_samples;
        let hops_per_window = timing.hops_per_window;
        let mut cos_table = Vec::with_capacity(TONES * hop);
        let mut sin_table = Vec::with_capacity(TONES * hop);
        let mut rotation = Vec::with_capacity(TONES * hops_per_window);
        for tone in 0..TONES {
            let omega = timing.omega(profile.tone_hz(tone));
            for n in 0..hop {
                cos_table.push((omega * n as f64).cos() as f32);
                sin_table.push((omega * n as f64).sin() as f32);
            }
            for b in 0..hops_per_window {
                let phase = -omega * (b * hop) as f64;
                rotation.push((phase.cos() as f32, phase.sin() as f32));
            }
        }
        let expected = PREAMBLE_PATTERN.map(|values| {
            let mut tones = [0usize; GROUPS];
            for (group, tone) in tones.iter_mut().enumerate() {
                *tone = tone_index(group, values[group]);
            }
            tones
        });
        Self {
            hop,
            hops_per_window,
            cos_table,
            sin_table,
            rotation,
            expected,
            next_block: 0,
            partials: VecDeque::new(),
            energies: VecDeque::new(),
            best: None,
        }
    }

    fn restart_at(&mut self, sample: u64) {
        self.next_block = sample.div_ceil(self.hop as u64);
        self.partials.clear();
        self.energies.clear();
        self.best = None;
    }

    fn pending_peak(&self) -> Option<u64> {
        self.best.map(|(window, _)| window * self.hop as u64)
    }

    /// The detector keeps its history in `partials`/`energies`, but a
    /// confirmed peak lies a preamble and a window back, and the timing
    /// search reaches a little before it.
    fn oldest_needed(&self, timing: &Timing) -> u64 {
        let back = (timing.preamble_samples() + 2 * timing.window_samples + 4 * self.hop) as u64;
        (self.next_block * self.hop as u64).saturating_sub(back)
    }

    /// Consumes whole hops from `buffer`; returns the coarse start sample of
    /// a confirmed preamble.
    fn advance(&mut self, buffer: &SampleBuffer) -> Option<u64> {
        let window_span = (PREAMBLE_SYMBOLS - 1) * self.hops_per_window + 1;
        let hop = self.hop as u64;
        if self.next_block * hop < buffer.start {
            // Samples already dropped cannot be searched; resume at the
            // oldest one held rather than wait for them forever.
            self.restart_at(buffer.start);
        }
        while let Some(block) = buffer.get(self.next_block * self.hop as u64, self.hop) {
            self.next_block += 1;
            self.partials.push_back(self.partial_dft(block));
            if self.partials.len() > self.hops_per_window {
                self.partials.pop_front();
            }
            if self.partials.len() < self.hops_per_window {
                continue;
            }
            self.energies.push_back(self.window_energies());
            if self.energies.len() > window_span {
                self.energies.pop_front();
            }
            if self.energies.len() < window_span {
                continue;
            }
            // Window index of `energies[0]`: the candidate preamble start.
            let candidate = self.next_block - (self.hops_per_window + window_span - 1) as u64;
            let score = self.score();
            if score >= DETECT_SCORE_MIN && self.best.is_none_or(|(_, best)| score > best) {
                self.best = Some((candidate, score));
            }
            if let Some((peak, _)) = self.best
                && candidate >= peak + self.hops_per_window as u64
            {
                self.best = None;
                return Some(peak * self.hop as u64);
            }
        }
        None
    }

    fn partial_dft(&self, block: &[f32]) -> Vec<(f32, f32)> {
        self.cos_table
            .chunks_exact(self.hop)
            .zip(self.sin_table.chunks_exact(self.hop))
            .map(|(cos_row, sin_row)| {
                let (mut re, mut im) = (0.0f32, 0.0f32);
                for ((&x, &c), &s) in block.iter().zip(cos_row).zip(sin_row) {
                    re += x * c;
                    im -= x * s;
                }
                (re, im)
            })
            .collect()
    }

    fn window_energies(&self) -> [f32; TONES] {
        let mut energies = [0.0f32; TONES];
        for (tone, energy) in energies.iter_mut().enumerate() {
            let rotations =
                self.rotation.get(tone * self.hops_per_window..(tone + 1) * self.hops_per_window).unwrap_or(&[]);
            let (mut re, mut im) = (0.0f32, 0.0f32);
            for (partial, &(c, s)) in self.partials.iter().zip(rotations) {
                let (pr, pi) = partial.get(tone).copied().unwrap_or((0.0, 0.0));
                re += pr * c - pi * s;
                im += pr * s + pi * c;
            }
            *energy = re * re + im * im;
        }
        energies
    }

    /// Share of the energy in the preamble's windows that sits on the tones
    /// the preamble uses.
    fn score(&self) -> f32 {
        let (mut on_pattern, mut total) = (0.0f64, 0.0f64);
        for (symbol, tones) in self.expected.iter().enumerate() {
            let Some(energies) = self.energies.get(symbol * self.hops_per_window) else {
                return 0.0;
            };
            total += energies.iter().map(|&e| f64::from(e)).sum::<f64>();
            on_pattern += tones.iter().map(|&t| f64::from(energies.get(t).copied().unwrap_or(0.0))).sum::<f64>();
        }
        if total > 1e-20 { (on_pattern / total) as f32 } else { 0.0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Encoder, PAYLOAD_BYTES_MAX};

    #[test]
    fn clean_signal_decodes_and_events_are_ordered() {
        let encoder = Encoder::new(Profile::Audible, 48_000).unwrap();
        let mut samples = vec![0.0f32; 1234];
        samples.extend(encoder.encode(b"hello vouch").unwrap());
        samples.extend(vec![0.0f32; 3000]);
        let mut decoder = StreamDecoder::with_profiles(48_000, &[Profile::Audible]).unwrap();
        let mut events = Vec::new();
        for chunk in samples.chunks(1000) {
            events.extend(decoder.push(chunk));
        }
        events.extend(decoder.finish());
        assert!(matches!(events.first(), Some(DecodeEvent::FrameStarted { start_sample: 1234, .. })));
        assert!(events.iter().any(|e| matches!(e, DecodeEvent::Progress { .. })));
        assert_eq!(
            events.last(),
            Some(&DecodeEvent::Payload(DecodedPayload { profile: Profile::Audible, bytes: b"hello vouch".to_vec() }))
        );
        let _ = PAYLOAD_BYTES_MAX;
    }

    #[test]
    fn hostile_samples_do_not_panic() {
        let mut decoder = StreamDecoder::new(44_100).unwrap();
        let mut samples = vec![f32::NAN, f32::INFINITY, -f32::INFINITY, f32::MAX, f32::MIN];
        samples.extend((0..20_000).map(|i| if i % 2 == 0 { 1e30 } else { -1e30 }));
        assert!(decoder.push(&samples).is_empty());
        assert!(decoder.push(&[]).is_empty());
        assert!(decoder.finish().is_empty());
    }

    #[test]
    fn search_resumes_after_a_preamble_whose_header_fails() {
        let encoder = Encoder::new(Profile::Audible, 48_000).unwrap();
        let good = encoder.encode(b"second try").unwrap();
        let timing = Timing::new(48_000).unwrap();
        // A preamble followed by silence where the header should be, then a
        // real frame. Small chunks and several positions make the buffer
        // trim while the header is pending, at some point in its batch.
        for lead in (0..8).map(|i| 20_000 + i * 2_100) {
            let mut samples = vec![0.0f32; lead];
            samples.extend(&good[..timing.preamble_samples()]);
            samples.extend(vec![0.0f32; 30_000]);
            samples.extend(&good);
            samples.extend(vec![0.0f32; 2_000]);
            let mut decoder = StreamDecoder::with_profiles(48_000, &[Profile::Audible]).unwrap();
            let mut events = Vec::new();
            for chunk in samples.chunks(960) {
                events.extend(decoder.push(chunk));
            }
            assert!(
                matches!(events.first(), Some(DecodeEvent::FrameDropped { reason: Error::HeaderUnreadable, .. })),
                "lead {lead}"
            );
            assert_eq!(
                events.last(),
                Some(&DecodeEvent::Payload(DecodedPayload {
                    profile: Profile::Audible,
                    bytes: b"second try".to_vec()
                })),
                "lead {lead}"
            );
        }
    }

    #[test]
    fn detector_skips_samples_it_no_longer_has() {
        let mut decoder = StreamDecoder::with_profiles(48_000, &[Profile::Audible]).unwrap();
        decoder.push(&[0.0f32; 100_000]);
        let lane = &mut decoder.lanes[0];
        lane.detector.restart_at(0);
        let buffer = SampleBuffer { start: 50_000, samples: vec![0.0; 10_000] };
        assert_eq!(lane.detector.advance(&buffer), None);
        assert_eq!(lane.detector.next_block * timing_hop(&lane.detector), 60_000);
    }

    fn timing_hop(detector: &Detector) -> u64 {
        detector.hop as u64
    }

    #[test]
    fn buffer_is_trimmed_while_idle() {
        let mut decoder = StreamDecoder::new(48_000).unwrap();
        for _ in 0..20 {
            decoder.push(&[0.0f32; 4800]);
        }
        assert!(decoder.buffer.samples.len() < 48_000);
        assert_eq!(decoder.samples_seen(), 96_000);
    }
}
