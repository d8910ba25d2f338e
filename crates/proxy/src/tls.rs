//! rustls configurations of the tunnel, built only from `tessera-tls` (which owns the crypto
//! provider and every SPIFFE verifier).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rustls::{ClientConfig, ServerConfig};
use tessera_spiffe::SpiffeId;
use tessera_tls::records::TrafficSecretLog;
use tessera_tls::{ExpectedPeer, SpiffeClientVerifier, SpiffeServerVerifier};

use crate::identity::Identity;

/// ALPN of the tunnel: HTTP/2 (HBONE is HTTP/2 CONNECT over mutual TLS).
pub const ALPN_H2: &[u8] = b"h2";
pub use crate::stream::ALPN_STREAM;

/// How the outbound side carries connections to a peer proxy. The inbound side serves both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TunnelProtocol {
    /// HTTP/2 CONNECT (HBONE): pooled mutual-TLS connections, one stream per connection.
    #[default]
    H2,
    /// One mutual-TLS connection per proxied connection (ALPN `tessera-stream/1`): no framing,
    /// for throughput and latency; every connection costs a full handshake.
    Stream,
}

impl TunnelProtocol {
    pub fn alpn(self) -> &'static [u8] {
        match self {
            Self::H2 => ALPN_H2,
            Self::Stream => ALPN_STREAM,
        }
    }
}

impl std::str::FromStr for TunnelProtocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "h2" => Ok(Self::H2),
            "stream" => Ok(Self::Stream),
            other => Err(format!(
                "tunnel protocol {other:?}: expected h2 (HTTP/2 CONNECT, pooled) or stream (one mTLS connection per connection)"
            )),
        }
    }
}

/// The tunnel's server side: TLS 1.3, client certificate mandatory and verified against the
/// bundle of the client's own trust domain. Session resumption is off (`tessera_tls`'s configs
/// turn it off everywhere), so every connection runs the full verification against the bundles
/// of that moment (a bundle that drops a CA takes effect for the next connection, and no ticket
/// outlives it).
pub fn server_config(identity: &Identity) -> Option<Arc<ServerConfig>> {
    let resolver = identity.resolver()?;
    let clients = Arc::new(SpiffeClientVerifier::new(identity.bundles(), true));
    let mut cfg = tessera_tls::server_config(resolver, clients, &[ALPN_H2, ALPN_STREAM]).ok()?;
    // The stream tunnel carries its data phase on this handshake's keys (`crate::sealed`).
    cfg.enable_secret_extraction = true;
    Some(Arc::new(cfg))
}

/// `cfg` for one connection, with `log` as its `key_log`: the stream tunnel takes that
/// connection's application traffic secrets to its own record layer, where they derive the keys
/// of each KeyUpdate (`crate::sealed`). A copy per connection, so a secret can only ever reach
/// the connection it belongs to (the record layer also checks it against the extracted keys).
pub fn server_config_for(cfg: &ServerConfig, log: &Arc<TrafficSecretLog>) -> Arc<ServerConfig> {
    let mut c = cfg.clone();
    c.key_log = log.clone();
    Arc::new(c)
}

/// [`server_config_for`], for the client side.
pub fn client_config_for(cfg: &ClientConfig, log: &Arc<TrafficSecretLog>) -> Arc<ClientConfig> {
    let mut c = cfg.clone();
    c.key_log = log.clone();
    Arc::new(c)
}

/// Client configs by the SPIFFE ID the destination must prove. Each verifies the server's chain
/// against the bundle of the server's trust domain and then that the ID is exactly the expected
/// one: a stale address→identity mapping fails the handshake.
#[derive(Debug, Default)]
pub struct ClientConfigs {
    protocol: TunnelProtocol,
    by_peer: Mutex<HashMap<SpiffeId, Arc<ClientConfig>>>,
}

impl ClientConfigs {
    /// Configs that offer only `protocol`'s ALPN.
    pub fn new(protocol: TunnelProtocol) -> Self {
        Self {
            protocol,
            by_peer: Mutex::default(),
        }
    }

    pub fn get(&self, identity: &Identity, peer: &SpiffeId) -> Option<Arc<ClientConfig>> {
        if let Ok(map) = self.by_peer.lock()
            && let Some(c) = map.get(peer)
        {
            return Some(c.clone());
        }
        let resolver = identity.resolver()?;
        let verifier = Arc::new(SpiffeServerVerifier::new(
            identity.bundles(),
            ExpectedPeer::Exact(peer.clone()),
        ));
        let mut cfg =
            tessera_tls::client_config(verifier, Some(resolver), &[self.protocol.alpn()]).ok()?;
        cfg.enable_secret_extraction = self.protocol == TunnelProtocol::Stream;
        let cfg = Arc::new(cfg);
        if let Ok(mut map) = self.by_peer.lock() {
            map.insert(peer.clone(), cfg.clone());
        }
        Some(cfg)
    }
}
