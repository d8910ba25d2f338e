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
use crate::cluster::{self, AuthorityRecord};

pub(crate) const JOURNAL_FILE: &str = "ca_journal.json";
/// This server's name among the servers of its trust domain (random, made at first start).
pub(crate) const INSTANCE_FILE: &str = "server_instance_id";

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
    /// Every server's tainted authorities (ours as of now, the others' as last read).
    tainted: watch::Sender<Tainted>,
    /// This server's key in the datastore's authority records.
    instance: String,
    /// What the other servers of the trust domain publish, as last read from the datastore.
    cluster: Mutex<Cluster>,
}

#[derive(Debug, Default)]
struct Cluster {
    tainted: Tainted,
    /// The trust domain's bundle as stored (every server's authorities).
    bundle: Option<Bundle>,
}

fn own_tainted(j: &Journal) -> Tainted {
    Tainted {
        x509: j.x509().tainted_ids(),
        jwt: j.jwt().tainted_ids(),
    }
}

fn union(a: &Tainted, b: &Tainted) -> Tainted {
    let join = |x: &[String], y: &[String]| {
        x.iter()
            .chain(y)
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect()
    };
    Tainted {
        x509: join(&a.x509, &b.x509),
        jwt: join(&a.jwt, &b.jwt),
    }
}

