//! The CA rotation journal: which authorities (an X.509 CA and a JWT key, created together) exist,
//! which one signs, and which are only published.
//!
//! Two slots, as in SPIRE: at half of the active authority's life the next one is *prepared* (it
//! enters the bundle but signs nothing); when 1/6 of the active one's life is left the prepared one
//! is *activated* and the previous one becomes *old*; an old one leaves the bundle once it has
//! expired. Every verifier therefore holds a key in its bundle before the first SVID signed with it
//! arrives, and keeps it until the last such SVID has expired (SVIDs never outlive their CA).
//!
//! A pure state machine: the caller passes `now`, persists [`Journal::to_bytes`] after every tick
//! that returned events, and republishes the bundle when [`Journal::generation`] changes.

use std::borrow::Cow;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use tessera_spiffe::{Bundle, TrustDomain};
use zeroize::Zeroizing;

use crate::{JwtAuthority, PkiError, X509Authority};

/// Version of the [`Journal::to_bytes`] format.
const FORMAT_VERSION: u32 = 1;

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
    /// Replaced; published until it expires so the SVIDs it signed still verify.
    Old,
}

/// One authority of the journal: an X.509 CA and a JWT key with the same lifetime.
#[derive(Debug)]
pub struct JournalEntry {
    /// Increases with every authority created; never reused.
    pub id: u64,
    pub x509: X509Authority,
    pub jwt: JwtAuthority,
    pub status: Status,
    /// Unix seconds.
    pub created_at: u64,
    /// Reserved for tainting (every SVID it signed must be replaced now); always false for now.
    pub tainted: bool,
}

impl JournalEntry {
    fn new(
        id: u64,
        td: &TrustDomain,
        now: u64,
        ttl: u64,
        status: Status,
    ) -> Result<Self, PkiError> {
        let x509 = X509Authority::self_signed(td, now, ttl)?;
        // Both keys end together, so one entry is dropped from the bundle as a whole.
        let jwt = JwtAuthority::generate(now, x509.not_after().saturating_sub(now))?;
        Ok(Self {
            id,
            x509,
            jwt,
            status,
            created_at: now,
            tainted: false,
        })
    }

    /// When both of its keys have expired: nothing it signed can still be valid.
    fn expiry(&self) -> u64 {
        self.x509.not_after().max(self.jwt.not_after())
    }

    /// True once half of the X.509 CA's life has passed: time to prepare the successor.
    fn past_half_life(&self, now: u64) -> bool {
        let (nb, na) = (self.x509.not_before(), self.x509.not_after());
        now >= nb + (na - nb) / 2
    }

    /// True once at most 1/6 of the X.509 CA's life is left: time to hand over to the successor.
    fn in_last_sixth(&self, now: u64) -> bool {
        let (nb, na) = (self.x509.not_before(), self.x509.not_after());
        now >= na - (na - nb) / 6
    }
}

/// What a [`Journal::tick`] did, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JournalEvent {
    /// A new authority was created and published; it does not sign yet.
    Prepared { id: u64 },
    /// This authority now signs; the previous active one is old.
    Activated { id: u64 },
    /// This authority expired and left the bundle.
    Dropped { id: u64 },
}

/// The authorities of one trust domain over time: one active, at most one prepared, and the old
/// ones still published. The slots make the invariant structural.
#[derive(Debug)]
pub struct Journal {
    trust_domain: TrustDomain,
    /// Replaced authorities, oldest first, kept until they expire.
    old: Vec<JournalEntry>,
    active: JournalEntry,
    prepared: Option<JournalEntry>,
    next_id: u64,
    generation: u64,
}

