//! A DPoP client that knows nothing of Vouch's code: it builds proofs with an
//! independent JOSE library (`jsonwebtoken`) from RFC 9449 alone, speaks plain HTTP,
//! follows the server-nonce dance of RFC 9449 section 8, and checks the access token
//! and the signed digest against the published JWK Set with the same library.

use std::collections::HashMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{Jwk, JwkSet, ThumbprintHash};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Value, json};

use crate::support::fixture;

/// An ES256 key as the independent client holds it: PKCS#8 to sign, the public JWK to
/// put in proofs.
struct ClientKey {
    encoding: EncodingKey,
    jwk: Jwk,
}

impl ClientKey {
    fn proof(&self, method: &str, url: &str, access_token: Option<&str>, nonce: Option<&str>) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.typ = Some("dpop+jwt".into());
        header.jwk = Some(self.jwk.clone());
        let mut claims = json!({
            "jti": uuid::Uuid::new_v4().to_string(),
            "htm": method,
            "htu": url,
            "iat": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(),
        });
        if let Some(token) = access_token {
            let hash = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
            claims["ath"] = json!(URL_SAFE_NO_PAD.encode(hash.as_ref()));
        }
        if let Some(nonce) = nonce {
            claims["nonce"] = json!(nonce);
        }
        jsonwebtoken::encode(&header, &claims, &self.encoding).unwrap()
    }
}

fn verify<T: serde::de::DeserializeOwned>(token: &str, jwks: &JwkSet, typ: &str) -> T {
    let header = jsonwebtoken::decode_header(token).unwrap();
    assert_eq!(header.typ.as_deref(), Some(typ));
    let jwk = jwks.find(header.kid.as_deref().unwrap()).expect("signed by a published key");
    let mut validation = Validation::new(Algorithm::ES256);
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    jsonwebtoken::decode::<T>(token, &DecodingKey::from_jwk(jwk).unwrap(), &validation).unwrap().claims
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_independent_dpop_client_gets_a_token_and_a_signature() {
    let fx = fixture().await;
    let mut device = fx.device(&[]).await;
    let ticket = fx.attest(&mut device).await.unwrap().outcome.ticket;
    let key = ClientKey {
        encoding: EncodingKey::from_ec_der(&device.identity.key().to_pkcs8_der().unwrap()),
        jwk: serde_json::from_value(serde_json::to_value(device.identity.jwk()).unwrap()).unwrap(),
    };
    let http = reqwest::Client::new();
    let token_url = format!("{}/v1/token", fx.server.url);
    let form = HashMap::from([("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"), ("assertion", &ticket)]);

    // RFC 9449 section 8: without a nonce the server asks for one.
    let first = http.post(&token_url).header("DPoP", key.proof("POST", &token_url, None, None)).form(&form);
    let first = first.send().await.unwrap();
    assert_eq!(first.status(), 400);
    let nonce = first.headers()["DPoP-Nonce"].to_str().unwrap().to_owned();
    let body: Value = first.json().await.unwrap();
    assert_eq!(body["error"], "use_dpop_nonce");

    let granted = http.post(&token_url).header("DPoP", key.proof("POST", &token_url, None, Some(&nonce))).form(&form);
    let granted = granted.send().await.unwrap();
    assert_eq!(granted.status(), 200);
    let nonce = granted.headers()["DPoP-Nonce"].to_str().unwrap().to_owned();
    let body: Value = granted.json().await.unwrap();
    assert_eq!(body["token_type"], "DPoP");
    let access_token = body["access_token"].as_str().unwrap().to_owned();

    let jwks: JwkSet =
        http.get(format!("{}/.well-known/jwks.json", fx.server.url)).send().await.unwrap().json().await.unwrap();
    let claims: Value = verify(&access_token, &jwks, "at+jwt");
    assert_eq!(claims["cnf"]["jkt"].as_str(), Some(key.jwk.thumbprint(ThumbprintHash::SHA256).as_str()));
    assert_eq!(claims["sid"], body["sid"]);

    let sign_url = format!("{}/v1/sign", fx.server.url);
    let digest = URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b"receipt").as_ref());
    let signed = http
        .post(&sign_url)
        .header("Authorization", format!("DPoP {access_token}"))
        .header("DPoP", key.proof("POST", &sign_url, Some(&access_token), Some(&nonce)))
        .json(&json!({ "digest": digest }))
        .send()
        .await
        .unwrap();
    assert_eq!(signed.status(), 200);
    let body: Value = signed.json().await.unwrap();
    let signature: Value = verify(body["signature"].as_str().unwrap(), &jwks, "vouch-signed-digest+jwt");
    assert_eq!(signature["digest"], json!(digest));
    assert_eq!(signature["sub"], json!(device.device_id));
    assert_eq!(signature["ear_status"], "affirming");

    // The same token as a bearer token is refused, with a DPoP challenge.
    let bearer =
        http.post(&sign_url).bearer_auth(&access_token).json(&json!({ "digest": digest })).send().await.unwrap();
    assert_eq!(bearer.status(), 401);
    assert!(bearer.headers()["WWW-Authenticate"].to_str().unwrap().starts_with("DPoP "));
}
