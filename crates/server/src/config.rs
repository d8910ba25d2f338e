//! Server configuration: TOML, every key with a default, unknown keys refused.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tessera_spiffe::TrustDomain;

/// A duration written as `90s`, `5m`, `1h`, `24h`, `1h30m` (also `7d`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Secs(pub u64);

impl FromStr for Secs {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad =
            || format!("duration {s:?}: expected a number with a unit, like 90s, 5m, 1h or 1h30m");
        if s.is_empty() {
            return Err(bad());
        }
        let mut total: u64 = 0;
        let mut num = String::new();
        for c in s.chars() {
            if c.is_ascii_digit() {
                num.push(c);
                continue;
            }
            let n: u64 = num.parse().map_err(|_| bad())?;
            num.clear();
            let unit = match c {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                'd' => 86_400,
                _ => return Err(bad()),
            };
            total = n
                .checked_mul(unit)
                .and_then(|v| total.checked_add(v))
                .ok_or_else(bad)?;
        }
        if !num.is_empty() {
            return Err(bad());
        }
        Ok(Self(total))
    }
}

impl fmt::Display for Secs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        if s != 0 && s.is_multiple_of(3600) {
            write!(f, "{}h", s / 3600)
        } else if s != 0 && s.is_multiple_of(60) {
            write!(f, "{}m", s / 60)
        } else {
            write!(f, "{s}s")
        }
    }
}

impl Serialize for Secs {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Secs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub trust_domain: TrustDomain,
    /// CA keys, the SQLite database and the audit log live here.
    pub data_dir: PathBuf,
    /// The agent API (gRPC over mTLS).
    pub bind_address: SocketAddr,
    /// The admin API (gRPC on a Unix socket, mode 0600).
    pub admin_socket: PathBuf,
    /// Optionally, the admin API also over mTLS here, for X509-SVIDs of entries marked `admin`.
    pub admin_bind_address: Option<SocketAddr>,
    /// `/live`, `/ready` and `/metrics`.
    pub health_bind_address: SocketAddr,
    pub log_level: String,
    pub datastore: DatastoreConfig,
    pub ca: CaConfig,
    pub svid: SvidConfig,
    pub node_attestation: NodeAttestationConfig,
    /// An external PKI that signs the server's X.509 CAs; unset: self-signed CAs.
    pub upstream_authority: UpstreamAuthorityConfig,
    /// The SPIFFE bundle endpoint (off unless `bind_address` is set).
    pub bundle_endpoint: BundleEndpointConfig,
    /// How federated bundles are refreshed.
    pub federation: FederationConfig,
    /// Authorization policy defaults, pushed to agents with the policies.
    pub policy: PolicyConfig,
}

/// `[policy]`: what a workload with no ALLOW policy decides, and the external sources that own
/// named policy sets.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// `"deny"` (the default) or `"allow"`.
    pub default: tessera_policy::DefaultAction,
    /// `[[policy.sync]]`: each source is the source of truth for the policies named
    /// `<set>/<name>`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sync: Vec<PolicySyncConfig>,
}

/// `[[policy.sync]]`: a policy set owned by an external access-control system.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySyncConfig {
    /// The set's name: its policies are stored as `<set>/<name>`, and only this source changes
    /// them.
    pub set: String,
    /// `https://…` (verified with `ca_file` or `spiffe_id`), or `http://` to a loopback address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// A directory of `*.yaml`, `*.yml` and `*.json` files, read whole at every poll.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<PathBuf>,
    /// How often the source is read.
    #[serde(default = "default_sync_interval")]
    pub interval: Secs,
    /// HTTPS: PEM CA certificate(s) the server's certificate must chain to (Web PKI rules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// HTTPS: the server must present this SPIFFE ID's X509-SVID, verified against this trust
    /// domain's bundles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
}

fn default_sync_interval() -> Secs {
    Secs(30)
}

