//! The server's certificate authority: the rotation journal of `tessera-pki`, persisted in the
//! data dir (mode 0600) so a restart keeps the trust domain, and published as the trust domain's
//! bundle in the datastore whenever the set of keys changes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tessera_pki::{Journal, JournalEvent, SignedSvid, SvidTemplate};
use tessera_spiffe::{Bundle, SpiffeId, TrustDomain};
use tessera_store::Datastore;

use crate::ServerError;

pub(crate) const JOURNAL_FILE: &str = "ca_journal.json";

/// The CA of one trust domain. Signing takes a short lock; nothing here does I/O but `tick`.
#[derive(Debug)]
pub(crate) struct CaManager {
    td: TrustDomain,
    journal: Mutex<Journal>,
    path: PathBuf,
    ca_ttl: u64,
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl CaManager {
    /// Loads the journal from `data_dir`, or creates a new CA (a new trust domain) if none exists.
    pub(crate) fn open(
        td: &TrustDomain,
        data_dir: &Path,
        ca_ttl: u64,
        now: u64,
    ) -> Result<Self, ServerError> {
        let path = data_dir.join(JOURNAL_FILE);
        let journal = match std::fs::read(&path) {
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
                let j =
                    Journal::new(td, now, ca_ttl).map_err(|e| ServerError::Ca(e.to_string()))?;
                write_private(&path, &j.to_bytes())?;
                tracing::info!(trust_domain = %td, "created a new CA");
                j
            }
            Err(e) => {
                return Err(ServerError::Ca(format!(
                    "cannot read {}: {e}",
                    path.display()
                )));
            }
        };
        Ok(Self {
            td: td.clone(),
            journal: Mutex::new(journal),
            path,
            ca_ttl,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Journal> {
        // A panic while holding the lock cannot leave the journal half-changed (every mutation
        // is a whole-value assignment in tessera-pki), so a poisoned lock is still usable.
        self.journal.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Signs a CSR with the active authority.
    pub(crate) fn sign(&self, csr: &[u8], tmpl: &SvidTemplate) -> Result<SignedSvid, ServerError> {
        let j = self.lock();
        j.active()
            .x509
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
        j.active()
            .jwt
            .mint(sub, audience, ttl, unix_now())
            .map_err(|e| ServerError::Invalid(e.to_string()))
    }

    /// The bundle of every published authority (without sequence; the datastore's copy has it).
    pub(crate) fn bundle(&self) -> Result<Bundle, ServerError> {
        self.lock()
            .bundle()
            .map_err(|e| ServerError::Ca(e.to_string()))
    }

    /// Advances rotation; persists and returns true when the published keys changed.
    pub(crate) fn tick(&self, now: u64) -> Result<bool, ServerError> {
        let mut j = self.lock();
        let before = j.generation();
        let events = j
            .tick(now, self.ca_ttl)
            .map_err(|e| ServerError::Ca(e.to_string()))?;
        for e in &events {
            match e {
                JournalEvent::Prepared { id } => tracing::info!(id, "prepared the next CA"),
                JournalEvent::Activated { id } => tracing::info!(id, "activated the prepared CA"),
                JournalEvent::Dropped { id } => tracing::info!(id, "dropped an expired CA"),
                #[allow(unreachable_patterns)]
                other => tracing::info!(?other, "CA journal event"),
            }
        }
        if !events.is_empty() {
            write_private(&self.path, &j.to_bytes())?;
        }
        Ok(j.generation() != before)
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

    /// Seconds until the next rotation step is due (for the rotation timer), at least 1.
    pub(crate) fn next_tick_in(&self, now: u64) -> u64 {
        let j = self.lock();
        let active = &j.active().x509;
        let life = active
            .not_after()
            .saturating_sub(active.not_before())
            .max(6);
        let prepare_at = active.not_before() + life / 2;
        let activate_at = active.not_after().saturating_sub(life / 6);
        let next = [prepare_at, activate_at, active.not_after()]
            .into_iter()
            .filter(|t| *t > now)
            .min()
            .unwrap_or(now + 60);
        (next - now).clamp(1, 3600)
    }
}

/// Writes `bytes` to `path` atomically with mode 0600 (see [`crate::write_private_file`]).
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), ServerError> {
    crate::write_private_file(path, bytes)
        .map_err(|e| ServerError::Ca(format!("cannot write {}: {e}", path.display())))
}
