//! Throwaway certificates for the TLS tests, made with the `openssl` command (scripts/setup installs it): a
//! CA of the test's own, and server certificates it signs for the names a test chooses. Nothing here is
//! trusted by anything but the test that made it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A certificate authority: its certificate (what a client is given as its CA file) and key.
pub struct TestCa {
    pub cert: PathBuf,
    key: PathBuf,
    dir: PathBuf,
    name: String,
}

/// A server certificate signed by a [`TestCa`], and its private key (PKCS#8 PEM).
#[derive(Debug, Clone)]
pub struct ServerCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (scripts/setup installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TestCa {
    /// A new CA named `name` (files `{name}-ca.pem`, `{name}-ca.key` in `dir`), valid for two days.
    pub fn new(dir: &Path, name: &str) -> TestCa {
        std::fs::create_dir_all(dir).expect("certificate dir");
        let (cert, key) = (format!("{name}-ca.pem"), format!("{name}-ca.key"));
        openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN=delta-bridge test CA {name}"),
                "-keyout",
                &key,
                "-out",
                &cert,
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
            dir,
        );
        TestCa {
            cert: dir.join(cert),
            key: dir.join(key),
            dir: dir.to_path_buf(),
            name: name.to_string(),
        }
    }

    /// A server certificate for exactly these subject alternative names (`DNS:localhost`, `IP:127.0.0.1`),
    /// files `{name}-{file}.pem` and `{name}-{file}.key`.
    pub fn issue(&self, file: &str, sans: &[&str]) -> ServerCert {
        let base = format!("{}-{file}", self.name);
        let (cert, key, csr, ext) = (
            format!("{base}.pem"),
            format!("{base}.key"),
            format!("{base}.csr"),
            format!("{base}.ext"),
        );
        std::fs::write(
            self.dir.join(&ext),
            format!(
                "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
                 extendedKeyUsage=serverAuth\nsubjectAltName={}\n",
                sans.join(",")
            ),
        )
        .expect("extensions file");
        openssl(
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-subj",
                &format!("/CN={file}"),
                "-keyout",
                &key,
                "-out",
                &csr,
            ],
            &self.dir,
        );
        let ca_cert = self.cert.display().to_string();
        let ca_key = self.key.display().to_string();
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_cert,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &cert,
            ],
            &self.dir,
        );
        ServerCert {
            cert: self.dir.join(cert),
            key: self.dir.join(key),
        }
    }
}

/// The test's CA, an unrelated CA, and a server certificate from the first for `localhost` only (no IP
/// address: connecting to 127.0.0.1 is connecting to a name the certificate does not carry).
pub struct Certs {
    pub ca: TestCa,
    pub other: TestCa,
    pub localhost: ServerCert,
}

pub fn certs(dir: &Path) -> Certs {
    let ca = TestCa::new(dir, "good");
    let other = TestCa::new(dir, "other");
    let localhost = ca.issue("localhost", &["DNS:localhost"]);
    Certs { ca, other, localhost }
}
