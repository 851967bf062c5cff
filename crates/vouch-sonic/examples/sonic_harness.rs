//! Command-line harness around vouch-sonic for benchmarks and peer
//! comparisons: WAV in and out (via `hound`), timings and results as JSON
//! lines on stdout.
//!
//! ```text
//! sonic_harness encode --profile audible --rate 48000 PAYLOAD.bin...   # writes PAYLOAD.bin.wav
//! sonic_harness decode RECORDING.wav...                              # one JSON line each
//! sonic_harness sweep [--trials 10] [--seed 1]                       # in-process noise sweep
//! ```
//!
//! Times are wall-clock seconds of the library call on one thread, which is
//! its CPU time.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use vouch_sonic::{DecodedPayload, Encoder, Profile, decode_all};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("encode") => encode(&args[1..]),
        Some("decode") => decode(&args[1..]),
        Some("sweep") => sweep(&args[1..]),
        _ => Err("usage: sonic_harness encode|decode|sweep ...".to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("sonic_harness: {message}");
            ExitCode::FAILURE
        }
    }
}

fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map(String::as_str)
}

fn positional(args: &[String]) -> Vec<&str> {
    let mut out = Vec::new();
    let mut skip = false;
    for arg in args {
        if skip {
            skip = false;
        } else if arg.starts_with("--") {
            skip = true;
        } else {
            out.push(arg.as_str());
        }
    }
    out
}

fn encode(args: &[String]) -> Result<(), String> {
    let profile: Profile = flag(args, "--profile").unwrap_or("audible").parse().map_err(|e| format!("{e}"))?;
    let rate: u32 = flag(args, "--rate").unwrap_or("48000").parse().map_err(|e| format!("--rate: {e}"))?;
    let encoder = Encoder::new(profile, rate).map_err(|e| e.to_string())?;
    for path in positional(args) {
        let payload = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
        let started = Instant::now();
        let samples = encoder.encode(&payload).map_err(|e| e.to_string())?;
        let encode_secs = started.elapsed().as_secs_f64();
        let out = format!("{path}.wav");
        write_wav(Path::new(&out), rate, &samples)?;
        println!(
            "{{\"file\":\"{out}\",\"samples\":{},\"audio_secs\":{:.6},\"encode_secs\":{encode_secs:.6}}}",
            samples.len(),
            samples.len() as f64 / f64::from(rate)
        );
    }
    Ok(())
}

fn decode(args: &[String]) -> Result<(), String> {
    for path in positional(args) {
        let (rate, samples) = read_wav(Path::new(path))?;
        let started = Instant::now();
        let result = decode_all(rate, &samples);
        let decode_secs = started.elapsed().as_secs_f64();
        match result {
            Ok(payloads) => {
                let hex: Vec<String> = payloads.iter().map(|p| to_hex(&p.bytes)).collect();
                println!(
                    "{{\"file\":\"{path}\",\"ok\":true,\"payloads\":[\"{}\"],\"decode_secs\":{decode_secs:.6}}}",
                    hex.join("\",\"")
                );
            }
            Err(reason) => println!(
                "{{\"file\":\"{path}\",\"ok\":false,\"reason\":\"{reason}\",\"decode_secs\":{decode_secs:.6}}}"
            ),
        }
    }
    Ok(())
}

