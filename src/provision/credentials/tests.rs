use super::*;
use crate::provision::acl::device_acl;
use jsonwebtoken::{decode, decode_header, jwk::JwkSet, DecodingKey, Validation};

fn openssl(args: &[&str]) -> String {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl CLI");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf8")
}

fn claims(now: i64) -> Claims {
    Claims::for_device(
        "pos-01",
        device_acl("dev", "M1", "B1"),
        "delta-bridge",
        "mqtt",
        now,
        3600,
        new_jti(),
    )
}

/// Verifies with jsonwebtoken (an implementation independent of ours) through the JWKS.
fn verify(keys: &SigningKeys, token: &str, alg: jsonwebtoken::Algorithm) -> Claims {
    let header = decode_header(token).expect("header");
    assert_eq!(header.alg, alg);
    let set: JwkSet = serde_json::from_value(keys.jwks()).expect("jwks parses");
    let kid = header.kid.expect("kid in header");
    let jwk = set.find(&kid).expect("kid published");
    let mut v = Validation::new(alg);
    v.set_audience(&["mqtt"]);
    v.set_issuer(&["delta-bridge"]);
    v.validate_nbf = true;
    decode::<Claims>(token, &DecodingKey::from_jwk(jwk).expect("key"), &v)
        .expect("valid token")
        .claims
}

#[test]
fn claims_follow_the_contract() {
    let c = claims(1_700_000_000);
    let v = serde_json::to_value(&c).expect("json");
    assert_eq!(v["sub"], "pos-01");
    assert_eq!(v["clientid"], "pos-01");
    assert_eq!(v["username"], "pos-01");
    assert_eq!(v["nbf"], 1_700_000_000 - 60);
    assert_eq!(v["exp"], 1_700_003_600);
    assert_eq!(
        v["acl"][1],
        json!({"permission": "deny", "action": "all", "topic": "#"})
    );
    assert!(v.get("is_superuser").is_none());
    assert_eq!(c.jti.len(), 36);
    assert_ne!(new_jti(), new_jti());
}

#[test]
fn es256_from_sec1_pem_verifies_independently() {
    let pem = openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout"]);
    let keys = SigningKeys::from_pem(&pem).expect("sec1 key");
    assert_eq!(keys.algorithm(), Algorithm::Es256);
    let now = chrono::Utc::now().timestamp();
    let token = keys.sign(&claims(now)).expect("sign");
    let got = verify(&keys, &token, jsonwebtoken::Algorithm::ES256);
    assert_eq!(got.sub, "pos-01");
    assert_eq!(keys.jwks()["keys"][0]["kid"], keys.kid());
    assert_eq!(keys.jwks()["keys"][0]["crv"], "P-256");
}

#[test]
fn es256_with_parameters_block_and_pkcs8() {
    let pem = openssl(&["ecparam", "-name", "prime256v1", "-genkey"]);
    assert!(pem.contains("EC PARAMETERS"));
    SigningKeys::from_pem(&pem).expect("parameters block skipped");
    let generated = delta_harness::demo::es256_pem().expect("generate");
    let keys = SigningKeys::from_pem(&generated).expect("pkcs8 key");
    let token = keys.sign(&claims(chrono::Utc::now().timestamp())).expect("sign");
    verify(&keys, &token, jsonwebtoken::Algorithm::ES256);
}

#[test]
fn rs256_verifies_independently() {
    let pem = openssl(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]);
    let keys = SigningKeys::from_pem(&pem).expect("rsa key");
    assert_eq!(keys.algorithm(), Algorithm::Rs256);
    let token = keys.sign(&claims(chrono::Utc::now().timestamp())).expect("sign");
    verify(&keys, &token, jsonwebtoken::Algorithm::RS256);
    assert_eq!(keys.jwks()["keys"][0]["kty"], "RSA");
}

