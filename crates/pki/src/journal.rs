//! The CA rotation journal: which authorities exist, which one signs, which are only published,
//! and which an operator has tainted. X.509 CAs and JWT keys rotate independently, each in its
//! own [`Rotation`].
//!
//! Two slots, as in SPIRE: at half of the active authority's life the next one is *prepared* (it
//! enters the bundle but signs nothing); when 1/6 of the active one's life is left the prepared one
//! is *activated* and the previous one becomes *old*; an old one leaves the bundle once it has
//! expired. Every verifier therefore holds a key in its bundle before the first SVID signed with it
//! arrives, and keeps it until the last such SVID has expired (SVIDs never outlive their CA).
//!
//! Forced rotation (an operator who suspects a key leaked) runs the same steps by hand, in the
//! order prepare → activate → taint → revoke: [`Journal::prepare`] and [`Journal::activate`]
//! move the slots at once; [`Journal::taint`] marks an *old* authority so that everything it
//! signed is replaced now rather than at half-life; [`Journal::revoke`] removes a *tainted* old
//! authority from the bundle, after which nothing it signed verifies. Each refuses a step out of
//! order with an error that says which step comes first.
//!
//! A pure state machine: the caller passes `now`, persists [`Journal::to_bytes`] after every step
//! that returned events, and republishes the bundle when [`Journal::generation`] changes.

use std::borrow::Cow;
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use tessera_spiffe::{Bundle, TrustDomain};
use zeroize::Zeroizing;

use crate::{JwtAuthority, PkiError, X509Authority};

/// Version of the [`Journal::to_bytes`] format; version 1 (one entry per X.509 + JWT pair) is
/// still read.
const FORMAT_VERSION: u32 = 2;

/// Upper bound for the stored counters (2^53, exact in every JSON implementation): far beyond
/// any real journal, and it keeps `+= 1` from ever overflowing on a restored one.
const MAX_COUNTER: u64 = 1 << 53;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Published in the bundle; signs nothing yet.
    Prepared,
    /// Signs every new SVID.
    Active,
    /// Replaced; published until it expires (or is revoked) so the SVIDs it signed still verify.
    Old,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Prepared => "prepared",
            Self::Active => "active",
            Self::Old => "old",
        })
    }
}

/// Which of the two kinds of authority a step is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    X509,
    Jwt,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::X509 => "X.509",
            Self::Jwt => "JWT",
        })
    }
}

/// What the journal needs to know of a signing key.
pub trait Authority: fmt::Debug {
    /// How operators and agents name it: the X.509 CA's subject key identifier (which every SVID
    /// it signed carries as authority key identifier), or the JWT key's `kid`.
    fn authority_id(&self) -> &str;
    /// Unix seconds; nothing it signed is valid after this.
    fn not_after(&self) -> u64;
}

impl Authority for X509Authority {
    fn authority_id(&self) -> &str {
        self.subject_key_id()
    }
    fn not_after(&self) -> u64 {
        X509Authority::not_after(self)
    }
}

impl Authority for JwtAuthority {
    fn authority_id(&self) -> &str {
        self.kid()
    }
    fn not_after(&self) -> u64 {
        JwtAuthority::not_after(self)
    }
}

/// One authority of a rotation.
#[derive(Debug)]
pub struct Slot<A> {
    /// Increases with every authority created (X.509 and JWT share the counter); never reused.
    pub id: u64,
    pub authority: A,
    pub status: Status,
    /// Unix seconds; the start of its life for the rotation schedule.
    pub created_at: u64,
    /// Set by an operator on an old authority: every SVID it signed must be replaced now.
    pub tainted: bool,
}

impl<A: Authority> Slot<A> {
    fn life(&self) -> (u64, u64) {
        let na = self.authority.not_after();
        (self.created_at.min(na), na)
    }

    /// True once half of its life has passed: time to prepare the successor.
    fn past_half_life(&self, now: u64) -> bool {
        let (nb, na) = self.life();
        now >= nb + (na - nb) / 2
    }

    /// True once at most 1/6 of its life is left: time to hand over to the successor.
    fn in_last_sixth(&self, now: u64) -> bool {
        let (nb, na) = self.life();
        now >= na - (na - nb) / 6
    }

    /// The next time (Unix seconds) the automatic schedule has something to do for it.
    fn next_step_after(&self, now: u64, has_prepared: bool) -> Option<u64> {
        let (nb, na) = self.life();
        let at = if has_prepared {
            na - (na - nb) / 6
        } else {
            nb + (na - nb) / 2
        };
        [at, na].into_iter().filter(|t| *t > now).min()
    }
}

