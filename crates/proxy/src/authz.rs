//! CUSTOM policies: external authorizers over Envoy's `envoy.service.auth.v3.Authorization/Check`
//! (the ext_authz gRPC API that OPA's Envoy plugin serves). The proxy sends what Envoy sends for
//! mTLS peers: source and destination principals (the SPIFFE IDs) and addresses, and for HTTP
//! the method, path and host. A Check that times out or fails denies, unless the provider is
//! configured `fail_open` (ext_authz's `failure_mode_allow`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tessera_policy::{Addresses, CustomCheck, Decision, PolicySet};
use tessera_proto::xds::envoy::config::core::v3 as core;
use tessera_proto::xds::envoy::service::auth::v3 as auth;
use tessera_spiffe::SpiffeId;
use tonic::transport::Channel;

/// `[[authz_provider]]` in the proxy config file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// What CUSTOM policies name in `provider`.
    pub name: String,
    /// The authorizer's gRPC address (plaintext gRPC, as OPA-Envoy's `addr` serves it).
    pub address: SocketAddr,
    /// Per Check; default 200 ms.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Admit when the authorizer cannot be reached or answers too late (default: deny).
    #[serde(default)]
    pub fail_open: bool,
}

#[derive(Debug, Clone)]
struct Provider {
    cfg: ProviderConfig,
    client: auth::authorization_client::AuthorizationClient<Channel>,
}

/// The configured providers.
#[derive(Debug, Clone, Default)]
pub struct Authorizers {
    providers: HashMap<String, Provider>,
}

/// What one Check describes.
#[derive(Debug, Clone, Copy)]
pub struct CheckInput<'a> {
    /// `None`: a caller without identity (PERMISSIVE plaintext); the authorizer sees no
    /// principal, as Envoy sends none for a plaintext peer.
    pub src: Option<&'a SpiffeId>,
    pub src_addr: Option<SocketAddr>,
    pub dst: Option<&'a SpiffeId>,
    pub dst_addr: Option<SocketAddr>,
    pub http: Option<tessera_policy::HttpRequest<'a>>,
}

fn peer(id: Option<&SpiffeId>, addr: Option<SocketAddr>) -> auth::attribute_context::Peer {
    auth::attribute_context::Peer {
        address: addr.map(|a| core::Address {
            address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                protocol: 0,
                address: a.ip().to_string(),
                port_specifier: Some(core::socket_address::PortSpecifier::PortValue(u32::from(
                    a.port(),
                ))),
            })),
        }),
        principal: id.map(|i| i.to_string()).unwrap_or_default(),
        ..Default::default()
    }
}

impl Authorizers {
    /// Validates the provider list (names unique and well formed); connects lazily.
    pub fn new(list: &[ProviderConfig]) -> Result<Self, String> {
        let mut providers = HashMap::new();
        for (i, p) in list.iter().enumerate() {
            if p.name.is_empty() || providers.contains_key(&p.name) {
                return Err(format!(
                    "authz_provider[{i}].name {:?}: empty or used twice",
                    p.name
                ));
            }
            let ep = tonic::transport::Endpoint::from_shared(format!("http://{}", p.address))
                .map_err(|e| format!("authz_provider[{i}].address: {e}"))?;
            providers.insert(
                p.name.clone(),
                Provider {
                    cfg: p.clone(),
                    client: auth::authorization_client::AuthorizationClient::new(ep.connect_lazy()),
                },
            );
        }
        Ok(Self { providers })
    }

    pub fn is_empty(&self) -> bool {
        self.providers.is_empty()
    }

    /// Asks each check's provider; the first deny decides (`None`: every provider allowed).
    /// A path with segment parameters is asked about in both readings, as sent and as a
    /// servlet container routes it (`tessera_policy::path_without_params`): CUSTOM is a
    /// restriction, so a deny of either reading denies, as it does for policy's own rules.
    pub async fn check(&self, checks: &[CustomCheck], input: &CheckInput<'_>) -> Option<Decision> {
        let stripped = input
            .http
            .and_then(|h| tessera_policy::path_without_params(h.path));
        for c in checks {
            let Some(p) = self.providers.get(c.provider.as_ref()) else {
                return Some(Decision::custom_denied(
                    c.policy.clone(),
                    format!(
                        "no authz_provider {:?} is configured (fail closed)",
                        c.provider.as_ref()
                    ),
                ));
            };
            let readings = std::iter::once(None).chain(stripped.as_deref().map(Some));
            for path in readings {
                if let Some(deny) = p.ask(c, input, path).await {
                    return Some(deny);
                }
            }
        }
        None
    }
}

