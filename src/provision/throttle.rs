//! The limit on failed admin authentication (docs/api.md#authentication): per client address, a bucket of
//! [`BURST`] failures that refills at [`PER_SECOND`] a second. A request with a missing or wrong token takes
//! one failure from its address's bucket (a right one gives it back); while the bucket holds less than one,
//! every device-API request from that address is answered 429 *without its token being compared*, and with
//! the time until the next failure is allowed.
//!
//! Not comparing is what makes it a limit: if a right token were still served while wrong ones got 429, the
//! 429 itself would tell a guesser that the guess was wrong, and guessing could go on at full speed. The cost
//! is that a valid client sharing an address with a guesser (behind the same NAT or proxy) waits with it;
//! a client that never fails never takes from a bucket, and the wait ends within a second of the failures
//! stopping.
//!
//! Memory is bounded: at most [`MAX_ADDRESSES`] buckets. IPv6 clients are counted by /64 (one host usually
//! has a whole /64). When the table is full, buckets that have refilled completely (which remember nothing)
//! are dropped; if every bucket is still in use, addresses without a bucket share one overflow bucket, so
//! that many addresses guessing at once are limited together.

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

struct Table {
    buckets: HashMap<Key, Bucket>,
    overflow: Bucket,
}

/// What a client address may do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Its token is compared. One failure is set aside for it before the comparison, so that requests in
    /// parallel cannot get more comparisons than the bucket holds; [`AuthThrottle::succeeded`] gives it back.
    /// `last`: that was the address's last failure (worth a log line if the token is wrong).
    Check { last: bool },
    /// Answered 429; it may try again after this long.
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
            }),
        }
    }
}

impl Table {
    /// The bucket that counts `key`: its own (made when there is room, after forgetting the buckets that have
    /// refilled if the table is full), else the shared overflow bucket.
    fn bucket(&mut self, key: Key, now: Instant) -> &mut Bucket {
        if !self.buckets.contains_key(&key) && self.buckets.len() >= MAX_ADDRESSES {
            self.buckets.retain(|_, b| {
                b.refill(now);
                b.tokens < BURST
            });
        }
        if self.buckets.len() < MAX_ADDRESSES || self.buckets.contains_key(&key) {
            self.buckets.entry(key).or_insert_with(|| Bucket::full(now))
        } else {
            &mut self.overflow
        }
    }
}

impl AuthThrottle {
    /// Before the token is compared: whether `ip` may have it compared now (and if so, one failure is set
    /// aside for it).
    pub(crate) fn admit(&self, ip: IpAddr, now: Instant) -> Verdict {
        let mut t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let bucket = t.bucket(Key::of(ip), now);
        if let Some(wait) = bucket.wait(now) {
            return Verdict::Limited(wait);
        }
        bucket.tokens -= 1.0;
        Verdict::Check {
            last: bucket.tokens < 1.0,
        }
    }

    /// The token was right: the failure set aside for it goes back (a success never counts).
    pub(crate) fn succeeded(&self, ip: IpAddr, now: Instant) {
        let mut t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let bucket = t.bucket(Key::of(ip), now);
        bucket.refill(now);
        bucket.tokens = (bucket.tokens + 1.0).min(BURST);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
    }

    fn fail_burst(t: &AuthThrottle, ip: IpAddr, now: Instant) {
        for i in 0..BURST as usize {
            let last = i + 1 == BURST as usize;
            assert_eq!(t.admit(ip, now), Verdict::Check { last }, "failure {i}");
        }
    }

    #[test]
    fn a_burst_then_the_refill_rate() {
        let t = AuthThrottle::default();
        let now = Instant::now();
        fail_burst(&t, v4(1), now);
        let Verdict::Limited(wait) = t.admit(v4(1), now) else {
            panic!("limited after the burst")
        };
        assert_eq!(wait, Duration::from_secs_f64(1.0 / PER_SECOND));
        // Another address is not affected.
        assert_eq!(t.admit(v4(2), now), Verdict::Check { last: false });
        // One failure's worth later it may try once more, and is limited again after it.
        let later = now + wait;
        assert_eq!(t.admit(v4(1), later), Verdict::Check { last: true });
        assert!(matches!(t.admit(v4(1), later), Verdict::Limited(_)));
        // Long enough without failures: the whole burst again.
        fail_burst(&t, v4(1), later + Duration::from_secs_f64(BURST / PER_SECOND));
    }

    #[test]
    fn successes_never_count() {
        let t = AuthThrottle::default();
        let now = Instant::now();
        for _ in 0..1000 {
            assert!(matches!(t.admit(v4(1), now), Verdict::Check { .. }));
            t.succeeded(v4(1), now);
        }
        fail_burst(&t, v4(1), now);
        assert!(matches!(t.admit(v4(1), now), Verdict::Limited(_)));
    }

    #[test]
    fn requests_in_parallel_get_no_more_comparisons_than_the_bucket_holds() {
        let t = AuthThrottle::default();
        let now = Instant::now();
        // Every admission sets a failure aside before any comparison is done.
        let admitted = (0..100)
            .filter(|_| matches!(t.admit(v4(1), now), Verdict::Check { .. }))
            .count();
        assert_eq!(admitted, BURST as usize);
    }

    #[test]
    fn ipv6_counts_by_64_and_mapped_ipv4_as_ipv4() {
        let t = AuthThrottle::default();
        let now = Instant::now();
        let a: IpAddr = "2001:db8:1:2::1".parse().expect("ip");
        let same64: IpAddr = "2001:db8:1:2:ffff::9".parse().expect("ip");
        let other64: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        fail_burst(&t, a, now);
        assert!(matches!(t.admit(same64, now), Verdict::Limited(_)));
        assert!(matches!(t.admit(other64, now), Verdict::Check { .. }));

        let mapped = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 7).to_ipv6_mapped());
        fail_burst(&t, mapped, now);
        assert!(matches!(t.admit(v4(7), now), Verdict::Limited(_)));
        assert!(matches!(
            t.admit(IpAddr::V6(Ipv6Addr::LOCALHOST), now),
            Verdict::Check { .. }
        ));
    }

    #[test]
    fn the_table_stays_bounded_and_a_full_table_shares_one_bucket() {
        let t = AuthThrottle::default();
        let now = Instant::now();
        let addr = |i: u32| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
        for i in 0..MAX_ADDRESSES as u32 {
            assert!(matches!(t.admit(addr(i), now), Verdict::Check { .. }));
        }
        assert_eq!(t.table.lock().expect("lock").buckets.len(), MAX_ADDRESSES);
        // Every bucket still in use: new addresses share the overflow bucket and are limited together.
        let extra = MAX_ADDRESSES as u32;
        for i in 0..BURST as u32 {
            assert!(matches!(t.admit(addr(extra + i), now), Verdict::Check { .. }));
        }
        assert_eq!(t.table.lock().expect("lock").buckets.len(), MAX_ADDRESSES);
        assert!(matches!(t.admit(addr(extra + 1000), now), Verdict::Limited(_)));
        // Once the old buckets have refilled they are forgotten and a new address gets its own bucket.
        let later = now + Duration::from_secs_f64(BURST / PER_SECOND + 1.0);
        assert!(matches!(t.admit(addr(extra + 2000), later), Verdict::Check { .. }));
        let table = t.table.lock().expect("lock");
        assert_eq!(table.buckets.len(), 1);
        assert!(table.buckets.contains_key(&Key::of(addr(extra + 2000))));
    }
}
