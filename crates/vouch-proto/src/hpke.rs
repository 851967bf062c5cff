//! Hybrid Public Key Encryption (RFC 9180), base mode only, in the one suite Vouch uses:
//! DHKEM(P-256, HKDF-SHA256), HKDF-SHA256, AES-128-GCM (KEM 0x0010, KDF 0x0001, AEAD
//! 0x0001). Built on the aws-lc-rs primitives the crate already uses (ECDH P-256, HMAC-SHA256,
//! AES-128-GCM) rather than on a second crypto stack.
//!
//! Base mode does not authenticate the sender: Vouch authenticates what it seals by signing
//! the result (a JWS under its published key), and binds each use to its context through
//! `info` and `aad`.
//!
//! Public keys and `enc` are uncompressed SEC1 points (65 bytes), checked to be on the curve;
//! private keys are 32-byte big-endian scalars in `1..n`, kept in zeroizing buffers.

use aws_lc_rs::{aead, agreement, hmac};
use zeroize::Zeroizing;

use crate::{ProtoError, VerifyingKey, crypto::SecureRandom};

pub const KEM_ID: u16 = 0x0010;
pub const KDF_ID: u16 = 0x0001;
pub const AEAD_ID: u16 = 0x0001;
/// Length of `enc`, the sender's ephemeral public key: an uncompressed SEC1 point (`Nenc`).
pub const ENC_BYTES: usize = 65;
/// Length of the AES-128-GCM tag each ciphertext carries (`Nt`).
pub const TAG_BYTES: usize = 16;
/// Longest secret [`SenderContext::export`] gives: HKDF-Expand's 255 blocks (RFC 5869 section 2.3).
pub const EXPORT_BYTES_MAX: usize = 255 * HASH_BYTES;

/// `Nsk`: a P-256 scalar.
const SCALAR_BYTES: usize = 32;
/// `Nh` of HKDF-SHA256, also the KEM's `Nsecret`.
const HASH_BYTES: usize = 32;
/// `Nk` of AES-128-GCM.
const KEY_BYTES: usize = 16;
/// `Nn` of AES-128-GCM.
const NONCE_BYTES: usize = 12;

/// `"KEM" || I2OSP(kem_id, 2)`: the suite id inside the KEM (RFC 9180 section 4.1).
const KEM_SUITE_ID: &[u8] = b"KEM\x00\x10";
/// `"HPKE" || kem_id || kdf_id || aead_id`: the suite id of the key schedule (section 5.1).
const HPKE_SUITE_ID: &[u8] = b"HPKE\x00\x10\x00\x01\x00\x01";
const VERSION_LABEL: &[u8] = b"HPKE-v1";
const MODE_BASE: u8 = 0x00;
/// DeriveKeyPair's candidate counter is one byte (section 7.1.3).
const DERIVE_CANDIDATES: u16 = 256;

fn hpke_error(detail: impl ToString) -> ProtoError {
    ProtoError::Hpke(detail.to_string())
}

type Secret = Zeroizing<[u8; HASH_BYTES]>;

/// `LabeledExtract(salt, label, ikm)` (section 4) over HKDF-SHA256.
fn labeled_extract(suite_id: &[u8], salt: &[u8], label: &[u8], ikm: &[u8]) -> Secret {
    let mut context = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, salt));
    for part in [VERSION_LABEL, suite_id, label, ikm] {
        context.update(part);
    }
    let mut prk = Zeroizing::new([0u8; HASH_BYTES]);
    prk.copy_from_slice(context.sign().as_ref());
    prk
}

