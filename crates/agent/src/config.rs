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
    /// More servers of the same trust domain (IP:port each), tried in order after
    /// `server_address` when the one in use cannot be reached: the agent moves its sync stream
    /// there and resumes from the revision it has (servers sharing one PostgreSQL).
    pub server_addresses: Vec<String>,
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
    /// Envoy SDS v3 on the Workload API socket: the resource names it answers to.
    pub sds: SdsConfig,
    /// Node mode: the admin socket (mode 0600) where workloads are attached by network
    /// namespace (`tessera workload attach`). Unset: no enrollment.
    pub admin_socket_path: Option<PathBuf>,
    /// SPIFFE IDs whose holders (attested like Workload API callers) may open the delegated
    /// identity stream on the admin socket: the node proxy. It receives enrolled workloads'
    /// keys, so list only the node proxy's own ID.
    pub authorized_delegates: Vec<String>,
}

/// Envoy's Secret Discovery Service (SDS v3), served on the Workload API socket. The names are
/// SPIRE's defaults, so Envoy configurations written for SPIRE work unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SdsConfig {
    /// The caller's default (first) X509-SVID.
    pub default_svid_name: String,
    /// The agent's own trust domain's bundle.
    pub default_bundle_name: String,
    /// Every bundle the caller may use, in one SPIFFE certificate validator configuration.
    pub default_all_bundles_name: String,
    /// Always send plain `trusted_ca` validation contexts, even to Envoys that have the SPIFFE
    /// certificate validator (one Envoy can ask for the same with node metadata).
    pub disable_spiffe_cert_validation: bool,
}

impl Default for SdsConfig {
    fn default() -> Self {
        Self {
            default_svid_name: "default".into(),
            default_bundle_name: "ROOTCA".into(),
            default_all_bundles_name: "ALL".into(),
            disable_spiffe_cert_validation: false,
        }
    }
}

impl SdsConfig {
    /// Names must be non-empty, distinct, and not SPIFFE IDs (those name identities and bundles).
    pub fn validate(&self) -> Result<(), String> {
        let names = [
            ("sds.default_svid_name", &self.default_svid_name),
            ("sds.default_bundle_name", &self.default_bundle_name),
            (
                "sds.default_all_bundles_name",
                &self.default_all_bundles_name,
            ),
        ];
        for (i, (key, name)) in names.iter().enumerate() {
            if name.trim().is_empty() {
                return Err(format!("{key}: must not be empty"));
            }
            if name.to_ascii_lowercase().starts_with("spiffe:") {
                return Err(format!(
                    "{key} {name:?}: must not be a SPIFFE ID (SPIFFE IDs name identities and trust domains' bundles)"
                ));
            }
            if let Some((other, _)) = names[..i].iter().find(|(_, n)| n == name) {
                return Err(format!("{key} {name:?}: the same name as {other}"));
            }
        }
        Ok(())
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            trust_domain: TrustDomain::new("example.org").unwrap_or_else(|_| unreachable!()),
            server_address: "127.0.0.1:8081".into(),
            server_addresses: Vec::new(),
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
            sds: SdsConfig::default(),
            admin_socket_path: None,
            authorized_delegates: Vec::new(),
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
        if self.data_dir.as_os_str().is_empty() {
            return Err("data_dir is empty: give the directory the agent keeps its SVID in".into());
        }
        if self.socket_path.as_os_str().is_empty() {
            return Err("socket_path is empty: give the Workload API socket's path".into());
        }
        if let Some(p) = &self.admin_socket_path
            && (!p.is_absolute() || *p == self.socket_path)
        {
            return Err(format!(
                "admin_socket_path {}: must be an absolute path other than socket_path",
                p.display()
            ));
        }
        for d in &self.authorized_delegates {
            let id = tessera_spiffe::SpiffeId::parse(d)
                .map_err(|e| format!("authorized_delegates {d:?}: {e}"))?;
            if id.is_root() {
                return Err(format!(
                    "authorized_delegates {d:?}: a trust domain, not a workload ID"
                ));
            }
        }
        if !self.socket_path.is_absolute() {
            return Err(format!(
                "socket_path {}: must be an absolute path",
                self.socket_path.display()
            ));
        }
        if self.x509pop_cert_path.is_some() != self.x509pop_key_path.is_some() {
            return Err("x509pop_cert_path and x509pop_key_path must be set together".into());
        }
        self.servers()?;
        self.sds.validate()
    }