/// The authorities of one kind: one active, at most one prepared, and the old ones still
/// published. The slots make the invariant structural.
#[derive(Debug)]
pub struct Rotation<A> {
    /// Replaced authorities, oldest first, kept until they expire or are revoked.
    old: Vec<Slot<A>>,
    active: Slot<A>,
    prepared: Option<Slot<A>>,
}

impl<A: Authority> Rotation<A> {
    /// The authority that signs.
    pub fn active(&self) -> &Slot<A> {
        &self.active
    }

    /// The successor, published but not signing yet.
    pub fn prepared(&self) -> Option<&Slot<A>> {
        self.prepared.as_ref()
    }

    /// Every published authority, oldest first: old ones, the active one, the prepared one.
    pub fn entries(&self) -> impl Iterator<Item = &Slot<A>> {
        self.old
            .iter()
            .chain(std::iter::once(&self.active))
            .chain(self.prepared.as_ref())
    }

    /// The authority with this ID, if it is still in the journal.
    pub fn find(&self, authority_id: &str) -> Option<&Slot<A>> {
        self.entries()
            .find(|s| s.authority.authority_id() == authority_id)
    }

    /// IDs of the tainted authorities (all old, all still published).
    pub fn tainted_ids(&self) -> Vec<String> {
        self.old
            .iter()
            .filter(|s| s.tainted)
            .map(|s| s.authority.authority_id().to_owned())
            .collect()
    }

    /// Moves the prepared authority (if any) to active and the active one to old.
    fn promote(&mut self) -> Option<u64> {
        let mut next = self.prepared.take()?;
        next.status = Status::Active;
        let mut previous = std::mem::replace(&mut self.active, next);
        previous.status = Status::Old;
        self.old.push(previous);
        Some(self.active.id)
    }

    fn next_step_after(&self, now: u64) -> Option<u64> {
        let own = self.active.next_step_after(now, self.prepared.is_some());
        let drops = self
            .old
            .iter()
            .map(|s| s.authority.not_after())
            .filter(|t| *t > now);
        own.into_iter().chain(drops).min()
    }
}

/// What a step of the journal did, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JournalEvent {
    /// A new authority was created and published; it does not sign yet.
    Prepared { kind: Kind, id: u64 },
    /// This authority now signs; the previous active one is old.
    Activated { kind: Kind, id: u64 },
    /// This authority expired and left the bundle.
    Dropped { kind: Kind, id: u64 },
    /// An operator tainted this (old) authority: what it signed must be replaced now.
    Tainted { kind: Kind, id: u64 },
    /// An operator revoked this (tainted) authority: it left the bundle before it expired.
    Revoked { kind: Kind, id: u64 },
}

/// Makes a new X.509 CA valid from `now` for `ttl` seconds (self-signed, or signed by an upstream
/// authority).
pub type MintX509<'a> = dyn FnMut(u64, u64) -> Result<X509Authority, PkiError> + 'a;

/// The authorities of one trust domain over time.
#[derive(Debug)]
pub struct Journal {
    trust_domain: TrustDomain,
    x509: Rotation<X509Authority>,
    jwt: Rotation<JwtAuthority>,
    /// Roots of the upstream authority, published in the bundle instead of the CAs they signed.
    upstream_roots: Vec<Vec<u8>>,
    next_id: u64,
    generation: u64,
    /// The last automatic X.509 step that could not make a CA: why, when it is tried again, and
    /// how many times in a row it failed. Kept in memory only (a restart tries at once).
    x509_stalled: Option<Stalled>,
}

/// An automatic X.509 rotation step that failed (see [`Journal::x509_problem`]).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stalled {
    why: String,
    retry_at: u64,
    failures: u32,
}

/// First wait after an automatic X.509 step failed; it doubles up to [`STALLED_MAX_WAIT`].
const STALLED_FIRST_WAIT: u64 = 30;
const STALLED_MAX_WAIT: u64 = 600;

impl Journal {
    /// A journal with self-signed X.509 CAs whose first authorities are active at once (there is
    /// no one yet to pre-publish to).
    pub fn new(td: &TrustDomain, now: u64, ca_ttl_secs: u64) -> Result<Self, PkiError> {
        let td2 = td.clone();
        Self::new_with(td, now, ca_ttl_secs, &mut |now, ttl| {
            X509Authority::self_signed(&td2, now, ttl)
        })
    }