/// `LabeledExpand(prk, label, info, L)` (section 4) over HKDF-SHA256, filling `out` (`L` bytes,
/// at most [`EXPORT_BYTES_MAX`]: callers check it).
fn labeled_expand(suite_id: &[u8], prk: &[u8; HASH_BYTES], label: &[u8], info: &[u8], out: &mut [u8]) {
    debug_assert!(out.len() <= EXPORT_BYTES_MAX);
    let length = (out.len() as u16).to_be_bytes();
    let key = hmac::Key::new(hmac::HMAC_SHA256, prk);
    let mut block = Zeroizing::new([0u8; HASH_BYTES]);
    for (index, chunk) in out.chunks_mut(HASH_BYTES).enumerate() {
        let mut context = hmac::Context::with_key(&key);
        // HKDF-Expand (RFC 5869 section 2.3): T(i) = HMAC(prk, T(i-1) || info || i), T(0) empty.
        if index > 0 {
            context.update(&block[..]);
        }
        for part in [&length[..], VERSION_LABEL, suite_id, label, info] {
            context.update(part);
        }
        // Invariant: at most 255 blocks, so the counter fits the one byte HKDF gives it.
        context.update(&[index as u8 + 1]);
        block.copy_from_slice(context.sign().as_ref());
        chunk.copy_from_slice(&block[..chunk.len()]);
    }
}

/// An HPKE recipient (or ephemeral sender) key: a P-256 scalar. Debug shows only the public key.
pub struct HpkePrivateKey {
    scalar: Zeroizing<[u8; SCALAR_BYTES]>,
    key: agreement::PrivateKey,
    public: HpkePublicKey,
}

impl std::fmt::Debug for HpkePrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HpkePrivateKey").field("public", &self.public).finish_non_exhaustive()
    }
}

impl HpkePrivateKey {
    /// A fresh key: `DeriveKeyPair(random(Nsk))`, as RFC 9180 section 7.1.3 allows.
    pub fn generate(rng: &dyn SecureRandom) -> Result<Self, ProtoError> {
        let mut ikm = Zeroizing::new([0u8; SCALAR_BYTES]);
        rng.fill(&mut ikm[..]).map_err(|_| ProtoError::Rng)?;
        Self::derive(&ikm[..])
    }

    /// A key from its 32-byte big-endian scalar, which must be in `1..n`.
    pub fn from_bytes(scalar: &[u8]) -> Result<Self, ProtoError> {
        let scalar: [u8; SCALAR_BYTES] = scalar.try_into().map_err(|_| {
            ProtoError::InvalidKey(format!("HPKE private key is {} bytes, expected {SCALAR_BYTES}", scalar.len()))
        })?;
        let scalar = Zeroizing::new(scalar);
        // aws-lc refuses zero and anything not below the group order.
        let key = agreement::PrivateKey::from_private_key(&agreement::ECDH_P256, &scalar[..]).map_err(|_| {
            ProtoError::InvalidKey("HPKE private key is not a P-256 scalar between 1 and the group order".into())
        })?;
        let public = key
            .compute_public_key()
            .map_err(|_| ProtoError::InvalidKey("HPKE public key cannot be computed".into()))
            .and_then(|point| HpkePublicKey::from_sec1(point.as_ref()))?;
        Ok(HpkePrivateKey { scalar, key, public })
    }

    /// `DeriveKeyPair(ikm)` of DHKEM(P-256, HKDF-SHA256) (RFC 9180 section 7.1.3): rejection
    /// sampling of candidates expanded from `ikm`, which must be at least 32 bytes.
    pub fn derive(ikm: &[u8]) -> Result<Self, ProtoError> {
        if ikm.len() < SCALAR_BYTES {
            return Err(ProtoError::InvalidKey(format!(
                "HPKE key material is {} bytes, expected at least {SCALAR_BYTES}",
                ikm.len()
            )));
        }
        let dkp_prk = labeled_extract(KEM_SUITE_ID, b"", b"dkp_prk", ikm);
        let mut candidate = Zeroizing::new([0u8; SCALAR_BYTES]);
        for counter in 0..DERIVE_CANDIDATES {
            // The P-256 bitmask is 0xff: the candidate is used as expanded.
            labeled_expand(KEM_SUITE_ID, &dkp_prk, b"candidate", &[counter as u8], &mut candidate[..]);
            // `from_bytes` refuses exactly the candidates DeriveKeyPair rejects: zero and
            // those not below the group order.
            if let Ok(key) = Self::from_bytes(&candidate[..]) {
                return Ok(key);
            }
        }
        Err(hpke_error("DeriveKeyPair found no P-256 scalar among 256 candidates"))
    }