    /// `server_address`, then `server_addresses`, without repeats.
    pub fn servers(&self) -> Result<Vec<SocketAddr>, String> {
        let first = self
            .server_address
            .parse::<SocketAddr>()
            .map_err(|_| format!("server_address {:?}: expected IP:port", self.server_address))?;
        let mut out = vec![first];
        for (i, a) in self.server_addresses.iter().enumerate() {
            let addr = a
                .parse::<SocketAddr>()
                .map_err(|_| format!("server_addresses[{i}] {a:?}: expected IP:port"))?;
            if !out.contains(&addr) {
                out.push(addr);
            }
        }
        Ok(out)
    }

    pub fn default_toml() -> String {
        let d = Self::default();
        format!(
            r#"# Tessera agent configuration. Every key is optional; shown are the defaults.

trust_domain = "{td}"
# The server's agent API (IP:port).
server_address = "{server}"
# More servers of the trust domain (sharing one PostgreSQL), tried in order when the one in use
# cannot be reached; the agent resumes there from the revision it has.
server_addresses = []
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

# Envoy SDS v3 (envoy.service.secret.v3.SecretDiscoveryService) on the Workload API socket. Envoy
# asks for secrets by name: the names below, a SPIFFE ID (that SVID), or spiffe://<trust domain>
# (that bundle); no name at all means every SVID and bundle the caller may use.
[sds]
# The caller's first X509-SVID.
default_svid_name = "{svid}"
# The agent's own trust domain's bundle.
default_bundle_name = "{bundle}"
# Every bundle the caller may use, own and federated, in one SPIFFE validator configuration.
default_all_bundles_name = "{all}"
# Send plain trusted_ca instead of Envoy's SPIFFE certificate validator (used for Envoy >= 1.18).
# One Envoy can ask for this with node metadata `disable_spiffe_cert_validation: true`.
disable_spiffe_cert_validation = false
"#,
            td = d.trust_domain,
            server = d.server_address,
            data = d.data_dir.display(),
            socket = d.socket_path.display(),
            max = d.max_hash_bytes,
            svid = d.sds.default_svid_name,
            bundle = d.sds.default_bundle_name,
            all = d.sds.default_all_bundles_name,
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn default_toml_parses_to_the_defaults() {
        let cfg: AgentConfig = toml::from_str(&AgentConfig::default_toml()).unwrap();
        assert_eq!(cfg.sds, SdsConfig::default());
        cfg.validate().unwrap();
    }

    #[test]
    fn sds_names_are_checked() {
        let bad = |sds: SdsConfig| {
            AgentConfig {
                sds,
                ..AgentConfig::default()
            }
            .validate()
        };
        let e = bad(SdsConfig {
            default_svid_name: String::new(),
            ..SdsConfig::default()
        })
        .unwrap_err();
        assert!(e.contains("sds.default_svid_name"), "{e}");
        let e = bad(SdsConfig {
            default_all_bundles_name: "ROOTCA".into(),
            ..SdsConfig::default()
        })
        .unwrap_err();
        assert!(
            e.contains("sds.default_all_bundles_name") && e.contains("sds.default_bundle_name"),
            "{e}"
        );
        let e = bad(SdsConfig {
            default_bundle_name: "spiffe://example.org".into(),
            ..SdsConfig::default()
        })
        .unwrap_err();
        assert!(e.contains("SPIFFE ID"), "{e}");
        let e = toml::from_str::<AgentConfig>("[sds]\nnames = 1\n").unwrap_err();
        assert!(e.to_string().contains("names"), "{e}");
    }
}