impl Journal {
    /// A journal whose first authority is active at once (there is no one yet to pre-publish to).
    pub fn new(td: &TrustDomain, now: u64, ca_ttl_secs: u64) -> Result<Self, PkiError> {
        Ok(Self {
            trust_domain: td.clone(),
            old: Vec::new(),
            active: JournalEntry::new(1, td, now, ca_ttl_secs, Status::Active)?,
            prepared: None,
            next_id: 2,
            generation: 1,
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The authority that signs.
    pub fn active(&self) -> &JournalEntry {
        &self.active
    }

    /// The successor, published but not signing yet.
    pub fn prepared(&self) -> Option<&JournalEntry> {
        self.prepared.as_ref()
    }

    /// Every published authority, oldest first: old ones, the active one, the prepared one.
    pub fn entries(&self) -> impl Iterator<Item = &JournalEntry> {
        self.old
            .iter()
            .chain(std::iter::once(&self.active))
            .chain(self.prepared.as_ref())
    }

    /// Changes whenever the set of published keys changes (an authority prepared or dropped), and
    /// only then; it only grows, across [`Self::to_bytes`] and [`Self::from_bytes`] too.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Advances the rotation to `now`; authorities created now live `ca_ttl_secs`. Returns what
    /// changed, in order; the caller persists the journal whenever that is not empty.
    pub fn tick(&mut self, now: u64, ca_ttl_secs: u64) -> Result<Vec<JournalEvent>, PkiError> {
        if ca_ttl_secs == 0 {
            return Err(PkiError::ZeroTtl { what: "CA" });
        }
        let mut events = Vec::new();
        // Hand over at 1/6 of the active authority's life left. This runs before anything is
        // prepared below, so an authority prepared in this tick never signs in it: it is
        // always in the bundle before its first SVID.
        if self.prepared.is_some() && self.active.in_last_sixth(now) {
            events.push(JournalEvent::Activated {
                id: self.activate(),
            });
        }
        if now >= self.active.x509.not_after() {
            // Nothing valid can sign (the server was down through the whole window): make an
            // authority and use it at once. The one case where a key signs before verifiers had
            // time to fetch it; it beats signing nothing.
            let id = self.prepare(now, ca_ttl_secs)?;
            events.push(JournalEvent::Prepared { id });
            events.push(JournalEvent::Activated {
                id: self.activate(),
            });
        } else if self.prepared.is_none() && self.active.past_half_life(now) {
            let id = self.prepare(now, ca_ttl_secs)?;
            events.push(JournalEvent::Prepared { id });
        }
        // Old authorities leave the bundle once expired: no SVID or token they signed is valid
        // any more, since neither outlives its authority.
        let before = self.old.len();
        self.old.retain(|e| {
            let expired = now >= e.expiry();
            if expired {
                events.push(JournalEvent::Dropped { id: e.id });
            }
            !expired
        });
        if self.old.len() != before {
            self.generation += 1;
        }
        Ok(events)
    }

    fn prepare(&mut self, now: u64, ttl: u64) -> Result<u64, PkiError> {
        let id = self.next_id;
        let entry = JournalEntry::new(id, &self.trust_domain, now, ttl, Status::Prepared)?;
        self.next_id += 1;
        self.prepared = Some(entry);
        self.generation += 1;
        Ok(id)
    }

    /// Moves the prepared authority (there must be one) to active, the active one to old.
    fn activate(&mut self) -> u64 {
        if let Some(mut next) = self.prepared.take() {
            next.status = Status::Active;
            let mut previous = std::mem::replace(&mut self.active, next);
            previous.status = Status::Old;
            self.old.push(previous);
        }
        self.active.id
    }

    /// The trust bundle: every published authority's CA certificate and JWT key (prepared, active
    /// and old). `sequence` and `refresh_hint` are left to the caller.
    pub fn bundle(&self) -> Result<Bundle, PkiError> {
        let mut bundle = Bundle::new(self.trust_domain.clone());
        for e in self.entries() {
            bundle.add_x509_authority(e.x509.cert_der().to_vec())?;
            bundle.add_jwt_authority(e.jwt.kid(), e.jwt.public_key())?;
        }
        Ok(bundle)
    }

    /// The whole journal, private keys included (base64 PKCS#8), as versioned JSON. Store it where
    /// only the server can read it (a 0600 file, an encrypted column).
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let entries: Vec<&JournalEntry> = self.entries().collect();
        let keys: Vec<_> = entries
            .iter()
            .map(|e| {
                (
                    Zeroizing::new(STANDARD.encode(e.x509.key_pkcs8_der().as_slice())),
                    Zeroizing::new(STANDARD.encode(e.jwt.key_pkcs8_der().as_slice())),
                )
            })
            .collect();
        let out = Stored {
            version: FORMAT_VERSION,
            trust_domain: self.trust_domain.to_string(),
            next_id: self.next_id,
            generation: self.generation,
            entries: entries
                .iter()
                .zip(&keys)
                .map(|(e, (x509_key, jwt_key))| StoredEntry {
                    id: e.id,
                    status: e.status,
                    created_at: e.created_at,
                    tainted: e.tainted,
                    x509_cert: STANDARD.encode(e.x509.cert_der()),
                    x509_key: Cow::Borrowed(x509_key.as_str()),
                    jwt_kid: e.jwt.kid().to_owned(),
                    jwt_key: Cow::Borrowed(jwt_key.as_str()),
                    jwt_not_after: e.jwt.not_after(),
                })
                .collect(),
        };
        // Sized up front so the buffer holding keys is never reallocated (and left unwiped).
        let mut bytes = Zeroizing::new(Vec::with_capacity(1024 + 4096 * entries.len()));
        // Writing strings and numbers into a Vec cannot fail.
        let _ = serde_json::to_writer_pretty(&mut *bytes, &out);
        bytes
    }

    /// Restores a journal written by [`Self::to_bytes`], checking every key, certificate and
    /// invariant; anything wrong is an error naming the entry.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, PkiError> {
        let mut stored: Stored<'_> = serde_json::from_slice(bytes)
            .map_err(|e| PkiError::Journal(format!("not a journal: {e}")))?;
        let result = Self::from_stored(&stored);
        stored.wipe();
        result
    }

    fn from_stored(stored: &Stored<'_>) -> Result<Self, PkiError> {
        let bad = PkiError::Journal;
        if stored.version != FORMAT_VERSION {
            return Err(bad(format!(
                "format version {} is not supported (expected {FORMAT_VERSION})",
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
        let mut old = Vec::new();
        let mut active = None;
        let mut prepared = None;
        let mut last_id = 0;
        let mut kids = Vec::new();
        for s in &stored.entries {
            let at = |what: String| bad(format!("entry {}: {what}", s.id));
            // Ids increase with creation; entries are stored oldest first.
            if s.id <= last_id || s.id >= stored.next_id {
                return Err(at(format!(
                    "ids must increase from entry to entry and stay below next_id {}",
                    stored.next_id
                )));
            }
            last_id = s.id;
            let b64 = |field: &str, v: &str| {
                STANDARD
                    .decode(v)
                    .map(Zeroizing::new)
                    .map_err(|e| at(format!("`{field}` is not base64: {e}")))
            };
            let x509 = X509Authority::from_parts(
                &b64("x509_cert", &s.x509_cert)?,
                &b64("x509_key", &s.x509_key)?,
            )
            .map_err(|e| at(e.to_string()))?;
            if *x509.trust_domain() != td {
                return Err(at(format!(
                    "its CA is for trust domain {}, not {td}",
                    x509.trust_domain()
                )));
            }
            let jwt_key = b64("jwt_key", &s.jwt_key)?;
            let jwt = JwtAuthority::from_parts(&s.jwt_kid, &jwt_key, s.jwt_not_after)
                .map_err(|e| at(e.to_string()))?;
            if kids.contains(&s.jwt_kid) {
                return Err(at(format!("JWT kid {:?} is used twice", s.jwt_kid)));
            }
            kids.push(s.jwt_kid.clone());
            let entry = JournalEntry {
                id: s.id,
                x509,
                jwt,
                status: s.status,
                created_at: s.created_at,
                tainted: s.tainted,
            };
            // Stored order is old..., active, prepared: anything else is not a state `tick`
            // can produce.
            match (s.status, &active, &prepared) {
                (Status::Old, None, None) => old.push(entry),
                (Status::Active, None, None) => active = Some(entry),
                (Status::Prepared, Some(_), None) => prepared = Some(entry),
                _ => {
                    return Err(at(
                        "entries must be the old ones, then exactly one active, then at most \
                         one prepared"
                            .into(),
                    ));
                }
            }
        }
        let active = active.ok_or_else(|| bad("no active entry".into()))?;
        Ok(Self {
            trust_domain: td,
            old,
            active,
            prepared,
            next_id: stored.next_id,
            generation: stored.generation,
        })
    }
}

/// The serialized journal. Key fields are wiped after use ([`Stored::wipe`]).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored<'a> {
    version: u32,
    trust_domain: String,
    next_id: u64,
    generation: u64,
    #[serde(borrow)]
    entries: Vec<StoredEntry<'a>>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredEntry<'a> {
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

impl Stored<'_> {
    fn wipe(&mut self) {
        use zeroize::Zeroize as _;
        for e in &mut self.entries {
            for key in [&mut e.x509_key, &mut e.jwt_key] {
                if let Cow::Owned(s) = key {
                    s.zeroize();
                }
            }
        }
    }
}
