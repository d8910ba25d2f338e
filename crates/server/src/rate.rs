//! Per-agent rate limits on the agent API's costly calls (SVID signing, JWT minting, renewal),
//! as SPIRE limits them per caller: an attested node that is compromised can ask for what its
//! entries allow, but not at a rate that takes the CA's lock, the datastore's write lock or the
//! server's CPU from every other node. Token buckets, pure: the caller passes the time.

use std::collections::HashMap;
use std::sync::Mutex;

use tessera_spiffe::SpiffeId;

/// A token bucket: `burst` tokens at most, refilled at `per_sec` a second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Limit {
    pub(crate) burst: f64,
    pub(crate) per_sec: f64,
}

/// SVIDs one agent may have signed: a node with 10,000 workloads signs them all at once (at
/// start, after a taint), then about one per workload per half-life.
pub(crate) const SIGN: Limit = Limit {
    burst: 10_000.0,
    per_sec: 1_000.0,
};
/// JWT-SVIDs one agent may have minted.
pub(crate) const MINT_JWT: Limit = Limit {
    burst: 1_000.0,
    per_sec: 500.0,
};
/// Renewals of one agent's own SVID (each a datastore write): about one per half-life is
/// needed; twenty in a row, then one every 10 s, or four per agent TTL when that is more (an
/// agent TTL of a few seconds renews every second or two).
pub(crate) fn renew(agent_ttl_secs: u64) -> Limit {
    #[allow(clippy::cast_precision_loss)] // a TTL in seconds
    let per_ttl = 4.0 / agent_ttl_secs.max(1) as f64;
    Limit {
        burst: 20.0,
        per_sec: per_ttl.max(0.1),
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: f64,
}

/// The buckets of every agent for one kind of call.
#[derive(Debug)]
pub(crate) struct Limiter {
    limit: Limit,
    buckets: Mutex<HashMap<SpiffeId, Bucket>>,
}

impl Limiter {
    pub(crate) fn new(limit: Limit) -> Self {
        Self {
            limit,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn limit(&self) -> Limit {
        self.limit
    }

    /// Takes `n` tokens for `agent` at `now` (seconds, monotonic), or says how long until there
    /// are that many (seconds). A request larger than the burst is never granted.
    pub(crate) fn take(&self, agent: &SpiffeId, n: f64, now: f64) -> Result<(), f64> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let b = buckets.entry(agent.clone()).or_insert(Bucket {
            tokens: self.limit.burst,
            at: now,
        });
        let elapsed = (now - b.at).max(0.0);
        b.tokens = (b.tokens + elapsed * self.limit.per_sec).min(self.limit.burst);
        b.at = now;
        if n <= b.tokens {
            b.tokens -= n;
            Ok(())
        } else {
            Err((n - b.tokens) / self.limit.per_sec)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_bucket_grants_its_burst_then_its_rate_per_agent() {
        let l = Limiter::new(Limit {
            burst: 10.0,
            per_sec: 2.0,
        });
        let a = SpiffeId::parse("spiffe://example.org/tessera/agent/a").unwrap();
        let b = SpiffeId::parse("spiffe://example.org/tessera/agent/b").unwrap();
        assert!(l.take(&a, 10.0, 0.0).is_ok());
        let wait = l.take(&a, 1.0, 0.0).unwrap_err();
        assert!((wait - 0.5).abs() < 1e-9, "{wait}");
        // Another agent has its own bucket.
        assert!(l.take(&b, 10.0, 0.0).is_ok());
        // Refilled at the rate, never above the burst.
        assert!(l.take(&a, 1.0, 0.5).is_ok());
        assert!(l.take(&a, 10.0, 1000.0).is_ok());
        assert!(l.take(&a, 1.0, 1000.0).is_err());
        // More than the burst is never granted.
        assert!(l.take(&b, 11.0, 5000.0).is_err());
        // Renewal follows the agent TTL: at least four per TTL, at least one per 10 s.
        assert!((renew(2).per_sec - 2.0).abs() < 1e-9);
        assert!((renew(3600).per_sec - 0.1).abs() < 1e-9);
        assert!((renew(0).per_sec - 4.0).abs() < 1e-9);
    }
}