/// The bundle endpoint profiles (SPIFFE Trust Domain and Bundle §5.2).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BundleEndpointProfile {
    /// Served with the server's own X509-SVID (`spiffe://<td>/tessera/server`).
    #[default]
    HttpsSpiffe,
    /// Served with `cert_path`/`key_path`, a Web PKI (or enterprise CA) certificate.
    HttpsWeb,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BundleEndpointConfig {
    /// HTTPS listener for `GET` of the trust domain's bundle. Unset: no bundle endpoint.
    pub bind_address: Option<SocketAddr>,
    pub profile: BundleEndpointProfile,
    /// https_web: PEM certificate chain, leaf first.
    pub cert_path: Option<PathBuf>,
    /// https_web: PEM private key (PKCS#8, SEC1 or PKCS#1).
    pub key_path: Option<PathBuf>,
    /// `spiffe_refresh_hint` served with the bundle: how often federated servers should fetch.
    pub refresh_hint: Secs,
}

impl Default for BundleEndpointConfig {
    fn default() -> Self {
        Self {
            bind_address: None,
            profile: BundleEndpointProfile::default(),
            cert_path: None,
            key_path: None,
            refresh_hint: Secs(300),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FederationConfig {
    /// A federated bundle is fetched at its `spiffe_refresh_hint`, but never more often than this…
    pub refresh_floor: Secs,
    /// …and never less often than this.
    pub refresh_ceiling: Secs,
    /// The interval for bundles without a refresh hint.
    pub default_refresh: Secs,
    /// Longest a fetch (connect, TLS, response) may take.
    pub fetch_timeout: Secs,
}

impl Default for FederationConfig {
    fn default() -> Self {
        Self {
            refresh_floor: Secs(30),
            refresh_ceiling: Secs(3600),
            default_refresh: Secs(300),
            fetch_timeout: Secs(10),
        }
    }
}

/// `[upstream_authority]`: at most one kind of upstream.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamAuthorityConfig {
    /// `[upstream_authority.disk]`: a CA certificate and key in PEM files.
    pub disk: Option<DiskUpstreamConfig>,
}

/// `[upstream_authority.disk]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskUpstreamConfig {
    /// PEM: the CA certificate that signs the server's CAs, and the intermediates between it and
    /// the root.
    pub cert_chain_path: PathBuf,
    /// PEM PKCS#8 private key of that certificate.
    pub key_path: PathBuf,
    /// PEM: the upstream root(s), published in the trust bundle. Unset: the self-signed
    /// certificates of `cert_chain_path`.
    #[serde(default)]
    pub bundle_path: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatastoreConfig {
    /// `sqlite://PATH` or `postgres://…`; empty: `sqlite://<data_dir>/datastore.sqlite3`.
    pub url: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaConfig {
    /// Lifetime of each CA; the next one is prepared at half of it and activated at 1/6 left.
    pub ttl: Secs,
    /// Only `ec-p256` for now.
    pub key_type: String,
}

impl Default for CaConfig {
    fn default() -> Self {
        Self {
            ttl: Secs(24 * 3600),
            key_type: "ec-p256".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SvidConfig {
    /// Default X.509-SVID lifetime for entries created without one.
    pub default_x509_ttl: Secs,
    /// Default JWT-SVID lifetime for entries created without one.
    pub default_jwt_ttl: Secs,
    /// Lifetime of agent SVIDs.
    pub agent_ttl: Secs,
}

impl Default for SvidConfig {
    fn default() -> Self {
        Self {
            default_x509_ttl: Secs(3600),
            default_jwt_ttl: Secs(300),
            agent_ttl: Secs(3600),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeAttestationConfig {
    pub join_token: JoinTokenConfig,
    pub x509pop: X509PopConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JoinTokenConfig {
    /// Lifetime of tokens generated without `--ttl`.
    pub default_ttl: Secs,
}

impl Default for JoinTokenConfig {
    fn default() -> Self {
        Self {
            default_ttl: Secs(600),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct X509PopConfig {
    /// PEM file of the CA certificates that node certificates must chain to. Unset: x509pop off.
    pub ca_bundle_path: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            trust_domain: TrustDomain::new("example.org").unwrap_or_else(|_| unreachable!()),
            data_dir: PathBuf::from("/var/lib/tessera/server"),
            bind_address: SocketAddr::from(([127, 0, 0, 1], 8081)),
            admin_socket: PathBuf::from("/tmp/tessera/admin.sock"),
            admin_bind_address: None,
            health_bind_address: SocketAddr::from(([127, 0, 0, 1], 8080)),
            log_level: "info".into(),
            datastore: DatastoreConfig::default(),
            ca: CaConfig::default(),
            svid: SvidConfig::default(),
            node_attestation: NodeAttestationConfig::default(),
            upstream_authority: UpstreamAuthorityConfig::default(),
            bundle_endpoint: BundleEndpointConfig::default(),
            federation: FederationConfig::default(),
            policy: PolicyConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config: {0}")]
    Invalid(String),
}

impl ServerConfig {
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses TOML; every key has a default, unknown keys are an error naming the key.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let cfg: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.data_dir.as_os_str().is_empty() {
            return invalid(
                "data_dir is empty: give the directory the server keeps its state in".into(),
            );
        }
        if self.ca.key_type != "ec-p256" {
            return invalid(format!(
                "ca.key_type {:?}: only \"ec-p256\" is supported",
                self.ca.key_type
            ));
        }
        // One minute at least: the rotation schedule works in whole seconds, and a short-lived
        // CA is what the rotation soak test runs with.
        if self.ca.ttl.0 < 60 {
            return invalid(format!("ca.ttl {}: must be at least 1m", self.ca.ttl));
        }
        for (name, v) in [
            ("svid.default_x509_ttl", self.svid.default_x509_ttl),
            ("svid.default_jwt_ttl", self.svid.default_jwt_ttl),
            ("svid.agent_ttl", self.svid.agent_ttl),
            (
                "node_attestation.join_token.default_ttl",
                self.node_attestation.join_token.default_ttl,
            ),
        ] {
            if v.0 == 0 {
                return invalid(format!("{name}: must be more than 0s"));
            }
            if v >= self.ca.ttl {
                return invalid(format!(
                    "{name} {v}: must be shorter than ca.ttl {}",
                    self.ca.ttl
                ));
            }
        }
        self.validate_federation()?;
        self.validate_policy_sync()?;
        if !self.admin_socket.is_absolute() {
            return invalid(format!(
                "admin_socket {}: must be an absolute path",
                self.admin_socket.display()
            ));
        }
        Ok(())
    }

    fn validate_policy_sync(&self) -> Result<(), ConfigError> {
        let mut sets = std::collections::BTreeSet::new();
        for (i, s) in self.policy.sync.iter().enumerate() {
            let at = format!("policy.sync[{i}]");
            crate::policy_sync::check_source(s)
                .map_err(|m| ConfigError::Invalid(format!("{at}: {m}")))?;
            if !sets.insert(s.set.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "{at}.set {:?}: two sources own this set",
                    s.set
                )));
            }
        }
        Ok(())
    }

    fn validate_federation(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        let be = &self.bundle_endpoint;
        match be.profile {
            BundleEndpointProfile::HttpsWeb => {
                if be.bind_address.is_some() && (be.cert_path.is_none() || be.key_path.is_none()) {
                    return invalid(
                        "bundle_endpoint: profile \"https_web\" needs cert_path and key_path (a Web PKI certificate for the endpoint's host name)".into(),
                    );
                }
            }
            BundleEndpointProfile::HttpsSpiffe => {
                if be.cert_path.is_some() || be.key_path.is_some() {
                    return invalid(
                        "bundle_endpoint: cert_path/key_path are for profile \"https_web\"; profile \"https_spiffe\" serves the server's own X509-SVID".into(),
                    );
                }
            }
        }
        if be.refresh_hint.0 == 0 {
            return invalid("bundle_endpoint.refresh_hint: must be more than 0s".into());
        }
        let f = &self.federation;
        if f.refresh_floor.0 == 0 || f.fetch_timeout.0 == 0 {
            return invalid(
                "federation.refresh_floor and federation.fetch_timeout must be more than 0s".into(),
            );
        }
        if f.refresh_floor > f.refresh_ceiling {
            return invalid(format!(
                "federation.refresh_floor {} is longer than federation.refresh_ceiling {}",
                f.refresh_floor, f.refresh_ceiling
            ));
        }
        Ok(())
    }

    /// The datastore URL, defaulting to SQLite in the data dir.
    pub fn datastore_url(&self) -> String {
        if self.datastore.url.is_empty() {
            format!(
                "sqlite://{}",
                self.data_dir.join("datastore.sqlite3").display()
            )
        } else {
            self.datastore.url.clone()
        }
    }

    /// A commented default configuration.
    pub fn default_toml() -> String {
        let d = Self::default();
        format!(
            r#"# Tessera server configuration. Every key is optional; shown are the defaults.

# The trust domain this server is the authority of.
trust_domain = "{td}"
# CA keys (mode 0600), the SQLite database and the audit log.
data_dir = "{data_dir}"
# Agent API: gRPC over mutual TLS (agents present their agent SVID).
bind_address = "{bind}"
# Admin API: gRPC on a Unix socket, mode 0600; being able to connect is the authorization.
admin_socket = "{admin}"
# Optionally the admin API over mTLS too, for SVIDs of entries created with --admin true.
# admin_bind_address = "127.0.0.1:8082"
# /live, /ready and /metrics (Prometheus).
health_bind_address = "{health}"
log_level = "{log}"

[datastore]
# "sqlite:///path/file.sqlite3" or "postgres://user@host/db". Empty: SQLite in data_dir.
url = ""

[ca]
# Each CA lives this long; the next is prepared at half-life and activated at 1/6 remaining.
ttl = "{ca_ttl}"
key_type = "ec-p256"

[svid]
default_x509_ttl = "{x509}"
default_jwt_ttl = "{jwt}"
agent_ttl = "{agent}"

[node_attestation.join_token]
default_ttl = "{token}"

[node_attestation.x509pop]
# PEM CA certificates that node certificates must chain to; unset disables x509pop.
# ca_bundle_path = "/etc/tessera/node-ca.pem"

# An external PKI: the server's CA becomes an intermediate signed by this CA certificate and key,
# and the trust bundle publishes the upstream root(s). Unset: self-signed CAs.
# [upstream_authority.disk]
# cert_chain_path = "/etc/tessera/upstream-chain.pem"   # signing CA (+ intermediates to the root)
# key_path = "/etc/tessera/upstream-key.pem"            # its PKCS#8 key
# bundle_path = "/etc/tessera/upstream-root.pem"        # the root(s)
[bundle_endpoint]
# HTTPS endpoint serving this trust domain's bundle (SPIFFE bundle JSON) to federated trust
# domains. Unset: off.
# bind_address = "0.0.0.0:8443"
# "https_spiffe": served with the server's X509-SVID; "https_web": with cert_path/key_path.
profile = "https_spiffe"
# cert_path = "/etc/tessera/bundle-endpoint.pem"
# key_path = "/etc/tessera/bundle-endpoint.key"
# spiffe_refresh_hint served with the bundle.
refresh_hint = "5m"

[federation]
# Federated bundles are fetched at their spiffe_refresh_hint, kept within these bounds.
refresh_floor = "30s"
refresh_ceiling = "1h"
# For bundles without a refresh hint.
default_refresh = "5m"
fetch_timeout = "10s"

[policy]
# What a workload with no ALLOW policy decides: "deny" or "allow". Pushed with the policies.
default = "deny"

# A policy set owned by an external access-control system: the source is the source of truth
# for the policies named "<set>/<name>" (created, updated and deleted to match; an invalid
# document is refused whole and the last good set stays). `tessera policy sync status`.
# [[policy.sync]]
# set = "central"
# url = "https://pap.example:8443/policies"   # or: directory = "/etc/tessera/policies.d"
# ca_file = "/etc/tessera/pap-ca.pem"         # or: spiffe_id = "spiffe://example.org/pap"
# interval = "30s"
"#,
            td = d.trust_domain,
            data_dir = d.data_dir.display(),
            bind = d.bind_address,
            admin = d.admin_socket.display(),
            health = d.health_bind_address,
            log = d.log_level,
            ca_ttl = d.ca.ttl,
            x509 = d.svid.default_x509_ttl,
            jwt = d.svid.default_jwt_ttl,
            agent = d.svid.agent_ttl,
            token = d.node_attestation.join_token.default_ttl,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_print() {
        for (s, v) in [
            ("90s", 90),
            ("5m", 300),
            ("1h", 3600),
            ("1h30m", 5400),
            ("7d", 604_800),
        ] {
            assert_eq!(s.parse::<Secs>().unwrap(), Secs(v), "{s}");
        }
        for bad in ["", "5", "m", "5x", "1h5", "-1s", "99999999999999999999s"] {
            assert!(bad.parse::<Secs>().is_err(), "{bad:?}");
        }
        assert_eq!(Secs(5400).to_string(), "90m");
        assert_eq!(Secs(3600).to_string(), "1h");
    }

    #[test]
    fn default_config_parses_to_the_defaults() {
        let cfg = ServerConfig::parse(&ServerConfig::default_toml(), "default").unwrap();
        assert_eq!(cfg.trust_domain.as_str(), "example.org");
        assert_eq!(cfg.ca.ttl, Secs(86_400));
        assert!(cfg.upstream_authority.disk.is_none());
        assert_eq!(cfg.policy.default, tessera_policy::DefaultAction::Deny);
        let open = ServerConfig::parse("[policy]\ndefault = \"allow\"", "t.toml").unwrap();
        assert_eq!(open.policy.default, tessera_policy::DefaultAction::Allow);
        assert!(cfg.policy.sync.is_empty());
        let synced = ServerConfig::parse(
            "[[policy.sync]]\nset = \"central\"\nurl = \"http://127.0.0.1:9/p\"\ninterval = \"5s\"",
            "t.toml",
        )
        .unwrap();
        assert_eq!(synced.policy.sync[0].interval, Secs(5));
        let up = ServerConfig::parse(
            "[upstream_authority.disk]\ncert_chain_path = \"/c.pem\"\nkey_path = \"/k.pem\"",
            "t.toml",
        )
        .unwrap();
        let disk = up.upstream_authority.disk.unwrap();
        assert_eq!(disk.key_path, PathBuf::from("/k.pem"));
        assert!(disk.bundle_path.is_none());
        assert!(
            cfg.datastore_url()
                .ends_with("/var/lib/tessera/server/datastore.sqlite3")
        );
    }

    #[test]
    fn bad_config_names_the_key() {
        for (text, want) in [
            ("trust_domain = \"Example.org\"", "trust_domain"),
            ("bogus = 1", "unknown field `bogus`"),
            ("[ca]\nttl = \"soon\"", "duration \"soon\""),
            ("[ca]\nkey_type = \"rsa\"", "ca.key_type"),
            (
                "[svid]\nagent_ttl = \"48h\"",
                "svid.agent_ttl 48h: must be shorter than ca.ttl 24h",
            ),
            ("admin_socket = \"rel.sock\"", "admin_socket rel.sock"),
            ("bind_address = \"nowhere\"", "bind_address"),
            (
                "[bundle_endpoint]\nbind_address = \"127.0.0.1:0\"\nprofile = \"https_web\"",
                "needs cert_path and key_path",
            ),
            (
                "[bundle_endpoint]\ncert_path = \"/x.pem\"",
                "cert_path/key_path are for profile",
            ),
            (
                "[bundle_endpoint]\nprofile = \"http\"",
                "unknown variant `http`",
            ),
            (
                "[federation]\nrefresh_floor = \"2h\"",
                "refresh_floor 2h is longer than federation.refresh_ceiling 1h",
            ),
            ("[ca]\nttl = \"30s\"", "ca.ttl 30s: must be at least 1m"),
            (
                "[upstream_authority.disk]\ncert_chain_path = \"/a.pem\"",
                "missing field `key_path`",
            ),
            ("[policy]\ndefault = \"open\"", "unknown variant `open`"),
            (
                "[[policy.sync]]\nset = \"central\"\nurl = \"http://pap.example/p\"",
                "policy.sync[0]: url: \"http://pap.example/p\": plain http is allowed only to a loopback address",
            ),
            (
                "[[policy.sync]]\nset = \"c\"\ndirectory = \"/d\"\n[[policy.sync]]\nset = \"c\"\ndirectory = \"/e\"",
                "policy.sync[1].set \"c\": two sources own this set",
            ),
            (
                "[[policy.sync]]\nset = \"c\"\ndirectory = \"/d\"\ninterval = \"soon\"",
                "duration \"soon\"",
            ),
            (
                "[[policy.sync]]\nset = \"c\"\nbogus = 1",
                "unknown field `bogus`",
            ),
            (
                "[upstream_authority.vault]\nurl = \"x\"",
                "unknown field `vault`",
            ),
        ] {
            let err = ServerConfig::parse(text, "t.toml").unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
    }
}
