//! The destination map in force in transparent mode: the config file's `[[destination]]`
//! entries merged with the server's map, which the agent pushes over `DestinationWatch`.
//!
//! Either source may change at any time; the merged map replaces the one the capture port reads
//! only when the merge is unambiguous. A change that would give one address and port two
//! expected identities, or a pushed document that does not parse, is refused whole and the map
//! in force stays: dropping an entry would turn a mapped destination into an unmapped one (and,
//! with `--unmapped passthrough`, into plaintext). Until the agent's first snapshot the file's
//! entries alone apply. A stale map fails closed: the handshake verifies the identity it names.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tessera_proto::v1 as pb;

use crate::config::{DestinationDoc, DestinationMap};

/// The two sources and the merged map built from them.
#[derive(Debug)]
pub struct Sources {
    inner: Mutex<Inner>,
    map: Arc<ArcSwap<DestinationMap>>,
}

#[derive(Debug, Default)]
struct Inner {
    local: DestinationMap,
    pushed: DestinationMap,
}

impl Sources {
    /// Starts with the config file's map alone.
    pub fn new(local: DestinationMap) -> Arc<Self> {
        Arc::new(Self {
            map: Arc::new(ArcSwap::from_pointee(local.clone())),
            inner: Mutex::new(Inner {
                local,
                pushed: DestinationMap::default(),
            }),
        })
    }

    /// The map in force (what the capture port looks destinations up in).
    pub fn map(&self) -> Arc<ArcSwap<DestinationMap>> {
        self.map.clone()
    }

    /// The config file's entries changed.
    pub fn set_local(&self, local: DestinationMap) -> Result<usize, String> {
        self.replace(|i| i.local = local)
    }

    /// The server's map changed.
    pub fn set_pushed(&self, pushed: DestinationMap) -> Result<usize, String> {
        self.replace(|i| i.pushed = pushed)
    }

    /// Applies `change`, and keeps it only when the merged map is unambiguous; returns the
    /// number of entries in force.
    fn replace(&self, change: impl FnOnce(&mut Inner)) -> Result<usize, String> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = Inner {
            local: inner.local.clone(),
            pushed: inner.pushed.clone(),
        };
        change(&mut next);
        let merged = next.local.merge(&next.pushed).map_err(|e| e.to_string())?;
        let n = merged.len();
        *inner = next;
        self.map.store(Arc::new(merged));
        Ok(n)
    }
}

/// The server's map as the agent sent it; any document that does not parse refuses the whole
/// snapshot (it may be the entry for an address this proxy is about to reach).
pub fn pushed_map(snap: &pb::DestinationSnapshot) -> Result<DestinationMap, String> {
    let mut entries = Vec::with_capacity(snap.destinations.len());
    for d in &snap.destinations {
        let label = format!("the server's destination {:?}", d.name);
        let parsed =
            DestinationDoc::from_json(&d.document_json).map_err(|e| format!("{label}: {e}"))?;
        entries.push((label, parsed));
    }
    DestinationMap::build(entries).map_err(|e| e.to_string())
}

/// Streams the server's destination map from the agent at `socket` forever (reconnecting with
/// backoff), merging each snapshot into `sources`.
pub async fn watch(socket: PathBuf, sources: Arc<Sources>) {
    crate::live::reconnecting("destination stream", &socket, || {
        stream_once(&socket, &sources)
    })
    .await;
}

