//! No secret ever reaches the bridge's stdout or stderr. The bridge binary runs with every secret set to a
//! distinct, recognisable value — given in the config file, in environment variables and in `<key>_file`
//! files, the PostgreSQL password as a `?password=` query parameter, as URL userinfo and behind a `key=value`
//! connection string — through `check-config`, `migrate`, `run` (until ready, then SIGTERM), `device issue`,
//! and runs that fail and log why (PostgreSQL unreachable, the broker refusing the bridge's password and the
//! admin's, an EMQX API that does not answer), all at debug level (the bridge's own crate at trace). Every line
//! of their output is then searched for every secret, as given, URL-encoded and JSON-escaped, and for a
//! marker that a part of it would show too. The one exception is what `device issue` exists to print: the
//! issued device's token, on its stdout.
//!
//! PostgreSQL checks the password here (scram-sha-256 for the bridge's role), and Mosquitto authenticates
//! through dynamic security only, so a password that is not applied fails the run instead of passing unseen.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::Env;
use delta_harness::servers::{free_port, Mosquitto};
use serde_json::{json, Value};

const DYNSEC_ADMIN: &str = "admin";
const PG_ROLE: &str = "sec_bridge";

/// The PostgreSQL password: a '/' right after digits (a URL library reads `user:4242` as host and port),
/// then '#' and '&', which a URL must encode.
const PG_PW: &str = "4242/pg-SECRET#x&y";
/// A password inside the `key=value` string that `postgres.password` overrides (quoted, with an escaped quote).
const KV_OLD_PW: &str = "kv-OLD-SECRET ' z";
const MQTT_PW: &str = "mqtt-SECRET-pw";
const MQTT_WRONG_PW: &str = "mqtt-WRONG-SECRET";
/// In `mqtt.url`'s userinfo, which the bridge does not use (`mqtt.password` is its password): never printed
/// either.
const MQTT_URL_PW: &str = "mqtt-URLINFO-SECRET";
const ADMIN_TOKEN: &str = "http-ADMIN-TOKEN-0123456789";
const DYNSEC_PW: &str = "dynsec-ADMIN-SECRET";
const DYNSEC_WRONG_PW: &str = "dynsec-WRONG-SECRET";
const API_SECRET: &str = "emqx-API-SECRET";
const AUTHN_TOKEN: &str = "emqx-AUTHN-TOKEN-SECRET";
const API_URL_PW: &str = "emqx-URLINFO-SECRET";
const LOAD_PW: &str = "load-SECRET-pw";

const WAIT: Duration = Duration::from_secs(30);

/// A secret and the strings whose appearance would show it (or part of it).
struct Secret {
    name: String,
    needles: Vec<String>,
}

impl Secret {
    /// `value` as given, URL-encoded, JSON-escaped, and `marker`, a part of it found nowhere else.
    fn new(name: &str, value: &str, marker: &str) -> Secret {
        assert!(value.contains(marker));
        let json = serde_json::to_string(value).expect("json");
        let mut needles = vec![
            value.to_string(),
            url_encode(value),
            json[1..json.len() - 1].to_string(),
            marker.to_string(),
        ];
        needles.sort();
        needles.dedup();
        Secret {
            name: name.to_string(),
            needles,
        }
    }
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|c| match c {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (c as char).to_string(),
            _ => format!("%{c:02X}"),
        })
        .collect()
}

/// What one command printed.
struct Capture {
    what: String,
    stdout: String,
    stderr: String,
}

/// Every line of every capture that holds a needle; `allowed` (the issued token on `device issue`'s stdout)
/// is blanked first in the capture named.
fn leaks(captures: &[Capture], secrets: &[Secret], allowed: &[(String, String)]) -> Vec<String> {
    let mut found = Vec::new();
    for c in captures {
        for (stream, text) in [("stdout", &c.stdout), ("stderr", &c.stderr)] {
            let mut text = text.clone();
            for (what, value) in allowed {
                if *what == c.what && stream == "stdout" {
                    text = text.replace(value.as_str(), "<the issued token>");
                }
            }
            for (n, line) in text.lines().enumerate() {
                for s in secrets {
                    if let Some(needle) = s.needles.iter().find(|needle| line.contains(needle.as_str())) {
                        found.push(format!(
                            "{} ({needle:?}) in `{}` {stream} line {}: {line}",
                            s.name,
                            c.what,
                            n + 1
                        ));
                    }
                }
            }
        }
    }
    found
}

