//! Network partitions a test makes itself, with iproute2 alone: a network namespace for the process to cut
//! off (a bridge replica), and for each path to it a "wire" through a second namespace whose bridge device
//! a test can unplug. Every address is in 10.231.0.0/16, a /30 per path that exists only while the test
//! runs; no packet leaves the machine.
//!
//! ```text
//!   host (servers, other replicas)                 wire namespace                 leader namespace
//!   {p}h 10.231.X.Y+1/30  ── veth ──  {p}w ─[ bridge {p}b ]─ {p}x  ── veth ──  {p}l 10.231.X.Y+2/30
//!                                                            ^ cut: `ip link set {p}x down`
//! ```
//!
//! A cut unplugs the wire's port towards the namespace: the namespace's end loses carrier (its route stays,
//! its packets are dropped silently), and what the host sends towards it is dropped by the wire's bridge.
//! Neither side gets an error or a reset, as with a real partition: TCP on both sides has to find out by
//! itself (timeouts, keepalives). `tc netem` is not in this kernel, and no iptables/nft binary is installed,
//! so a cut is a link state, not a filter.
//!
//! Safety: a `blackhole 10.231.0.0/16` route (metric 4242, added once and left in place) catches anything
//! addressed to a test's /30 once its veth is gone (a straggling FIN from a server's socket), which would
//! otherwise follow the default route off the machine. Dropping a [`Partitionable`] (also while a test
//! panics) heals every cut, kills what still runs in the namespace, and deletes both namespaces (which
//! deletes their veth pairs). Namespaces left by a test process that died without dropping (SIGKILL) are
//! removed by the next one.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use delta_harness::servers::ExtraListen;

const PREFIX: &str = "dbchaos";
/// The range every test network is carved from; never routed anywhere but to a test's own veth pairs.
const RANGE: &str = "10.231.0.0/16";
const SAFETY_METRIC: &str = "4242";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Why the namespaces could not be made (not root, no iproute2): the tests fail with this reason, or skip when
/// told to (see tests/partition.rs).
#[derive(Debug)]
pub struct Unavailable(pub String);

fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// One path between the host and the namespace.
#[derive(Debug, Clone)]
pub struct Link {
    pub name: String,
    /// The host's end (servers listen here).
    pub host: Ipv4Addr,
    /// The namespace's end.
    pub far: Ipv4Addr,
    /// The wire's port towards the namespace (None: a direct veth, never cut).
    cut_dev: Option<String>,
}

impl Link {
    pub fn extra_listen(&self) -> ExtraListen {
        ExtraListen {
            addr: self.host,
            prefix: 30,
        }
    }
}

/// A namespace for one process, reachable from the host over separate paths that can be cut one by one.
pub struct Partitionable {
    /// Where the cut-off process runs (`ip netns exec {ns} ...`).
    pub ns: String,
    wire: String,
    pub links: Vec<Link>,
}

