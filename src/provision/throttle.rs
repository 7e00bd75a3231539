//! The limit on failed admin authentication (docs/api.md#authentication): per client address, a bucket of
//! [`BURST`] failures that refills at [`PER_SECOND`] a second. A request with a missing or wrong token takes
//! one failure from its address's bucket; while the bucket holds less than one, every device-API request from
//! that address is answered 429 *without its token being compared*, and with the time until the next failure
//! is allowed.
//!
//! Not comparing is what makes it a limit: if a right token were still served while wrong ones got 429, the
//! 429 itself would tell a guesser that the guess was wrong, and guessing could go on at full speed. The cost
//! is that a valid client sharing an address with a guesser (behind the same NAT or proxy) waits with it;
//! a client that never fails never has a bucket at all, and the wait ends within a second of the failures
//! stopping. The comparison runs under the table's lock ([`AuthThrottle::check`], a hash of a short token), so
//! requests in parallel get no more comparisons than the bucket holds.
//!
//! Memory and work are bounded: at most [`MAX_ADDRESSES`] buckets, made only on a failure. IPv6 clients are
//! counted by /64 (one host usually has a whole /64). When the table is full and a new address fails, the
//! buckets that have refilled completely (which remember nothing) are dropped, at most once every
//! [`SWEEP_INTERVAL`]; if none could be, addresses without a bucket are counted together in one shared
//! bucket: while it is empty, such an address is answered 429 (many addresses guessing at once are limited
//! together), while addresses that have a bucket of their own keep it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Failures an address may make in a row before it is limited.
pub(crate) const BURST: f64 = 20.0;

/// Failures an address regains per second.
pub(crate) const PER_SECOND: f64 = 2.0;

/// Buckets kept at most (~100 bytes each).
pub(crate) const MAX_ADDRESSES: usize = 10_000;

/// Whom a bucket counts: an IPv4 address, or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    V4(u32),
    V6(u64),
}

impl Key {
    fn of(ip: IpAddr) -> Key {
        match ip {
            IpAddr::V4(v4) => Key::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Key::V4(u32::from(v4)),
                None => Key::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(now: Instant) -> Bucket {
        Bucket { tokens: BURST, at: now }
    }

    fn refill(&mut self, now: Instant) {
        let gained = now.saturating_duration_since(self.at).as_secs_f64() * PER_SECOND;
        self.tokens = (self.tokens + gained).min(BURST);
        self.at = now;
    }

    /// Refilled to `now`: None when a failure is allowed, else how long until one is.
    fn wait(&mut self, now: Instant) -> Option<Duration> {
        self.refill(now);
        (self.tokens < 1.0).then(|| Duration::from_secs_f64((1.0 - self.tokens) / PER_SECOND))
    }
}

/// How often, at most, a full table is swept for buckets that remember nothing.
pub(crate) const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

struct Table {
    buckets: HashMap<Key, Bucket>,
    /// Counts the addresses that found the table full.
    overflow: Bucket,
    last_sweep: Option<Instant>,
}

/// What became of a device-API request's token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// It was right.
    Passed,
    /// It was wrong or missing, and counted. `last`: that was the address's last failure (worth a log line).
    Failed { last: bool },
    /// Not compared: the address has failed too often; it may try again after this long.
    Limited(Duration),
}

/// The per-address failure buckets; shared by every request of the device API.
pub(crate) struct AuthThrottle {
    table: Mutex<Table>,
}

impl Default for AuthThrottle {
    fn default() -> Self {
        AuthThrottle {
            table: Mutex::new(Table {
                buckets: HashMap::new(),
                overflow: Bucket::full(Instant::now()),
                last_sweep: None,
            }),
        }
    }
}

impl Table {
    /// The bucket that counts `key` if it has one, or the shared one if the table is full (and cannot be
    /// swept yet); None for an address with no failures on record and room to record them.
    fn existing(&mut self, key: Key, now: Instant) -> Option<&mut Bucket> {
        if self.buckets.contains_key(&key) {
            return self.buckets.get_mut(&key);
        }
        if self.buckets.len() >= MAX_ADDRESSES {
            self.sweep(now);
        }
        (self.buckets.len() >= MAX_ADDRESSES).then_some(&mut self.overflow)
    }

