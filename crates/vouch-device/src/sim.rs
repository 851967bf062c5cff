//! Device simulators. A simulated device enrols the way a real one does: it fetches a
//! nonce, signs the enrolment with its own key, and checks the credential it gets
//! against the server's published keys before trusting it.

use vouch_proto::crypto::SystemRandom;
use vouch_proto::enrol::{DEVICE_CREDENTIAL_TYP, DeviceCredentialClaims, DeviceKind, EnrolmentClaims};
use vouch_proto::jws::UnverifiedJws;
use vouch_proto::{Clock, JwkSet, jwt};

use crate::{DeviceError, DeviceIdentity, EnrolledDevice, VouchClient};

/// What a simulated device says about itself.
#[derive(Debug, Clone)]
pub struct DeviceProfile {
    pub kind: DeviceKind,
    pub model: String,
    pub firmware_version: String,
    pub merchant_id: String,
}

impl DeviceProfile {
    pub fn simulated(kind: DeviceKind, merchant_id: &str) -> Self {
        let model = match kind {
            DeviceKind::Reader => "VR-200 card reader",
            DeviceKind::Pos => "VouchPOS app",
            DeviceKind::Terminal => "VT-900 terminal",
            DeviceKind::Consumer => "wallet phone",
        };
        DeviceProfile { kind, model: model.into(), firmware_version: "1.4.2".into(), merchant_id: merchant_id.into() }
    }
}

/// Makes the enrolment proof for `profile` over a fresh server nonce.
pub async fn enrolment_proof(
    client: &VouchClient,
    identity: &DeviceIdentity,
    profile: &DeviceProfile,
    clock: &dyn Clock,
    rng: &SystemRandom,
) -> Result<String, DeviceError> {
    let nonce = client.enrolment_nonce().await?;
    let claims = EnrolmentClaims {
        nonce: nonce.nonce,
        kind: profile.kind,
        model: profile.model.clone(),
        firmware_version: profile.firmware_version.clone(),
        merchant_id: profile.merchant_id.clone(),
        iat: clock.now_unix(),
    };
    Ok(claims.sign(identity.key(), rng)?)
}

/// Enrols and checks the returned credential: signed by a published server key, for
/// this device's key, kind and merchant.
pub async fn enrol(
    client: &VouchClient,
    identity: &DeviceIdentity,
    profile: &DeviceProfile,
    clock: &dyn Clock,
    rng: &SystemRandom,
) -> Result<EnrolledDevice, DeviceError> {
    let proof = enrolment_proof(client, identity, profile, clock, rng).await?;
    let enrolled = client.enrol(&proof).await?;
    let jwks = client.jwks().await?;
    let claims = verify_device_credential(&enrolled.device_credential, &jwks, clock)?;
    if claims.cnf.jwk.thumbprint() != identity.jwk().thumbprint()
        || claims.kind != profile.kind
        || claims.merchant_id != profile.merchant_id
        || claims.sub != enrolled.device_id
    {
        return Err(DeviceError::Untrusted("device credential does not describe this device".into()));
    }
    Ok(enrolled)
}

/// Verifies a `device_credential` against a JWK Set and the clock.
pub fn verify_device_credential(
    credential: &str,
    jwks: &JwkSet,
    clock: &dyn Clock,
) -> Result<DeviceCredentialClaims, DeviceError> {
    let jws = UnverifiedJws::parse(credential)?;
    jws.header().expect_typ(DEVICE_CREDENTIAL_TYP)?;
    let kid = jws.header().kid.as_deref().ok_or_else(|| DeviceError::Untrusted("credential has no kid".into()))?;
    let key = jwks
        .find(kid)
        .ok_or_else(|| DeviceError::Untrusted(format!("credential signed by unpublished key {kid}")))?
        .verifying_key()?;
    let claims: DeviceCredentialClaims = jwt::decode(&jws, &key)?;
    jwt::check_validity(claims.exp, None, clock.now_unix(), 0)?;
    Ok(claims)
}
