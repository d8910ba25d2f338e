//! Agent configuration: TOML, every key with a default, unknown keys refused.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tessera_spiffe::TrustDomain;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    pub trust_domain: TrustDomain,
    /// The server's agent API address.
    pub server_address: String,
    /// The agent SVID, its key and the last bundle are kept here (mode 0600), so a restart needs
    /// no new join token.
    pub data_dir: PathBuf,
    /// The SPIFFE Workload API socket.
    pub socket_path: PathBuf,
    /// PEM CA certificates or SPIFFE bundle JSON to verify the server on first contact.
    pub trust_bundle_path: Option<PathBuf>,
    /// Trust the server on first contact without a bundle. Insecure; warned at every start.
    pub insecure_bootstrap: bool,
    /// Join token for the first attestation.
    pub join_token: Option<String>,
    /// x509pop node attestation: the node certificate chain (PEM, leaf first) ...
    pub x509pop_cert_path: Option<PathBuf>,
    /// ... and its private key (PEM, PKCS#8).
    pub x509pop_key_path: Option<PathBuf>,
    /// Workload executables larger than this get no `unix:sha256` selector.
    pub max_hash_bytes: u64,
    /// `/live`, `/ready`, `/metrics`; unset: no health endpoint.
    pub health_bind_address: Option<SocketAddr>,
    pub log_level: String,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            trust_domain: TrustDomain::new("example.org").unwrap_or_else(|_| unreachable!()),
            server_address: "127.0.0.1:8081".into(),
            data_dir: PathBuf::from("/var/lib/tessera/agent"),
            socket_path: PathBuf::from("/tmp/tessera/agent.sock"),
            trust_bundle_path: None,
            insecure_bootstrap: false,
            join_token: None,
            x509pop_cert_path: None,
            x509pop_key_path: None,
            max_hash_bytes: 64 * 1024 * 1024,
            health_bind_address: None,
            log_level: "info".into(),
        }
    }
}

impl AgentConfig {
    pub fn load(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
        let cfg: Self =
            toml::from_str(&text).map_err(|e| format!("config {}: {e}", path.display()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), String> {
        if !self.socket_path.is_absolute() {
            return Err(format!(
                "socket_path {}: must be an absolute path",
                self.socket_path.display()
            ));
        }
        if self.x509pop_cert_path.is_some() != self.x509pop_key_path.is_some() {
            return Err("x509pop_cert_path and x509pop_key_path must be set together".into());
        }
        if self.server_address.parse::<SocketAddr>().is_err() {
            return Err(format!(
                "server_address {:?}: expected IP:port",
                self.server_address
            ));
        }
        Ok(())
    }

    pub fn default_toml() -> String {
        let d = Self::default();
        format!(
            r#"# Tessera agent configuration. Every key is optional; shown are the defaults.

trust_domain = "{td}"
# The server's agent API (IP:port).
server_address = "{server}"
# Agent SVID, key and last bundle (mode 0600): a restart needs no new join token.
data_dir = "{data}"
# The SPIFFE Workload API socket (SPIFFE_ENDPOINT_SOCKET=unix://<this>).
socket_path = "{socket}"
# How to trust the server on first contact: a bundle file (PEM or SPIFFE JSON) ...
# trust_bundle_path = "/etc/tessera/bundle.pem"
# ... or, insecurely, nothing (warned at every start).
insecure_bootstrap = false
# join_token = "..."
# Or x509pop: a node certificate (chain, PEM) and its key, verified against the server's x509pop CA.
# x509pop_cert_path = "/etc/tessera/node.pem"
# x509pop_key_path = "/etc/tessera/node-key.pem"
max_hash_bytes = {max}
# health_bind_address = "127.0.0.1:8082"
log_level = "info"
"#,
            td = d.trust_domain,
            server = d.server_address,
            data = d.data_dir.display(),
            socket = d.socket_path.display(),
            max = d.max_hash_bytes,
        )
    }
}