/// Names of the namespaces of a test process that no longer runs.
fn stale_namespaces() -> Vec<String> {
    let list = ip(&["netns", "list"]).unwrap_or_default();
    list.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{PREFIX}-")))
        .filter(|n| {
            let pid = n.split('-').nth(1).and_then(|p| p.parse::<u32>().ok());
            pid.is_some_and(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
        })
        .map(str::to_string)
        .collect()
}

fn kill_all_in(ns: &str) {
    let pids = ip(&["netns", "pids", ns]).unwrap_or_default();
    for pid in pids.split_whitespace() {
        let _ = Command::new("kill").args(["-KILL", pid]).status();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && !ip(&["netns", "pids", ns]).unwrap_or_default().trim().is_empty() {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn delete_namespace(ns: &str) {
    kill_all_in(ns);
    let _ = ip(&["netns", "del", ns]);
}

/// Free /30 blocks of 10.231.0.0/16: none of their addresses is on an interface of the host now.
fn free_blocks(n: usize, seed: u32) -> Vec<(u8, u8)> {
    let used = ip(&["-o", "-4", "addr", "show"]).unwrap_or_default();
    let mut out = Vec::new();
    let mut k = seed.wrapping_mul(2_654_435_761) % 16_384;
    while out.len() < n {
        let (x, y) = ((k / 64) as u8, ((k % 64) * 4) as u8);
        let taken = (0..4).any(|i| used.contains(&format!("10.231.{x}.{}/", y + i)));
        if !taken {
            out.push((x, y));
        }
        k = (k + 1) % 16_384;
    }
    out
}

impl Partitionable {
    /// A namespace with one cuttable path per name in `cut`, plus one direct path (`mgmt`, never cut) for
    /// the test to reach the process's HTTP port.
    pub fn create(cut: &[&str]) -> Result<Partitionable, Unavailable> {
        let root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        if !root {
            return Err(Unavailable("network namespaces need root".into()));
        }
        ip(&["-V"]).map_err(|e| Unavailable(format!("iproute2 is needed: {e}")))?;
        for ns in stale_namespaces() {
            eprintln!("removing namespace {ns} left by a test process that is gone");
            delete_namespace(&ns);
        }
        // `replace`, not `add`: tests run in parallel, and the first ones on a machine that never had the
        // route would race to add it ("File exists" for all but one).
        if ip(&["route", "show", RANGE]).unwrap_or_default().trim().is_empty() {
            ip(&["route", "replace", "blackhole", RANGE, "metric", SAFETY_METRIC])
                .map_err(|e| Unavailable(format!("cannot add the safety route: {e}")))?;
        }

        let pid = std::process::id();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let id = format!("{pid:x}{n:x}");
        let ns = format!("{PREFIX}-{pid}-{n}-leader");
        let wire = format!("{PREFIX}-{pid}-{n}-wire");
        let mut p = Partitionable {
            ns: ns.clone(),
            wire: wire.clone(),
            links: Vec::new(),
        };
        let fail = |e: String| Unavailable(format!("cannot build the test network: {e}"));
        ip(&["netns", "add", &ns]).map_err(fail)?;
        ip(&["netns", "add", &wire]).map_err(fail)?;
        ip(&["-n", &ns, "link", "set", "lo", "up"]).map_err(fail)?;
        let blocks = free_blocks(cut.len() + 1, pid.wrapping_mul(31).wrapping_add(n * 7));
        for (i, name) in cut.iter().chain(std::iter::once(&"mgmt")).enumerate() {
            let (x, y) = blocks[i];
            let host = Ipv4Addr::new(10, 231, x, y + 1);
            let far = Ipv4Addr::new(10, 231, x, y + 2);
            let dev = format!("dc{id}{i}");
            let (h, l) = (format!("{dev}h"), format!("{dev}l"));
            let cut_dev = if *name == "mgmt" {
                ip(&["link", "add", &h, "type", "veth", "peer", "name", &l, "netns", &ns]).map_err(fail)?;
                None
            } else {
                let (w, x_, b) = (format!("{dev}w"), format!("{dev}x"), format!("{dev}b"));
                ip(&["link", "add", &h, "type", "veth", "peer", "name", &w, "netns", &wire]).map_err(fail)?;
                ip(&[
                    "-n", &wire, "link", "add", &x_, "type", "veth", "peer", "name", &l, "netns", &ns,
                ])
                .map_err(fail)?;
                ip(&["-n", &wire, "link", "add", &b, "type", "bridge"]).map_err(fail)?;
                for port in [&w, &x_] {
                    ip(&["-n", &wire, "link", "set", port, "master", &b]).map_err(fail)?;
                    ip(&["-n", &wire, "link", "set", port, "up"]).map_err(fail)?;
                }
                ip(&["-n", &wire, "link", "set", &b, "up"]).map_err(fail)?;
                Some(x_)
            };
            ip(&["addr", "add", &format!("{host}/30"), "dev", &h]).map_err(fail)?;
            ip(&["link", "set", &h, "up"]).map_err(fail)?;
            ip(&["-n", &ns, "addr", "add", &format!("{far}/30"), "dev", &l]).map_err(fail)?;
            ip(&["-n", &ns, "link", "set", &l, "up"]).map_err(fail)?;
            p.links.push(Link {
                name: name.to_string(),
                host,
                far,
                cut_dev,
            });
        }
        // Wait until every path carries traffic (the bridge's ports forward; addresses left tentative state).
        for l in &p.links {
            p.wait_reachable(l, Duration::from_secs(10)).map_err(fail)?;
        }
        Ok(p)
    }

    pub fn link(&self, name: &str) -> &Link {
        self.links
            .iter()
            .find(|l| l.name == name)
            .unwrap_or_else(|| panic!("no link {name}"))
    }

    /// The addresses the servers must listen on (every path's host end).
    pub fn extra_listen(&self) -> Vec<ExtraListen> {
        self.links.iter().map(Link::extra_listen).collect()
    }

    /// Checks, from inside the namespace, that the host end of `l` answers TCP (a listener the test opens
    /// on the host for the purpose).
    fn wait_reachable(&self, l: &Link, limit: Duration) -> Result<(), String> {
        let listener = std::net::TcpListener::bind((l.host, 0)).map_err(|e| format!("bind {}: {e}", l.host))?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let start = Instant::now();
        loop {
            // bash's /dev/tcp: no other tool needed inside the namespace.
            let ok = Command::new("ip")
                .args(["netns", "exec", &self.ns, "timeout", "2", "bash", "-c"])
                .arg(format!("exec 3<>/dev/tcp/{}/{port}", l.host))
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Ok(());
            }
            if start.elapsed() > limit {
                return Err(format!("{} not reachable from the namespace after {limit:?}", l.host));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Unplugs the path `name` (packets both ways are dropped silently from now on).
    pub fn cut(&self, name: &str) {
        let dev = self.link(name).cut_dev.clone().expect("this path cannot be cut");
        ip(&["-n", &self.wire, "link", "set", &dev, "down"]).expect("cut");
    }

    /// Plugs the path `name` back in.
    pub fn heal(&self, name: &str) {
        let dev = self.link(name).cut_dev.clone().expect("this path cannot be cut");
        ip(&["-n", &self.wire, "link", "set", &dev, "up"]).expect("heal");
    }

    /// `ip netns exec {ns}`: the command prefix that runs a program inside the namespace.
    pub fn exec_prefix(&self) -> Vec<String> {
        vec!["ip".into(), "netns".into(), "exec".into(), self.ns.clone()]
    }
}

impl Drop for Partitionable {
    fn drop(&mut self) {
        // Heal first, so that what is killed below closes its connections properly instead of leaving the
        // servers' sockets to time out towards an address that is about to disappear.
        for l in &self.links {
            if let Some(dev) = &l.cut_dev {
                let _ = ip(&["-n", &self.wire, "link", "set", dev, "up"]);
            }
        }
        delete_namespace(&self.ns);
        delete_namespace(&self.wire);
    }
}
