//! The server's certificate authority: the rotation journal of `tessera-pki`, persisted in the
//! data dir (mode 0600) so a restart keeps the trust domain, and published as the trust domain's
//! bundle in the datastore whenever the set of keys changes. Under an upstream authority the X.509
//! CAs are signed by it and the bundle holds its roots.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tessera_pki::{
    Journal, JournalEvent, Kind, PkiError, SignedSvid, SvidTemplate, UpstreamAuthority,
    X509Authority,
};
use tessera_spiffe::{Bundle, SpiffeId, TrustDomain};
use tessera_store::Datastore;
use tokio::sync::watch;

use crate::ServerError;

pub(crate) const JOURNAL_FILE: &str = "ca_journal.json";

/// The tainted authorities, as pushed to agents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Tainted {
    pub(crate) x509: Vec<String>,
    pub(crate) jwt: Vec<String>,
}

impl Tainted {
    pub(crate) fn is_empty(&self) -> bool {
        self.x509.is_empty() && self.jwt.is_empty()
    }
}

/// The CA of one trust domain. Signing takes a short lock; nothing here does I/O but the steps
/// that change the journal (which write it to disk).
#[derive(Debug)]
pub(crate) struct CaManager {
    td: TrustDomain,
    journal: Mutex<Journal>,
    path: PathBuf,
    ca_ttl: u64,
    upstream: Option<Arc<dyn UpstreamAuthority>>,
    tainted: watch::Sender<Tainted>,
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn mint_with(
    td: &TrustDomain,
    upstream: Option<&dyn UpstreamAuthority>,
) -> impl FnMut(u64, u64) -> Result<X509Authority, PkiError> {
    move |now, ttl| match upstream {
        Some(up) => X509Authority::from_upstream(td, now, ttl, up),
        None => X509Authority::self_signed(td, now, ttl),
    }
}

impl CaManager {
    /// Loads the journal from `data_dir`, or creates a new CA (a new trust domain) if none exists.
    pub(crate) fn open(
        td: &TrustDomain,
        data_dir: &Path,
        ca_ttl: u64,
        now: u64,
        upstream: Option<Arc<dyn UpstreamAuthority>>,
    ) -> Result<Self, ServerError> {
        let path = data_dir.join(JOURNAL_FILE);
        let ca_err = |e: PkiError| ServerError::Ca(e.to_string());
        let mut journal = match std::fs::read(&path) {
            Ok(bytes) => {
                let j = Journal::from_bytes(&bytes)
                    .map_err(|e| ServerError::Ca(format!("{}: {e}", path.display())))?;
                if j.trust_domain() != td {
                    return Err(ServerError::Ca(format!(
                        "{} belongs to trust domain {}, but this server is configured for {td}; \
                         use another data_dir or fix trust_domain",
                        path.display(),
                        j.trust_domain()
                    )));
                }
                j
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let j = Journal::new_with(td, now, ca_ttl, &mut mint_with(td, upstream.as_deref()))
                    .map_err(ca_err)?;
                write_private(&path, &j.to_bytes())?;
                tracing::info!(trust_domain = %td, upstream = upstream.as_ref().map(|u| u.name().to_owned()), "created a new CA");
                j
            }
            Err(e) => {
                return Err(ServerError::Ca(format!(
                    "cannot read {}: {e}",
                    path.display()
                )));
            }
        };
        if let Some(up) = &upstream {
            journal.set_upstream_roots(up.x509_roots());
            if !journal.x509().active().authority.is_upstream_signed() {
                tracing::warn!(
                    "an upstream authority is configured but the active CA is self-signed; it \
                     takes over at the next rotation, or now with `tessera authority x509 \
                     prepare` and `activate`"
                );
            }
        }
        let tainted = Tainted {
            x509: journal.x509().tainted_ids(),
            jwt: journal.jwt().tainted_ids(),
        };
        let ca = Self {
            td: td.clone(),
            journal: Mutex::new(journal),
            path,
            ca_ttl,
            upstream,
            tainted: watch::Sender::new(tainted),
        };
        ca.self_check()?;
        Ok(ca)
    }

