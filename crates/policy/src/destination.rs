//! The destination map of transparent interception: which SPIFFE ID must answer at an original
//! destination (network and ports), and where its proxy's tunnel listens.
//!
//! One place parses and checks a destination, whether it comes from a proxy's config file
//! (`[[destination]]`) or from the server (`tessera destination ...`, pushed to every agent and
//! from there to proxies): an entry the server accepts is one every proxy accepts, and a map
//! is built by one function that refuses ambiguity. Pure: no I/O.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use tessera_spiffe::SpiffeId;

use crate::IpNet;

/// The HBONE convention: the peer proxy's mutual-TLS tunnel port.
pub const TUNNEL_PORT: u16 = 15008;

/// Longest stored destination document, in bytes (a few hundred is typical; ports are the only
/// list).
pub const MAX_DOCUMENT_LEN: usize = 64 * 1024;

/// One destination: who must answer at these addresses and ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub cidr: IpNet,
    /// Empty: every port.
    pub ports: Vec<u16>,
    pub spiffe_id: SpiffeId,
    /// The peer proxy's tunnel port (default 15008).
    pub tunnel_port: u16,
}

/// A destination as written: the `[[destination]]` table of a proxy config file, and the JSON
/// document the server stores.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationDoc {
    pub cidr: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    pub spiffe_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_port: Option<u16>,
}

/// What is wrong with a destination: the field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct DestinationError {
    pub field: String,
    pub message: String,
}

fn bad(field: &str, message: impl Into<String>) -> DestinationError {
    DestinationError {
        field: field.to_owned(),
        message: message.into(),
    }
}

/// A destination's name on the server: 1 to 256 letters, digits, `.`, `_`, `-` or `/` (as a
/// policy's).
pub fn validate_name(name: &str) -> Result<(), DestinationError> {
    crate::validate_name(name)
        .map(|_| ())
        .map_err(|e| bad("name", format!("{name:?}: {}", e.message)))
}

impl DestinationDoc {
    /// Checks every field.
    pub fn check(&self) -> Result<Destination, DestinationError> {
        let cidr: IpNet = self.cidr.parse().map_err(|e: String| bad("cidr", e))?;
        if self.ports.contains(&0) {
            return Err(bad("ports", "port 0 is not a port"));
        }
        let spiffe_id = SpiffeId::parse(&self.spiffe_id)
            .map_err(|e| bad("spiffe_id", format!("{:?}: {e}", self.spiffe_id)))?;
        // The map says which workload must prove itself at the destination; a trust domain's
        // ID (no path) names no workload (SPIFFE-ID §2.2: the ID of the trust domain itself).
        if spiffe_id.is_root() {
            return Err(bad("spiffe_id", "a trust domain is not a workload ID"));
        }
        let tunnel_port = match self.tunnel_port {
            Some(0) => return Err(bad("tunnel_port", "port 0 is not a port")),
            Some(p) => p,
            None => TUNNEL_PORT,
        };
        let mut ports = self.ports.clone();
        ports.sort_unstable();
        ports.dedup();
        Ok(Destination {
            cidr,
            ports,
            spiffe_id,
            tunnel_port,
        })
    }

    /// A stored JSON document, checked.
    pub fn from_json(json: &str) -> Result<Destination, DestinationError> {
        if json.len() > MAX_DOCUMENT_LEN {
            return Err(bad(
                "document",
                format!("at most {MAX_DOCUMENT_LEN} bytes are allowed"),
            ));
        }
        let doc: DestinationDoc =
            crate::from_json_at(json).map_err(|(field, msg)| bad(&field, msg))?;
        doc.check()
    }
}

/// The destinations of a YAML or JSON file (`tessera destination create|apply -f`): one mapping
/// (`name` and a document's fields) or a list of them. Each is checked, no name is used twice,
/// and together they must make an unambiguous map, as the server would refuse the second of two
/// that claim one address and port. The first error names the entry and the field.
pub fn parse_documents(text: &str) -> Result<Vec<(String, Destination)>, DestinationError> {
    let named = crate::named_documents(
        text,
        "destination",
        crate::validate_name,
        crate::Empty::Allowed,
    )
    .map_err(|e| bad(&format!("{}.{}", e.policy, e.field), e.message))?;
    let mut out = Vec::with_capacity(named.len());
    for (name, json) in named {
        let d = DestinationDoc::from_json(&json)
            .map_err(|e| bad(&format!("{name}.{}", e.field), e.message))?;
        out.push((name, d));
    }
    DestinationMap::build(out.iter().map(|(n, d)| (format!("{n:?}"), d.clone())))
        .map_err(|e| bad("(file)", e.to_string()))?;
    Ok(out)
}