    /// The bucket a failure of `key` is counted in: its own, made if there is room (after a sweep if the
    /// table is full), else the shared one.
    fn counting(&mut self, key: Key, now: Instant) -> &mut Bucket {
        if !self.buckets.contains_key(&key) && self.buckets.len() >= MAX_ADDRESSES {
            self.sweep(now);
        }
        if self.buckets.len() < MAX_ADDRESSES || self.buckets.contains_key(&key) {
            self.buckets.entry(key).or_insert_with(|| Bucket::full(now))
        } else {
            &mut self.overflow
        }
    }

    /// Forgets the buckets that have refilled, unless that was tried less than [`SWEEP_INTERVAL`] ago.
    fn sweep(&mut self, now: Instant) {
        if self
            .last_sweep
            .is_some_and(|t| now.saturating_duration_since(t) < SWEEP_INTERVAL)
        {
            return;
        }
        self.last_sweep = Some(now);
        self.buckets.retain(|_, b| {
            b.refill(now);
            b.tokens < BURST
        });
    }
}

impl AuthThrottle {
    /// Whether `ip` may have its token compared now, and if so, `compare` (true: the token is right) with
    /// a wrong token counted against the address. A right token changes nothing and makes no bucket.
    pub(crate) fn check(&self, ip: IpAddr, now: Instant, compare: impl FnOnce() -> bool) -> Verdict {
        let key = Key::of(ip);
        let mut t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(bucket) = t.existing(key, now) {
            if let Some(wait) = bucket.wait(now) {
                return Verdict::Limited(wait);
            }
        }
        if compare() {
            return Verdict::Passed;
        }
        let bucket = t.counting(key, now);
        bucket.tokens -= 1.0;
        Verdict::Failed {
            last: bucket.tokens < 1.0,
        }
    }

    #[cfg(test)]
    fn buckets(&self) -> usize {
        self.table.lock().expect("lock").buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
    }

    fn wrong(t: &AuthThrottle, ip: IpAddr, now: Instant) -> Verdict {
        t.check(ip, now, || false)
    }

    fn right(t: &AuthThrottle, ip: IpAddr, now: Instant) -> Verdict {
        t.check(ip, now, || true)
    }

    fn fail_burst(t: &AuthThrottle, ip: IpAddr, now: Instant) {
        for i in 0..BURST as usize {
            let last = i + 1 == BURST as usize;
            assert_eq!(wrong(t, ip, now), Verdict::Failed { last }, "failure {i}");
        }
    }

    #[test]
    fn a_burst_then_the_refill_rate() {
        let t = AuthThrottle::default();
        let now = Instant::now();
        fail_burst(&t, v4(1), now);
        let Verdict::Limited(wait) = right(&t, v4(1), now) else {
            panic!("limited after the burst, whatever the token")
        };
        assert_eq!(wait, Duration::from_secs_f64(1.0 / PER_SECOND));
        // Another address is not affected.
        assert_eq!(wrong(&t, v4(2), now), Verdict::Failed { last: false });
        // One failure's worth later it may try once more, and is limited again after it.
        let later = now + wait;
        assert_eq!(wrong(&t, v4(1), later), Verdict::Failed { last: true });
        assert!(matches!(wrong(&t, v4(1), later), Verdict::Limited(_)));
        // Long enough without failures: the whole burst again.
        fail_burst(&t, v4(1), later + Duration::from_secs_f64(BURST / PER_SECOND));
    }