/// Reads this server's instance id from `data_dir`, making one on first start.
fn instance_id(data_dir: &Path) -> Result<String, ServerError> {
    let path = data_dir.join(INSTANCE_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() && s.trim().len() <= 64 => Ok(s.trim().to_owned()),
        Ok(_) => Err(ServerError::Ca(format!(
            "{}: expected one line of at most 64 characters; delete it to make a new one",
            path.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut b = [0u8; 16];
            aws_lc_rs::rand::fill(&mut b)
                .map_err(|_| ServerError::Ca("no randomness available".into()))?;
            let id = hex::encode(b);
            write_private(&path, id.as_bytes())?;
            Ok(id)
        }
        Err(e) => Err(ServerError::Ca(format!(
            "cannot read {}: {e}",
            path.display()
        ))),
    }
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Makes each new X.509 CA (at first start, at rotation, on `authority x509 prepare`) and checks
/// it before the journal takes it: a CA whose SVIDs no peer can verify (an upstream certificate
/// whose pathLenConstraint leaves no room for it, a root that does not sign it) would otherwise
/// be activated and break every new handshake in the trust domain.
fn mint_with(
    td: &TrustDomain,
    upstream: Option<&dyn UpstreamAuthority>,
) -> impl FnMut(u64, u64) -> Result<X509Authority, PkiError> {
    move |now, ttl| {
        let authority = match upstream {
            Some(up) => X509Authority::from_upstream(td, now, ttl, up)?,
            None => X509Authority::self_signed(td, now, ttl)?,
        };
        // What the bundle will hold for it: the upstream's roots, or the CA itself.
        let mut bundle = Bundle::new(td.clone());
        let roots = match upstream {
            Some(up) => up.x509_roots(),
            None => vec![authority.cert_der().to_vec()],
        };
        for root in roots {
            bundle
                .add_x509_authority(root)
                .map_err(|e| PkiError::Upstream(format!("an upstream root: {e}")))?;
        }
        probe(td, &authority, &bundle, now).map_err(|e| {
            PkiError::Upstream(format!(
                "a new CA{} signs SVIDs that do not verify against the trust bundle, so it is \
                 not used (check [upstream_authority]): {e}",
                upstream
                    .map(|u| format!(" from the {} upstream", u.name()))
                    .unwrap_or_default()
            ))
        })?;
        Ok(authority)
    }
}

/// Signs a probe SVID with `authority` at `now` and verifies it against `bundle` the way every
/// peer will (`tessera_tls::verify_svid`, the one verifier).
fn probe(
    td: &TrustDomain,
    authority: &X509Authority,
    bundle: &Bundle,
    now: u64,
) -> Result<(), String> {
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .map_err(|e| e.to_string())?;
    let tmpl = SvidTemplate {
        spiffe_id: crate::server_id(td),
        dns_names: Vec::new(),
        ttl_secs: 60,
    };
    let signed = authority
        .sign_x509_svid(csr.der(), &tmpl, now)
        .map_err(|e| e.to_string())?;
    let chain: Vec<rustls::pki_types::CertificateDer<'_>> = signed
        .chain()
        .into_iter()
        .map(rustls::pki_types::CertificateDer::from)
        .collect();
    tessera_tls::verify_svid(
        &chain,
        bundle,
        rustls::pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(now)),
        tessera_tls::PeerRole::Client,
    )
    .map(|_| ())
    .map_err(|e| e.to_string())
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
        let tainted = own_tainted(&journal);
        let ca = Self {
            td: td.clone(),
            journal: Mutex::new(journal),
            path,
            ca_ttl,
            upstream,
            tainted: watch::Sender::new(tainted),
            instance: instance_id(data_dir)?,
            cluster: Mutex::new(Cluster::default()),
        };
        ca.self_check()?;
        Ok(ca)
    }

    /// Checks at start that the active CA's SVIDs verify against the bundle, and that the
    /// configured upstream makes CAs whose SVIDs verify: a broken upstream stops the server
    /// here, not at the next rotation (when the active CA is still self-signed or from an
    /// earlier upstream, it would otherwise only be found then).
    fn self_check(&self) -> Result<(), ServerError> {
        let now = unix_now();
        let bundle = self.bundle()?;
        {
            let j = self.lock();
            probe(&self.td, &j.x509().active().authority, &bundle, now).map_err(|e| {
                ServerError::Ca(format!(
                    "an SVID signed by the active CA does not verify against the trust bundle \
                     (check [upstream_authority]): {e}"
                ))
            })?;
        }
        if let Some(up) = &self.upstream {
            mint_with(&self.td, Some(up.as_ref()))(now, self.ca_ttl)
                .map_err(|e| ServerError::Ca(e.to_string()))?;
        }
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
        let own = own_tainted(&j);
        let changed = j.generation() != before;
        drop(j);
        self.update_tainted(&own);
        Ok((events, changed))
    }

    fn cluster(&self) -> std::sync::MutexGuard<'_, Cluster> {
        self.cluster.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the tainted watch to ours ∪ the other servers', waking sync streams if it changed.
    fn update_tainted(&self, own: &Tainted) {
        let tainted = union(own, &self.cluster().tainted);
        self.tainted.send_if_modified(|cur| {
            let differs = *cur != tainted;
            if differs {
                *cur = tainted;
            }
            differs
        });
    }

    /// Advances rotation; persists and returns true when the published keys changed.
    /// A failed X.509 step does not fail the tick (the JWT rotation goes on); it is logged each
    /// time it is tried again (see `Journal::x509_problem`).
    pub(crate) fn tick(&self, now: u64) -> Result<bool, ServerError> {
        let (td, ttl, up) = (self.td.clone(), self.ca_ttl, self.upstream.clone());
        let before = self.lock().x509_problem().map(|(_, n)| n);
        let changed = self
            .step(|j| j.tick_with(now, ttl, &mut mint_with(&td, up.as_deref())))
            .map(|(_, changed)| changed)?;
        let j = self.lock();
        if let Some((why, failures)) = j.x509_problem()
            && before != Some(failures)
        {
            tracing::error!(error = %why, failures, "cannot make a new X.509 CA; tried again later");
        }
        Ok(changed)
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

    /// What this server publishes of its CA: its authorities' public parts and taint marks.
    fn record(&self) -> Result<AuthorityRecord, ServerError> {
        let j = self.lock();
        let bundle = j.bundle().map_err(|e| ServerError::Ca(e.to_string()))?;
        let tainted = own_tainted(&j);
        let expires_at = j
            .x509()
            .entries()
            .map(|s| s.authority.not_after())
            .chain(j.jwt().entries().map(|s| s.authority.not_after()))
            .max()
            .unwrap_or(0);
        Ok(AuthorityRecord {
            bundle: bundle.to_json(),
            tainted_x509: tainted.x509,
            tainted_jwt: tainted.jwt,
            expires_at,
        })
    }

    /// Publishes this server's authorities: its record in the datastore, and the trust
    /// domain's bundle recomputed from every server's record when that changes it (with
    /// `spiffe_sequence` one higher, Trust Domain and Bundle §4.1.1). Then re-reads what the
    /// others publish. Returns the revision of the write, if one happened.
    pub(crate) async fn publish(
        &self,
        store: &Arc<dyn Datastore>,
    ) -> Result<Option<u64>, ServerError> {
        let record = self.record()?.to_bytes();
        let (td, own, now) = (self.td.clone(), self.instance.clone(), unix_now());
        let merge = move |records: &[(String, Vec<u8>)], stored: Option<&[u8]>| {
            cluster::merge_bundle(&td, records, stored, &own, now)
        };
        let rev = store
            .publish_authorities(&self.td, &self.instance, &record, &merge)
            .await?;
        self.refresh(store).await?;
        Ok(rev)
    }

    /// Re-reads what every server publishes (after a `BundleUpdated` event for our trust
    /// domain): the stored bundle becomes our trust, and their taint marks join ours.
    pub(crate) async fn refresh(&self, store: &Arc<dyn Datastore>) -> Result<(), ServerError> {
        let records = store.list_authority_records().await?;
        let stored = store.get_bundle(&self.td).await?;
        let now = unix_now();
        let tainted = cluster::union_tainted(&self.td, &records, &self.instance, now);
        let bundle = match stored {
            Some(s) => Some(
                Bundle::parse(self.td.clone(), &s.bundle_json)
                    .map_err(|e| ServerError::Ca(format!("stored bundle is unreadable: {e}")))?,
            ),
            None => None,
        };
        {
            let mut c = self.cluster();
            c.tainted = tainted;
            c.bundle = bundle;
        }
        let own = own_tainted(&self.lock());
        self.update_tainted(&own);
        Ok(())
    }

    /// What this server trusts for its own trust domain: every server's authorities as last
    /// read, plus ours as of now (so a key we just made is trusted before the read comes back).
    pub(crate) fn trust_bundle(&self) -> Result<Bundle, ServerError> {
        let mut own = self.bundle()?;
        if let Some(stored) = &self.cluster().bundle {
            for der in stored.x509_authorities() {
                let _ = own.add_x509_authority(der.clone());
            }
            for (kid, key) in stored.jwt_authorities() {
                let _ = own.add_jwt_authority(kid, key.clone());
            }
        }
        Ok(own)
    }

    /// Why no X.509-SVID can be signed now, if none can: the active CA has expired (rotation
    /// could not replace it, e.g. an expired upstream). Readiness reports it.
    pub(crate) fn cannot_sign(&self, now: u64) -> Option<String> {
        let not_after = self.lock().x509().active().authority.not_after();
        (now >= not_after).then(|| {
            format!(
                "the active X.509 CA expired at {not_after} (Unix seconds) and no new one could \
                 be made{}: no SVID can be signed",
                if self.upstream.is_some() {
                    " (check the files of [upstream_authority])"
                } else {
                    ""
                }
            )
        })
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// An upstream whose CAs' SVIDs do not verify stops the server at start even when the
    /// active CA is still self-signed (before, the server started with a warning and the broken
    /// CA became active at the next rotation or `authority x509 prepare`/`activate`).
    #[test]
    fn a_broken_upstream_is_refused_at_start_whatever_ca_is_active() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        let now = unix_now();
        CaManager::open(&td, dir.path(), 3600, now, None).unwrap();
        // A root named like the one that signed the intermediate, with another key: the files
        // link by name, the signatures do not.
        let (root, _, _) = tessera_test_util::rcgen_pki(|_| {}, |_| {});
        let (_, int, key) = tessera_test_util::rcgen_pki(|_| {}, |_| {});
        let up = tessera_pki::DiskUpstream::from_pem(&int, &key, Some(&root)).unwrap();
        let err = CaManager::open(&td, dir.path(), 3600, now, Some(Arc::new(up)))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("a new CA from the disk upstream signs SVIDs that do not verify"),
            "{err}"
        );
        // The same files with their own root are fine.
        let (root, int, key) = tessera_test_util::rcgen_pki(|_| {}, |_| {});
        let up = tessera_pki::DiskUpstream::from_pem(&int, &key, Some(&root)).unwrap();
        let ca = CaManager::open(&td, dir.path(), 3600, now, Some(Arc::new(up))).unwrap();
        ca.prepare(Kind::X509).unwrap();
        // Readiness: a CA past its end (here: asked about a time after it) cannot sign.
        assert_eq!(ca.cannot_sign(now), None);
        let why = ca.cannot_sign(now + 86_400).unwrap();
        assert!(
            why.contains("expired") && why.contains("[upstream_authority]"),
            "{why}"
        );
    }
}
