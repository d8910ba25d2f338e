//! Proxy configuration: flags (`--inbound`, `--outbound`) and the proxy config file (TOML) with the
//! destination map used in transparent mode. Pure parsing; every error names the input.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use tessera_spiffe::SpiffeId;

/// The HBONE convention: the peer proxy's mTLS tunnel port.
pub const TUNNEL_PORT: u16 = tessera_policy::destination::TUNNEL_PORT;
/// Transparent mode: where redirected outbound TCP lands.
pub const OUTBOUND_CAPTURE_PORT: u16 = 15001;
/// Transparent mode: where redirected inbound plaintext TCP lands (refused in STRICT mode).
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// The socket mark of the proxy's own connections, exempted from interception.
pub const DEFAULT_MARK: u32 = 0x5e55;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {message}")]
pub struct ConfigError {
    pub what: String,
    pub message: String,
}

fn err(what: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        what: what.into(),
        message: message.into(),
    }
}

/// What an inbound port speaks (`--inbound 8080:http`); `http` is recorded for the later HTTP
/// policy fields and proxied as TCP today.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Http,
}

/// A port of this workload reachable through the tunnel (`--inbound PORT[:http]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboundPort {
    pub port: u16,
    pub protocol: Protocol,
}

impl std::str::FromStr for InboundPort {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let what = || format!("--inbound {s:?}");
        let (port, protocol) = match s.split_once(':') {
            None => (s, Protocol::Tcp),
            Some((p, "http")) => (p, Protocol::Http),
            Some((p, "tcp")) => (p, Protocol::Tcp),
            Some((_, other)) => {
                return Err(err(
                    what(),
                    format!("unknown protocol {other:?} (expected tcp or http)"),
                ));
            }
        };
        let port: u16 = port
            .parse()
            .map_err(|_| err(what(), "expected PORT or PORT:http with PORT in 1..=65535"))?;
        if port == 0 {
            return Err(err(what(), "port 0 is not a port"));
        }
        Ok(Self { port, protocol })
    }
}

/// An explicit outbound listener (`--outbound LISTEN=HOST:PORT,SPIFFE_ID`): connections to
/// LISTEN go through the tunnel to HOST:PORT, whose proxy must prove SPIFFE_ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundListener {
    pub listen: SocketAddr,
    /// `host:port`; resolved at each connection.
    pub destination: String,
    pub spiffe_id: SpiffeId,
}

impl std::str::FromStr for OutboundListener {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let what = || format!("--outbound {s:?}");
        let (listen, rest) = s
            .split_once('=')
            .ok_or_else(|| err(what(), "expected LISTEN=HOST:PORT,SPIFFE_ID"))?;
        let listen: SocketAddr = listen
            .parse()
            .map_err(|e| err(what(), format!("listen address {listen:?}: {e}")))?;
        let (destination, id) = rest
            .split_once(',')
            .ok_or_else(|| err(what(), "expected LISTEN=HOST:PORT,SPIFFE_ID"))?;
        let (host, port) = destination
            .rsplit_once(':')
            .ok_or_else(|| err(what(), format!("destination {destination:?} has no :PORT")))?;
        if host.is_empty() || !matches!(port.parse::<u16>(), Ok(p) if p != 0) {
            return Err(err(
                what(),
                format!("destination {destination:?}: expected HOST:PORT"),
            ));
        }
        let spiffe_id =
            SpiffeId::parse(id).map_err(|e| err(what(), format!("SPIFFE ID {id:?}: {e}")))?;
        Ok(Self {
            listen,
            destination: destination.to_owned(),
            spiffe_id,
        })
    }
}

/// An IPv4 or IPv6 network (`198.18.0.0/15`, `2001:2::/48`, or one address): the same type
/// as policy's address conditions.
pub use tessera_policy::IpNet as Cidr;

/// The destination map and its entries: one module (in `tessera-policy`) parses and checks
/// them for the config file and for the server, which pushes them.
pub use tessera_policy::destination::{Destination, DestinationDoc, DestinationMap};

