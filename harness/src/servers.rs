//! Private PostgreSQL and Mosquitto servers on free loopback ports, in a directory of their own, started from
//! the system's binaries (Debian's `postgresql` and `mosquitto` packages). Used through [`crate::stack`] by the
//! demo, the integration tests and the benchmarks; never touches servers already running on the standard ports.
//!
//! When run as root (CI, containers) the servers run as the `postgres` / `mosquitto` users, since `initdb`
//! refuses root. Dropping a server kills it.

use std::fs;
use std::io;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum LocalEnvError {
    #[error("{what} not found: {hint}")]
    Missing { what: String, hint: String },
    #[error("{what} failed: {detail}")]
    Failed { what: String, detail: String },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LocalEnvError + '_ {
    move |source| LocalEnvError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; the servers bind it right after).
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// uid/gid to run a server as, when we are root; None otherwise.
fn service_user(name: &str) -> Option<(u32, u32)> {
    // SAFETY-free check of the effective uid through the environment of `id`: keeps this module free of unsafe.
    let euid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&euid.stdout).trim() != "0" {
        return None;
    }
    let uid = Command::new("id").args(["-u", name]).output().ok()?;
    let gid = Command::new("id").args(["-g", name]).output().ok()?;
    let uid = String::from_utf8_lossy(&uid.stdout).trim().parse().ok()?;
    let gid = String::from_utf8_lossy(&gid.stdout).trim().parse().ok()?;
    Some((uid, gid))
}

fn chown_tree(path: &Path, user: Option<(u32, u32)>) -> Result<(), LocalEnvError> {
    if let Some((uid, gid)) = user {
        let status = Command::new("chown")
            .args(["-R", &format!("{uid}:{gid}")])
            .arg(path)
            .status()
            .map_err(io_err(path))?;
        if !status.success() {
            return Err(LocalEnvError::Failed {
                what: "chown".into(),
                detail: path.display().to_string(),
            });
        }
    }
    Ok(())
}

fn as_user(cmd: &mut Command, user: Option<(u32, u32)>) {
    if let Some((uid, gid)) = user {
        cmd.uid(uid).gid(gid);
    }
}

