//! `vouch sonic`: move a payload through sound. `encode` writes a WAV file,
//! `decode` reads one back (16-bit integer or 32-bit float, any channel
//! count, 44.1 or 48 kHz), `bench` runs the modem's white-noise sweep.
//!
//! The modem itself lives in `vouch-sonic` and does no IO; this module owns
//! the files, the terminal and the randomness the benchmark needs.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use vouch_sonic::channel::{NoiseRng, recording};
use vouch_sonic::{Encoder, PAYLOAD_BYTES_MAX, Profile, decode_all};

/// SNR points of the benchmark, full-band (noise white from 0 Hz to Nyquist).
const BENCH_SNRS_DB: [f64; 7] = [20.0, 10.0, 5.0, 0.0, -3.0, -6.0, -9.0];
const BENCH_PAYLOAD_BYTES: [usize; 2] = [64, 140];
const BENCH_RATES_HZ: [u32; 2] = [48_000, 44_100];
/// The benchmark places each transmission at a random point in the first
/// half second of the recording and lets a quarter second follow it.
const BENCH_LEAD_MAX_SECS: f64 = 0.5;
const BENCH_TAIL_SECS: f64 = 0.25;

#[derive(Debug, clap::Subcommand)]
pub enum SonicCommand {
    /// Encode a payload file into a WAV recording.
    Encode {
        /// Frequency band to transmit in.
        #[arg(long, value_enum)]
        profile: ProfileArg,
        /// Sample rate of the WAV file.
        #[arg(long, value_enum, default_value = "48000")]
        rate: RateArg,
        /// Payload to send (at most 1024 bytes).
        #[arg(long = "in", value_name = "PAYLOAD")]
        input: PathBuf,
        /// WAV file to write (mono, 16-bit).
        #[arg(long = "out", value_name = "WAV")]
        output: PathBuf,
    },
    /// Decode the payload(s) in a WAV recording; exit 1 if none is valid.
    Decode {
        /// WAV file to read (16-bit int or 32-bit float, mono or multi-channel).
        #[arg(long = "in", value_name = "WAV")]
        input: PathBuf,
        /// Where to write the payload; printed as hex when omitted.
        #[arg(long = "out", value_name = "PAYLOAD")]
        output: Option<PathBuf>,
    },
    /// Noise sweep: goodput and decode success at SNR 20 to -9 dB.
    Bench {
        /// Random payloads per size, profile, rate and SNR.
        #[arg(long, default_value_t = 10)]
        trials: usize,
        /// Seed of the payload and noise generator.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print one JSON object per row instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProfileArg {
    Audible,
    Ultrasonic,
}

impl From<ProfileArg> for Profile {
    fn from(arg: ProfileArg) -> Self {
        match arg {
            ProfileArg::Audible => Profile::Audible,
            ProfileArg::Ultrasonic => Profile::Ultrasonic,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RateArg {
    #[value(name = "44100")]
    Hz44100,
    #[value(name = "48000")]
    Hz48000,
}

impl RateArg {
    fn hz(self) -> u32 {
        match self {
            RateArg::Hz44100 => 44_100,
            RateArg::Hz48000 => 48_000,
        }
    }
}

pub fn run(command: SonicCommand) -> Result<ExitCode> {
    match command {
        SonicCommand::Encode { profile, rate, input, output } => encode(profile.into(), rate.hz(), &input, &output),
        SonicCommand::Decode { input, output } => decode(&input, output.as_deref()),
        SonicCommand::Bench { trials, seed, json } => bench(trials, seed, json),
    }
}

fn encode(profile: Profile, sample_rate_hz: u32, input: &Path, output: &Path) -> Result<ExitCode> {
    let payload = std::fs::read(input).with_context(|| format!("reading {}", input.display()))?;
    if payload.len() > PAYLOAD_BYTES_MAX {
        bail!("{} is {} bytes: a sonic payload is at most {PAYLOAD_BYTES_MAX} bytes", input.display(), payload.len());
    }
    let samples = Encoder::new(profile, sample_rate_hz)?.encode(&payload)?;
    write_wav(output, sample_rate_hz, &samples)?;
    eprintln!(
        "wrote {}: {} bytes as {:.2} s of {profile} audio at {sample_rate_hz} Hz",
        output.display(),
        payload.len(),
        samples.len() as f64 / f64::from(sample_rate_hz)
    );
    Ok(ExitCode::SUCCESS)
}

fn decode(input: &Path, output: Option<&Path>) -> Result<ExitCode> {
    let (sample_rate_hz, samples) = read_wav(input)?;
    let payloads = match decode_all(sample_rate_hz, &samples) {
        Ok(payloads) => payloads,
        Err(reason) => {
            eprintln!("no valid payload in {}: {reason}", input.display());
            return Ok(ExitCode::from(1));
        }
    };
    for payload in &payloads {
        eprintln!("decoded {} bytes ({} profile)", payload.bytes.len(), payload.profile);
    }
    match output {
        Some(path) => {
            // A recording normally holds one payload; keep the first and say
            // so if there were more.
            if let Some(first) = payloads.first() {
                std::fs::write(path, &first.bytes).with_context(|| format!("writing {}", path.display()))?;
            }
            if payloads.len() > 1 {
                eprintln!("{} payloads found; wrote the first to {}", payloads.len(), path.display());
            }
        }
        None => {
            for payload in &payloads {
                println!("{}", vouch_proto::hex::encode(&payload.bytes));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn write_wav(path: &Path, sample_rate_hz: u32, samples: &[f32]) -> Result<()> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: sample_rate_hz,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut writer = hound::WavWriter::create(path, spec).with_context(|| format!("creating {}", path.display()))?;
    for &sample in samples {
        let value = (sample.clamp(-1.0, 1.0) * f32::from(i16::MAX)).round() as i16;
        writer.write_sample(value)?;
    }
    writer.finalize().with_context(|| format!("writing {}", path.display()))
}

/// Reads a WAV file as mono `f32` (channels averaged). A file cut short
/// (its header promising more data than follows) yields the samples that
/// are there, so the decoder can say which frame the cut interrupted.
fn read_wav(path: &Path) -> Result<(u32, Vec<f32>)> {
    let mut reader = hound::WavReader::open(path).with_context(|| format!("opening {}", path.display()))?;
    let spec = reader.spec();
    let (interleaved, read_error): (Vec<f32>, Option<hound::Error>) = match (spec.sample_format, spec.bits_per_sample) {
        (hound::SampleFormat::Float, 32) => collect_until_error(reader.samples::<f32>()),
        (hound::SampleFormat::Int, bits @ 8..=32) => {
            let scale = 1.0 / (1u64 << (bits - 1)) as f32;
            collect_until_error(reader.samples::<i32>().map(|s| s.map(|v| v as f32 * scale)))
        }
        (format, bits) => bail!(
            "{}: unsupported WAV encoding {format:?} {bits}-bit: expected 16-bit integer \
                 or 32-bit float",
            path.display()
        ),
    };
    if let Some(error) = read_error {
        if interleaved.is_empty() {
            return Err(error).with_context(|| format!("reading {}", path.display()));
        }
        eprintln!(
            "warning: {} ends early ({error}); decoding the {} samples present",
            path.display(),
            interleaved.len()
        );
    }
    let channels = usize::from(spec.channels.max(1));
    let mono = interleaved.chunks(channels).map(|frame| frame.iter().sum::<f32>() / channels as f32).collect();
    Ok((spec.sample_rate, mono))
}

fn collect_until_error(samples: impl Iterator<Item = hound::Result<f32>>) -> (Vec<f32>, Option<hound::Error>) {
    let mut out = Vec::new();
    for sample in samples {
        match sample {
            Ok(value) => out.push(value),
            Err(error) => return (out, Some(error)),
        }
    }
    (out, None)
}

/// One benchmark row: a rate, profile and payload size across all SNRs.
#[derive(Debug)]
struct BenchRow {
    sample_rate_hz: u32,
    profile: Profile,
    payload_bytes: usize,
    audio_secs: f64,
    /// `(decoded correctly, decoded wrongly)` per SNR point.
    outcomes: Vec<(usize, usize)>,
    encode_ms: f64,
    decode_ms_per_audio_sec: f64,
}

/// White Gaussian noise over the whole recording, at full-band SNR
/// ([`vouch_sonic::channel`]).
fn bench(trials: usize, seed: u64, json: bool) -> Result<ExitCode> {
    let trials = trials.max(1);
    let mut rng = NoiseRng::new(seed);
    let mut rows = Vec::new();
    for sample_rate_hz in BENCH_RATES_HZ {
        for profile in Profile::ALL {
            let encoder = Encoder::new(profile, sample_rate_hz)?;
            for payload_bytes in BENCH_PAYLOAD_BYTES {
                let row = bench_row(&encoder, payload_bytes, trials, &mut rng)?;
                if json {
                    println!("{}", row_json(&row, trials));
                }
                rows.push(row);
            }
        }
    }
    if !json {
        print_table(&rows, trials);
    }
    Ok(ExitCode::SUCCESS)
}

fn bench_row(encoder: &Encoder, payload_bytes: usize, trials: usize, rng: &mut NoiseRng) -> Result<BenchRow> {
    let rate = encoder.sample_rate_hz();
    let rate_f = f64::from(rate);
    let (mut encode_secs, mut decode_secs, mut recorded_secs, mut audio_secs) = (0.0, 0.0, 0.0, 0.0);
    let mut outcomes = Vec::new();
    for snr_db in BENCH_SNRS_DB {
        let (mut ok, mut wrong) = (0, 0);
        for _ in 0..trials {
            let payload = rng.bytes(payload_bytes);
            let started = Instant::now();
            let tx = encoder.encode(&payload)?;
            encode_secs += started.elapsed().as_secs_f64();
            audio_secs = tx.len() as f64 / rate_f;
            let lead = (rng.uniform() * BENCH_LEAD_MAX_SECS * rate_f) as usize;
            let rx = recording(&tx, lead, (BENCH_TAIL_SECS * rate_f) as usize, Some(snr_db), rng);
            recorded_secs += rx.len() as f64 / rate_f;
            let started = Instant::now();
            let result = decode_all(rate, &rx);
            decode_secs += started.elapsed().as_secs_f64();
            match result {
                Ok(found) if found.iter().any(|p| p.bytes == payload) => ok += 1,
                Ok(_) => wrong += 1,
                Err(_) => {}
            }
        }
        outcomes.push((ok, wrong));
    }
    let runs = (trials * BENCH_SNRS_DB.len()) as f64;
    Ok(BenchRow {
        sample_rate_hz: rate,
        profile: encoder.profile(),
        payload_bytes,
        audio_secs,
        outcomes,
        encode_ms: encode_secs * 1e3 / runs,
        decode_ms_per_audio_sec: decode_secs * 1e3 / recorded_secs.max(f64::MIN_POSITIVE),
    })
}

fn goodput_bps(row: &BenchRow) -> f64 {
    (row.payload_bytes * 8) as f64 / row.audio_secs.max(f64::MIN_POSITIVE)
}

fn print_table(rows: &[BenchRow], trials: usize) {
    let snr_heads: Vec<String> = BENCH_SNRS_DB.iter().map(|s| format!("{s} dB")).collect();
    println!(
        "| rate Hz | profile | bytes | audio s | goodput bit/s | {} | wrong | enc ms | dec ms/s |",
        snr_heads.join(" | ")
    );
    println!("|{}", "---|".repeat(9 + BENCH_SNRS_DB.len()));
    for row in rows {
        let cells: Vec<String> = row.outcomes.iter().map(|(ok, _)| format!("{ok}/{trials}")).collect();
        let wrong: usize = row.outcomes.iter().map(|(_, w)| w).sum();
        println!(
            "| {} | {} | {} | {:.2} | {:.0} | {} | {wrong} | {:.1} | {:.1} |",
            row.sample_rate_hz,
            row.profile,
            row.payload_bytes,
            row.audio_secs,
            goodput_bps(row),
            cells.join(" | "),
            row.encode_ms,
            row.decode_ms_per_audio_sec
        );
    }
    println!(
        "\nSNR is full-band: white Gaussian noise from 0 Hz to Nyquist, variance = mean \
         signal power / 10^(SNR/10). {trials} random payloads per cell."
    );
}

fn row_json(row: &BenchRow, trials: usize) -> String {
    let points: Vec<String> = BENCH_SNRS_DB
        .iter()
        .zip(&row.outcomes)
        .map(|(snr, (ok, wrong))| format!("{{\"snr_db\":{snr},\"ok\":{ok},\"wrong\":{wrong},\"n\":{trials}}}"))
        .collect();
    format!(
        "{{\"sample_rate_hz\":{},\"profile\":\"{}\",\"payload_bytes\":{},\"audio_secs\":{:.4},\
         \"goodput_bps\":{:.1},\"encode_ms\":{:.3},\"decode_ms_per_audio_sec\":{:.3},\"points\":[{}]}}",
        row.sample_rate_hz,
        row.profile,
        row.payload_bytes,
        row.audio_secs,
        goodput_bps(row),
        row.encode_ms,
        row.decode_ms_per_audio_sec,
        points.join(",")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wav_round_trip_through_encode_and_decode() {
        let dir = std::env::temp_dir().join(format!("vouch-sonic-cmd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let payload_path = dir.join("payload.bin");
        let wav_path = dir.join("tx.wav");
        let out_path = dir.join("rx.bin");
        std::fs::write(&payload_path, b"approve 12.50 EUR").unwrap();
        let code = run(SonicCommand::Encode {
            profile: ProfileArg::Ultrasonic,
            rate: RateArg::Hz44100,
            input: payload_path.clone(),
            output: wav_path.clone(),
        })
        .unwrap();
        assert_eq!(code, ExitCode::SUCCESS);
        let code = run(SonicCommand::Decode { input: wav_path.clone(), output: Some(out_path.clone()) }).unwrap();
        assert_eq!(code, ExitCode::SUCCESS);
        assert_eq!(std::fs::read(&out_path).unwrap(), b"approve 12.50 EUR");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stereo_float_wav_is_mixed_down_and_silence_exits_1() {
        let dir = std::env::temp_dir().join(format!("vouch-sonic-cmd-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let samples = Encoder::new(Profile::Audible, 48_000).unwrap().encode(b"hi").unwrap();
        let stereo = dir.join("stereo.wav");
        let spec = hound::WavSpec {
            channels: 2,
            sample_rate: 48_000,
            bits_per_sample: 32,
            sample_format: hound::SampleFormat::Float,
        };
        let mut writer = hound::WavWriter::create(&stereo, spec).unwrap();
        for &s in &samples {
            writer.write_sample(s).unwrap();
            writer.write_sample(s * 0.5).unwrap();
        }
        writer.finalize().unwrap();
        let (rate, mono) = read_wav(&stereo).unwrap();
        assert_eq!((rate, mono.len()), (48_000, samples.len()));
        assert_eq!(decode_all(rate, &mono).unwrap()[0].bytes, b"hi");

        let silent = dir.join("silent.wav");
        write_wav(&silent, 48_000, &vec![0.0; 48_000]).unwrap();
        let code = run(SonicCommand::Decode { input: silent, output: None }).unwrap();
        assert_eq!(code, ExitCode::from(1));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