    pub fn to_bytes(&self) -> Zeroizing<[u8; SCALAR_BYTES]> {
        self.scalar.clone()
    }

    pub fn public_key(&self) -> HpkePublicKey {
        self.public.clone()
    }

    /// `DH(sk, pk)`: the x-coordinate of the shared point.
    fn dh(&self, peer: &HpkePublicKey) -> Result<Secret, ProtoError> {
        let peer = agreement::UnparsedPublicKey::new(&agreement::ECDH_P256, peer.sec1());
        agreement::agree(&self.key, peer, hpke_error("P-256 key agreement failed"), |shared| {
            let mut out = Zeroizing::new([0u8; HASH_BYTES]);
            if shared.len() != HASH_BYTES {
                return Err(hpke_error(format!("P-256 shared secret is {} bytes, expected 32", shared.len())));
            }
            out.copy_from_slice(shared);
            Ok(out)
        })
    }
}

/// An HPKE public key: an uncompressed SEC1 P-256 point, checked to be on the curve.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct HpkePublicKey([u8; ENC_BYTES]);

impl HpkePublicKey {
    pub fn from_sec1(bytes: &[u8]) -> Result<Self, ProtoError> {
        // The same uncompressed P-256 point an ES256 key is, under the same checks.
        VerifyingKey::from_sec1(bytes).map(|key| HpkePublicKey(*key.sec1()))
    }

    pub fn sec1(&self) -> &[u8; ENC_BYTES] {
        &self.0
    }
}

/// What a single-shot [`seal`] produces: the encapsulated key and the ciphertext with its tag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sealed {
    pub enc: [u8; ENC_BYTES],
    pub ciphertext: Vec<u8>,
}

/// `ExtractAndExpand(dh, kem_context)` with `kem_context = enc || pkRm` (section 4.1).
fn extract_and_expand(dh: &Secret, enc: &[u8; ENC_BYTES], recipient: &HpkePublicKey) -> Secret {
    let eae_prk = labeled_extract(KEM_SUITE_ID, b"", b"eae_prk", &dh[..]);
    let mut kem_context = [0u8; 2 * ENC_BYTES];
    kem_context[..ENC_BYTES].copy_from_slice(enc);
    kem_context[ENC_BYTES..].copy_from_slice(recipient.sec1());
    let mut shared_secret = Zeroizing::new([0u8; HASH_BYTES]);
    labeled_expand(KEM_SUITE_ID, &eae_prk, b"shared_secret", &kem_context, &mut shared_secret[..]);
    shared_secret
}

/// `Encap(pkR)` with the ephemeral key given: `(enc, shared_secret)`.
fn encap(recipient: &HpkePublicKey, ephemeral: &HpkePrivateKey) -> Result<([u8; ENC_BYTES], Secret), ProtoError> {
    let dh = ephemeral.dh(recipient)?;
    let enc = *ephemeral.public.sec1();
    let shared_secret = extract_and_expand(&dh, &enc, recipient);
    Ok((enc, shared_secret))
}

/// `Decap(enc, skR)`.
fn decap(recipient: &HpkePrivateKey, enc: &[u8]) -> Result<Secret, ProtoError> {
    let enc: [u8; ENC_BYTES] =
        enc.try_into().map_err(|_| hpke_error(format!("enc is {} bytes, expected {ENC_BYTES}", enc.len())))?;
    let ephemeral = HpkePublicKey::from_sec1(&enc).map_err(|_| hpke_error("enc is not a point on P-256"))?;
    let dh = recipient.dh(&ephemeral)?;
    Ok(extract_and_expand(&dh, &enc, &recipient.public))
}