    /// Signs a probe SVID and verifies it against the bundle the way every peer will, so a CA
    /// that cannot produce verifiable SVIDs (a broken upstream chain) stops the server at start
    /// instead of failing every handshake later.
    fn self_check(&self) -> Result<(), ServerError> {
        let key = rcgen::KeyPair::generate().map_err(|e| ServerError::Ca(e.to_string()))?;
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .map_err(|e| ServerError::Ca(e.to_string()))?;
        let tmpl = SvidTemplate {
            spiffe_id: crate::server_id(&self.td),
            dns_names: Vec::new(),
            ttl_secs: 60,
        };
        let signed = self.sign(csr.der(), &tmpl)?;
        let chain: Vec<rustls::pki_types::CertificateDer<'_>> = signed
            .chain()
            .into_iter()
            .map(rustls::pki_types::CertificateDer::from)
            .collect();
        tessera_tls::verify_svid(
            &chain,
            &self.bundle()?,
            tessera_tls::now(),
            tessera_tls::PeerRole::Client,
        )
        .map_err(|e| {
            ServerError::Ca(format!(
                "an SVID signed by the active CA does not verify against the trust bundle \
                 (check [upstream_authority]): {e}"
            ))
        })?;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Journal> {
        // A panic while holding the lock cannot leave the journal half-changed (every mutation
        // is a whole-value assignment in tessera-pki), so a poisoned lock is still usable.
        self.journal.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Signs a CSR with the active authority.
    pub(crate) fn sign(&self, csr: &[u8], tmpl: &SvidTemplate) -> Result<SignedSvid, ServerError> {
        let j = self.lock();
        j.x509()
            .active()
            .authority
            .sign_x509_svid(csr, tmpl, unix_now())
            .map_err(|e| ServerError::Invalid(e.to_string()))
    }

    /// Mints a JWT-SVID with the active JWT key.
    pub(crate) fn mint_jwt(
        &self,
        sub: &SpiffeId,
        audience: &[String],
        ttl: u64,
    ) -> Result<String, ServerError> {
        let j = self.lock();
        j.jwt()
            .active()
            .authority
            .mint(sub, audience, ttl, unix_now())
            .map_err(|e| ServerError::Invalid(e.to_string()))
    }

    /// The bundle of every published authority (without sequence; the datastore's copy has it).
    pub(crate) fn bundle(&self) -> Result<Bundle, ServerError> {
        self.lock()
            .bundle()
            .map_err(|e| ServerError::Ca(e.to_string()))
    }

    /// The tainted authorities now, and a receiver that wakes whenever they change.
    pub(crate) fn tainted(&self) -> watch::Receiver<Tainted> {
        self.tainted.subscribe()
    }

    /// Runs `f` on the journal, persists it if `f` changed anything, logs the events, and says
    /// whether the published keys changed.
    fn step(
        &self,
        f: impl FnOnce(&mut Journal) -> Result<Vec<JournalEvent>, PkiError>,
    ) -> Result<(Vec<JournalEvent>, bool), ServerError> {
        let mut j = self.lock();
        let before = j.generation();
        let events = f(&mut j).map_err(|e| match e {
            PkiError::Rotation(m) => ServerError::Precondition(m),
            other => ServerError::Ca(other.to_string()),
        })?;
        for e in &events {
            tracing::info!(event = ?e, "CA journal");
        }
        if !events.is_empty() {
            write_private(&self.path, &j.to_bytes())?;
        }
        let tainted = Tainted {
            x509: j.x509().tainted_ids(),
            jwt: j.jwt().tainted_ids(),
        };
        let changed = j.generation() != before;
        drop(j);
        self.tainted.send_if_modified(|cur| {
            let differs = *cur != tainted;
            if differs {
                *cur = tainted;
            }
            differs
        });
        Ok((events, changed))
    }

    /// Advances rotation; persists and returns true when the published keys changed.
    pub(crate) fn tick(&self, now: u64) -> Result<bool, ServerError> {
        let (td, ttl, up) = (self.td.clone(), self.ca_ttl, self.upstream.clone());
        self.step(|j| j.tick_with(now, ttl, &mut mint_with(&td, up.as_deref())))
            .map(|(_, changed)| changed)
    }

    /// Forced prepare of the next authority of `kind`.
    pub(crate) fn prepare(&self, kind: Kind) -> Result<Vec<JournalEvent>, ServerError> {
        let (td, ttl, up) = (self.td.clone(), self.ca_ttl, self.upstream.clone());
        self.step(|j| j.prepare(kind, unix_now(), ttl, &mut mint_with(&td, up.as_deref())))
            .map(|(e, _)| e)
    }

    pub(crate) fn activate(&self, kind: Kind) -> Result<Vec<JournalEvent>, ServerError> {
        self.step(|j| j.activate(kind)).map(|(e, _)| e)
    }

    pub(crate) fn taint(&self, kind: Kind, id: &str) -> Result<Vec<JournalEvent>, ServerError> {
        self.step(|j| j.taint(kind, id)).map(|(e, _)| e)
    }

    pub(crate) fn revoke(&self, kind: Kind, id: &str) -> Result<Vec<JournalEvent>, ServerError> {
        self.step(|j| j.revoke(kind, id)).map(|(e, _)| e)
    }

    /// Reads the journal (for `tessera authority ... show`).
    pub(crate) fn with_journal<T>(&self, f: impl FnOnce(&Journal) -> T) -> T {
        f(&self.lock())
    }

    pub(crate) fn upstream(&self) -> Option<&Arc<dyn UpstreamAuthority>> {
        self.upstream.as_ref()
    }

    /// Writes the current bundle to the datastore when it differs from the stored one, with
    /// `spiffe_sequence` one higher (Trust Domain and Bundle §4.1.1: it MUST change whenever the
    /// contents do). Returns the revision of the write, if one happened.
    pub(crate) async fn publish(
        &self,
        store: &Arc<dyn Datastore>,
    ) -> Result<Option<u64>, ServerError> {
        let mut bundle = self.bundle()?;
        let stored = store.get_bundle(&self.td).await?;
        let previous = match &stored {
            Some(s) => Some(
                Bundle::parse(self.td.clone(), &s.bundle_json)
                    .map_err(|e| ServerError::Ca(format!("stored bundle is unreadable: {e}")))?,
            ),
            None => None,
        };
        if let Some(prev) = &previous
            && prev.x509_authorities() == bundle.x509_authorities()
            && prev.jwt_authorities() == bundle.jwt_authorities()
        {
            return Ok(None);
        }
        bundle.sequence = Some(previous.and_then(|p| p.sequence).unwrap_or(0) + 1);
        let rev = store
            .set_bundle(&self.td, bundle.to_json().as_bytes())
            .await?;
        Ok(Some(rev))
    }

    /// Seconds until the next rotation step is due (for the rotation timer), 1 to 3600.
    pub(crate) fn next_tick_in(&self, now: u64) -> u64 {
        self.lock().next_step_in(now).clamp(1, 3600)
    }
}

/// Writes `bytes` to `path` atomically with mode 0600 (see [`crate::write_private_file`]).
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), ServerError> {
    crate::write_private_file(path, bytes)
        .map_err(|e| ServerError::Ca(format!("cannot write {}: {e}", path.display())))
}