#[test]
fn extra_keys_are_published_for_rotation() {
    let new_key = delta_harness::demo::es256_pem().expect("generate");
    let old_private = delta_harness::demo::es256_pem().expect("generate");
    let old_public = openssl_pubout(&old_private);
    let keys = SigningKeys::from_pem(&format!("{new_key}\n{old_public}\n{old_private}")).expect("keys");
    let set = keys.jwks();
    let kids: Vec<&str> = set["keys"]
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|k| k["kid"].as_str())
        .collect();
    assert_eq!(kids.len(), 2, "the old key once, however often it appears");
    assert_eq!(kids[0], keys.kid(), "the signer comes first");
    let old = SigningKeys::from_pem(&old_private).expect("old");
    assert_eq!(kids[1], old.kid());
    // A token signed with the old key still verifies against the new JWKS.
    let token = old.sign(&claims(chrono::Utc::now().timestamp())).expect("sign");
    let header = decode_header(&token).expect("header");
    assert_eq!(header.kid.as_deref(), Some(old.kid()));
    verify(&keys, &token, jsonwebtoken::Algorithm::ES256);
}

fn openssl_pubout(private_pem: &str) -> String {
    let dir = std::env::temp_dir().join(format!("db-keys-{}-{}", std::process::id(), new_jti()));
    std::fs::create_dir_all(&dir).expect("dir");
    let f = dir.join("k.pem");
    std::fs::write(&f, private_pem).expect("write");
    let out = openssl(&["pkey", "-in", f.to_str().expect("utf8"), "-pubout"]);
    let _ = std::fs::remove_dir_all(&dir);
    out
}

#[test]
fn refuses_what_it_cannot_use() {
    assert!(matches!(SigningKeys::from_pem(""), Err(KeyError::NoPrivateKey)));
    let p384 = openssl(&["ecparam", "-name", "secp384r1", "-genkey", "-noout"]);
    assert!(matches!(
        SigningKeys::from_pem(&p384),
        Err(KeyError::Unsupported { .. })
    ));
    let small = openssl(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024"]);
    let e = SigningKeys::from_pem(&small).expect_err("too small");
    assert!(e.to_string().contains("2048"), "{e}");
    let cert_like = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    assert!(SigningKeys::from_pem(cert_like).is_err());
}

#[test]
fn verify_accepts_our_tokens_only() {
    let keys = SigningKeys::from_pem(&delta_harness::demo::es256_pem().expect("generate")).expect("keys");
    let other = SigningKeys::from_pem(&delta_harness::demo::es256_pem().expect("generate")).expect("keys");
    let c = claims(chrono::Utc::now().timestamp());
    let token = keys.sign(&c).expect("sign");
    assert_eq!(keys.verify(&token), Some(c.clone()));
    assert_eq!(keys.verify(&other.sign(&c).expect("sign")), None, "another key");
    // A changed payload under the original signature.
    let mut parts: Vec<String> = token.split('.').map(String::from).collect();
    let mut forged = c.clone();
    forged.jti = new_jti();
    parts[1] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).expect("json"));
    assert_eq!(keys.verify(&parts.join(".")), None, "forged claims");
    for junk in ["", "a.b", "a.b.c", "a.b.c.d", &format!("{token}.x")] {
        assert_eq!(keys.verify(junk), None, "{junk}");
    }
    let rsa = SigningKeys::from_pem(&openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
    ]))
    .expect("rsa");
    let token = rsa.sign(&c).expect("sign");
    assert_eq!(rsa.verify(&token), Some(c));
    assert_eq!(keys.verify(&token), None);
}

#[test]
fn thumbprint_matches_rfc7638_example() {
    // RFC 7638 §3.1: the example RSA key's thumbprint.
    let n = "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw";
    let n = rsa::BigUint::from_bytes_be(&URL_SAFE_NO_PAD.decode(n).expect("b64"));
    let e = rsa::BigUint::from(65537u32);
    let pk = PublicKey::Rsa(Box::new(rsa::RsaPublicKey::new(n, e).expect("key")));
    assert_eq!(pk.thumbprint(), "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs");
}
