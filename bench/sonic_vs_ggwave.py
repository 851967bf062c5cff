#!/usr/bin/env python3
"""Vouch sonic modem vs ggwave: goodput and robustness in white Gaussian noise.

Usage (from the repository root):

    pip install ggwave==0.4.3 numpy
    python3 bench/sonic_vs_ggwave.py [--trials 10] [--seed 1] [--markdown out.md]

The vouch side runs through the `sonic_harness` example of crates/vouch-sonic
(built here with `cargo build --release`), the ggwave side through its Python
binding. Both modems get the same random payloads (64 B and 140 B) and the
same channel:

    recording = silence (random 0-0.5 s) + modem waveform + 0.25 s silence
    noise     = white Gaussian, added to every sample of the recording

SNR definition (full band): SNR_dB = 10 log10(P_signal / sigma^2), where
P_signal is the mean of x^2 over the modem's whole emitted waveform and sigma^2
the variance of the noise, which is white from 0 Hz to Nyquist (24 kHz at
48 kHz, 22.05 kHz at 44.1 kHz). A modem occupying a narrow band therefore sees
much less noise in band than the full-band figure suggests; that is the same
for both modems.

Reported per modem, rate, profile and payload size:
  goodput   payload bits / seconds of emitted audio (silence padding excluded)
  ok/N      trials where the exact payload came back, per SNR point
  wrong     trials where a payload came back but differed from the one sent
  enc ms    CPU time of one encode; dec ms/s: decode CPU time per second of
            recording (vouch: timed inside the harness around the library call;
            ggwave: process CPU time around its decode loop)

ggwave runs at 48 kHz only (its protocols are defined at 48 kHz); its 44.1 kHz
rows are therefore absent. ggwave caps payloads at 140 bytes.
"""

import argparse
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

SNRS_DB = [20, 10, 5, 0, -3, -6, -9]
SIZES = [64, 140]
GGWAVE_SAMPLE_RATE = 48000
GGWAVE_PROTOCOLS = {"audible": 2, "ultrasonic": 5}  # "Fastest" of each band
GGWAVE_CHUNK = 1024
LEAD_MAX_SECS = 0.5
TAIL_SECS = 0.25

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_wav_f32(path, rate, samples):
    data = np.asarray(samples, dtype="<f4").tobytes()
    header = b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 3, 1, rate, rate * 4, 4, 32)
    header += b"data" + struct.pack("<I", len(data))
    with open(path, "wb") as f:
        f.write(header + data)


def read_wav_f32(path):
    with open(path, "rb") as f:
        blob = f.read()
    pos, rate, fmt, data = 12, None, None, None
    while pos + 8 <= len(blob):
        cid, size = blob[pos:pos + 4], struct.unpack("<I", blob[pos + 4:pos + 8])[0]
        body = blob[pos + 8:pos + 8 + size]
        if cid == b"fmt ":
            fmt, channels, rate = struct.unpack("<HHI", body[:8])
            if fmt == 0xFFFE and len(body) >= 26:  # WAVE_FORMAT_EXTENSIBLE: sub-format code
                fmt = struct.unpack("<H", body[24:26])[0]
        elif cid == b"data":
            data = body
        pos += 8 + size + (size & 1)
    if fmt != 3 or data is None:
        raise ValueError(f"{path}: expected a 32-bit float WAV")
    return rate, np.frombuffer(data, dtype="<f4").astype(np.float64)


def build_harness():
    subprocess.run(
        ["cargo", "build", "--release", "-q", "-p", "vouch-sonic", "--example", "sonic_harness"],
        cwd=REPO, check=True)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
    return os.path.join(target, "release", "examples", "sonic_harness")