impl Destination {
    /// The canonical JSON document (what the server stores and pushes).
    pub fn to_json(&self) -> String {
        let doc = DestinationDoc {
            cidr: self.cidr.to_string(),
            ports: self.ports.clone(),
            spiffe_id: self.spiffe_id.to_string(),
            tunnel_port: (self.tunnel_port != TUNNEL_PORT).then_some(self.tunnel_port),
        };
        serde_json::to_string(&doc).unwrap_or_default()
    }

    /// What `self` and `other` both cover, when they would make the expected identity of an
    /// address and port depend on their order: the same network and a port in common (or both
    /// for every port). Different networks never overlap this way: the longest prefix wins.
    pub fn overlap(&self, other: &Destination) -> Option<String> {
        if self.cidr != other.cidr {
            return None;
        }
        if self.ports.is_empty() && other.ports.is_empty() {
            return Some("every port".to_owned());
        }
        self.ports
            .iter()
            .find(|p| other.ports.contains(p))
            .map(|p| format!("port {p}"))
    }
}

/// Two entries of a map that claim one address and port.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{cidr} for {what} is mapped by both {first} and {second}; one address and port has one expected identity"
)]
pub struct Ambiguous {
    /// The label of the entry that came first.
    pub first: String,
    /// The label of the entry that repeats it.
    pub second: String,
    pub cidr: IpNet,
    /// "port 80" or "every port".
    pub what: String,
}

/// Original destination → expected identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DestinationMap {
    /// Most specific first: the longest prefix, and among equal prefixes the entries that
    /// name ports before those for every port. The first match wins. Each entry keeps its
    /// label, so a merge can name what clashes.
    entries: Vec<(String, Destination)>,
    /// The same order, indexed: one table per (family, prefix length), longest first, from a
    /// network's address bits to its entries' positions. A lookup costs one hash lookup per
    /// prefix length in use, not a scan of every entry: the server's map may hold a whole
    /// trust domain's services, and it is read on every intercepted connection.
    index: Vec<PrefixTable>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct PrefixTable {
    v4: bool,
    prefix: u8,
    networks: std::collections::HashMap<u128, Vec<usize>>,
}

impl DestinationMap {
    /// A map of entries known not to overlap (tests), labelled by position.
    pub fn new(entries: Vec<Destination>) -> Self {
        Self::sorted(
            entries
                .into_iter()
                .enumerate()
                .map(|(i, d)| (format!("#{i}"), d))
                .collect(),
        )
    }

    fn sorted(mut entries: Vec<(String, Destination)>) -> Self {
        entries.sort_by_key(|(_, d)| (std::cmp::Reverse(d.cidr.prefix()), d.ports.is_empty()));
        let mut index: Vec<PrefixTable> = Vec::new();
        for (i, (_, d)) in entries.iter().enumerate() {
            let (v4, prefix, bits) = d.cidr.key();
            // Sorted by prefix length: a family's table for this length, if any, is among the
            // last ones made (the other family's may sit between).
            let pos = match index.iter().rposition(|t| t.v4 == v4 && t.prefix == prefix) {
                Some(p) => p,
                None => {
                    index.push(PrefixTable {
                        v4,
                        prefix,
                        networks: std::collections::HashMap::new(),
                    });
                    index.len() - 1
                }
            };
            index[pos].networks.entry(bits).or_default().push(i);
        }
        Self { entries, index }
    }

    /// A map of labelled entries (a file's `destination[3]`, the server's `destination "db"`),
    /// refused when two overlap ([`Destination::overlap`]): the expected identity of an address
    /// must not depend on the order entries were written or pushed in.
    pub fn build<L: std::fmt::Display>(
        entries: impl IntoIterator<Item = (L, Destination)>,
    ) -> Result<Self, Ambiguous> {
        // Grouped by network: only entries of one network can overlap.
        let mut by_net: std::collections::HashMap<IpNet, Vec<usize>> =
            std::collections::HashMap::new();
        let mut out: Vec<(String, Destination)> = Vec::new();
        for (label, d) in entries {
            let label = label.to_string();
            let same = by_net.entry(d.cidr).or_default();
            for i in same.iter() {
                let (first, e) = &out[*i];
                if let Some(what) = e.overlap(&d) {
                    return Err(Ambiguous {
                        first: first.clone(),
                        second: label,
                        cidr: d.cidr,
                        what,
                    });
                }
            }
            same.push(out.len());
            out.push((label, d));
        }
        Ok(Self::sorted(out))
    }

