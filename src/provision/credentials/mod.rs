//! Device credentials: the signing keys (EC P-256 for ES256, RSA for RS256, detected from the PEM), the JWT
//! claims of a device token (docs/provisioning.md), compact JWS signing and the JWKS document. Pure apart from reading the key file;
//! never logs or prints a private key or a token, and never issues `is_superuser`.
//!
//! Key rotation without downtime: the key file may hold several PEM blocks. The first private key signs;
//! every key in the file (the signer, further private keys, `PUBLIC KEY` blocks) is published in the JWKS,
//! each under its RFC 7638 thumbprint as `kid`. To rotate: add the new public key, let EMQX refresh its JWKS,
//! put the new private key first (keeping the old public key), and drop the old key after `max_ttl`.

use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::pkcs8::{DecodePrivateKey, DecodePublicKey};
use rsa::pkcs1::{DecodeRsaPrivateKey, DecodeRsaPublicKey};
use rsa::traits::PublicKeyParts;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::acl::AclRule;

/// `nbf` is back-dated by this much: EMQX checks `nbf` with no leeway, and device clocks drift.
pub(crate) const CLOCK_SKEW_SECS: i64 = 60;
/// RSA keys below this size are refused.
const MIN_RSA_BITS: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read signing key file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("signing key file holds no private key (need an EC P-256 or RSA private key in PEM)")]
    NoPrivateKey,
    #[error("PEM block {index} ({label}): {reason}")]
    Unsupported {
        index: usize,
        label: String,
        reason: String,
    },
    #[error("cannot serialise the token: {0}")]
    Encode(#[from] serde_json::Error),
}

/// The JWS algorithm of the signing key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Algorithm {
    Es256,
    Rs256,
}

impl Algorithm {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Algorithm::Es256 => "ES256",
            Algorithm::Rs256 => "RS256",
        }
    }
}

enum Signer {
    Es256(p256::ecdsa::SigningKey),
    Rs256(Box<rsa::pkcs1v15::SigningKey<Sha256>>),
}

enum PublicKey {
    Ec(p256::PublicKey),
    Rsa(Box<rsa::RsaPublicKey>),
}

impl PublicKey {
    fn algorithm(&self) -> Algorithm {
        match self {
            PublicKey::Ec(_) => Algorithm::Es256,
            PublicKey::Rsa(_) => Algorithm::Rs256,
        }
    }

    /// The required members of the JWK in lexicographic order: the RFC 7638 thumbprint input.
    fn required_members(&self) -> Value {
        match self {
            PublicKey::Ec(pk) => {
                let point = pk.to_encoded_point(false);
                let coord = |c: Option<&p256::FieldBytes>| c.map(|b| URL_SAFE_NO_PAD.encode(b)).unwrap_or_default();
                json!({"crv": "P-256", "kty": "EC", "x": coord(point.x()), "y": coord(point.y())})
            }
            PublicKey::Rsa(pk) => json!({
                "e": URL_SAFE_NO_PAD.encode(pk.e().to_bytes_be()),
                "kty": "RSA",
                "n": URL_SAFE_NO_PAD.encode(pk.n().to_bytes_be()),
            }),
        }
    }

    /// RFC 7638 thumbprint (SHA-256, base64url): stable across restarts and replicas, so it serves as `kid`.
    fn thumbprint(&self) -> String {
        // serde_json's map is ordered by key, and the members have no whitespace: the canonical form.
        let canonical = self.required_members().to_string();
        URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
    }

    fn jwk(&self) -> Value {
        let mut v = self.required_members();
        if let Value::Object(m) = &mut v {
            m.insert("kid".into(), Value::String(self.thumbprint()));
            m.insert("use".into(), Value::String("sig".into()));
            m.insert("alg".into(), Value::String(self.algorithm().as_str().into()));
        }
        v
    }
}

/// The signing key and every published verification key.
pub(crate) struct SigningKeys {
    signer: Signer,
    kid: String,
    published: Vec<PublicKey>,
}

impl std::fmt::Debug for SigningKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKeys")
            .field("algorithm", &self.algorithm())
            .field("kid", &self.kid)
            .field("published", &self.published.len())
            .finish_non_exhaustive()
    }
}