impl Provider {
    /// One Check (with `path` in place of the request's, when given); `Some` when it denies.
    async fn ask(
        &self,
        c: &CustomCheck,
        input: &CheckInput<'_>,
        path: Option<&str>,
    ) -> Option<Decision> {
        let req = auth::CheckRequest {
            attributes: Some(auth::AttributeContext {
                source: Some(peer(input.src, input.src_addr)),
                destination: Some(peer(input.dst, input.dst_addr)),
                request: input.http.map(|h| auth::attribute_context::Request {
                    http: Some(auth::attribute_context::HttpRequest {
                        method: h.method.to_owned(),
                        path: path.unwrap_or(h.path).to_owned(),
                        host: h.host.to_owned(),
                        headers: header_map(h.headers),
                        ..Default::default()
                    }),
                }),
                context_extensions: HashMap::new(),
            }),
        };
        let timeout = Duration::from_millis(self.cfg.timeout_ms.unwrap_or(200));
        let mut client = self.client.clone();
        let outcome = match tokio::time::timeout(timeout, client.check(req)).await {
            Err(_) => Err(format!("no answer within {timeout:?}")),
            Ok(Err(s)) => Err(format!("{}: {}", s.code(), s.message())),
            Ok(Ok(r)) => Ok(r.into_inner().status.map_or(0, |s| s.code)),
        };
        match outcome {
            Ok(0) => None,
            Ok(code) => Some(Decision::custom_denied(
                c.policy.clone(),
                format!("authorizer {:?} denied (status {code})", self.cfg.name),
            )),
            Err(e) if self.cfg.fail_open => {
                tracing::warn!(provider = %self.cfg.name, error = %e, "external authorizer unavailable; fail_open admits");
                None
            }
            Err(e) => Some(Decision::custom_denied(
                c.policy.clone(),
                format!(
                    "authorizer {:?} unavailable: {e} (fail closed)",
                    self.cfg.name
                ),
            )),
        }
    }
}

/// Request headers as Envoy hands them to an authorizer: lower-case names, repeated values
/// joined with `,` (RFC 9110 section 5.3).
fn header_map(headers: &[(&str, &str)]) -> HashMap<String, String> {
    let mut m: HashMap<String, String> = HashMap::with_capacity(headers.len());
    for (n, v) in headers {
        m.entry(n.to_ascii_lowercase())
            .and_modify(|e| {
                e.push(',');
                e.push_str(v);
            })
            .or_insert_with(|| (*v).to_owned());
    }
    m
}

/// CUSTOM first (asking the authorizers), then the rest of the order. Also returns the
/// providers that were asked and admitted: kept with the connection or request, so that a
/// policy change asks only authorizers that were never asked about it (`crate::live`).
pub async fn authorize(
    set: &PolicySet,
    authorizers: &Authorizers,
    input: &CheckInput<'_>,
    port: u16,
) -> (Decision, Vec<Arc<str>>) {
    let addrs = Addresses {
        source: input.src_addr.map(|a| a.ip()),
        destination: input.dst_addr.map(|a| a.ip()),
    };
    let mut asked = Vec::new();
    if set.has_custom() {
        let checks = set.custom_checks(input.src, port, &addrs, input.http.as_ref());
        if !checks.is_empty() {
            if let Some(deny) = authorizers.check(&checks, input).await {
                return (deny, asked);
            }
            asked = checks.into_iter().map(|c| c.provider).collect();
        }
    }
    (
        set.decide_request(input.src, port, &addrs, input.http.as_ref()),
        asked,
    )
}

/// Shared handle.
pub type SharedAuthorizers = Arc<Authorizers>;