/// The servers: PostgreSQL with a role that must give its password, Mosquitto with dynamic security only.
fn servers() -> Env {
    let env = Env::start_with_mqtt("secrets", |dir| {
        Mosquitto::start_dynsec(dir, DYNSEC_ADMIN, DYNSEC_PW, "").expect("mosquitto with dynamic security")
    });
    for args in [
        vec!["createClient", "bridge", "-p", MQTT_PW],
        vec!["createRole", "bridge-publisher"],
        vec!["addRoleACL", "bridge-publisher", "publishClientSend", "dev/#", "allow"],
        vec!["addClientRole", "bridge", "bridge-publisher"],
    ] {
        env.mqtt.dynsec(DYNSEC_ADMIN, DYNSEC_PW, &args).expect("mosquitto_ctrl");
    }
    let hba = env.pg.psql(&env.db, "SHOW hba_file").expect("hba_file");
    let hba = PathBuf::from(hba.trim());
    let rest = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
    std::fs::write(&hba, format!("host all {PG_ROLE} 127.0.0.1/32 scram-sha-256\n{rest}")).expect("write pg_hba.conf");
    let pw = PG_PW.replace('\'', "''");
    env.pg
        .psql(
            &env.db,
            &format!(
                "SET password_encryption = 'scram-sha-256'; \
                 CREATE ROLE {PG_ROLE} LOGIN SUPERUSER PASSWORD '{pw}'; SELECT pg_reload_conf();"
            ),
        )
        .expect("role with a password");
    env
}

/// A fresh EC P-256 key made by the openssl CLI, and its base64 lines (each one a part of the secret).
fn signing_key(dir: &Path) -> (PathBuf, Vec<String>) {
    let out = Command::new("openssl")
        .args(["ecparam", "-name", "prime256v1", "-genkey", "-noout"])
        .output()
        .expect("openssl");
    assert!(out.status.success());
    let path = dir.join("k1.pem");
    std::fs::write(&path, &out.stdout).expect("key");
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 16)
        .map(str::to_string)
        .collect();
    (path, lines)
}

/// A file holding `value` (named so that its path, which `check-config` prints, gives nothing away).
fn secret_file(dir: &Path, n: u32, value: &str) -> String {
    let path = dir.join(format!("f{n}"));
    std::fs::write(&path, format!("{value}\n")).expect("secret file");
    path.to_str().expect("utf8").to_string()
}

/// How one run is configured.
#[derive(Clone)]
struct Setup {
    /// `postgres.url` in the config file.
    pg_url: String,
    /// Extra `[postgres]` lines.
    pg_extra: String,
    /// The `[broker]` section's lines.
    broker: String,
    log_format: &'static str,
    /// Environment variables beyond the common ones (the same name set again wins).
    vars: Vec<(String, String)>,
}

impl Setup {
    fn with_var(&self, k: &str, v: &str) -> Setup {
        let mut s = self.clone();
        s.vars.push((k.to_string(), v.to_string()));
        s
    }
}