impl SigningKeys {
    pub(crate) fn load(path: &Path) -> Result<SigningKeys, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_pem(&text)
    }

    /// Parses every PEM block; the first private key signs.
    pub(crate) fn from_pem(text: &str) -> Result<SigningKeys, KeyError> {
        let mut signer: Option<(Signer, PublicKey)> = None;
        let mut published: Vec<PublicKey> = Vec::new();
        for (index, (label, block)) in pem_blocks(text).into_iter().enumerate() {
            let index = index + 1;
            let bad = |reason: String| KeyError::Unsupported {
                index,
                label: label.clone(),
                reason,
            };
            let (private, public) = match label.as_str() {
                "EC PARAMETERS" => continue,
                "EC PRIVATE KEY" => {
                    let sk = p256::SecretKey::from_sec1_pem(&block)
                        .map_err(|e| bad(format!("not an EC P-256 private key ({e})")))?;
                    let public = PublicKey::Ec(sk.public_key());
                    (Some(Signer::Es256(sk.into())), public)
                }
                "PRIVATE KEY" => {
                    if let Ok(sk) = p256::SecretKey::from_pkcs8_pem(&block) {
                        let public = PublicKey::Ec(sk.public_key());
                        (Some(Signer::Es256(sk.into())), public)
                    } else {
                        let sk = rsa::RsaPrivateKey::from_pkcs8_pem(&block)
                            .map_err(|_| bad("neither an EC P-256 nor an RSA private key".into()))?;
                        rsa_signer(sk).map_err(bad)?
                    }
                }
                "RSA PRIVATE KEY" => {
                    let sk = rsa::RsaPrivateKey::from_pkcs1_pem(&block)
                        .map_err(|e| bad(format!("not an RSA private key ({e})")))?;
                    rsa_signer(sk).map_err(bad)?
                }
                "PUBLIC KEY" => {
                    if let Ok(pk) = p256::PublicKey::from_public_key_pem(&block) {
                        (None, PublicKey::Ec(pk))
                    } else {
                        let pk = rsa::RsaPublicKey::from_public_key_pem(&block)
                            .map_err(|_| bad("neither an EC P-256 nor an RSA public key".into()))?;
                        (None, rsa_public(pk).map_err(bad)?)
                    }
                }
                "RSA PUBLIC KEY" => {
                    let pk = rsa::RsaPublicKey::from_pkcs1_pem(&block)
                        .map_err(|e| bad(format!("not an RSA public key ({e})")))?;
                    (None, rsa_public(pk).map_err(bad)?)
                }
                _ => {
                    return Err(bad(
                        "expected EC PRIVATE KEY, PRIVATE KEY, RSA PRIVATE KEY or PUBLIC KEY".into(),
                    ))
                }
            };
            match private {
                Some(s) if signer.is_none() => signer = Some((s, public)),
                _ => {
                    let kid = public.thumbprint();
                    let duplicate = published.iter().any(|p| p.thumbprint() == kid)
                        || signer.as_ref().is_some_and(|(_, p)| p.thumbprint() == kid);
                    if !duplicate {
                        published.push(public);
                    }
                }
            }
        }
        let (signer, public) = signer.ok_or(KeyError::NoPrivateKey)?;
        let kid = public.thumbprint();
        published.retain(|p| p.thumbprint() != kid);
        published.insert(0, public);
        Ok(SigningKeys { signer, kid, published })
    }

    pub(crate) fn algorithm(&self) -> Algorithm {
        match self.signer {
            Signer::Es256(_) => Algorithm::Es256,
            Signer::Rs256(_) => Algorithm::Rs256,
        }
    }

    /// The claims of `token` if it is a compact JWS signed by one of the published keys (found by the `kid` of
    /// its header, with the algorithm of that key) and its payload has the shape of a device token; None for
    /// anything else. Checks neither `exp` nor `nbf`: the caller decides what a live token is. Bounded work:
    /// one signature check, whatever the token holds.
    pub(crate) fn verify(&self, token: &str) -> Option<Claims> {
        /// Far beyond any device token (about 400 bytes); refuses to decode anything larger.
        const MAX_TOKEN: usize = 8192;
        if token.len() > MAX_TOKEN {
            return None;
        }
        let mut parts = token.split('.');
        let (h, p, sig) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).ok()?).ok()?;
        let kid = header.get("kid")?.as_str()?;
        let key = self.published.iter().find(|k| k.thumbprint() == kid)?;
        if header.get("alg")?.as_str()? != key.algorithm().as_str() {
            return None;
        }
        let sig = URL_SAFE_NO_PAD.decode(sig).ok()?;
        let signing_input = &token[..h.len() + 1 + p.len()];
        let ok = match key {
            PublicKey::Ec(pk) => {
                let vk = p256::ecdsa::VerifyingKey::from(pk);
                p256::ecdsa::Signature::from_slice(&sig)
                    .is_ok_and(|s| p256::ecdsa::signature::Verifier::verify(&vk, signing_input.as_bytes(), &s).is_ok())
            }
            PublicKey::Rsa(pk) => {
                let vk = rsa::pkcs1v15::VerifyingKey::<Sha256>::new(pk.as_ref().clone());
                rsa::pkcs1v15::Signature::try_from(sig.as_slice())
                    .is_ok_and(|s| rsa::signature::Verifier::verify(&vk, signing_input.as_bytes(), &s).is_ok())
            }
        };
        if !ok {
            return None;
        }
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).ok()?).ok()
    }

    /// The `kid` of the signing key.
    pub(crate) fn kid(&self) -> &str {
        &self.kid
    }

    /// `{"keys": [...]}`, the signing key first.
    pub(crate) fn jwks(&self) -> Value {
        json!({"keys": self.published.iter().map(PublicKey::jwk).collect::<Vec<_>>()})
    }

    /// A compact JWS: base64url(header).base64url(claims).base64url(signature).
    pub(crate) fn sign(&self, claims: &Claims) -> Result<String, KeyError> {
        let header = json!({"alg": self.algorithm().as_str(), "typ": "JWT", "kid": self.kid});
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header)?),
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims)?)
        );
        let signature = match &self.signer {
            Signer::Es256(key) => {
                // JWS wants the fixed 64-byte r||s form (RFC 7518 §3.4), which is what to_bytes gives.
                let sig: p256::ecdsa::Signature = p256::ecdsa::signature::Signer::sign(key, signing_input.as_bytes());
                sig.to_bytes().to_vec()
            }
            Signer::Rs256(key) => {
                let sig = rsa::signature::Signer::sign(key.as_ref(), signing_input.as_bytes());
                rsa::signature::SignatureEncoding::to_vec(&sig)
            }
        };
        Ok(format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature)))
    }
}