fn wait_for_port(port: u16, limit: Duration, child: &mut Child, what: &str, log: &Path) -> Result<(), LocalEnvError> {
    let start = Instant::now();
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let tail = fs::read(log)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            let tail: String = tail
                .lines()
                .rev()
                .take(15)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            return Err(LocalEnvError::Failed {
                what: what.into(),
                detail: format!("exited with {status}:\n{tail}"),
            });
        }
        if start.elapsed() > limit {
            return Err(LocalEnvError::Failed {
                what: what.into(),
                detail: format!("not listening on {port} after {limit:?}"),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The directory of PostgreSQL's server binaries: $PG_BIN, else the newest /usr/lib/postgresql/*/bin.
pub fn postgres_bin_dir() -> Result<PathBuf, LocalEnvError> {
    if let Ok(dir) = std::env::var("PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut found: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| {
                    let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
                    let bin = e.path().join("bin");
                    bin.join("postgres").exists().then_some((v, bin))
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found.pop().map(|(_, p)| p).ok_or_else(|| LocalEnvError::Missing {
        what: "PostgreSQL server binaries".into(),
        hint: "install Debian's postgresql package (scripts/setup does), or set PG_BIN".into(),
    })
}

/// An address a server listens on besides 127.0.0.1 (same port), and the prefix length of the network its
/// clients come from: e.g. the host side of a test's veth pair, 10.231.7.1/30.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtraListen {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl ExtraListen {
    /// The client network, `addr/prefix` with the host bits cleared.
    pub fn network(&self) -> String {
        let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix.min(32))).unwrap_or(0);
        format!("{}/{}", Ipv4Addr::from(u32::from(self.addr) & mask), self.prefix)
    }
}

/// A server's TLS certificate (chain, PEM) and private key (PEM), as files; the server gets copies of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A private PostgreSQL cluster. Superuser `postgres`, trust authentication, loopback only (plus any
/// [`ExtraListen`] address, trusting its network); TLS offered (`ssl = on`) when started with a certificate,
/// plain connections accepted as well.
pub struct Postgres {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
    user: Option<(u32, u32)>,
    durable: bool,
    also: Vec<ExtraListen>,
    /// `ssl = on` with the copies `server.crt` and `server.key` in `dir`.
    tls: bool,
    child: Option<Child>,
}

impl Postgres {
    /// initdb + start under `dir` (created). `durable = false` turns fsync off: right for tests (a killed
    /// server still recovers; only an OS crash would lose data), wrong for measuring commit cost.
    pub fn start(dir: &Path, durable: bool) -> Result<Postgres, LocalEnvError> {
        Self::start_on(dir, durable, &[])
    }

    /// Like [`Postgres::start`], also listening on `also` (the same port) and trusting clients from its
    /// networks.
    pub fn start_on(dir: &Path, durable: bool, also: &[ExtraListen]) -> Result<Postgres, LocalEnvError> {
        Self::start_tls(dir, durable, also, None)
    }

    /// Like [`Postgres::start_on`], with `ssl = on` and this certificate when `tls` is given.
    pub fn start_tls(
        dir: &Path,
        durable: bool,
        also: &[ExtraListen],
        tls: Option<&ServerTls>,
    ) -> Result<Postgres, LocalEnvError> {
        let bin = postgres_bin_dir()?;
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        if let Some(tls) = tls {
            // PostgreSQL refuses a key file that others can read: copies of its own, owned by it, mode 0600.
            use std::os::unix::fs::PermissionsExt;
            for (from, to) in [(&tls.cert, "server.crt"), (&tls.key, "server.key")] {
                let to = dir.join(to);
                fs::copy(from, &to).map_err(io_err(from))?;
                fs::set_permissions(&to, fs::Permissions::from_mode(0o600)).map_err(io_err(&to))?;
            }
        }
        let user = service_user("postgres");
        chown_tree(dir, user)?;
        let data = dir.join("data");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .args(["-D"])
            .arg(&data)
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        as_user(&mut initdb, user);
        let out = initdb.output().map_err(io_err(&data))?;
        if !out.status.success() {
            return Err(LocalEnvError::Failed {
                what: "initdb".into(),
                detail: String::from_utf8_lossy(&out.stderr).into(),
            });
        }
        if !also.is_empty() {
            let hba = data.join("pg_hba.conf");
            let mut text = fs::read_to_string(&hba).map_err(io_err(&hba))?;
            for a in also {
                text.push_str(&format!("host all all {} trust\n", a.network()));
            }
            fs::write(&hba, text).map_err(io_err(&hba))?;
        }
        let mut pg = Postgres {
            port: free_port().map_err(io_err(dir))?,
            dir: dir.to_path_buf(),
            bin,
            user,
            durable,
            also: also.to_vec(),
            tls: tls.is_some(),
            child: None,
        };
        pg.spawn()?;
        Ok(pg)
    }

    fn spawn(&mut self) -> Result<(), LocalEnvError> {
        let log = self.dir.join("postgres.log");
        let logf = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io_err(&log))?;
        let errf = logf.try_clone().map_err(io_err(&log))?;
        let mut listen = String::from("127.0.0.1");
        for a in &self.also {
            listen.push_str(&format!(",{}", a.addr));
        }
        let mut cmd = Command::new(self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(self.dir.join("data"))
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(&self.dir)
            .args([
                "-c",
                &format!("listen_addresses={listen}"),
                "-c",
                "max_connections=200",
                "-c",
                "shared_buffers=128MB",
            ])
            .args(["-c", "log_min_messages=warning"])
            .stdin(Stdio::null())
            .stdout(logf)
            .stderr(errf);
        if !self.durable {
            cmd.args(["-c", "fsync=off", "-c", "full_page_writes=off"]);
        }
        if self.tls {
            cmd.args(["-c", "ssl=on", "-c"])
                .arg(format!("ssl_cert_file={}", self.dir.join("server.crt").display()))
                .arg("-c")
                .arg(format!("ssl_key_file={}", self.dir.join("server.key").display()));
        }
        as_user(&mut cmd, self.user);
        let mut child = cmd.spawn().map_err(io_err(&self.bin))?;
        wait_for_port(self.port, Duration::from_secs(60), &mut child, "postgres", &log)?;
        self.child = Some(child);
        // Listening is not accepting: wait until a connection is served.
        let start = Instant::now();
        loop {
            let ok = Command::new(self.bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", "-q"])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(60) {
                return Err(LocalEnvError::Failed {
                    what: "postgres".into(),
                    detail: "not ready after 60s".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `postgres://postgres@127.0.0.1:PORT/db`
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Stops the server: `immediate` is a crash (SIGQUIT, recovery at next start), else a fast shutdown.
    pub fn stop(&mut self, immediate: bool) {
        if let Some(child) = self.child.take() {
            stop_child(child, if immediate { "QUIT" } else { "INT" }, Duration::from_secs(30));
        }
    }

    /// Stops and starts again on the same port.
    pub fn restart(&mut self, immediate: bool) -> Result<(), LocalEnvError> {
        self.stop(immediate);
        self.spawn()
    }

    /// The postmaster's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A crash: SIGKILL to the postmaster alone (`kill -9`), as the OOM killer would. Its backends and
    /// auxiliary processes are not signalled; they notice the postmaster's death and exit by themselves.
    /// Start it again with [`Postgres::start_after_crash`].
    pub fn kill(&mut self) {
        if let Some(child) = self.child.take() {
            stop_child(child, "KILL", Duration::from_secs(10));
        }
    }

    /// Starts the server again after [`Postgres::kill`]: PostgreSQL refuses to start while processes of the
    /// killed postmaster still hold its shared memory, so this retries for up to `limit`; the start itself
    /// runs crash recovery from the WAL. Returns how long the old processes took to go.
    pub fn start_after_crash(&mut self, limit: Duration) -> Result<Duration, LocalEnvError> {
        let start = Instant::now();
        loop {
            match self.spawn() {
                Ok(()) => return Ok(start.elapsed()),
                Err(e) if start.elapsed() >= limit => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Runs SQL through psql (for set-up; the bridge itself never shells out).
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, LocalEnvError> {
        let psql = if self.bin.join("psql").exists() {
            self.bin.join("psql")
        } else {
            PathBuf::from("psql")
        };
        let out = Command::new(psql)
            .args([
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-At",
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
                "-c",
                sql,
            ])
            .output()
            .map_err(io_err(&self.bin))?;
        if !out.status.success() {
            return Err(LocalEnvError::Failed {
                what: "psql".into(),
                detail: String::from_utf8_lossy(&out.stderr).into(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop(true);
    }
}

/// A private Mosquitto broker (MQTT 5 capable), with persistence so that a restart keeps queued messages and
/// `max_queued_messages 0` so that it never drops QoS 1 messages for a slow subscriber (the default, 1000,
/// drops QoS 1 messages it already acknowledged to the publisher once a subscriber falls that far behind).
pub struct Mosquitto {
    pub port: u16,
    dir: PathBuf,
    user: Option<(u32, u32)>,
    child: Option<Child>,
}

/// The `autosave_interval` of every broker started here: it writes its persistence file every second, so a
/// SIGKILL loses at most about a second of state changes (messages it acknowledged but had not yet delivered
/// among them); SIGTERM saves everything.
pub const MOSQUITTO_AUTOSAVE_SECONDS: u32 = 1;

impl Mosquitto {
    /// Starts with anonymous access allowed.
    pub fn start(dir: &Path) -> Result<Mosquitto, LocalEnvError> {
        Self::start_with(dir, "allow_anonymous true\n")
    }

    /// Starts with extra configuration lines (e.g. the dynamic-security plugin).
    pub fn start_with(dir: &Path, extra: &str) -> Result<Mosquitto, LocalEnvError> {
        Self::start_on(dir, extra, &[])
    }

    /// Like [`Mosquitto::start_with`], with a listener on each of `also` as well (the same port).
    pub fn start_on(dir: &Path, extra: &str, also: &[ExtraListen]) -> Result<Mosquitto, LocalEnvError> {
        which("mosquitto").ok_or_else(|| LocalEnvError::Missing {
            what: "mosquitto".into(),
            hint: "install Debian's mosquitto package (scripts/setup does)".into(),
        })?;
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let port = free_port().map_err(io_err(dir))?;
        let mut listeners = format!("listener {port} 127.0.0.1\n");
        for a in also {
            listeners.push_str(&format!("listener {port} {}\n", a.addr));
        }
        let conf = format!(
            "{listeners}persistence true\npersistence_location {}/\nautosave_interval {MOSQUITTO_AUTOSAVE_SECONDS}\n\
             max_queued_messages 0\nmax_inflight_messages 0\nlog_dest file {}/mosquitto.log\n\
             log_type error\nlog_type warning\nlog_type notice\nper_listener_settings false\n{extra}",
            dir.display(),
            dir.display()
        );
        let conf_path = dir.join("mosquitto.conf");
        fs::write(&conf_path, conf).map_err(io_err(&conf_path))?;
        let user = service_user("mosquitto");
        chown_tree(dir, user)?;
        let mut m = Mosquitto {
            port,
            dir: dir.to_path_buf(),
            user,
            child: None,
        };
        m.spawn()?;
        Ok(m)
    }

    fn spawn(&mut self) -> Result<(), LocalEnvError> {
        // What it says before its log file is open (a configuration or persistence error) goes to stderr.
        let err_path = self.dir.join("mosquitto.stderr");
        let errf = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&err_path)
            .map_err(io_err(&err_path))?;
        let mut cmd = Command::new("mosquitto");
        cmd.arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(errf);
        as_user(&mut cmd, self.user);
        let mut child = cmd.spawn().map_err(io_err(&self.dir))?;
        let log = self.dir.join("mosquitto.log");
        wait_for_port(self.port, Duration::from_secs(30), &mut child, "mosquitto", &log).map_err(|e| {
            let stderr = fs::read(&err_path)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            match e {
                LocalEnvError::Failed { what, detail } => LocalEnvError::Failed {
                    what,
                    detail: format!("{detail}\nstderr:\n{stderr}"),
                },
                other => other,
            }
        })?;
        self.child = Some(child);
        Ok(())
    }

    /// Starts with the dynamic-security plugin as the only authentication (no anonymous access), with
    /// `admin` / `admin_password` as its administrator. `extra` is appended to the configuration.
    pub fn start_dynsec(
        dir: &Path,
        admin: &str,
        admin_password: &str,
        extra: &str,
    ) -> Result<Mosquitto, LocalEnvError> {
        let plugin = dynsec_plugin().ok_or_else(|| LocalEnvError::Missing {
            what: "mosquitto_dynamic_security.so".into(),
            hint: "install Debian's mosquitto package (2.0 or later)".into(),
        })?;
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let file = dir.join("dynamic-security.json");
        let out = Command::new("mosquitto_ctrl")
            .args(["dynsec", "init"])
            .arg(&file)
            .args([admin, admin_password])
            .output()
            .map_err(io_err(&file))?;
        if !out.status.success() {
            return Err(LocalEnvError::Failed {
                what: "mosquitto_ctrl dynsec init".into(),
                detail: String::from_utf8_lossy(&out.stderr).into(),
            });
        }
        Self::start_with(
            dir,
            &format!(
                "allow_anonymous false\nplugin {}\nplugin_opt_config_file {}\n{extra}",
                plugin.display(),
                file.display()
            ),
        )
    }

    /// Runs `mosquitto_ctrl dynsec ARGS` against this broker as the given administrator.
    pub fn dynsec(&self, admin: &str, admin_password: &str, args: &[&str]) -> Result<(), LocalEnvError> {
        let out = Command::new("mosquitto_ctrl")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-u",
                admin,
                "-P",
                admin_password,
                "dynsec",
            ])
            .args(args)
            .output()
            .map_err(io_err(&self.dir))?;
        if !out.status.success() {
            return Err(LocalEnvError::Failed {
                what: format!("mosquitto_ctrl dynsec {}", args.first().unwrap_or(&"")),
                detail: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            });
        }
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stops the broker: gracefully (SIGTERM: it saves its persistence file), or by SIGKILL.
    pub fn stop(&mut self, kill: bool) {
        if let Some(child) = self.child.take() {
            stop_child(child, if kill { "KILL" } else { "TERM" }, Duration::from_secs(20));
        }
    }

    pub fn restart(&mut self) -> Result<(), LocalEnvError> {
        self.stop(false);
        self.spawn()
    }

    /// A crash: SIGKILL. What the broker had not yet written to its persistence file (at most
    /// [`MOSQUITTO_AUTOSAVE_SECONDS`] of changes) is gone. Start it again with [`Mosquitto::start_again`].
    pub fn kill(&mut self) {
        self.stop(true);
    }

    /// Starts the broker again (same port, configuration and persistence file) after [`Mosquitto::kill`].
    /// A start that fails is retried (up to 5 attempts, as a service manager would), each failure said on
    /// stderr: once in about twenty kills under load a start after SIGKILL exited with status 3 and nothing
    /// in its log, not reproduced since.
    pub fn start_again(&mut self) -> Result<(), LocalEnvError> {
        self.stop(true);
        let mut attempt = 1;
        loop {
            match self.spawn() {
                Ok(()) => return Ok(()),
                Err(e) if attempt >= 5 => return Err(e),
                Err(e) => {
                    eprintln!("mosquitto did not start after a kill (attempt {attempt}, retrying): {e}");
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }

    /// The broker's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop(true);
    }
}

/// The dynamic-security plugin of the installed Mosquitto (multiarch path), if any.
pub fn dynsec_plugin() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = fs::read_dir("/usr/lib")
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path().join("mosquitto_dynamic_security.so"))
                .collect()
        })
        .unwrap_or_default();
    candidates.push(PathBuf::from("/usr/lib/mosquitto_dynamic_security.so"));
    candidates.into_iter().find(|p| p.exists())
}

/// Sends `signal` (a `kill` name: TERM, INT, QUIT) and waits up to `limit` for the exit, then kills. A child
/// that already exited is only reaped: its pid may belong to another process by now.
pub(crate) fn stop_child(mut child: Child, signal: &str, limit: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let _ = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status();
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn which(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join(bin))
        .find(|p| p.exists())
}