/// What transparent mode does with a destination that has no `[[destination]]` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unmapped {
    /// Refuse the connection (the default: no identity to expect means no way to authenticate).
    #[default]
    Deny,
    /// Connect directly in plaintext, logged at warn.
    Passthrough,
}

/// Inbound mode in transparent mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InboundMode {
    /// Only mutual TLS through the tunnel port.
    #[default]
    Strict,
    /// Also plaintext to declared ports, without identity, where policy allows unauthenticated
    /// callers (`from.unauthenticated`; migration only; logged loudly).
    Permissive,
}

/// The proxy config file (TOML).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    destination: Vec<DestinationDoc>,
    #[serde(default)]
    unmapped: Option<Unmapped>,
    #[serde(default)]
    inbound_mode: Option<InboundMode>,
    #[serde(default)]
    policy_file: Option<PathBuf>,
    /// External authorizers for CUSTOM policies.
    #[serde(default)]
    authz_provider: Vec<crate::authz::ProviderConfig>,
}

/// What the config file contributes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileConfig {
    pub destinations: DestinationMap,
    pub unmapped: Option<Unmapped>,
    pub inbound_mode: Option<InboundMode>,
    pub policy_file: Option<PathBuf>,
    pub authz_providers: Vec<crate::authz::ProviderConfig>,
}