    /// A journal whose X.509 CAs come from `mint` (an upstream authority).
    pub fn new_with(
        td: &TrustDomain,
        now: u64,
        ca_ttl_secs: u64,
        mint: &mut MintX509<'_>,
    ) -> Result<Self, PkiError> {
        if ca_ttl_secs == 0 {
            return Err(PkiError::ZeroTtl { what: "CA" });
        }
        let x509 = mint(now, ca_ttl_secs)?;
        check_td(td, &x509)?;
        let jwt = JwtAuthority::generate(now, ca_ttl_secs)?;
        Ok(Self {
            trust_domain: td.clone(),
            x509: Rotation {
                old: Vec::new(),
                active: Slot {
                    id: 1,
                    authority: x509,
                    status: Status::Active,
                    created_at: now,
                    tainted: false,
                },
                prepared: None,
            },
            jwt: Rotation {
                old: Vec::new(),
                active: Slot {
                    id: 2,
                    authority: jwt,
                    status: Status::Active,
                    created_at: now,
                    tainted: false,
                },
                prepared: None,
            },
            upstream_roots: Vec::new(),
            next_id: 3,
            generation: 1,
            x509_stalled: None,
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn x509(&self) -> &Rotation<X509Authority> {
        &self.x509
    }

    pub fn jwt(&self) -> &Rotation<JwtAuthority> {
        &self.jwt
    }

    /// Publishes `roots` (an upstream authority's) as the bundle's X.509 authorities instead of
    /// the upstream-signed CAs. Self-signed CAs still in the journal stay published beside them
    /// until they expire, so switching to an upstream never strands an SVID.
    pub fn set_upstream_roots(&mut self, roots: Vec<Vec<u8>>) {
        if roots != self.upstream_roots {
            self.upstream_roots = roots;
            self.generation += 1;
        }
    }

    pub fn upstream_roots(&self) -> &[Vec<u8>] {
        &self.upstream_roots
    }

    /// Why the last automatic X.509 step could not make a CA, and how many times in a row it
    /// failed; `None` once a step succeeds. The schedule retries it after 30 s, doubling up to
    /// 10 minutes.
    pub fn x509_problem(&self) -> Option<(&str, u32)> {
        self.x509_stalled
            .as_ref()
            .map(|st| (st.why.as_str(), st.failures))
    }

    /// Changes whenever the set of published keys changes (an authority prepared, dropped or
    /// revoked, or new upstream roots), and only then; it only grows, across [`Self::to_bytes`]
    /// and [`Self::from_bytes`] too.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Seconds from `now` until the automatic schedule has something to do (at least 1).
    pub fn next_step_in(&self, now: u64) -> u64 {
        // A stalled X.509 step waits for its retry (old authorities still drop on time).
        let x509 = match &self.x509_stalled {
            Some(st) if st.retry_at > now => {
                let drops = self.x509.old.iter().map(|s| s.authority.not_after());
                drops.chain([st.retry_at]).filter(|t| *t > now).min()
            }
            _ => self.x509.next_step_after(now),
        };
        let next = [x509, self.jwt.next_step_after(now)]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(now + 3600);
        (next - now).max(1)
    }

    /// Advances both rotations to `now` with self-signed X.509 CAs; authorities created now live
    /// `ca_ttl_secs`. Returns what changed, in order; the caller persists the journal whenever that
    /// is not empty.
    pub fn tick(&mut self, now: u64, ca_ttl_secs: u64) -> Result<Vec<JournalEvent>, PkiError> {
        let td = self.trust_domain.clone();
        self.tick_with(now, ca_ttl_secs, &mut |now, ttl| {
            X509Authority::self_signed(&td, now, ttl)
        })
    }

    /// [`Self::tick`] with X.509 CAs made by `mint`.
    pub fn tick_with(
        &mut self,
        now: u64,
        ca_ttl_secs: u64,
        mint: &mut MintX509<'_>,
    ) -> Result<Vec<JournalEvent>, PkiError> {
        if ca_ttl_secs == 0 {
            return Err(PkiError::ZeroTtl { what: "CA" });
        }
        let mut events = Vec::new();
        // X.509: hand over at 1/6 left. This runs before anything is prepared below, so an
        // authority prepared in this tick never signs in it: it is always in the bundle before
        // its first SVID.
        if self.x509.prepared.is_some() && self.x509.active.in_last_sixth(now) {
            self.activate_kind(Kind::X509, &mut events);
        }
        // A CA that cannot be made (an upstream down or expired) must not hold up the JWT
        // rotation below, nor be retried every second: the failure is kept, reported by
        // `x509_problem`, and retried with a growing wait.
        let retry_due = self
            .x509_stalled
            .as_ref()
            .is_none_or(|st| now >= st.retry_at);
        let active_end = self.x509.active.authority.not_after();
        let made = if !retry_due {
            Ok(())
        } else if now >= active_end {
            // Nothing valid can sign (the server was down through the whole window): make an
            // authority and use it at once. The one case where a key signs before verifiers had
            // time to fetch it; it beats signing nothing.
            self.prepare_x509(now, ca_ttl_secs, mint, &mut events)
                .map(|()| {
                    self.activate_kind(Kind::X509, &mut events);
                })
        } else if self.x509.prepared.is_none() && self.x509.active.past_half_life(now) {
            // A successor that ends no later than the active CA gains nothing (an upstream
            // certificate near its end caps both): preparing it anyway rotated every few
            // seconds as the end came near, each rotation a bundle change for every agent.
            let mut no_gain = |now, ttl| {
                let next = mint(now, ttl)?;
                if next.is_upstream_signed() && next.not_after() <= active_end {
                    return Err(PkiError::Upstream(format!(
                        "a new CA could not outlive the active one (both end at {}, the end of \
                         the upstream chain): replace the upstream certificate before then",
                        next.not_after()
                    )));
                }
                Ok(next)
            };
            self.prepare_x509(now, ca_ttl_secs, &mut no_gain, &mut events)
        } else {
            Ok(())
        };
        match made {
            Ok(()) if retry_due => self.x509_stalled = None,
            Ok(()) => {}
            Err(e) => {
                let failures = self.x509_stalled.as_ref().map_or(0, |st| st.failures) + 1;
                // Nothing signs while the active CA is expired: keep trying at the first wait.
                // Otherwise the wait grows, but never past the active CA's end: a CA must be
                // tried for then, whatever the back-off.
                let retry_at = if now >= active_end {
                    now.saturating_add(STALLED_FIRST_WAIT)
                } else {
                    let wait = STALLED_FIRST_WAIT
                        .saturating_mul(1 << (failures - 1).min(10))
                        .min(STALLED_MAX_WAIT);
                    now.saturating_add(wait).min(active_end)
                };
                self.x509_stalled = Some(Stalled {
                    why: e.to_string(),
                    retry_at,
                    failures,
                });
            }
        }
        // JWT: the same schedule, on its own key.
        if self.jwt.prepared.is_some() && self.jwt.active.in_last_sixth(now) {
            self.activate_kind(Kind::Jwt, &mut events);
        }
        if now >= self.jwt.active.authority.not_after() {
            self.prepare_jwt(now, ca_ttl_secs, &mut events)?;
            self.activate_kind(Kind::Jwt, &mut events);
        } else if self.jwt.prepared.is_none() && self.jwt.active.past_half_life(now) {
            self.prepare_jwt(now, ca_ttl_secs, &mut events)?;
        }
        // Old authorities leave the bundle once expired: no SVID or token they signed is valid
        // any more, since neither outlives its authority.
        let mut dropped = false;
        self.x509.old.retain(|e| {
            let expired = now >= e.authority.not_after();
            if expired {
                events.push(JournalEvent::Dropped {
                    kind: Kind::X509,
                    id: e.id,
                });
                dropped = true;
            }
            !expired
        });
        self.jwt.old.retain(|e| {
            let expired = now >= e.authority.not_after();
            if expired {
                events.push(JournalEvent::Dropped {
                    kind: Kind::Jwt,
                    id: e.id,
                });
                dropped = true;
            }
            !expired
        });
        if dropped {
            self.generation += 1;
        }
        Ok(events)
    }

    fn prepare_x509(
        &mut self,
        now: u64,
        ttl: u64,
        mint: &mut MintX509<'_>,
        events: &mut Vec<JournalEvent>,
    ) -> Result<(), PkiError> {
        let authority = mint(now, ttl)?;
        check_td(&self.trust_domain, &authority)?;
        let id = self.take_id();
        self.x509.prepared = Some(Slot {
            id,
            authority,
            status: Status::Prepared,
            created_at: now,
            tainted: false,
        });
        self.generation += 1;
        events.push(JournalEvent::Prepared {
            kind: Kind::X509,
            id,
        });
        Ok(())
    }

    fn prepare_jwt(
        &mut self,
        now: u64,
        ttl: u64,
        events: &mut Vec<JournalEvent>,
    ) -> Result<(), PkiError> {
        let authority = JwtAuthority::generate(now, ttl)?;
        let id = self.take_id();
        self.jwt.prepared = Some(Slot {
            id,
            authority,
            status: Status::Prepared,
            created_at: now,
            tainted: false,
        });
        self.generation += 1;
        events.push(JournalEvent::Prepared {
            kind: Kind::Jwt,
            id,
        });
        Ok(())
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn activate_kind(&mut self, kind: Kind, events: &mut Vec<JournalEvent>) {
        let id = match kind {
            Kind::X509 => self.x509.promote(),
            Kind::Jwt => self.jwt.promote(),
        };
        if let Some(id) = id {
            events.push(JournalEvent::Activated { kind, id });
        }
    }

    /// Forced step 1: prepares the next authority of `kind` now (published, not signing).
    /// Refused while one is already prepared.
    pub fn prepare(
        &mut self,
        kind: Kind,
        now: u64,
        ttl: u64,
        mint: &mut MintX509<'_>,
    ) -> Result<Vec<JournalEvent>, PkiError> {
        if ttl == 0 {
            return Err(PkiError::ZeroTtl { what: "CA" });
        }
        let prepared = match kind {
            Kind::X509 => self.x509.prepared().map(|s| s.authority.authority_id()),
            Kind::Jwt => self.jwt.prepared().map(|s| s.authority.authority_id()),
        };
        if let Some(id) = prepared {
            return Err(PkiError::Rotation(format!(
                "{kind} authority {id} is already prepared; activate it (or wait for the \
                 schedule to) before preparing another"
            )));
        }
        let mut events = Vec::new();
        match kind {
            Kind::X509 => self.prepare_x509(now, ttl, mint, &mut events)?,
            Kind::Jwt => self.prepare_jwt(now, ttl, &mut events)?,
        }
        Ok(events)
    }

    /// Forced step 2: the prepared authority of `kind` signs from now on; the active one becomes
    /// old (still published). Refused when nothing is prepared.
    pub fn activate(&mut self, kind: Kind) -> Result<Vec<JournalEvent>, PkiError> {
        let has = match kind {
            Kind::X509 => self.x509.prepared.is_some(),
            Kind::Jwt => self.jwt.prepared.is_some(),
        };
        if !has {
            return Err(PkiError::Rotation(format!(
                "no {kind} authority is prepared; prepare one first (prepare → activate)"
            )));
        }
        let mut events = Vec::new();
        self.activate_kind(kind, &mut events);
        Ok(events)
    }

    /// Forced step 3: marks the old authority `authority_id` tainted, so that every SVID it signed
    /// is replaced at once. Only an old authority can be tainted: the active one still signs and
    /// a prepared one has signed nothing.
    pub fn taint(&mut self, kind: Kind, authority_id: &str) -> Result<Vec<JournalEvent>, PkiError> {
        let id = match kind {
            Kind::X509 => old_slot(&mut self.x509, kind, authority_id, ("taint", "tainted"))?,
            Kind::Jwt => old_slot(&mut self.jwt, kind, authority_id, ("taint", "tainted"))?,
        };
        let (slot_id, already) = id;
        if already {
            return Err(PkiError::Rotation(format!(
                "{kind} authority {authority_id} is already tainted; the next step is revoke"
            )));
        }
        match kind {
            Kind::X509 => set_tainted(&mut self.x509, slot_id),
            Kind::Jwt => set_tainted(&mut self.jwt, slot_id),
        }
        Ok(vec![JournalEvent::Tainted { kind, id: slot_id }])
    }

    /// Forced step 4: removes the tainted old authority `authority_id` from the journal and the
    /// bundle, so nothing it signed verifies any more. Refused for an authority that is not
    /// tainted (taint first, so that everything it signed has been replaced), and for an X.509 CA
    /// signed by an upstream authority (it is not in the bundle; its upstream root is).
    pub fn revoke(
        &mut self,
        kind: Kind,
        authority_id: &str,
    ) -> Result<Vec<JournalEvent>, PkiError> {
        let (slot_id, tainted) = match kind {
            Kind::X509 => old_slot(&mut self.x509, kind, authority_id, ("revoke", "revoked"))?,
            Kind::Jwt => old_slot(&mut self.jwt, kind, authority_id, ("revoke", "revoked"))?,
        };
        if !tainted {
            return Err(PkiError::Rotation(format!(
                "{kind} authority {authority_id} is not tainted; taint it first, so that every \
                 SVID it signed is replaced before it leaves the bundle (taint → revoke)"
            )));
        }
        if kind == Kind::X509
            && self
                .x509
                .old
                .iter()
                .any(|s| s.id == slot_id && s.authority.is_upstream_signed())
        {
            return Err(PkiError::Rotation(format!(
                "X.509 authority {authority_id} is signed by the upstream authority: the bundle \
                 holds the upstream root, not this CA, so removing it here would not make \
                 validators reject what it signed; revoke it at the upstream PKI instead"
            )));
        }
        match kind {
            Kind::X509 => self.x509.old.retain(|s| s.id != slot_id),
            Kind::Jwt => self.jwt.old.retain(|s| s.id != slot_id),
        }
        self.generation += 1;
        Ok(vec![JournalEvent::Revoked { kind, id: slot_id }])
    }

    /// The trust bundle: every published JWT key (prepared, active, old) and, for X.509, the
    /// upstream roots plus every self-signed CA (prepared, active, old). `sequence` and
    /// `refresh_hint` are left to the caller.
    pub fn bundle(&self) -> Result<Bundle, PkiError> {
        let mut bundle = Bundle::new(self.trust_domain.clone());
        for root in &self.upstream_roots {
            bundle.add_x509_authority(root.clone())?;
        }
        for e in self.x509.entries() {
            if !e.authority.is_upstream_signed() {
                bundle.add_x509_authority(e.authority.cert_der().to_vec())?;
            }
        }
        for e in self.jwt.entries() {
            bundle.add_jwt_authority(e.authority.kid(), e.authority.public_key())?;
        }
        Ok(bundle)
    }

    /// The whole journal, private keys included (base64 PKCS#8), as versioned JSON. Store it where
    /// only the server can read it (a 0600 file, an encrypted column).
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let x509: Vec<&Slot<X509Authority>> = self.x509.entries().collect();
        let jwt: Vec<&Slot<JwtAuthority>> = self.jwt.entries().collect();
        let x509_keys: Vec<Zeroizing<String>> = x509
            .iter()
            .map(|e| Zeroizing::new(STANDARD.encode(e.authority.key_pkcs8_der().as_slice())))
            .collect();
        let jwt_keys: Vec<Zeroizing<String>> = jwt
            .iter()
            .map(|e| Zeroizing::new(STANDARD.encode(e.authority.key_pkcs8_der().as_slice())))
            .collect();
        let out = Stored {
            version: FORMAT_VERSION,
            trust_domain: self.trust_domain.to_string(),
            next_id: self.next_id,
            generation: self.generation,
            entries: Vec::new(),
            x509: x509
                .iter()
                .zip(&x509_keys)
                .map(|(e, key)| StoredX509 {
                    id: e.id,
                    status: e.status,
                    created_at: e.created_at,
                    tainted: e.tainted,
                    cert: STANDARD.encode(e.authority.cert_der()),
                    key: Cow::Borrowed(key.as_str()),
                    upstream_chain: e
                        .authority
                        .upstream_chain()
                        .iter()
                        .map(|c| STANDARD.encode(c))
                        .collect(),
                })
                .collect(),
            jwt: jwt
                .iter()
                .zip(&jwt_keys)
                .map(|(e, key)| StoredJwt {
                    id: e.id,
                    status: e.status,
                    created_at: e.created_at,
                    tainted: e.tainted,
                    kid: e.authority.kid().to_owned(),
                    key: Cow::Borrowed(key.as_str()),
                    not_after: e.authority.not_after(),
                })
                .collect(),
        };
        // Sized up front so the buffer holding keys is never reallocated (and left unwiped).
        let mut bytes = Zeroizing::new(Vec::with_capacity(2048 + 8192 * (x509.len() + jwt.len())));
        // Writing strings and numbers into a Vec cannot fail.
        let _ = serde_json::to_writer_pretty(&mut *bytes, &out);
        bytes
    }

    /// Restores a journal written by [`Self::to_bytes`] (format 2, or format 1 of earlier
    /// versions), checking every key, certificate and invariant; anything wrong is an error
    /// naming the entry.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, PkiError> {
        let mut stored: Stored<'_> = serde_json::from_slice(bytes)
            .map_err(|e| PkiError::Journal(format!("not a journal: {e}")))?;
        let result = Self::from_stored(&stored);
        stored.wipe();
        result
    }

    fn from_stored(stored: &Stored<'_>) -> Result<Self, PkiError> {
        let bad = PkiError::Journal;
        if stored.version != FORMAT_VERSION && stored.version != 1 {
            return Err(bad(format!(
                "format version {} is not supported (expected 1 or {FORMAT_VERSION})",
                stored.version
            )));
        }
        if stored.next_id > MAX_COUNTER || stored.generation > MAX_COUNTER {
            return Err(bad(format!(
                "next_id {} or generation {} is above {MAX_COUNTER}",
                stored.next_id, stored.generation
            )));
        }
        let td = TrustDomain::new(&stored.trust_domain)
            .map_err(|e| bad(format!("trust domain {:?}: {e}", stored.trust_domain)))?;
        // Format 1 kept an X.509 CA and a JWT key per entry; they become one slot each.
        let (x509_in, jwt_in): (Vec<StoredX509<'_>>, Vec<StoredJwt<'_>>) = if stored.version == 1 {
            if !stored.x509.is_empty() || !stored.jwt.is_empty() {
                return Err(bad("format 1 has `entries`, not `x509`/`jwt`".into()));
            }
            stored
                .entries
                .iter()
                .map(|e| {
                    (
                        StoredX509 {
                            id: e.id,
                            status: e.status,
                            created_at: e.created_at,
                            tainted: e.tainted,
                            cert: e.x509_cert.clone(),
                            key: Cow::Borrowed(&e.x509_key),
                            upstream_chain: Vec::new(),
                        },
                        StoredJwt {
                            id: e.id,
                            status: e.status,
                            created_at: e.created_at,
                            tainted: e.tainted,
                            kid: e.jwt_kid.clone(),
                            key: Cow::Borrowed(&e.jwt_key),
                            not_after: e.jwt_not_after,
                        },
                    )
                })
                .unzip()
        } else {
            if !stored.entries.is_empty() {
                return Err(bad("format 2 has `x509` and `jwt`, not `entries`".into()));
            }
            (
                stored.x509.iter().map(StoredX509::borrowed).collect(),
                stored.jwt.iter().map(StoredJwt::borrowed).collect(),
            )
        };
        let b64 = |at: &dyn Fn(String) -> PkiError, field: &str, v: &str| {
            STANDARD
                .decode(v)
                .map(Zeroizing::new)
                .map_err(|e| at(format!("`{field}` is not base64: {e}")))
        };
        let x509 = restore(&x509_in, stored.next_id, "X.509", |s, at| {
            let chain = s
                .upstream_chain
                .iter()
                .map(|c| b64(at, "upstream_chain", c).map(|z| z.to_vec()))
                .collect::<Result<Vec<_>, _>>()?;
            let a = X509Authority::from_parts_with_chain(
                &b64(at, "cert", &s.cert)?,
                &b64(at, "key", &s.key)?,
                chain,
            )
            .map_err(|e| at(e.to_string()))?;
            if *a.trust_domain() != td {
                return Err(at(format!(
                    "its CA is for trust domain {}, not {td}",
                    a.trust_domain()
                )));
            }
            Ok((s.id, s.status, s.created_at, s.tainted, a))
        })?;
        let jwt = restore(&jwt_in, stored.next_id, "JWT", |s, at| {
            let a = JwtAuthority::from_parts(&s.kid, &b64(at, "key", &s.key)?, s.not_after)
                .map_err(|e| at(e.to_string()))?;
            Ok((s.id, s.status, s.created_at, s.tainted, a))
        })?;
        let mut kids: Vec<&str> = jwt.entries().map(|s| s.authority.kid()).collect();
        kids.sort_unstable();
        if let Some(w) = kids.windows(2).find(|w| w[0] == w[1]) {
            return Err(bad(format!("JWT kid {:?} is used twice", w[0])));
        }
        Ok(Self {
            trust_domain: td,
            x509,
            jwt,
            upstream_roots: Vec::new(),
            next_id: stored.next_id,
            generation: stored.generation,
            x509_stalled: None,
        })
    }
}

fn check_td(td: &TrustDomain, a: &X509Authority) -> Result<(), PkiError> {
    if a.trust_domain() != td {
        return Err(PkiError::CaCertificate(format!(
            "it is for trust domain {}, not {td}",
            a.trust_domain()
        )));
    }
    Ok(())
}

/// The slot id of the old authority `authority_id` and whether it is tainted; an error that names
/// the right next step when it is not old.
fn old_slot<A: Authority>(
    r: &mut Rotation<A>,
    kind: Kind,
    authority_id: &str,
    (step, done): (&str, &str),
) -> Result<(u64, bool), PkiError> {
    match r.find(authority_id) {
        None => Err(PkiError::Rotation(format!(
            "no {kind} authority {authority_id:?} in the journal (it may have expired or been \
             revoked); `tessera authority {} show` lists them",
            if kind == Kind::X509 { "x509" } else { "jwt" }
        ))),
        Some(s) if s.status == Status::Active => Err(PkiError::Rotation(format!(
            "{kind} authority {authority_id} is active: it still signs, so it cannot be \
             {done}; prepare and activate a successor first (prepare → activate → taint → revoke)"
        ))),
        Some(s) if s.status == Status::Prepared => Err(PkiError::Rotation(format!(
            "{kind} authority {authority_id} is only prepared and has signed nothing; there is \
             nothing to {step} (only an old authority can be)"
        ))),
        Some(s) => Ok((s.id, s.tainted)),
    }
}

fn set_tainted<A>(r: &mut Rotation<A>, id: u64) {
    for s in &mut r.old {
        if s.id == id {
            s.tainted = true;
        }
    }
}

/// Rebuilds one rotation from stored slots (old..., active, prepared), checking the order.
fn restore<S: StoredSlot, A: Authority>(
    stored: &[S],
    next_id: u64,
    kind: &str,
    mut make: impl FnMut(
        &S,
        &dyn Fn(String) -> PkiError,
    ) -> Result<(u64, Status, u64, bool, A), PkiError>,
) -> Result<Rotation<A>, PkiError> {
    let mut old = Vec::new();
    let mut active = None;
    let mut prepared = None;
    let mut last_id = 0;
    for s in stored {
        let sid = s.id();
        let at = move |what: String| PkiError::Journal(format!("{kind} entry {sid}: {what}"));
        // Ids increase with creation; entries are stored oldest first.
        if sid <= last_id || sid >= next_id {
            return Err(at(format!(
                "ids must increase from entry to entry and stay below next_id {next_id}"
            )));
        }
        last_id = sid;
        let (id, status, created_at, tainted, authority) = make(s, &at)?;
        if tainted && status != Status::Old {
            return Err(at("only an old authority can be tainted".into()));
        }
        let slot = Slot {
            id,
            authority,
            status,
            created_at,
            tainted,
        };
        // Stored order is old..., active, prepared: anything else is not a state the journal can
        // produce.
        match (status, &active, &prepared) {
            (Status::Old, None, None) => old.push(slot),
            (Status::Active, None, None) => active = Some(slot),
            (Status::Prepared, Some(_), None) => prepared = Some(slot),
            _ => {
                return Err(at(
                    "entries must be the old ones, then exactly one active, then at most one \
                     prepared"
                        .into(),
                ));
            }
        }
    }
    let active = active.ok_or_else(|| PkiError::Journal(format!("no active {kind} entry")))?;
    Ok(Rotation {
        old,
        active,
        prepared,
    })
}

trait StoredSlot {
    fn id(&self) -> u64;
}

/// The serialized journal. Key fields are wiped after use ([`Stored::wipe`]).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored<'a> {
    version: u32,
    trust_domain: String,
    next_id: u64,
    generation: u64,
    /// Format 1 only.
    #[serde(borrow, default, skip_serializing_if = "Vec::is_empty")]
    entries: Vec<StoredEntryV1<'a>>,
    #[serde(borrow, default)]
    x509: Vec<StoredX509<'a>>,
    #[serde(borrow, default)]
    jwt: Vec<StoredJwt<'a>>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredEntryV1<'a> {
    id: u64,
    status: Status,
    created_at: u64,
    tainted: bool,
    x509_cert: String,
    #[serde(borrow)]
    x509_key: Cow<'a, str>,
    jwt_kid: String,
    #[serde(borrow)]
    jwt_key: Cow<'a, str>,
    jwt_not_after: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredX509<'a> {
    id: u64,
    status: Status,
    created_at: u64,
    tainted: bool,
    cert: String,
    #[serde(borrow)]
    key: Cow<'a, str>,
    /// Upstream-signed CAs: the certificates between this CA and the upstream root.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    upstream_chain: Vec<String>,
}

impl StoredX509<'_> {
    fn borrowed(&self) -> StoredX509<'_> {
        StoredX509 {
            id: self.id,
            status: self.status,
            created_at: self.created_at,
            tainted: self.tainted,
            cert: self.cert.clone(),
            key: Cow::Borrowed(&self.key),
            upstream_chain: self.upstream_chain.clone(),
        }
    }
}

