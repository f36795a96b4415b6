//! A token issuer for tests: ES256 keys made with rcgen, their JWKS, and signed tokens.

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

pub const ISSUER: &str = "https://issuer.callisto.test";
pub const AUDIENCE: &str = "callisto";

/// One signing key with its key id.
pub struct SigningKey {
    pub kid: String,
    pair: rcgen::KeyPair,
}

impl SigningKey {
    pub fn generate(kid: &str) -> Self {
        Self { kid: kid.to_owned(), pair: rcgen::KeyPair::generate().unwrap() }
    }

    /// The public half as a JWK.
    pub fn jwk(&self) -> Value {
        let raw = self.pair.public_key_raw();
        assert_eq!((raw.len(), raw[0]), (65, 4), "an uncompressed P-256 point");
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        json!({"kty": "EC", "crv": "P-256", "x": b64(&raw[1..33]), "y": b64(&raw[33..]),
               "kid": self.kid, "alg": "ES256", "use": "sig"})
    }

    /// A token with `claims`, signed by this key and naming it.
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        let key = EncodingKey::from_ec_pem(self.pair.serialize_pem().as_bytes()).unwrap();
        jsonwebtoken::encode(&header, claims, &key).unwrap()
    }

    /// A valid token for `subject` with `scopes`, for an hour.
    pub fn token(&self, subject: &str, scopes: &[&str]) -> String {
        self.sign(&claims(subject, scopes))
    }
}

pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

pub fn claims(subject: &str, scopes: &[&str]) -> Value {
    json!({"iss": ISSUER, "aud": AUDIENCE, "sub": subject, "iat": now(), "exp": now() + 3600,
           "scope": scopes.join(" ")})
}

pub fn jwks(keys: &[&SigningKey]) -> Value {
    json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()})
}

/// Points `settings` at tokens from [`ISSUER`] for [`AUDIENCE`], verified with the JWKS file
/// `path`.
pub fn trust_file(settings: &mut callisto_core::config::Settings, path: &std::path::Path) {
    settings.auth.jwt.issuer = Some(ISSUER.into());
    settings.auth.jwt.audience = vec![AUDIENCE.into()];
    settings.auth.jwt.keys_file = Some(path.to_path_buf());
}
