//! The agent's own identity: node attestation, the agent SVID and its renewal, and persistence in
//! the data dir so a restart needs no new join token.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tessera_spiffe::{Bundle, SpiffeId, TrustDomain};
use tessera_tls::SvidResolver;
use zeroize::Zeroizing;

use crate::AgentError;

const FILE: &str = "agent_svid.json";

/// The agent SVID with its key and the bundle it was issued with.
pub(crate) struct NodeIdentity {
    pub(crate) spiffe_id: SpiffeId,
    pub(crate) chain: Vec<Vec<u8>>,
    pub(crate) key_pkcs8: Zeroizing<Vec<u8>>,
    pub(crate) not_after: u64,
    /// When this process got (or loaded) the SVID, Unix seconds.
    pub(crate) obtained_at: u64,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("spiffe_id", &self.spiffe_id)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
struct Stored {
    spiffe_id: String,
    chain: Vec<String>,
    key_pkcs8: String,
    bundle_json: String,
}

/// A fresh P-256 key and a CSR for it (the server takes only the public key).
pub(crate) fn key_and_csr() -> Result<(Zeroizing<Vec<u8>>, Vec<u8>), AgentError> {
    let key = rcgen::KeyPair::generate().map_err(|e| AgentError::Crypto(e.to_string()))?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .map_err(|e| AgentError::Crypto(e.to_string()))?;
    Ok((Zeroizing::new(key.serialize_der()), csr.der().to_vec()))
}

pub(crate) fn validity(leaf: &[u8]) -> Result<(u64, u64), AgentError> {
    use x509_parser::prelude::FromDer as _;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(leaf)
        .map_err(|e| AgentError::Crypto(format!("SVID from the server does not parse: {e}")))?;
    let nb = u64::try_from(cert.validity().not_before.timestamp()).unwrap_or(0);
    let na = u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0);
    Ok((nb, na))
}

/// The authority key identifier of a certificate (lowercase hex): the subject key identifier of
/// the CA that signed it, which is how the server names X.509 authorities.
pub(crate) fn authority_key_id(cert: &[u8]) -> Option<String> {
    use x509_parser::extensions::ParsedExtension;
    use x509_parser::prelude::FromDer as _;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(cert).ok()?;
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.as_ref().map(|k| hex::encode(k.0))
            }
            _ => None,
        })
}

impl NodeIdentity {
    pub(crate) fn new(
        spiffe_id: SpiffeId,
        chain: Vec<Vec<u8>>,
        key_pkcs8: Zeroizing<Vec<u8>>,
    ) -> Result<Self, AgentError> {
        let leaf = chain
            .first()
            .ok_or_else(|| AgentError::Crypto("the server sent an empty SVID chain".into()))?;
        let (_not_before, not_after) = validity(leaf)?;
        Ok(Self {
            spiffe_id,
            chain,
            key_pkcs8,
            not_after,
            obtained_at: crate::run::unix_now(),
        })
    }

    pub(crate) fn resolver(&self) -> Result<Arc<SvidResolver>, AgentError> {
        let chain = self
            .chain
            .iter()
            .map(|c| CertificateDer::from(c.clone()))
            .collect();
        let key = PrivateKeyDer::Pkcs8(self.key_pkcs8.to_vec().into());
        let ck = tessera_tls::certified_key(chain, key)
            .map_err(|e| AgentError::Crypto(e.to_string()))?;
        Ok(SvidResolver::new(ck))
    }

    /// When to renew: at half of the validity left when this process got the SVID (notBefore is
    /// backdated for clock skew, so it is not the start of the useful life).
    pub(crate) fn renew_at(&self) -> u64 {
        self.obtained_at + (self.not_after.saturating_sub(self.obtained_at)) / 2
    }
}

fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE)
}

/// Loads a persisted identity that is still valid at `now`, with its bundle.
pub(crate) fn load(
    data_dir: &Path,
    td: &TrustDomain,
    now: u64,
) -> Result<Option<(NodeIdentity, Bundle)>, AgentError> {
    let p = path(data_dir);
    let bytes = match std::fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(AgentError::Io {
                what: format!("read {}", p.display()),
                source: e,
            });
        }
    };
    let bad = |why: String| {
        AgentError::Config(format!("{}: {why}; delete it to attest again", p.display()))
    };
    let s: Stored = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    let id = SpiffeId::parse(&s.spiffe_id).map_err(|e| bad(e.to_string()))?;
    if !id.is_member_of(td) {
        return Err(bad(format!("agent ID {id} is not in trust domain {td}")));
    }
    let chain = s
        .chain
        .iter()
        .map(|c| STANDARD.decode(c))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    let key = Zeroizing::new(
        STANDARD
            .decode(&s.key_pkcs8)
            .map_err(|e| bad(e.to_string()))?,
    );
    let bundle =
        Bundle::parse(td.clone(), s.bundle_json.as_bytes()).map_err(|e| bad(e.to_string()))?;
    let node = NodeIdentity::new(id, chain, key)?;
    if node.not_after <= now {
        tracing::info!(agent = %node.spiffe_id, "the stored agent SVID has expired; attesting again");
        return Ok(None);
    }
    Ok(Some((node, bundle)))
}

/// Persists the identity and bundle (mode 0600, written atomically).
pub(crate) fn save(
    data_dir: &Path,
    node: &NodeIdentity,
    bundle: &Bundle,
) -> Result<(), AgentError> {
    let stored = Stored {
        spiffe_id: node.spiffe_id.to_string(),
        chain: node.chain.iter().map(|c| STANDARD.encode(c)).collect(),
        key_pkcs8: STANDARD.encode(&*node.key_pkcs8),
        bundle_json: bundle.to_json(),
    };
    let text =
        Zeroizing::new(serde_json::to_vec(&stored).map_err(|e| AgentError::Crypto(e.to_string()))?);
    let p = path(data_dir);
    let io = |e: std::io::Error| AgentError::Io {
        what: format!("write {}", p.display()),
        source: e,
    };
    std::fs::create_dir_all(data_dir).map_err(io)?;
    std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    tessera_server::write_private_file(&p, &text).map_err(io)?;
    Ok(())
}
