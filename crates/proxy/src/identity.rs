//! The proxy's own identity: its X509-SVID and the trust bundles, streamed from the Workload API
//! like any workload's. Rotation swaps the certificate in place ([`SvidResolver`]); connections
//! already established keep the certificate they were made with.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tessera_spiffe::{Bundle, BundleSet, SpiffeId, TrustDomain};
use tessera_tls::{SharedBundles, SvidResolver};
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("the Workload API returned no SVID")]
    NoSvid,
    #[error("SVID {0}: {1}")]
    Svid(String, String),
    #[error("bundle of {0}: {1}")]
    Bundle(String, String),
}

/// The current SVID, the bundles, and whether the proxy has an identity yet.
#[derive(Debug)]
pub struct Identity {
    resolver: OnceLock<Arc<SvidResolver>>,
    id: ArcSwapOption<SpiffeId>,
    bundles: SharedBundles,
    ready: watch::Sender<bool>,
    rotations: AtomicU64,
    /// Bumped on every SVID or bundle change (live re-authorization watches it).
    changes: watch::Sender<u64>,
}

impl Identity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            resolver: OnceLock::new(),
            id: ArcSwapOption::empty(),
            bundles: Arc::new(ArcSwap::from_pointee(BundleSet::new())),
            ready: watch::channel(false).0,
            rotations: AtomicU64::new(0),
            changes: watch::channel(0).0,
        })
    }

    /// A ready identity with this SVID and these bundles (see [`Identity::update`]).
    pub fn with_svid(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        bundles: BundleSet,
    ) -> Result<Arc<Self>, IdentityError> {
        let identity = Self::new();
        identity.update(chain, key, bundles)?;
        Ok(identity)
    }

    /// Installs an SVID (chain leaf first, PKCS#8 key) and the bundles to verify peers with. The
    /// chain must be an X509-SVID; its ID becomes this proxy's identity.
    pub fn update(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        bundles: BundleSet,
    ) -> Result<(), IdentityError> {
        let id = tessera_spiffe::validate_svid_chain(&chain)
            .map_err(|e| IdentityError::Svid("(from the Workload API)".into(), e.to_string()))?;
        let key = tessera_tls::certified_key(chain, key)
            .map_err(|e| IdentityError::Svid(id.to_string(), e.to_string()))?;
        // Bundles first, so a handshake with the new SVID never meets the old bundles.
        self.bundles.store(Arc::new(bundles));
        match self.resolver.get() {
            Some(r) => {
                r.swap(key);
                let n = self.rotations.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::info!(spiffe_id = %id, rotations = n, "X509-SVID rotated");
            }
            None => {
                let _ = self.resolver.set(SvidResolver::new(key));
            }
        }
        if self.id.load().as_deref() != Some(&id) {
            tracing::info!(spiffe_id = %id, "proxy identity");
        }
        self.id.store(Some(Arc::new(id)));
        self.ready.send_replace(true);
        self.changes.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Replaces the bundles only (tests; a bundle update without an SVID change).
    pub fn set_bundles(&self, bundles: BundleSet) {
        self.bundles.store(Arc::new(bundles));
        self.changes.send_modify(|n| *n += 1);
    }

    /// Wakes on every SVID or bundle change.
    pub fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// How many SVID or bundle changes there have been: what a connection set up under one
    /// value was verified and authenticated with may be stale under the next.
    pub fn generation(&self) -> u64 {
        *self.changes.borrow()
    }

    /// This proxy's SPIFFE ID, once it has one.
    pub fn spiffe_id(&self) -> Option<Arc<SpiffeId>> {
        self.id.load_full()
    }

    pub fn resolver(&self) -> Option<Arc<SvidResolver>> {
        self.resolver.get().cloned()
    }

    pub fn bundles(&self) -> SharedBundles {
        self.bundles.clone()
    }

    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// How many times the SVID was replaced after the first one.
    pub fn rotations(&self) -> u64 {
        self.rotations.load(Ordering::Relaxed)
    }

    /// Waits until the first SVID is installed.
    pub async fn wait_ready(&self) {
        let mut rx = self.ready.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }
}

/// Splits concatenated DER certificates (the Workload API's `x509_svid` and `bundle` fields)
/// without parsing them: each must be one complete SEQUENCE.
pub fn split_der(mut data: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let len = der_len(data).ok_or_else(|| {
            format!(
                "certificate {} is not a complete DER SEQUENCE",
                out.len() + 1
            )
        })?;
        let (one, rest) = data.split_at(len);
        out.push(CertificateDer::from(one.to_vec()));
        data = rest;
    }
    Ok(out)
}

/// The total length of the DER SEQUENCE at the start of `d`, if it is complete.
fn der_len(d: &[u8]) -> Option<usize> {
    if *d.first()? != 0x30 {
        return None;
    }
    let first = *d.get(1)?;
    let (hdr, body) = if first < 0x80 {
        (2usize, usize::from(first))
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | usize::from(*d.get(2 + i)?);
        }
        (2 + n, len)
    };
    let total = hdr.checked_add(body)?;
    (total <= d.len()).then_some(total)
}

