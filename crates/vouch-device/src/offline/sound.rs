//! Carrying a leg across the shop counter by sound: the bytes are encoded to audio with
//! `vouch-sonic`, optionally mixed with white noise at a chosen SNR (a simulated room,
//! from a seeded generator, so a run can be repeated), and decoded from the recording as
//! a microphone would hand it over, in short chunks.

use vouch_sonic::channel::{NoiseRng, recording};
use vouch_sonic::{DecodeEvent, Encoder, Profile, StreamDecoder};

use crate::DeviceError;

/// The recording starts this long before the transmission and ends this long after it.
const MARGIN_SECS: f64 = 0.1;
/// How much audio the decoder is fed at once, as a microphone buffer delivers it.
const CHUNK_SECS: f64 = 0.01;

/// One direction of the sound link: a profile and sample rate, and the room's noise.
#[derive(Debug, Clone)]
pub struct SoundChannel {
    encoder: Encoder,
    noise: Option<(f64, NoiseRng)>,
}

/// What the receiver decoded, and how long the transmission sounded.
#[derive(Debug, Clone, PartialEq)]
pub struct Heard {
    pub bytes: Vec<u8>,
    /// The transmission's length, without the silence around it.
    pub audio_secs: f64,
}

impl SoundChannel {
    /// A quiet channel in `profile` at `sample_rate_hz` (44,100 or 48,000).
    pub fn new(profile: Profile, sample_rate_hz: u32) -> Result<Self, DeviceError> {
        Ok(SoundChannel { encoder: Encoder::new(profile, sample_rate_hz)?, noise: None })
    }

    /// White Gaussian noise at `snr_db` (full band) over every recording, drawn from a
    /// generator seeded with `seed`.
    pub fn with_noise(mut self, snr_db: f64, seed: u64) -> Self {
        self.noise = Some((snr_db, NoiseRng::new(seed)));
        self
    }

    pub fn profile(&self) -> Profile {
        self.encoder.profile()
    }

    /// Sends `payload` through the channel and decodes what arrives. Nothing decoded is
    /// [`DeviceError::Sound`] with the decoder's reason; a payload only comes out once
    /// its checksums pass.
    pub fn carry(&mut self, payload: &[u8]) -> Result<Heard, DeviceError> {
        let rate = self.encoder.sample_rate_hz();
        let signal = self.encoder.encode(payload)?;
        let audio_secs = signal.len() as f64 / f64::from(rate);
        let margin = (MARGIN_SECS * f64::from(rate)) as usize;
        let heard = match &mut self.noise {
            Some((snr_db, rng)) => recording(&signal, margin, margin, Some(*snr_db), rng),
            None => recording(&signal, margin, margin, None, &mut NoiseRng::new(0)),
        };
        let mut decoder = StreamDecoder::with_profiles(rate, &[self.encoder.profile()])?;
        let chunk = ((CHUNK_SECS * f64::from(rate)) as usize).max(1);
        let mut last_drop = None;
        let mut events: Vec<DecodeEvent> = Vec::new();
        for piece in heard.chunks(chunk) {
            events.extend(decoder.push(piece));
        }
        events.extend(decoder.finish());
        for event in events {
            match event {
                DecodeEvent::Payload(payload) => return Ok(Heard { bytes: payload.bytes, audio_secs }),
                DecodeEvent::FrameDropped { reason, .. } => last_drop = Some(reason),
                DecodeEvent::FrameStarted { .. } | DecodeEvent::Progress { .. } => {}
            }
        }
        Err(last_drop.unwrap_or(vouch_sonic::Error::NoSignal).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leg_crosses_a_noisy_room_and_the_same_seed_hears_the_same() {
        let payload: Vec<u8> = (0..400u32).map(|i| (i * 31 % 251) as u8).collect();
        for profile in Profile::ALL {
            let mut channel = SoundChannel::new(profile, 48_000).unwrap().with_noise(0.0, 42);
            let heard = channel.carry(&payload).unwrap();
            assert_eq!(heard.bytes, payload, "{profile}");
            assert!(heard.audio_secs > 1.0 && heard.audio_secs < 10.0, "{profile}: {} s", heard.audio_secs);
        }
        let quiet = SoundChannel::new(Profile::Audible, 44_100).unwrap().carry(b"hi").unwrap();
        assert_eq!(quiet.bytes, b"hi");
    }

    #[test]
    fn a_room_too_loud_is_an_error_not_a_wrong_payload() {
        let mut channel = SoundChannel::new(Profile::Audible, 48_000).unwrap().with_noise(-30.0, 1);
        assert!(matches!(channel.carry(b"approve 12.50 EUR"), Err(DeviceError::Sound(_))));
    }
}