/// What the base-mode key schedule derives (section 5.1).
struct KeySchedule {
    key: Zeroizing<[u8; KEY_BYTES]>,
    base_nonce: [u8; NONCE_BYTES],
    exporter_secret: Secret,
}

/// `mode || psk_id_hash || info_hash`, with the empty `psk_id` of base mode.
fn key_schedule_context(info: &[u8]) -> [u8; 1 + 2 * HASH_BYTES] {
    let psk_id_hash = labeled_extract(HPKE_SUITE_ID, b"", b"psk_id_hash", b"");
    let info_hash = labeled_extract(HPKE_SUITE_ID, b"", b"info_hash", info);
    let mut context = [0u8; 1 + 2 * HASH_BYTES];
    context[0] = MODE_BASE;
    context[1..1 + HASH_BYTES].copy_from_slice(&psk_id_hash[..]);
    context[1 + HASH_BYTES..].copy_from_slice(&info_hash[..]);
    context
}

fn key_schedule(shared_secret: &Secret, info: &[u8]) -> KeySchedule {
    let context = key_schedule_context(info);
    // Base mode: the psk is empty.
    let secret = labeled_extract(HPKE_SUITE_ID, &shared_secret[..], b"secret", b"");
    let mut schedule = KeySchedule {
        key: Zeroizing::new([0u8; KEY_BYTES]),
        base_nonce: [0u8; NONCE_BYTES],
        exporter_secret: Zeroizing::new([0u8; HASH_BYTES]),
    };
    labeled_expand(HPKE_SUITE_ID, &secret, b"key", &context, &mut schedule.key[..]);
    labeled_expand(HPKE_SUITE_ID, &secret, b"base_nonce", &context, &mut schedule.base_nonce);
    labeled_expand(HPKE_SUITE_ID, &secret, b"exp", &context, &mut schedule.exporter_secret[..]);
    schedule
}

/// The state both ends share after setup: the AEAD key, the nonce sequence and the exporter.
struct Context {
    aead: aead::LessSafeKey,
    base_nonce: [u8; NONCE_BYTES],
    seq: u64,
    exporter_secret: Secret,
}

impl Context {
    fn new(schedule: KeySchedule) -> Result<Self, ProtoError> {
        let key = aead::UnboundKey::new(&aead::AES_128_GCM, &schedule.key[..])
            .map_err(|_| hpke_error("AES-128-GCM refused the derived key"))?;
        Ok(Context {
            aead: aead::LessSafeKey::new(key),
            base_nonce: schedule.base_nonce,
            seq: 0,
            exporter_secret: schedule.exporter_secret,
        })
    }

    /// `ComputeNonce(seq)`: the base nonce XOR the sequence number, big-endian, right-aligned.
    /// Refuses once the sequence number cannot be incremented, so no nonce is used twice.
    fn nonce(&self) -> Result<aead::Nonce, ProtoError> {
        if self.seq == u64::MAX {
            return Err(hpke_error("message limit of this context reached"));
        }
        let mut nonce = self.base_nonce;
        for (byte, seq_byte) in nonce[NONCE_BYTES - 8..].iter_mut().zip(self.seq.to_be_bytes()) {
            *byte ^= seq_byte;
        }
        Ok(aead::Nonce::assume_unique_for_key(nonce))
    }