    #[test]
    fn successes_never_count_nor_make_a_bucket() {
        let t = AuthThrottle::default();
        let now = Instant::now();
        for i in 0..1000 {
            assert_eq!(right(&t, v4(1), now), Verdict::Passed);
            assert_eq!(
                right(&t, IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + i)), now),
                Verdict::Passed
            );
        }
        assert_eq!(t.buckets(), 0);
        fail_burst(&t, v4(1), now);
        assert!(matches!(right(&t, v4(1), now), Verdict::Limited(_)));
        assert_eq!(t.buckets(), 1);
    }

    #[test]
    fn requests_in_parallel_get_no_more_comparisons_than_the_bucket_holds() {
        let t = std::sync::Arc::new(AuthThrottle::default());
        let now = Instant::now();
        let compared = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (t, compared) = (t.clone(), compared.clone());
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        t.check(v4(1), now, || {
                            compared.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            false
                        });
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().expect("thread");
        }
        assert_eq!(compared.load(std::sync::atomic::Ordering::SeqCst), BURST as usize);
    }

    #[test]
    fn ipv6_counts_by_64_and_mapped_ipv4_as_ipv4() {
        let t = AuthThrottle::default();
        let now = Instant::now();
        let a: IpAddr = "2001:db8:1:2::1".parse().expect("ip");
        let same64: IpAddr = "2001:db8:1:2:ffff::9".parse().expect("ip");
        let other64: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        fail_burst(&t, a, now);
        assert!(matches!(wrong(&t, same64, now), Verdict::Limited(_)));
        assert!(matches!(wrong(&t, other64, now), Verdict::Failed { .. }));

        let mapped = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 7).to_ipv6_mapped());
        fail_burst(&t, mapped, now);
        assert!(matches!(wrong(&t, v4(7), now), Verdict::Limited(_)));
        assert!(matches!(
            wrong(&t, IpAddr::V6(Ipv6Addr::LOCALHOST), now),
            Verdict::Failed { .. }
        ));
    }

    #[test]
    fn a_full_table_shares_one_bucket_for_new_addresses_only_and_is_swept_once_a_second() {
        let t = AuthThrottle::default();
        let now = Instant::now();
        let addr = |i: u32| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
        for i in 0..MAX_ADDRESSES as u32 {
            assert!(matches!(wrong(&t, addr(i), now), Verdict::Failed { .. }));
        }
        assert_eq!(t.buckets(), MAX_ADDRESSES);
        // An address with a bucket keeps it; its right token passes.
        assert_eq!(right(&t, addr(0), now), Verdict::Passed);
        // Every bucket still in use: new addresses' failures go to the shared bucket; once it is empty, new
        // addresses are limited together, right token or not.
        let extra = MAX_ADDRESSES as u32;
        for i in 0..BURST as u32 {
            assert!(matches!(wrong(&t, addr(extra + i), now), Verdict::Failed { .. }));
        }
        assert_eq!(t.buckets(), MAX_ADDRESSES);
        assert!(matches!(right(&t, addr(extra + 1000), now), Verdict::Limited(_)));
        assert_eq!(right(&t, addr(1), now), Verdict::Passed);
        // Once the old buckets have refilled, the next sweep forgets them and a new address gets its own.
        let later = now + Duration::from_secs_f64(BURST / PER_SECOND + 1.0);
        assert!(matches!(wrong(&t, addr(extra + 2000), later), Verdict::Failed { .. }));
        let table = t.table.lock().expect("lock");
        assert_eq!(table.buckets.len(), 1);
        assert!(table.buckets.contains_key(&Key::of(addr(extra + 2000))));
    }

    #[test]
    fn a_full_table_is_swept_at_most_once_a_second() {
        let t = AuthThrottle::default();
        let t0 = Instant::now();
        let addr = |i: u32| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
        for i in 0..MAX_ADDRESSES as u32 {
            wrong(&t, addr(i), t0);
        }
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let extra = MAX_ADDRESSES as u32;
        // Swept, but nothing has refilled yet (one failure takes half a second): the shared bucket.
        assert!(matches!(wrong(&t, addr(extra), ms(100)), Verdict::Failed { .. }));
        assert_eq!(t.buckets(), MAX_ADDRESSES);
        // Everything has refilled now, but the last sweep was 0.8 s ago: not swept again.
        assert!(matches!(wrong(&t, addr(extra + 1), ms(900)), Verdict::Failed { .. }));
        assert_eq!(t.buckets(), MAX_ADDRESSES);
        // A second after it: swept, and the new address has a bucket of its own.
        assert!(matches!(wrong(&t, addr(extra + 2), ms(1100)), Verdict::Failed { .. }));
        assert_eq!(t.buckets(), 1);
    }
}
