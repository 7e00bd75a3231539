//! `check-config` validates what `run` validates before it connects anywhere, the files the configuration
//! names included (the signing key, CA bundles, the bridge's certificate and key, secret files), and exits 2
//! naming the key; `--no-secret-files` checks a configuration without those files present (their paths'
//! form only). Runs the real binary; needs `openssl` for the keys and certificates.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_delta-bridge"));
    // Only what each case sets: no DELTA_BRIDGE_* from the caller's environment.
    c.env_clear();
    if let Ok(path) = std::env::var("PATH") {
        c.env("PATH", path);
    }
    c
}

fn dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("delta-bridge-check-config-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl").args(args).output().expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A signing key, a CA certificate, and a server certificate with its key, in `d`.
fn files(d: &Path) {
    let p = |name: &str| d.join(name).display().to_string();
    openssl(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        &p("signing.pem"),
    ]);
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-subj",
        "/CN=test-ca",
        "-days",
        "2",
        "-keyout",
        &p("ca.key"),
        "-out",
        &p("ca.pem"),
    ]);
    std::fs::write(d.join("mqtt-password"), "bridge-password\n").expect("secret file");
    std::fs::write(d.join("api-secret"), "emqx-api-secret\n").expect("secret file");
    std::fs::write(d.join("authn-token"), "authn-token-0123456789\n").expect("secret file");
}

/// A configuration using every file start-up reads: mqtts with a CA, EMQX's REST API over https with a CA,
/// the bridge's own https, PostgreSQL verify-full with sslrootcert, the signing key and secret files.
fn config(d: &Path) -> String {
    let p = |name: &str| d.join(name).display().to_string();
    format!(
        "[postgres]\nurl = \"postgres://bridge@db:5432/mstore?sslmode=verify-full&sslrootcert={ca}\"\n\
         [mqtt]\nurl = \"mqtts://emqx:8883\"\nca_file = \"{ca}\"\nusername = \"bridge\"\npassword_file = \"{pw}\"\n\
         [http]\nadmin_token = \"admin-token-0123456789\"\ntls_cert_file = \"{ca}\"\ntls_key_file = \"{cakey}\"\n\
         [credentials]\nsigning_key_file = \"{key}\"\n\
         [broker]\nkind = \"emqx\"\napi_url = \"https://emqx:18084\"\napi_ca_file = \"{ca}\"\napi_key = \"delta-bridge\"\n\
         api_secret_file = \"{secret}\"\nauthn_token_file = \"{authn}\"\n",
        ca = p("ca.pem"),
        cakey = p("ca.key"),
        pw = p("mqtt-password"),
        key = p("signing.pem"),
        secret = p("api-secret"),
        authn = p("authn-token"),
    )
}

fn check(d: &Path, name: &str, text: &str, extra: &[&str]) -> Output {
    let path = d.join(name);
    std::fs::write(&path, text).expect("write config");
    bin()
        .arg("--config")
        .arg(&path)
        .arg("check-config")
        .args(extra)
        .output()
        .expect("run check-config")
}

fn run_refuses(d: &Path, name: &str) -> Output {
    // `run` with the same file: refused before anything is connected (db and emqx do not even resolve here).
    bin()
        .arg("--config")
        .arg(d.join(name))
        .arg("run")
        .output()
        .expect("run")
}