fn rsa_public(pk: rsa::RsaPublicKey) -> Result<PublicKey, String> {
    let bits = pk.size() * 8;
    if bits < MIN_RSA_BITS {
        return Err(format!("RSA key of {bits} bits; at least {MIN_RSA_BITS} needed"));
    }
    Ok(PublicKey::Rsa(Box::new(pk)))
}

fn rsa_signer(sk: rsa::RsaPrivateKey) -> Result<(Option<Signer>, PublicKey), String> {
    let public = rsa_public(sk.to_public_key())?;
    Ok((
        Some(Signer::Rs256(Box::new(rsa::pkcs1v15::SigningKey::<Sha256>::new(sk)))),
        public,
    ))
}

/// Splits a PEM file into (label, block text) pairs; text outside blocks (comments) is ignored.
fn pem_blocks(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(label) = line.strip_prefix("-----BEGIN ").and_then(|l| l.strip_suffix("-----")) {
            current = Some((label.to_string(), format!("{line}\n")));
        } else if let Some((label, mut block)) = current.take() {
            block.push_str(line);
            block.push('\n');
            if line.starts_with("-----END ") {
                out.push((label, block));
            } else {
                current = Some((label, block));
            }
        }
    }
    out
}

/// The claims of a device token. Field order is the serialised order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Claims {
    pub sub: String,
    pub clientid: String,
    pub username: String,
    pub iss: String,
    pub aud: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    pub jti: String,
    pub acl: Vec<AclRule>,
}

impl Claims {
    /// Claims for `device_id`, issued at `now` (unix seconds) for `ttl_secs`.
    pub(crate) fn for_device(
        device_id: &str,
        acl: Vec<AclRule>,
        issuer: &str,
        audience: &str,
        now: i64,
        ttl_secs: i64,
        jti: String,
    ) -> Claims {
        Claims {
            sub: device_id.to_string(),
            clientid: device_id.to_string(),
            username: device_id.to_string(),
            iss: issuer.to_string(),
            aud: audience.to_string(),
            iat: now,
            nbf: now - CLOCK_SKEW_SECS,
            exp: now + ttl_secs,
            jti,
            acl,
        }
    }
}

/// A random token id in UUID v4 form.
pub(crate) fn new_jti() -> String {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests;