impl StoredSlot for StoredX509<'_> {
    fn id(&self) -> u64 {
        self.id
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredJwt<'a> {
    id: u64,
    status: Status,
    created_at: u64,
    tainted: bool,
    kid: String,
    #[serde(borrow)]
    key: Cow<'a, str>,
    not_after: u64,
}

impl StoredJwt<'_> {
    fn borrowed(&self) -> StoredJwt<'_> {
        StoredJwt {
            id: self.id,
            status: self.status,
            created_at: self.created_at,
            tainted: self.tainted,
            kid: self.kid.clone(),
            key: Cow::Borrowed(&self.key),
            not_after: self.not_after,
        }
    }
}

impl StoredSlot for StoredJwt<'_> {
    fn id(&self) -> u64 {
        self.id
    }
}

impl Stored<'_> {
    fn wipe(&mut self) {
        use zeroize::Zeroize as _;
        let keys = self
            .entries
            .iter_mut()
            .flat_map(|e| [&mut e.x509_key, &mut e.jwt_key])
            .chain(self.x509.iter_mut().map(|e| &mut e.key))
            .chain(self.jwt.iter_mut().map(|e| &mut e.key));
        for key in keys {
            if let Cow::Owned(s) = key {
                s.zeroize();
            }
        }
    }
}