/// The bundles of one Workload API response: ours, plus the federated ones.
fn bundles_of(
    own: &TrustDomain,
    bundle: &[u8],
    federated: &std::collections::HashMap<String, Vec<u8>>,
) -> Result<BundleSet, IdentityError> {
    let mut set = BundleSet::new();
    let mut add = |td: TrustDomain, der: &[u8]| -> Result<(), IdentityError> {
        let mut b = Bundle::new(td.clone());
        for c in split_der(der).map_err(|e| IdentityError::Bundle(td.to_string(), e))? {
            b.add_x509_authority(c.to_vec())
                .map_err(|e| IdentityError::Bundle(td.to_string(), e.to_string()))?;
        }
        set.upsert(b);
        Ok(())
    };
    add(own.clone(), bundle)?;
    for (key, der) in federated {
        // The map is keyed by the trust domain's SPIFFE ID (Workload API §5.2.1); accept a bare
        // name too, as some implementations send it.
        let name = key.strip_prefix("spiffe://").unwrap_or(key);
        let Ok(td) = TrustDomain::new(name) else {
            tracing::warn!(key = %key, "ignoring a federated bundle with an invalid trust domain");
            continue;
        };
        if &td != own {
            add(td, der)?;
        }
    }
    Ok(set)
}

/// Installs one `FetchX509SVID` response: the first SVID is the proxy's (the Workload API's
/// default SVID, §5.2.1).
pub fn apply_response(
    identity: &Identity,
    resp: &tessera_proto::workload::X509svidResponse,
) -> Result<(), IdentityError> {
    let svid = resp.svids.first().ok_or(IdentityError::NoSvid)?;
    let chain =
        split_der(&svid.x509_svid).map_err(|e| IdentityError::Svid(svid.spiffe_id.clone(), e))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(svid.x509_svid_key.clone()));
    let id = SpiffeId::parse(&svid.spiffe_id)
        .map_err(|e| IdentityError::Svid(svid.spiffe_id.clone(), e.to_string()))?;
    let bundles = bundles_of(&id.trust_domain(), &svid.bundle, &resp.federated_bundles)?;
    identity.update(chain, key, bundles)
}

/// The Workload API socket from `SPIFFE_ENDPOINT_SOCKET` syntax (`unix:///path`, `unix:/path`)
/// or a plain path.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, String> {
    if endpoint.starts_with('/') {
        return Ok(PathBuf::from(endpoint));
    }
    match tessera_spiffe::endpoint::EndpointAddr::parse(endpoint) {
        Ok(tessera_spiffe::endpoint::EndpointAddr::Unix(p)) => Ok(p),
        Ok(other) => Err(format!(
            "{endpoint:?}: a Unix socket is needed (unix:///path or /path), got {other:?}"
        )),
        Err(e) => Err(format!("{endpoint:?}: {e}")),
    }
}

/// Streams the proxy's SVID from the Workload API at `socket` forever, reconnecting with backoff;
/// each response is installed in `identity`.
pub async fn watch_workload_api(socket: PathBuf, identity: Arc<Identity>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match stream_once(&socket, &identity).await {
            Ok(()) => tracing::warn!("Workload API stream ended; reconnecting"),
            Err(e) => tracing::warn!(error = %e, socket = %socket.display(), "Workload API"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// A gRPC channel to the agent's socket (the Workload API and the services beside it). The URI
/// is required by the API but unused: the connector always dials the socket.
pub(crate) async fn uds_channel(socket: &Path) -> Result<tonic::transport::Channel, String> {
    let path = socket.to_owned();
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
        .map_err(|e| format!("connect: {e}"))
}

/// A request to the agent socket (the Workload API, and Tessera's `PolicyWatch` and
/// `DestinationWatch`, attested the same way).
pub(crate) fn agent_request<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    // Workload API §4: every request carries this header, so a browser cannot be tricked
    // into calling the socket.
    req.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    req
}

async fn stream_once(socket: &Path, identity: &Identity) -> Result<(), String> {
    use tessera_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
    let channel = uds_channel(socket).await?;
    let mut client = SpiffeWorkloadApiClient::new(channel);
    let req = agent_request(tessera_proto::workload::X509svidRequest {});
    let mut stream = client
        .fetch_x509svid(req)
        .await
        .map_err(|s| format!("FetchX509SVID: {}", s.message()))?
        .into_inner();
    loop {
        match stream.message().await {
            Ok(Some(resp)) => {
                if let Err(e) = apply_response(identity, &resp) {
                    tracing::error!(error = %e, "ignoring an unusable Workload API response");
                }
            }
            Ok(None) => return Ok(()),
            Err(s) => return Err(format!("FetchX509SVID stream: {}", s.message())),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn split_der_splits_and_refuses_truncation() {
        let ca = tessera_test_util::TestCa::new("example.org");
        let a = ca.issue("spiffe://example.org/a");
        let mut both = a.leaf().to_vec();
        both.extend_from_slice(ca.root());
        let parts = split_der(&both).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].as_ref(), a.leaf().as_ref());
        assert!(split_der(&both[..both.len() - 1]).is_err());
        assert!(split_der(&[0x02, 0x01, 0x00]).is_err());
        assert!(split_der(&[]).unwrap().is_empty());
    }

    #[test]
    fn socket_paths() {
        assert_eq!(
            socket_path("unix:///run/a.sock").unwrap(),
            PathBuf::from("/run/a.sock")
        );
        assert_eq!(
            socket_path("/run/a.sock").unwrap(),
            PathBuf::from("/run/a.sock")
        );
        assert!(socket_path("tcp://127.0.0.1:1").is_err());
    }
}