#[derive(Debug)]
enum Until {
    /// `/readyz` answers 200; the device API is then used once.
    Ready,
    /// stderr holds this text.
    Logged(&'static str),
}

/// A bridge process, killed if the test ends early.
struct Running(Child);

impl Running {
    fn terminate(&mut self) -> Option<i32> {
        let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        self.0.wait().ok().and_then(|s| s.code())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn ready(http: &str) -> bool {
    match reqwest::get(format!("{http}/readyz")).await {
        Ok(r) => r.status() == 200,
        Err(_) => false,
    }
}

/// The runs, and everything they printed.
struct Bench {
    env: Env,
    key: PathBuf,
    /// `DELTA_BRIDGE__BROKER__ADMIN_PASSWORD_FILE`'s file.
    dynsec_file: String,
    /// Every secret of the configuration, searched for in each command's output as soon as it ended.
    secrets: Vec<Secret>,
    captures: Vec<Capture>,
    runs: u32,
    /// Tokens the API issued (the test's to see, the log's never).
    api_tokens: Vec<String>,
    /// The status of each API revocation, by run.
    revocations: Vec<(String, u16)>,
}

impl Bench {
    /// Writes the run's config file (the secrets in it: the admin token; the others come from the
    /// environment and from files) and returns the command and the HTTP port it listens on.
    fn command(&mut self, s: &Setup, args: &[&str]) -> (Command, u16) {
        self.runs += 1;
        let toml = format!(
            "env = \"dev\"\n\
             [postgres]\nurl = {pg_url}\nconnect_timeout = \"2s\"\n{pg_extra}\n\
             [mqtt]\nurl = \"mqtt://bridge:{MQTT_URL_PW}@127.0.0.1:{mqtt}\"\nclient_id = \"sec-{{hostname}}-{{pid}}\"\n\
             username = \"bridge\"\n\
             [http]\nadmin_token = \"{ADMIN_TOKEN}\"\n\
             [credentials]\nsigning_key_file = {key}\n\
             [broker]\n{broker}\n\
             [bridge]\npoll_interval = \"200ms\"\n\
             [load]\nusername = \"loader\"\n\
             [log]\nformat = \"{format}\"\n",
            pg_url = toml::Value::String(s.pg_url.clone()),
            pg_extra = s.pg_extra,
            mqtt = self.env.mqtt.port,
            key = toml::Value::String(self.key.to_str().expect("utf8").into()),
            broker = s.broker,
            format = s.log_format,
        );
        let path = self.env.dir.join(format!("run-{}.toml", self.runs));
        std::fs::write(&path, toml).expect("config file");
        let port = free_port().expect("port");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_delta-bridge"));
        cmd.arg("--config")
            .arg(&path)
            .args(args)
            .env("RUST_LOG", "debug,delta_bridge=trace")
            .env("DELTA_BRIDGE__MQTT__PASSWORD", MQTT_PW)
            .env("DELTA_BRIDGE__LOAD__PASSWORD", LOAD_PW)
            .env("DELTA_BRIDGE__BROKER__ADMIN_PASSWORD_FILE", &self.dynsec_file)
            .env("DELTA_BRIDGE__HTTP__LISTEN", format!("127.0.0.1:{port}"))
            .envs(s.vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null());
        (cmd, port)
    }

    /// Records what a command printed, failing at once with every line that shows a secret.
    fn record(&mut self, capture: Capture) {
        let found = leaks(std::slice::from_ref(&capture), &self.secrets, &[]);
        assert!(
            found.is_empty(),
            "{} secret(s) printed:\n{}",
            found.len(),
            found.join("\n")
        );
        self.captures.push(capture);
    }

    /// Runs a command that ends by itself.
    fn once(&mut self, what: &str, s: &Setup, args: &[&str]) -> Output {
        let (mut cmd, _) = self.command(s, args);
        let out = cmd.output().expect("run delta-bridge");
        self.record(Capture {
            what: what.to_string(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
        out
    }

    /// `run` until `until`, then SIGTERM; expects a clean exit. Returns its stderr.
    async fn run(&mut self, what: &str, s: &Setup, until: Until) -> String {
        let (mut cmd, port) = self.command(s, &["run"]);
        let out_path = self.env.dir.join(format!("run-{}.out", self.runs));
        let err_path = self.env.dir.join(format!("run-{}.err", self.runs));
        let child = cmd
            .stdout(std::fs::File::create(&out_path).expect("stdout file"))
            .stderr(std::fs::File::create(&err_path).expect("stderr file"))
            .spawn()
            .expect("spawn delta-bridge run");
        let mut child = Running(child);
        let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();
        let http = format!("http://127.0.0.1:{port}");
        let start = Instant::now();
        loop {
            let log = std::fs::read_to_string(&err_path).unwrap_or_default();
            let done = match &until {
                Until::Ready => ready(&http).await,
                Until::Logged(marker) => log.contains(marker),
            };
            if done {
                break;
            }
            let stuck = match child.0.try_wait() {
                Ok(Some(status)) => Some(format!("exited early ({status})")),
                _ if start.elapsed() > WAIT => Some(format!("never got to {until:?}")),
                _ => None,
            };
            if let Some(why) = stuck {
                // What it printed is searched first: a leak is the finding that matters most.
                child.terminate();
                self.record(Capture {
                    what: what.to_string(),
                    stdout: read(&out_path),
                    stderr: read(&err_path),
                });
                panic!("`{what}` {why}:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if let Until::Ready = until {
            self.use_api(what, &http).await;
        }
        let code = child.terminate();
        let stderr = read(&err_path);
        self.record(Capture {
            what: what.to_string(),
            stdout: read(&out_path),
            stderr: stderr.clone(),
        });
        assert_eq!(code, Some(0), "`{what}` after SIGTERM:\n{stderr}");
        stderr
    }

    /// Issues, shows and revokes a device through the API (whichever broker is behind it).
    async fn use_api(&mut self, what: &str, http: &str) {
        let client = reqwest::Client::new();
        let device = format!("device-{}", self.runs);
        let issued = client
            .post(format!("{http}/api/v1/devices"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({"device_id": device, "merchant_code": "MCH-MST-001", "branch_code": "BRN-MST-OSK00001"}))
            .send()
            .await
            .expect("POST /api/v1/devices");
        assert_eq!(issued.status().as_u16(), 201, "{what}: issue");
        let body: Value = issued.json().await.expect("json");
        self.api_tokens
            .push(body["password"].as_str().expect("token").to_string());
        let shown = client
            .get(format!("{http}/api/v1/devices/{device}"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("GET");
        assert_eq!(shown.status().as_u16(), 200, "{what}: show");
        let revoked = client
            .delete(format!("{http}/api/v1/devices/{device}"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("DELETE");
        self.revocations.push((what.to_string(), revoked.status().as_u16()));
    }
}

fn issue_args(device: &str) -> Vec<&str> {
    vec![
        "device",
        "issue",
        "--device-id",
        device,
        "--merchant",
        "MCH-MST-001",
        "--branch",
        "BRN-MST-OSK00001",
    ]
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_is_ever_printed_or_logged() {
    let env = servers();
    let (key, key_lines) = signing_key(&env.dir);
    let dynsec_file = secret_file(&env.dir, 1, DYNSEC_PW);
    let pg_pw_file = secret_file(&env.dir, 2, PG_PW);
    let api_secret_file = secret_file(&env.dir, 3, API_SECRET);
    let dynsec_wrong_file = secret_file(&env.dir, 4, DYNSEC_WRONG_PW);
    let authn_token_file = secret_file(&env.dir, 5, AUTHN_TOKEN);
    let (pg, db) = (env.pg.port, env.db.clone());
    let closed = free_port().expect("port");
    let mut secrets = vec![
        Secret::new("postgres password", PG_PW, "pg-SECRET"),
        Secret::new("password inside the key=value string", KV_OLD_PW, "kv-OLD-SECRET"),
        Secret::new("mqtt.password", MQTT_PW, "mqtt-SECRET-pw"),
        Secret::new("mqtt.password (wrong)", MQTT_WRONG_PW, MQTT_WRONG_PW),
        Secret::new("mqtt.url userinfo", MQTT_URL_PW, MQTT_URL_PW),
        Secret::new("http.admin_token", ADMIN_TOKEN, "ADMIN-TOKEN"),
        Secret::new("broker.admin_password", DYNSEC_PW, DYNSEC_PW),
        Secret::new("broker.admin_password (wrong)", DYNSEC_WRONG_PW, DYNSEC_WRONG_PW),
        Secret::new("broker.api_secret", API_SECRET, API_SECRET),
        Secret::new("broker.authn_token", AUTHN_TOKEN, AUTHN_TOKEN),
        Secret::new("broker.api_url userinfo", API_URL_PW, API_URL_PW),
        Secret::new("load.password", LOAD_PW, LOAD_PW),
    ];
    for (i, line) in key_lines.iter().enumerate() {
        secrets.push(Secret::new(&format!("signing key, line {}", i + 2), line, line));
    }
    let mut b = Bench {
        env,
        key,
        dynsec_file,
        secrets,
        captures: Vec::new(),
        runs: 0,
        api_tokens: Vec::new(),
        revocations: Vec::new(),
    };

    // The EMQX settings are given in every run (printed by check-config); used in the last one.
    let emqx_settings = format!(
        "api_url = \"http://emqx-key:{API_URL_PW}@127.0.0.1:{closed}\"\napi_key = \"emqx-key\"\n\
         api_secret_file = {}\nauthn_token_file = {}",
        toml::Value::String(api_secret_file),
        toml::Value::String(authn_token_file)
    );
    let mosquitto = format!("kind = \"mosquitto\"\nadmin_username = \"{DYNSEC_ADMIN}\"\n{emqx_settings}");
    // The password as a URL's query parameter, in the config file.
    let query = Setup {
        pg_url: format!(
            "postgres://{PG_ROLE}@127.0.0.1:{pg}/{db}?application_name=sec&password={}",
            url_encode(PG_PW)
        ),
        pg_extra: String::new(),
        broker: mosquitto.clone(),
        log_format: "json",
        vars: Vec::new(),
    };
    // A key=value string with a password of its own, overridden by postgres.password from a file.
    let kv = Setup {
        pg_url: format!(
            "host=127.0.0.1 port={pg} user={PG_ROLE} dbname={db} password='{}'",
            KV_OLD_PW.replace('\'', "\\'")
        ),
        pg_extra: format!("password_file = {}", toml::Value::String(pg_pw_file)),
        broker: mosquitto.clone(),
        log_format: "text",
        vars: Vec::new(),
    };
    // URL userinfo, unencoded, from the environment.
    let userinfo_at = |port: u16| {
        query.with_var(
            "DELTA_BRIDGE__POSTGRES__URL",
            &format!("postgres://{PG_ROLE}:{PG_PW}@127.0.0.1:{port}/{db}"),
        )
    };
    let userinfo = Setup {
        log_format: "text",
        ..userinfo_at(pg)
    };

    for (what, s) in [
        ("check-config (?password=)", &query),
        ("check-config (key=value)", &kv),
        ("check-config (userinfo)", &userinfo),
    ] {
        let out = b.once(what, s, &["check-config"]);
        assert!(out.status.success(), "{what}: {}", text(&out));
        assert!(text(&out).contains("redacted"), "{what}: {}", text(&out));
    }
    let out = b.once("migrate", &query, &["migrate"]);
    assert!(out.status.success(), "migrate: {}", text(&out));

    b.run("run (?password=)", &query, Until::Ready).await;
    b.run("run (key=value)", &kv, Until::Ready).await;
    b.run("run (userinfo)", &userinfo, Until::Ready).await;

    let out = b.once("device issue", &kv, &issue_args("cli-device"));
    assert!(out.status.success(), "device issue: {}", text(&out));
    let issued: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let cli_token = issued["password"].as_str().expect("token").to_string();

    // Failures, logged.
    let unreachable = userinfo_at(closed);
    b.run(
        "run (PostgreSQL unreachable)",
        &unreachable,
        Until::Logged("cannot migrate yet"),
    )
    .await;
    let out = b.once("migrate (PostgreSQL unreachable)", &unreachable, &["migrate"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("cannot connect to PostgreSQL"), "{}", text(&out));
    let refused = query.with_var("DELTA_BRIDGE__MQTT__PASSWORD", MQTT_WRONG_PW);
    b.run("run (broker refuses)", &refused, Until::Logged("mqtt connection lost"))
        .await;
    let wrong_admin = kv.with_var("DELTA_BRIDGE__BROKER__ADMIN_PASSWORD_FILE", &dynsec_wrong_file);
    let out = b.once(
        "device issue (broker refuses the admin)",
        &wrong_admin,
        &issue_args("cli-device-2"),
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("broker admin connection failed"), "{}", text(&out));
    let emqx = Setup {
        broker: format!("kind = \"emqx\"\n{emqx_settings}"),
        ..query.clone()
    };
    let log = b.run("run (EMQX API unreachable)", &emqx, Until::Ready).await;
    assert!(
        log.contains("broker admin failed"),
        "the failed revocation is logged:\n{log}"
    );
    assert_eq!(
        b.revocations.iter().map(|(_, s)| *s).collect::<Vec<_>>(),
        [204, 204, 204, 502],
        "{:?}",
        b.revocations
    );

    // The devices' tokens, known only now: nowhere but on `device issue`'s stdout (its own).
    let tokens: Vec<Secret> = b
        .api_tokens
        .iter()
        .chain([&cli_token])
        .map(|t| Secret::new("a device token", t, t))
        .collect();
    let allowed = [("device issue".to_string(), cli_token.clone())];
    let found = leaks(&b.captures, &tokens, &allowed);
    assert!(
        found.is_empty(),
        "{} token(s) printed:\n{}",
        found.len(),
        found.join("\n")
    );
    // Not vacuous: the token is there to be excluded, and the runs logged at debug level.
    assert!(b.captures.iter().any(|c| c.stdout.contains(&cli_token)));
    assert!(
        b.captures.iter().all(|c| !(c.stdout.is_empty() && c.stderr.is_empty())),
        "every command printed something"
    );
    assert!(
        b.captures.iter().any(|c| c.stderr.contains("DEBUG")),
        "debug logging was on"
    );
}