    fn seal(&mut self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, ProtoError> {
        let nonce = self.nonce()?;
        // Zeroizing until sealed, so plaintext left by a failed seal does not linger.
        let mut buffer = Zeroizing::new(plaintext.to_vec());
        self.aead
            .seal_in_place_append_tag(nonce, aead::Aad::from(aad), &mut *buffer)
            .map_err(|_| hpke_error("AES-128-GCM sealing failed"))?;
        self.seq += 1;
        Ok(std::mem::take(&mut *buffer))
    }

    fn open(&mut self, aad: &[u8], ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>, ProtoError> {
        if ciphertext.len() < TAG_BYTES {
            return Err(hpke_error(format!(
                "ciphertext is {} bytes, shorter than the {TAG_BYTES}-byte tag",
                ciphertext.len()
            )));
        }
        let nonce = self.nonce()?;
        let mut buffer = Zeroizing::new(ciphertext.to_vec());
        let plaintext_len = self
            .aead
            .open_in_place(nonce, aead::Aad::from(aad), &mut buffer[..])
            .map_err(|_| hpke_error("ciphertext does not authenticate under this key, info and aad"))?
            .len();
        buffer.truncate(plaintext_len);
        // Only a message that opened moves the sequence on (section 5.2).
        self.seq += 1;
        Ok(buffer)
    }

    /// `Export(exporter_context, L)` (section 5.3).
    fn export(&self, exporter_context: &[u8], len: usize) -> Result<Zeroizing<Vec<u8>>, ProtoError> {
        if len > EXPORT_BYTES_MAX {
            return Err(hpke_error(format!("export of {len} bytes asked, over the limit of {EXPORT_BYTES_MAX}")));
        }
        let mut out = Zeroizing::new(vec![0u8; len]);
        labeled_expand(HPKE_SUITE_ID, &self.exporter_secret, b"sec", exporter_context, &mut out[..]);
        Ok(out)
    }
}

/// The sender's side of an HPKE context: seals messages in order.
pub struct SenderContext(Context);

/// The recipient's side of an HPKE context: opens messages in the order they were sealed.
pub struct ReceiverContext(Context);

impl std::fmt::Debug for SenderContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SenderContext").field("seq", &self.0.seq).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for ReceiverContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiverContext").field("seq", &self.0.seq).finish_non_exhaustive()
    }
}