#[test]
fn check_config_refuses_what_start_up_refuses_naming_the_key() {
    let d = dir("refuse");
    files(&d);
    let good = config(&d);
    let out = check(&d, "good.toml", &good, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));

    std::fs::write(d.join("not-a-key.pem"), "-----BEGIN NOTHING-----\n").expect("write");
    std::fs::write(d.join("not-a-cert.pem"), "hello\n").expect("write");
    let p = |name: &str| d.join(name).display().to_string();
    let ca = p("ca.pem");
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "missing signing key",
            good.replace(&p("signing.pem"), &p("missing.pem")),
            "credentials.signing_key_file",
        ),
        (
            "signing key holds no key",
            good.replace(&p("signing.pem"), &p("not-a-key.pem")),
            "credentials.signing_key_file",
        ),
        (
            "missing mqtt.ca_file",
            good.replacen(
                &format!("ca_file = \"{ca}\""),
                "ca_file = \"/nonexistent/mqtt-ca.pem\"",
                1,
            ),
            "mqtt.ca_file",
        ),
        (
            "https api_url, missing CA",
            good.replace(
                &format!("api_ca_file = \"{ca}\""),
                "api_ca_file = \"/nonexistent/emqx-ca.pem\"",
            ),
            "broker.api_ca_file",
        ),
        (
            "https api_url, CA without certificates",
            good.replace(
                &format!("api_ca_file = \"{ca}\""),
                &format!("api_ca_file = \"{}\"", p("not-a-cert.pem")),
            ),
            "broker.api_ca_file",
        ),
        (
            "missing http certificate",
            good.replace(
                &format!("tls_cert_file = \"{ca}\""),
                "tls_cert_file = \"/nonexistent/cert.pem\"",
            ),
            "http.tls_cert_file",
        ),
        (
            "http key not the certificate's",
            good.replace(&p("ca.key"), &p("signing.pem")),
            "http.tls_key_file",
        ),
        (
            "missing sslrootcert",
            good.replace(&format!("sslrootcert={ca}"), "sslrootcert=/nonexistent/pg-ca.pem"),
            "postgres.url",
        ),
        (
            "missing secret file",
            good.replace(&p("api-secret"), &p("no-such-secret")),
            "broker.api_secret_file",
        ),
    ];
    for (i, (what, text, key)) in cases.iter().enumerate() {
        assert_ne!(text, &good, "{what}: the case changes nothing");
        let name = format!("bad{i}.toml");
        let out = check(&d, &name, text, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {err}");
        assert!(
            err.contains(&format!("invalid configuration: {key}")),
            "{what}: should name {key}: {err}"
        );
        let out = run_refuses(&d, &name);
        let run_err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "run, {what}: {run_err}");
        assert!(run_err.contains(key), "run, {what}: {run_err}");
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn no_secret_files_checks_a_config_without_its_files() {
    let d = dir("form");
    // None of the files exists: the configuration as it will be inside the pod.
    let text = config(Path::new("/secrets"));
    let out = check(&d, "pod.toml", &text, &[]);
    assert_eq!(out.status.code(), Some(2), "the files are read without the flag");
    let out = check(&d, "pod.toml", &text, &["--no-secret-files"]);
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        printed.starts_with("# configuration is valid; files not read"),
        "{printed}"
    );
    for line in [
        "password_file = \"/secrets/mqtt-password\"",
        "api_secret_file = \"/secrets/api-secret\"",
        "authn_token_file = \"/secrets/authn-token\"",
        "signing_key_file = \"/secrets/signing.pem\"",
    ] {
        assert!(printed.lines().any(|l| l == line), "no line {line:?} in {printed}");
    }
    // Everything else is still validated, and a file key's form.
    let bad_url = text.replace("mqtts://emqx:8883", "http://emqx:8883");
    let out = check(&d, "bad-url.toml", &bad_url, &["--no-secret-files"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("mqtt.url"));
    for (key, from, to) in [
        (
            "broker.api_secret_file",
            "api_secret_file = \"/secrets/api-secret\"",
            "api_secret_file = \"\"",
        ),
        (
            "credentials.signing_key_file",
            "signing_key_file = \"/secrets/signing.pem\"",
            "signing_key_file = \"\"",
        ),
    ] {
        let out = check(&d, "empty.toml", &text.replace(from, to), &["--no-secret-files"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{key}: {err}");
        assert!(err.contains(key), "{key}: {err}");
    }
    let _ = std::fs::remove_dir_all(&d);
}