/// Same noise model as the comparison script: white Gaussian noise over the
/// whole recording, variance = mean power of the transmitted waveform
/// divided by 10^(SNR/10).
fn sweep(args: &[String]) -> Result<(), String> {
    let trials: usize = flag(args, "--trials").unwrap_or("10").parse().map_err(|e| format!("{e}"))?;
    let mut rng = Rng(flag(args, "--seed").unwrap_or("1").parse().map_err(|e| format!("{e}"))?);
    let snrs: Vec<f64> = flag(args, "--snr")
        .unwrap_or("20,10,5,0,-3,-6,-9")
        .split(',')
        .map(|s| s.parse().map_err(|e| format!("--snr: {e}")))
        .collect::<Result<_, _>>()?;
    let sizes: Vec<usize> = flag(args, "--sizes")
        .unwrap_or("64,140")
        .split(',')
        .map(|s| s.parse().map_err(|e| format!("--sizes: {e}")))
        .collect::<Result<_, _>>()?;
    let profiles: Vec<Profile> = flag(args, "--profiles")
        .unwrap_or("audible,ultrasonic")
        .split(',')
        .map(|s| s.parse::<Profile>().map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let rates: Vec<u32> = flag(args, "--rates")
        .unwrap_or("48000,44100")
        .split(',')
        .map(|s| s.parse().map_err(|e| format!("--rates: {e}")))
        .collect::<Result<_, _>>()?;
    println!("rate_hz,profile,bytes,snr_db,goodput_bps,ok,n,wrong,encode_ms,decode_ms_per_audio_s");
    for &rate in &rates {
        for &profile in &profiles {
            let encoder = Encoder::new(profile, rate).map_err(|e| e.to_string())?;
            for &size in &sizes {
                for &snr in &snrs {
                    let (mut ok, mut wrong) = (0, 0);
                    let (mut encode_secs, mut decode_secs, mut audio_secs) = (0.0, 0.0, 0.0);
                    let mut goodput = 0.0;
                    for _ in 0..trials {
                        let payload: Vec<u8> = (0..size).map(|_| rng.next() as u8).collect();
                        let started = Instant::now();
                        let tx = encoder.encode(&payload).map_err(|e| e.to_string())?;
                        encode_secs += started.elapsed().as_secs_f64();
                        goodput = (size * 8) as f64 / (tx.len() as f64 / f64::from(rate));
                        let power = tx.iter().map(|&s| f64::from(s) * f64::from(s)).sum::<f64>() / tx.len() as f64;
                        let sigma = (power / 10f64.powf(snr / 10.0)).sqrt();
                        let lead = (rng.next() % u64::from(rate / 2)) as usize;
                        let mut rx = vec![0.0f32; lead];
                        rx.extend_from_slice(&tx);
                        rx.resize(rx.len() + rate as usize / 4, 0.0);
                        for s in &mut rx {
                            *s += (rng.gaussian() * sigma) as f32;
                        }
                        audio_secs += rx.len() as f64 / f64::from(rate);
                        let started = Instant::now();
                        let result = decode_all(rate, &rx);
                        decode_secs += started.elapsed().as_secs_f64();
                        match result {
                            Ok(found) if found.iter().any(|p: &DecodedPayload| p.bytes == payload) => ok += 1,
                            Ok(_) => wrong += 1,
                            Err(_) => {}
                        }
                    }
                    println!(
                        "{rate},{profile},{size},{snr},{goodput:.0},{ok},{trials},{wrong},{:.2},{:.1}",
                        encode_secs * 1e3 / trials as f64,
                        decode_secs * 1e3 / audio_secs
                    );
                }
            }
        }
    }
    Ok(())
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn uniform(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn gaussian(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn write_wav(path: &Path, rate: u32, samples: &[f32]) -> Result<(), String> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: rate,
        bits_per_sample: 32,
        sample_format: hound::SampleFormat::Float,
    };
    let mut writer = hound::WavWriter::create(path, spec).map_err(|e| e.to_string())?;
    for &s in samples {
        writer.write_sample(s).map_err(|e| e.to_string())?;
    }
    writer.finalize().map_err(|e| e.to_string())
}

fn read_wav(path: &Path) -> Result<(u32, Vec<f32>), String> {
    let mut reader = hound::WavReader::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let spec = reader.spec();
    let channels = usize::from(spec.channels.max(1));
    let interleaved: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float => reader.samples::<f32>().collect::<Result<_, _>>(),
        hound::SampleFormat::Int => {
            let scale = 1.0 / (1u64 << (spec.bits_per_sample - 1)) as f32;
            reader.samples::<i32>().map(|s| s.map(|v| v as f32 * scale)).collect::<Result<_, _>>()
        }
    }
    .map_err(|e| e.to_string())?;
    let mono = interleaved.chunks(channels).map(|frame| frame.iter().sum::<f32>() / channels as f32).collect();
    Ok((spec.sample_rate, mono))
}