/// Parses the proxy config file; `name` is the file's path for error messages.
pub fn parse_file(name: &str, text: &str) -> Result<FileConfig, ConfigError> {
    let f: File = toml::from_str(text).map_err(|e| err(name, e.to_string()))?;
    let mut entries = Vec::with_capacity(f.destination.len());
    for (i, d) in f.destination.iter().enumerate() {
        let d = d
            .check()
            .map_err(|e| err(format!("{name}: destination[{i}].{}", e.field), e.message))?;
        entries.push((format!("destination[{i}]"), d));
    }
    // Two entries for the same network and a port in common would make the expected identity
    // depend on their order in the file: refused.
    let destinations = DestinationMap::build(entries)
        .map_err(|e| err(format!("{name}: {}.cidr", e.second), e.to_string()))?;
    Ok(FileConfig {
        destinations,
        unmapped: f.unmapped,
        inbound_mode: f.inbound_mode,
        policy_file: f.policy_file,
        authz_providers: f.authz_provider,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn inbound_ports() {
        assert_eq!(
            "8080".parse::<InboundPort>().unwrap(),
            InboundPort {
                port: 8080,
                protocol: Protocol::Tcp
            }
        );
        assert_eq!(
            "80:http".parse::<InboundPort>().unwrap().protocol,
            Protocol::Http
        );
        for bad in ["0", "x", "80:udp", "", "70000"] {
            let e = bad.parse::<InboundPort>().unwrap_err();
            assert!(e.what.contains(bad), "{e}");
        }
    }

    #[test]
    fn outbound_listeners() {
        let o: OutboundListener = "127.0.0.1:9000=bar.example:8080,spiffe://example.org/bar"
            .parse()
            .unwrap();
        assert_eq!(o.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(o.destination, "bar.example:8080");
        assert_eq!(o.spiffe_id.as_str(), "spiffe://example.org/bar");
        for bad in [
            "127.0.0.1:9000",
            "127.0.0.1:9000=bar:8080",
            "nope=bar:8080,spiffe://example.org/bar",
            "127.0.0.1:9000=bar,spiffe://example.org/bar",
            "127.0.0.1:9000=bar:0,spiffe://example.org/bar",
            "127.0.0.1:9000=bar:80,https://example.org/bar",
        ] {
            assert!(bad.parse::<OutboundListener>().is_err(), "{bad}");
        }
    }

    #[test]
    fn cidrs() {
        let c: Cidr = "198.18.0.0/15".parse().unwrap();
        assert!(c.contains("198.19.255.1".parse().unwrap()));
        assert!(!c.contains("198.20.0.1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        assert!("198.18.0.1/15".parse::<Cidr>().is_err());
        assert!("198.18.0.0/33".parse::<Cidr>().is_err());
        let v6: Cidr = "2001:2::/48".parse().unwrap();
        assert!(v6.contains("2001:2:0:ff::1".parse().unwrap()));
        assert!(!v6.contains("2001:3::1".parse().unwrap()));
        assert!(
            !v6.contains("198.18.0.1".parse().unwrap()),
            "one family only"
        );
        assert!(!all.contains("::1".parse().unwrap()));
        assert_eq!(v6.to_string(), "2001:2::/48");
        assert!("2001:2::1/48".parse::<Cidr>().is_err());
        assert!("2001:2::/129".parse::<Cidr>().is_err());
    }

    #[test]
    fn destination_file() {
        let f = parse_file(
            "p.toml",
            r#"
unmapped = "passthrough"
[[destination]]
cidr = "198.18.0.0/15"
spiffe_id = "spiffe://example.org/any"
[[destination]]
cidr = "198.18.0.2"
ports = [8080]
spiffe_id = "spiffe://example.org/bar"
"#,
        )
        .unwrap();
        assert_eq!(f.unmapped, Some(Unmapped::Passthrough));
        let m = &f.destinations;
        let bar = m.lookup("198.18.0.2:8080".parse().unwrap()).unwrap();
        assert_eq!(bar.spiffe_id.as_str(), "spiffe://example.org/bar");
        let other = m.lookup("198.18.0.2:9090".parse().unwrap()).unwrap();
        assert_eq!(other.spiffe_id.as_str(), "spiffe://example.org/any");
        assert!(m.lookup("10.0.0.1:80".parse().unwrap()).is_none());

        let e = parse_file(
            "p.toml",
            "[[destination]]\ncidr = \"1.2.3.4\"\nspiffe_id = \"spiffe://x/y\"\n[[destination]]\ncidr = \"1.2.3.4/40\"\nspiffe_id = \"spiffe://x/y\"\n",
        )
        .unwrap_err();
        assert_eq!(e.what, "p.toml: destination[1].cidr");
        let e = parse_file(
            "p.toml",
            "[[destination]]\ncidr = \"1.2.3.4\"\nspiffe_id = \"spiffe://x\"\n",
        )
        .unwrap_err();
        assert_eq!(e.what, "p.toml: destination[0].spiffe_id");
        assert!(parse_file("p.toml", "destinations = []").is_err());
    }

    #[test]
    fn a_port_specific_entry_wins_over_the_same_network_for_every_port() {
        // Listed after the every-port entry, with the same prefix: still the more specific.
        let f = parse_file(
            "p.toml",
            r#"
[[destination]]
cidr = "10.0.0.0/24"
spiffe_id = "spiffe://example.org/tier"
[[destination]]
cidr = "10.0.0.0/24"
ports = [5432]
spiffe_id = "spiffe://example.org/db"
"#,
        )
        .unwrap();
        let m = &f.destinations;
        let db = m.lookup("10.0.0.7:5432".parse().unwrap()).unwrap();
        assert_eq!(db.spiffe_id.as_str(), "spiffe://example.org/db");
        let tier = m.lookup("10.0.0.7:80".parse().unwrap()).unwrap();
        assert_eq!(tier.spiffe_id.as_str(), "spiffe://example.org/tier");
        // The same network and port twice is ambiguous, whatever the order.
        for (ports_a, ports_b, what) in [
            ("", "", "every port"),
            ("ports = [80, 5432]\n", "ports = [5432]\n", "port 5432"),
        ] {
            let e = parse_file(
                "p.toml",
                &format!(
                    "[[destination]]\ncidr = \"10.0.0.0/24\"\n{ports_a}spiffe_id = \"spiffe://example.org/a\"\n[[destination]]\ncidr = \"10.0.0.0/24\"\n{ports_b}spiffe_id = \"spiffe://example.org/b\"\n"
                ),
            )
            .unwrap_err();
            assert_eq!(e.what, "p.toml: destination[1].cidr");
            assert!(e.to_string().contains(what), "{e}");
            assert!(e.to_string().contains("destination[0]"), "{e}");
        }
    }
}