def harness(binary, *args):
    out = subprocess.run([binary, *args], check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def noisy(rng, signal, rate, snr_db):
    power = float(np.mean(signal ** 2))
    sigma = np.sqrt(power / 10 ** (snr_db / 10))
    lead = rng.integers(0, int(LEAD_MAX_SECS * rate))
    rec = np.concatenate([np.zeros(lead), signal, np.zeros(int(TAIL_SECS * rate))])
    return rec + rng.normal(0.0, sigma, rec.shape)


def run_vouch(binary, workdir, payloads, rate, profile, np_rng):
    rows = []
    for size, batch in payloads.items():
        paths = []
        for i, payload in enumerate(batch):
            path = os.path.join(workdir, f"v_{profile}_{rate}_{size}_{i}.bin")
            with open(path, "wb") as f:
                f.write(payload)
            paths.append(path)
        encoded = harness(binary, "encode", "--profile", profile, "--rate", str(rate), *paths)
        waves = [read_wav_f32(e["file"])[1] for e in encoded]
        audio_secs = float(np.mean([e["audio_secs"] for e in encoded]))
        enc_ms = 1e3 * float(np.mean([e["encode_secs"] for e in encoded]))
        per_snr, dec_secs, rec_secs = {}, 0.0, 0.0
        for snr in SNRS_DB:
            files = []
            for i, wave in enumerate(waves):
                rec = noisy(np_rng, wave, rate, snr)
                rec_secs += len(rec) / rate
                path = os.path.join(workdir, f"rx_{profile}_{rate}_{size}_{snr}_{i}.wav")
                write_wav_f32(path, rate, rec)
                files.append(path)
            results = harness(binary, "decode", *files)
            ok = wrong = 0
            for payload, result in zip(batch, results):
                dec_secs += result["decode_secs"]
                if result["ok"]:
                    if payload.hex() in result["payloads"]:
                        ok += 1
                    else:
                        wrong += 1
            per_snr[snr] = (ok, wrong)
            for path in files:
                os.remove(path)
        rows.append(dict(modem="vouch-sonic", rate=rate, profile=profile, size=size,
                         audio_secs=audio_secs, goodput=size * 8 / audio_secs, per_snr=per_snr,
                         n=len(batch), enc_ms=enc_ms, dec_ms_per_s=1e3 * dec_secs / rec_secs))
    return rows


def run_ggwave(payloads, profile, np_rng):
    import ggwave

    ggwave.disableLog()
    params = ggwave.getDefaultParameters()
    encoder = ggwave.init(params)
    protocol = GGWAVE_PROTOCOLS[profile]
    rows = []
    for size, batch in payloads.items():
        waves, enc_secs = [], 0.0
        for payload in batch:
            started = time.process_time()
            raw = ggwave.encode(payload, protocolId=protocol, volume=50, instance=encoder)
            enc_secs += time.process_time() - started
            waves.append(np.frombuffer(raw, dtype=np.float32).astype(np.float64))
        audio_secs = float(np.mean([len(w) for w in waves])) / GGWAVE_SAMPLE_RATE
        per_snr, dec_secs, rec_secs = {}, 0.0, 0.0
        for snr in SNRS_DB:
            ok = wrong = 0
            for payload, wave in zip(batch, waves):
                rec = noisy(np_rng, wave, GGWAVE_SAMPLE_RATE, snr).astype(np.float32)
                rec_secs += len(rec) / GGWAVE_SAMPLE_RATE
                decoder = ggwave.init(params)
                started = time.process_time()
                found = None
                for at in range(0, len(rec), GGWAVE_CHUNK):
                    chunk = rec[at:at + GGWAVE_CHUNK]
                    if len(chunk) < GGWAVE_CHUNK:
                        chunk = np.pad(chunk, (0, GGWAVE_CHUNK - len(chunk)))
                    found = ggwave.decode(decoder, chunk.tobytes())
                    if found is not None:
                        break
                dec_secs += time.process_time() - started
                ggwave.free(decoder)
                if found is not None:
                    if found == payload:
                        ok += 1
                    else:
                        wrong += 1
            per_snr[snr] = (ok, wrong)
        rows.append(dict(modem="ggwave 0.4.3", rate=GGWAVE_SAMPLE_RATE, profile=profile,
                         size=size, audio_secs=audio_secs, goodput=size * 8 / audio_secs,
                         per_snr=per_snr, n=len(batch), enc_ms=1e3 * enc_secs / len(batch),
                         dec_ms_per_s=1e3 * dec_secs / rec_secs))
    ggwave.free(encoder)
    return rows


def table(rows):
    head = ["modem", "rate Hz", "profile", "bytes", "audio s", "goodput bit/s"]
    head += [f"{s} dB" for s in SNRS_DB] + ["wrong", "enc ms", "dec ms/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["modem"], str(r["rate"]), r["profile"], str(r["size"]),
                 f"{r['audio_secs']:.2f}", f"{r['goodput']:.0f}"]
        cells += [f"{r['per_snr'][s][0]}/{r['n']}" for s in SNRS_DB]
        cells += [str(sum(w for _, w in r["per_snr"].values())),
                  f"{r['enc_ms']:.1f}", f"{r['dec_ms_per_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(rows):
    gg = next(r for r in rows if r["modem"].startswith("ggwave") and r["profile"] == "audible"
              and r["size"] == 140)
    out = [f"ggwave fastest audible goodput (140 B): {gg['goodput']:.0f} bit/s; "
           f"target >= {2 * gg['goodput']:.0f} bit/s at >= 9/10 decodes at -6 dB, 0 wrong."]
    for r in rows:
        if r["modem"] != "vouch-sonic":
            continue
        ok6 = r["per_snr"][-6][0]
        wrong = sum(w for _, w in r["per_snr"].values())
        met = r["goodput"] >= 2 * gg["goodput"] and ok6 * 10 >= 9 * r["n"] and wrong == 0
        out.append(f"  vouch {r['profile']:<10} {r['rate']} Hz {r['size']:>3} B: "
                   f"{r['goodput']:.0f} bit/s = {r['goodput'] / gg['goodput']:.2f}x, "
                   f"-6 dB {ok6}/{r['n']}, wrong {wrong}: {'MET' if met else 'NOT MET'}")
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=10, help="payloads per size and SNR")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--harness", help="prebuilt sonic_harness binary (default: build it)")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    np_rng = np.random.default_rng(args.seed)
    payloads = {size: [bytes(rng.getrandbits(8) for _ in range(size)) for _ in range(args.trials)]
                for size in SIZES}
    binary = args.harness or build_harness()
    workdir = tempfile.mkdtemp(prefix="sonic_vs_ggwave_")
    rows = []
    try:
        for profile in ["audible", "ultrasonic"]:
            rows += run_ggwave(payloads, profile, np_rng)
            for rate in [48000, 44100]:
                rows += run_vouch(binary, workdir, payloads, rate, profile, np_rng)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = table(rows) + "\n\n" + verdict(rows)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