    /// The entries of both maps (a proxy's config file and the server's map), refused as
    /// [`Self::build`] refuses: an entry of one may not claim an address and port of the other.
    pub fn merge(&self, other: &DestinationMap) -> Result<Self, Ambiguous> {
        Self::build(self.entries.iter().chain(&other.entries).cloned())
    }

    /// The entry for an original destination: the longest prefix containing its address with
    /// an entry for its port (an entry naming the port before one for every port).
    pub fn lookup(&self, dst: SocketAddr) -> Option<&Destination> {
        let ip = dst.ip();
        self.index.iter().find_map(|t| {
            let key = IpNet::key_of(ip, t.v4, t.prefix)?;
            t.networks.get(&key)?.iter().find_map(|i| {
                let d = &self.entries[*i].1;
                (d.ports.is_empty() || d.ports.contains(&dst.port())).then_some(d)
            })
        })
    }

    /// [`Self::lookup`] by scanning every entry in order: what the index must agree with
    /// (tests), and the baseline of its benchmark.
    #[doc(hidden)]
    pub fn lookup_by_scan(&self, dst: SocketAddr) -> Option<&Destination> {
        let ip = dst.ip();
        self.entries
            .iter()
            .map(|(_, d)| d)
            .find(|d| d.cidr.contains(ip) && (d.ports.is_empty() || d.ports.contains(&dst.port())))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn doc(cidr: &str, ports: &[u16], id: &str) -> DestinationDoc {
        DestinationDoc {
            cidr: cidr.into(),
            ports: ports.to_vec(),
            spiffe_id: id.into(),
            tunnel_port: None,
        }
    }

    #[test]
    fn every_field_is_checked_and_named() {
        let cases = [
            (doc("1.2.3.4/40", &[], "spiffe://x/y"), "cidr"),
            (doc("1.2.3.5/24", &[], "spiffe://x/y"), "cidr"),
            (doc("db.example", &[], "spiffe://x/y"), "cidr"),
            (doc("1.2.3.4", &[80, 0], "spiffe://x/y"), "ports"),
            (doc("1.2.3.4", &[], "spiffe://x"), "spiffe_id"),
            (doc("1.2.3.4", &[], "http://x/y"), "spiffe_id"),
            (
                DestinationDoc {
                    tunnel_port: Some(0),
                    ..doc("1.2.3.4", &[], "spiffe://x/y")
                },
                "tunnel_port",
            ),
        ];
        for (d, field) in cases {
            assert_eq!(d.check().unwrap_err().field, field, "{d:?}");
        }
        let e =
            DestinationDoc::from_json(r#"{"cidr":"1.2.3.4","spiffe_id":"spiffe://x/y","port":1}"#)
                .unwrap_err();
        assert_eq!(e.field, "port");
        assert!(e.message.contains("unknown field `port`"), "{e}");
        assert!(DestinationDoc::from_json(&" ".repeat(MAX_DOCUMENT_LEN + 1)).is_err());
    }

    #[test]
    fn json_round_trips_in_canonical_form() {
        let d = DestinationDoc::from_json(
            r#"{"cidr":"198.18.0.0/24","ports":[8443,80,80],"spiffe_id":"spiffe://example.org/db","tunnel_port":15008}"#,
        )
        .unwrap();
        assert_eq!(d.ports, vec![80, 8443]);
        let json = d.to_json();
        assert_eq!(
            json,
            r#"{"cidr":"198.18.0.0/24","ports":[80,8443],"spiffe_id":"spiffe://example.org/db"}"#
        );
        assert_eq!(DestinationDoc::from_json(&json).unwrap(), d);
    }

    /// The index answers as a scan of the ordered entries does, over many maps of nested and
    /// disjoint networks of both families, with and without ports.
    #[test]
    fn the_index_agrees_with_a_scan() {
        // A small deterministic generator (no dependency): xorshift.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..200 {
            let mut entries = Vec::new();
            for i in 0..next(40) {
                let v4 = next(3) != 0;
                let (cidr, prefix_max) = if v4 {
                    (format!("10.{}.{}.{}", next(2), next(3), next(4)), 32)
                } else {
                    (format!("2001:db8::{:x}", next(6)), 128)
                };
                let prefix = prefix_max - [0, 1, 2, 8, 16, 24][usize::try_from(next(6)).unwrap()];
                let ip: std::net::IpAddr = cidr.parse().unwrap();
                // The network of that prefix containing `ip` (host bits cleared).
                let net = IpNet::key_of(ip, v4, prefix).unwrap();
                let addr: std::net::IpAddr = if v4 {
                    std::net::Ipv4Addr::from(u32::try_from(net).unwrap()).into()
                } else {
                    std::net::Ipv6Addr::from(net).into()
                };
                let ports: Vec<u16> = (0..next(3))
                    .map(|_| 80 + u16::try_from(next(3)).unwrap())
                    .collect();
                let d = doc(
                    &format!("{addr}/{prefix}"),
                    &ports,
                    &format!("spiffe://example.org/w{i}"),
                )
                .check()
                .unwrap();
                entries.push((format!("e{i}"), d));
            }
            // Keep what builds (overlapping pairs are refused), one at a time.
            let mut kept: Vec<(String, Destination)> = Vec::new();
            for e in entries {
                let mut with = kept.clone();
                with.push(e);
                if DestinationMap::build(with.clone()).is_ok() {
                    kept = with;
                }
            }
            let m = DestinationMap::build(kept).unwrap();
            for _ in 0..50 {
                let ip = if next(3) != 0 {
                    format!("10.{}.{}.{}", next(2), next(3), next(300) % 256)
                } else {
                    format!("[2001:db8::{:x}]", next(300))
                };
                let dst: SocketAddr = format!("{ip}:{}", 79 + next(4)).parse().unwrap();
                assert_eq!(m.lookup(dst), m.lookup_by_scan(dst), "{dst} in {m:?}");
            }
            // IPv4-mapped IPv6 destinations find IPv4 entries, as the scan does.
            let mapped: SocketAddr = "[::ffff:10.0.0.0]:80".parse().unwrap();
            assert_eq!(m.lookup(mapped), m.lookup_by_scan(mapped));
        }
    }

    #[test]
    fn a_file_of_destinations_is_checked_whole() {
        let yaml = "- name: db\n  cidr: 198.18.0.7\n  ports: [5432]\n  spiffe_id: spiffe://example.org/db\n- name: web\n  cidr: 198.18.1.0/24\n  spiffe_id: spiffe://example.org/web\n  tunnel_port: 15009\n";
        let ds = parse_documents(yaml).unwrap();
        assert_eq!(
            ds.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            ["db", "web"]
        );
        assert_eq!(
            ds[0].1.to_json(),
            r#"{"cidr":"198.18.0.7/32","ports":[5432],"spiffe_id":"spiffe://example.org/db"}"#
        );
        assert_eq!(ds[1].1.tunnel_port, 15009);
        // One, as JSON.
        let one = parse_documents(
            r#"{"name":"db","cidr":"198.18.0.7","spiffe_id":"spiffe://example.org/db"}"#,
        )
        .unwrap();
        assert_eq!(one.len(), 1);
        for (text, field) in [
            (
                "- cidr: 198.18.0.7\n  spiffe_id: spiffe://example.org/db\n",
                "#0.name",
            ),
            (
                "- name: db\n  cidr: 198.18.0.0/8\n  spiffe_id: spiffe://example.org/db\n",
                "db.cidr",
            ),
            (
                "- name: db\n  cidr: 198.18.0.7\n  spiffe_id: spiffe://example.org/db\n  colour: red\n",
                "db.colour",
            ),
            (
                "- name: db\n  cidr: 198.18.0.7\n  ports: [0]\n  spiffe_id: spiffe://example.org/db\n",
                "db.ports",
            ),
            (
                "- name: db\n  cidr: 198.18.0.7\n  spiffe_id: spiffe://example.org\n",
                "db.spiffe_id",
            ),
            (
                "- name: \"bad name\"\n  cidr: 198.18.0.7\n  spiffe_id: spiffe://example.org/db\n",
                "bad name.name",
            ),
            (
                "- name: a\n  cidr: 198.18.0.7\n  spiffe_id: spiffe://example.org/a\n- name: a\n  cidr: 198.18.0.8\n  spiffe_id: spiffe://example.org/b\n",
                "a.name",
            ),
            (
                "- name: a\n  cidr: 198.18.0.7\n  ports: [80]\n  spiffe_id: spiffe://example.org/a\n- name: b\n  cidr: 198.18.0.7/32\n  ports: [80, 81]\n  spiffe_id: spiffe://example.org/b\n",
                "(file)",
            ),
            (
                "- name: db\n  cidr: \"::ffff:198.18.0.9\"\n  spiffe_id: spiffe://example.org/db\n",
                "db.cidr",
            ),
            // A wrong type names its field (before: `db.document`).
            (
                "- name: db\n  cidr: 198.18.0.7\n  spiffe_id: spiffe://example.org/db\n  tunnel_port: 99999\n",
                "db.tunnel_port",
            ),
            (
                "- name: db\n  cidr: 198.18.0.7\n  ports: \"80\"\n  spiffe_id: spiffe://example.org/db\n",
                "db.ports",
            ),
            ("42", "(document).document"),
            ("{not json", "(document).document"),
        ] {
            let e = parse_documents(text).unwrap_err();
            assert_eq!(e.field, field, "{text}: {e}");
        }
        let e = parse_documents(
            "name: db\ncidr: \"::ffff:198.18.0.9/128\"\nspiffe_id: spiffe://example.org/db\n",
        )
        .unwrap_err();
        assert!(
            e.message.ends_with(
                "an IPv4-mapped IPv6 address; write the IPv4 address (198.18.0.9) instead"
            ),
            "{e}"
        );
        // The ambiguity names both entries.
        let e = parse_documents("- name: a\n  cidr: 198.18.0.7\n  spiffe_id: spiffe://example.org/a\n- name: b\n  cidr: 198.18.0.7\n  spiffe_id: spiffe://example.org/b\n").unwrap_err();
        assert!(
            e.message.contains(r#""a""#) && e.message.contains(r#""b""#),
            "{e}"
        );
    }

    #[test]
    fn build_refuses_two_entries_for_one_address_and_port() {
        let d = |cidr: &str, ports: &[u16], id: &str| doc(cidr, ports, id).check().unwrap();
        let e = DestinationMap::build([
            ("a", d("10.0.0.0/24", &[80, 443], "spiffe://example.org/a")),
            ("b", d("10.0.0.0/24", &[8080], "spiffe://example.org/b")),
            ("c", d("10.0.0.0/24", &[443], "spiffe://example.org/a")),
        ])
        .unwrap_err();
        assert_eq!((e.first.as_str(), e.second.as_str()), ("a", "c"));
        assert_eq!(e.what, "port 443");
        let e = DestinationMap::build([
            ("a", d("10.0.0.0/24", &[], "spiffe://example.org/a")),
            ("b", d("10.0.0.0/24", &[], "spiffe://example.org/b")),
        ])
        .unwrap_err();
        assert_eq!(e.what, "every port");
        // A narrower network, or ports beside an every-port entry, are more specific: allowed.
        let m = DestinationMap::build([
            ("a", d("10.0.0.0/24", &[], "spiffe://example.org/a")),
            ("b", d("10.0.0.0/24", &[80], "spiffe://example.org/b")),
            ("c", d("10.0.0.7/32", &[], "spiffe://example.org/c")),
        ])
        .unwrap();
        let id = |a: &str| {
            m.lookup(a.parse().unwrap())
                .map(|d| d.spiffe_id.to_string())
        };
        assert_eq!(id("10.0.0.7:80").as_deref(), Some("spiffe://example.org/c"));
        assert_eq!(id("10.0.0.8:80").as_deref(), Some("spiffe://example.org/b"));
        assert_eq!(id("10.0.0.8:81").as_deref(), Some("spiffe://example.org/a"));
        assert_eq!(id("10.0.1.8:81"), None);

        // A merge keeps both sides' entries and names a clash by both labels.
        let server = DestinationMap::build([(
            "destination \"web\"",
            d("10.0.1.0/24", &[], "spiffe://example.org/web"),
        )])
        .unwrap();
        let both = m.merge(&server).unwrap();
        assert_eq!(both.len(), 4);
        assert!(both.lookup("10.0.1.8:81".parse().unwrap()).is_some());
        let clash = DestinationMap::build([(
            "destination \"c2\"",
            d("10.0.0.7/32", &[443], "spiffe://example.org/c2"),
        )])
        .unwrap();
        // A port on a network the other side maps for every port is more specific: allowed.
        assert!(m.merge(&clash).is_ok());
        let clash = DestinationMap::build([(
            "destination \"c2\"",
            d("10.0.0.7/32", &[], "spiffe://example.org/c2"),
        )])
        .unwrap();
        let e = m.merge(&clash).unwrap_err();
        assert_eq!(
            (e.first.as_str(), e.second.as_str()),
            ("c", "destination \"c2\"")
        );
    }
}