impl SenderContext {
    pub fn seal(&mut self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, ProtoError> {
        self.0.seal(aad, plaintext)
    }

    pub fn export(&self, exporter_context: &[u8], len: usize) -> Result<Zeroizing<Vec<u8>>, ProtoError> {
        self.0.export(exporter_context, len)
    }
}

impl ReceiverContext {
    pub fn open(&mut self, aad: &[u8], ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>, ProtoError> {
        self.0.open(aad, ciphertext)
    }

    pub fn export(&self, exporter_context: &[u8], len: usize) -> Result<Zeroizing<Vec<u8>>, ProtoError> {
        self.0.export(exporter_context, len)
    }
}

/// `SetupBaseS(pkR, info)` with the ephemeral key given, which must be fresh for every call
/// (use [`seal`], which makes one, unless replaying known-answer vectors). Returns `enc`.
pub fn setup_sender(
    recipient: &HpkePublicKey,
    info: &[u8],
    ephemeral: &HpkePrivateKey,
) -> Result<([u8; ENC_BYTES], SenderContext), ProtoError> {
    let (enc, shared_secret) = encap(recipient, ephemeral)?;
    Ok((enc, SenderContext(Context::new(key_schedule(&shared_secret, info))?)))
}

/// `SetupBaseR(enc, skR, info)`.
pub fn setup_receiver(recipient: &HpkePrivateKey, enc: &[u8], info: &[u8]) -> Result<ReceiverContext, ProtoError> {
    let shared_secret = decap(recipient, enc)?;
    Ok(ReceiverContext(Context::new(key_schedule(&shared_secret, info))?))
}

/// Single-shot base-mode encryption (`SealBase`, section 6.1) under a fresh ephemeral key.
pub fn seal(
    recipient: &HpkePublicKey,
    info: &[u8],
    aad: &[u8],
    plaintext: &[u8],
    rng: &dyn SecureRandom,
) -> Result<Sealed, ProtoError> {
    let ephemeral = HpkePrivateKey::generate(rng)?;
    let (enc, mut context) = setup_sender(recipient, info, &ephemeral)?;
    Ok(Sealed { enc, ciphertext: context.seal(aad, plaintext)? })
}

/// Single-shot base-mode decryption (`OpenBase`, section 6.1).
pub fn open(
    recipient: &HpkePrivateKey,
    enc: &[u8],
    info: &[u8],
    aad: &[u8],
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, ProtoError> {
    setup_receiver(recipient, enc, info)?.open(aad, ciphertext)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::SystemRandom;
    use proptest::prelude::*;

    fn hex(text: &str) -> Vec<u8> {
        crate::hex::decode(text).expect("hex digits")
    }

    fn field(vector: &serde_json::Value, name: &str) -> Vec<u8> {
        hex(vector[name].as_str().unwrap_or_else(|| panic!("vector has no {name}")))
    }

    fn rfc9180_a3_1() -> serde_json::Value {
        serde_json::from_str(include_str!("../tests/data/rfc9180_a3_1_base.json")).unwrap()
    }

    /// RFC 9180 Appendix A.3.1, base mode of DHKEM(P-256, HKDF-SHA256), HKDF-SHA256,
    /// AES-128-GCM: every value the appendix lists, from both ends.
    #[test]
    fn rfc9180_a3_1_base_mode_vector() {
        let v = rfc9180_a3_1();
        assert_eq!(
            (v["mode"].as_u64(), v["kem_id"].as_u64(), v["kdf_id"].as_u64(), v["aead_id"].as_u64()),
            (Some(0), Some(u64::from(KEM_ID)), Some(u64::from(KDF_ID)), Some(u64::from(AEAD_ID)))
        );
        let info = field(&v, "info");

        let ephemeral = HpkePrivateKey::derive(&field(&v, "ikmE")).unwrap();
        assert_eq!(ephemeral.to_bytes().to_vec(), field(&v, "skEm"));
        assert_eq!(ephemeral.public_key().sec1().to_vec(), field(&v, "pkEm"));
        let recipient = HpkePrivateKey::derive(&field(&v, "ikmR")).unwrap();
        assert_eq!(recipient.to_bytes().to_vec(), field(&v, "skRm"));
        assert_eq!(recipient.public_key().sec1().to_vec(), field(&v, "pkRm"));
        assert_eq!(HpkePrivateKey::from_bytes(&field(&v, "skRm")).unwrap().public_key(), recipient.public_key());

        let (enc, shared_secret) = encap(&recipient.public_key(), &ephemeral).unwrap();
        assert_eq!(enc.to_vec(), field(&v, "enc"));
        assert_eq!(shared_secret.to_vec(), field(&v, "shared_secret"));
        assert_eq!(decap(&recipient, &enc).unwrap().to_vec(), field(&v, "shared_secret"));

        assert_eq!(key_schedule_context(&info).to_vec(), field(&v, "key_schedule_context"));
        let schedule = key_schedule(&shared_secret, &info);
        assert_eq!(schedule.key.to_vec(), field(&v, "key"));
        assert_eq!(schedule.base_nonce.to_vec(), field(&v, "base_nonce"));
        assert_eq!(schedule.exporter_secret.to_vec(), field(&v, "exporter_secret"));

        let (enc, mut sender) = setup_sender(&recipient.public_key(), &info, &ephemeral).unwrap();
        let mut receiver = setup_receiver(&recipient, &enc, &info).unwrap();
        let encryptions = v["encryptions"].as_array().unwrap();
        assert_eq!(encryptions.len(), 6);
        let last = encryptions.iter().filter_map(|e| e["sequence_number"].as_u64()).max().unwrap();
        // Contexts only move forward, so the unlisted sequence numbers are sealed and opened too.
        for seq in 0..=last {
            let listed = encryptions.iter().find(|e| e["sequence_number"].as_u64() == Some(seq));
            let (aad, plaintext) = match listed {
                Some(e) => (field(e, "aad"), field(e, "pt")),
                None => (format!("Count-{seq}").into_bytes(), field(&encryptions[0], "pt")),
            };
            let ciphertext = sender.seal(&aad, &plaintext).unwrap();
            if let Some(e) = listed {
                assert_eq!(receiver.0.nonce().unwrap().as_ref().to_vec(), field(e, "nonce"), "nonce {seq}");
                assert_eq!(ciphertext, field(e, "ct"), "ciphertext {seq}");
            }
            assert_eq!(*receiver.open(&aad, &ciphertext).unwrap(), plaintext, "open {seq}");
        }

        let exports = v["exports"].as_array().unwrap();
        assert_eq!(exports.len(), 3);
        for e in exports {
            let context = field(e, "exporter_context");
            let len = e["L"].as_u64().unwrap() as usize;
            assert_eq!(*sender.export(&context, len).unwrap(), field(e, "exported_value"));
            assert_eq!(*receiver.export(&context, len).unwrap(), field(e, "exported_value"));
        }
    }

    #[test]
    fn single_shot_opens_what_it_sealed_and_nothing_else() {
        let rng = SystemRandom::new();
        let key = HpkePrivateKey::generate(&rng).unwrap();
        let sealed = seal(&key.public_key(), b"info", b"aad", b"secret", &rng).unwrap();
        assert_eq!(sealed.ciphertext.len(), b"secret".len() + TAG_BYTES);
        assert_eq!(*open(&key, &sealed.enc, b"info", b"aad", &sealed.ciphertext).unwrap(), b"secret");

        let not_authentic = hpke_error("ciphertext does not authenticate under this key, info and aad");
        let other = HpkePrivateKey::generate(&rng).unwrap();
        assert_eq!(open(&other, &sealed.enc, b"info", b"aad", &sealed.ciphertext), Err(not_authentic.clone()));
        assert_eq!(open(&key, &sealed.enc, b"infO", b"aad", &sealed.ciphertext), Err(not_authentic.clone()));
        assert_eq!(open(&key, &sealed.enc, b"info", b"aaD", &sealed.ciphertext), Err(not_authentic.clone()));
        for bit in [0, 8 * sealed.ciphertext.len() - 1] {
            let mut flipped = sealed.ciphertext.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(open(&key, &sealed.enc, b"info", b"aad", &flipped), Err(not_authentic.clone()));
        }
        let truncated = &sealed.ciphertext[..sealed.ciphertext.len() - 1];
        assert_eq!(open(&key, &sealed.enc, b"info", b"aad", truncated), Err(not_authentic.clone()));
        assert_eq!(
            open(&key, &sealed.enc, b"info", b"aad", &sealed.ciphertext[..TAG_BYTES - 1]),
            Err(hpke_error("ciphertext is 15 bytes, shorter than the 16-byte tag"))
        );
        // Another ephemeral key that is a valid point still derives another secret.
        let other_enc = *other.public_key().sec1();
        assert_eq!(open(&key, &other_enc, b"info", b"aad", &sealed.ciphertext), Err(not_authentic));
    }

    #[test]
    fn enc_must_be_an_uncompressed_point_on_the_curve() {
        let rng = SystemRandom::new();
        let key = HpkePrivateKey::generate(&rng).unwrap();
        let sealed = seal(&key.public_key(), b"", b"", b"", &rng).unwrap();
        assert_eq!(
            open(&key, &sealed.enc[..64], b"", b"", &sealed.ciphertext),
            Err(hpke_error("enc is 64 bytes, expected 65"))
        );
        let mut off_curve = sealed.enc;
        off_curve[64] ^= 1;
        assert_eq!(
            open(&key, &off_curve, b"", b"", &sealed.ciphertext),
            Err(hpke_error("enc is not a point on P-256"))
        );
        let mut compressed_tag = sealed.enc;
        compressed_tag[0] = 0x02;
        assert_eq!(
            open(&key, &compressed_tag, b"", b"", &sealed.ciphertext),
            Err(hpke_error("enc is not a point on P-256"))
        );
    }

    #[test]
    fn keys_refuse_what_is_not_a_p256_key() {
        let order = hex("ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551");
        for scalar in [vec![0u8; 32], order, vec![0xff; 32]] {
            assert!(matches!(HpkePrivateKey::from_bytes(&scalar), Err(ProtoError::InvalidKey(_))), "{scalar:?}");
        }
        let mut one = [0u8; 32];
        one[31] = 1;
        let key = HpkePrivateKey::from_bytes(&one).unwrap();
        assert_eq!(*key.to_bytes(), one);
        assert!(matches!(HpkePrivateKey::from_bytes(&one[1..]), Err(ProtoError::InvalidKey(_))));
        assert!(matches!(HpkePrivateKey::derive(&[7u8; 31]), Err(ProtoError::InvalidKey(_))));

        let point = *key.public_key().sec1();
        assert_eq!(HpkePublicKey::from_sec1(&point).unwrap(), key.public_key());
        let mut off_curve = point;
        off_curve[64] ^= 1;
        assert!(matches!(HpkePublicKey::from_sec1(&off_curve), Err(ProtoError::InvalidKey(_))));
        assert!(matches!(HpkePublicKey::from_sec1(&point[..33]), Err(ProtoError::InvalidKey(_))));
    }

    #[test]
    fn debug_output_holds_no_secret() {
        let rng = SystemRandom::new();
        let key = HpkePrivateKey::generate(&rng).unwrap();
        let shown = format!("{key:?}");
        assert!(shown.starts_with("HpkePrivateKey { public: HpkePublicKey("), "{shown}");
        let scalar_bytes = format!("{:?}", &key.to_bytes()[..]);
        assert!(!shown.contains(&scalar_bytes[1..scalar_bytes.len() - 1]));
        let (_, sender) = setup_sender(&key.public_key(), b"", &HpkePrivateKey::generate(&rng).unwrap()).unwrap();
        assert_eq!(format!("{sender:?}"), "SenderContext { seq: 0, .. }");
    }

    #[test]
    fn contexts_refuse_reordered_messages_and_oversized_exports() {
        let rng = SystemRandom::new();
        let key = HpkePrivateKey::generate(&rng).unwrap();
        let (enc, mut sender) =
            setup_sender(&key.public_key(), b"i", &HpkePrivateKey::generate(&rng).unwrap()).unwrap();
        let mut receiver = setup_receiver(&key, &enc, b"i").unwrap();
        let first = sender.seal(b"", b"one").unwrap();
        let second = sender.seal(b"", b"two").unwrap();
        assert!(receiver.open(b"", &second).is_err());
        // A refused message leaves the sequence where it was.
        assert_eq!(*receiver.open(b"", &first).unwrap(), b"one");
        assert_eq!(*receiver.open(b"", &second).unwrap(), b"two");
        assert_eq!(sender.export(b"c", EXPORT_BYTES_MAX).unwrap().len(), EXPORT_BYTES_MAX);
        assert_eq!(
            receiver.export(b"c", EXPORT_BYTES_MAX + 1),
            Err(hpke_error("export of 8161 bytes asked, over the limit of 8160"))
        );
        sender.0.seq = u64::MAX;
        assert_eq!(sender.seal(b"", b""), Err(hpke_error("message limit of this context reached")));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn seal_then_open_round_trips(
            info in proptest::collection::vec(any::<u8>(), 0..64),
            aad in proptest::collection::vec(any::<u8>(), 0..64),
            plaintext in proptest::collection::vec(any::<u8>(), 0..1024),
        ) {
            let rng = SystemRandom::new();
            let key = HpkePrivateKey::generate(&rng).unwrap();
            let sealed = seal(&key.public_key(), &info, &aad, &plaintext, &rng).unwrap();
            let opened = open(&key, &sealed.enc, &info, &aad, &sealed.ciphertext).unwrap();
            prop_assert_eq!(&*opened, &plaintext);
        }

        #[test]
        fn arbitrary_enc_and_ciphertext_never_panic(
            enc in proptest::collection::vec(any::<u8>(), 0..80),
            ciphertext in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let key = HpkePrivateKey::derive(&[1u8; 32]).unwrap();
            prop_assert!(open(&key, &enc, b"", b"", &ciphertext).is_err());
        }
    }
}