async fn stream_once(socket: &Path, sources: &Sources) -> Result<(), crate::live::StreamError> {
    use tessera_proto::v1::destination_watch_client::DestinationWatchClient;
    let channel = crate::identity::uds_channel(socket).await?;
    let req = crate::identity::agent_request(pb::WatchDestinationsRequest {});
    let mut stream = DestinationWatchClient::new(channel)
        .watch_destinations(req)
        .await
        .map_err(|s| crate::live::StreamError::opening("WatchDestinations", &s))?
        .into_inner();
    loop {
        match stream.message().await {
            Ok(Some(snap)) => match pushed_map(&snap).and_then(|m| sources.set_pushed(m)) {
                Ok(entries) => tracing::info!(
                    entries,
                    server = snap.destinations.len(),
                    revision = snap.revision,
                    "destination map from the server merged"
                ),
                Err(e) => tracing::error!(
                    error = %e,
                    revision = snap.revision,
                    "refusing the server's destination map; the map in force stays"
                ),
            },
            Ok(None) => return Ok(()),
            Err(s) => return Err(format!("WatchDestinations stream: {}", s.message()).into()),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn snap(entries: &[(&str, &str)]) -> pb::DestinationSnapshot {
        pb::DestinationSnapshot {
            destinations: entries
                .iter()
                .map(|(n, d)| pb::StoredDestination {
                    name: (*n).into(),
                    document_json: (*d).into(),
                })
                .collect(),
            revision: 7,
        }
    }

    fn expected(s: &Sources, addr: &str) -> Option<String> {
        s.map()
            .load()
            .lookup(addr.parse().unwrap())
            .map(|d| d.spiffe_id.to_string())
    }

    #[test]
    fn the_server_map_merges_with_the_file_and_a_bad_change_keeps_the_map_in_force() {
        let file = crate::config::parse_file(
            "p.toml",
            "[[destination]]\ncidr = \"198.18.0.2\"\nspiffe_id = \"spiffe://example.org/bar\"\n",
        )
        .unwrap();
        let s = Sources::new(file.destinations.clone());
        assert_eq!(
            expected(&s, "198.18.0.2:80").as_deref(),
            Some("spiffe://example.org/bar")
        );
        assert_eq!(expected(&s, "198.18.0.3:80"), None);

        let db = r#"{"cidr":"198.18.0.3/32","ports":[5432],"spiffe_id":"spiffe://example.org/db"}"#;
        s.set_pushed(pushed_map(&snap(&[("db", db)])).unwrap())
            .unwrap();
        assert_eq!(
            expected(&s, "198.18.0.3:5432").as_deref(),
            Some("spiffe://example.org/db")
        );
        assert_eq!(expected(&s, "198.18.0.3:80"), None);
        assert_eq!(
            expected(&s, "198.18.0.2:80").as_deref(),
            Some("spiffe://example.org/bar")
        );

        // The server claims the file's address: refused, naming both; the map in force stays.
        let clash = r#"{"cidr":"198.18.0.2/32","spiffe_id":"spiffe://example.org/evil"}"#;
        let e = s
            .set_pushed(pushed_map(&snap(&[("db", db), ("bar2", clash)])).unwrap())
            .unwrap_err();
        assert!(
            e.contains("destination[0]") && e.contains("\"bar2\""),
            "{e}"
        );
        assert_eq!(
            expected(&s, "198.18.0.2:80").as_deref(),
            Some("spiffe://example.org/bar")
        );
        assert_eq!(
            expected(&s, "198.18.0.3:5432").as_deref(),
            Some("spiffe://example.org/db")
        );

        // A document that does not parse refuses the whole snapshot.
        let e = pushed_map(&snap(&[("db", db), ("x", r#"{"cidr":"198.18.0.4"}"#)])).unwrap_err();
        assert!(e.contains("\"x\""), "{e}");

        // The file changes: merged with the server's map as it stands.
        let file2 = crate::config::parse_file(
            "p.toml",
            "[[destination]]\ncidr = \"198.18.0.9\"\nspiffe_id = \"spiffe://example.org/baz\"\n",
        )
        .unwrap();
        s.set_local(file2.destinations).unwrap();
        assert_eq!(expected(&s, "198.18.0.2:80"), None);
        assert_eq!(
            expected(&s, "198.18.0.9:80").as_deref(),
            Some("spiffe://example.org/baz")
        );
        assert_eq!(
            expected(&s, "198.18.0.3:5432").as_deref(),
            Some("spiffe://example.org/db")
        );
        // A file edit that clashes with the server's map is refused like a bad file.
        let file3 = crate::config::parse_file(
            "p.toml",
            "[[destination]]\ncidr = \"198.18.0.3\"\nports = [5432]\nspiffe_id = \"spiffe://example.org/x\"\n",
        )
        .unwrap();
        assert!(s.set_local(file3.destinations).is_err());
        assert_eq!(
            expected(&s, "198.18.0.9:80").as_deref(),
            Some("spiffe://example.org/baz")
        );

        // The server deletes its entries: the file's alone are left.
        s.set_pushed(pushed_map(&snap(&[])).unwrap()).unwrap();
        assert_eq!(expected(&s, "198.18.0.3:5432"), None);
        assert_eq!(
            expected(&s, "198.18.0.9:80").as_deref(),
            Some("spiffe://example.org/baz")
        );
    }
}
