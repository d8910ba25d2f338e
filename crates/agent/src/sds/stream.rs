//! The xDS state-of-the-world discipline of one `StreamSecrets` stream, without I/O: what to do
//! with each request Envoy sends and when to push. (xDS protocol: "ACK and NACK semantics",
//! "resource updates", and nonces.)
//!
//! - Every response carries a new version (a per-stream counter) and a random nonce.
//! - A request whose `response_nonce` is not the last nonce sent answers an older response: it is
//!   stale and ignored (a newer response is already on its way to Envoy).
//! - A request with the last nonce is an ACK (version = the last one sent, no error) or a NACK
//!   (with `error_detail`): neither is answered, unless it also changes the resource names.
//! - A push follows every change of the secrets the stream's names resolve to.

use std::collections::BTreeSet;

use tessera_proto::xds::envoy::config::core::v3::Node;
use tessera_proto::xds::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};

use super::resources::SECRET_TYPE_URL;

/// What a request is, relative to the stream's last response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// The first request, or one that changes the resource names: answer it.
    Subscribe,
    /// Acknowledges the last response.
    Ack,
    /// Rejects the last response; Envoy keeps the previous secrets. Carries Envoy's error message.
    Nack(String),
    /// Answers an older response than the last one sent: ignored.
    Stale { nonce: String, expected: String },
}

impl Received {
    /// Whether the request is answered with a response.
    pub fn needs_response(&self) -> bool {
        matches!(self, Received::Subscribe)
    }
}

#[derive(Debug, Default)]
pub struct StreamState {
    version: u64,
    nonce: Option<String>,
    names: Option<Vec<String>>,
    node: Option<Node>,
    sent: Option<Vec<prost_types::Any>>,
}

impl StreamState {
    /// Takes one request from Envoy. A NACK that also changes the names is a `Subscribe` (the
    /// error is still reported by the caller from the request's `error_detail`).
    pub fn on_request(&mut self, req: &DiscoveryRequest) -> Received {
        // Envoy may send its node on the first request only; keep the first one seen.
        if self.node.is_none() {
            self.node.clone_from(&req.node);
        }
        if let Some(expected) = &self.nonce
            && req.response_nonce != *expected
        {
            return Received::Stale {
                nonce: req.response_nonce.clone(),
                expected: expected.clone(),
            };
        }
        let names = name_set(&req.resource_names);
        let changed = self.names.as_ref().is_none_or(|old| name_set(old) != names);
        self.names = Some(req.resource_names.clone());
        if changed || self.sent.is_none() {
            return Received::Subscribe;
        }
        match &req.error_detail {
            Some(e) => Received::Nack(e.message.clone()),
            None if req.version_info == self.version.to_string() => Received::Ack,
            None => Received::Nack(format!(
                "version {:?} acknowledged, {} expected",
                req.version_info, self.version
            )),
        }
    }

    /// The names of the last accepted request (None before the first).
    pub fn names(&self) -> Option<&[String]> {
        self.names.as_deref()
    }

    pub fn node(&self) -> Option<&Node> {
        self.node.as_ref()
    }

    /// Whether `resources` differ from what was last sent (a snapshot change that matters).
    pub fn differs(&self, resources: &[prost_types::Any]) -> bool {
        self.sent.as_deref() != Some(resources)
    }

    /// The next response for `resources`, with a new version and `nonce`; remembered as sent.
    pub fn respond(
        &mut self,
        resources: Vec<prost_types::Any>,
        nonce: String,
    ) -> DiscoveryResponse {
        self.version += 1;
        self.nonce = Some(nonce.clone());
        self.sent = Some(resources.clone());
        DiscoveryResponse {
            version_info: self.version.to_string(),
            resources,
            canary: false,
            type_url: SECRET_TYPE_URL.to_owned(),
            nonce,
        }
    }
}

fn name_set(names: &[String]) -> BTreeSet<&str> {
    names
        .iter()
        .map(String::as_str)
        .filter(|n| !n.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_proto::xds::google::rpc::Status;

    fn req(names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: version.into(),
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            type_url: SECRET_TYPE_URL.into(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn any(n: u8) -> prost_types::Any {
        prost_types::Any {
            type_url: SECRET_TYPE_URL.into(),
            value: vec![n],
        }
    }

    #[test]
    fn ack_nack_stale_and_name_change() {
        let mut s = StreamState::default();
        assert_eq!(
            s.on_request(&req(&["default"], "", "")),
            Received::Subscribe
        );
        let r = s.respond(vec![any(1)], "n1".into());
        assert_eq!((r.version_info.as_str(), r.nonce.as_str()), ("1", "n1"));
        assert_eq!(s.on_request(&req(&["default"], "1", "n1")), Received::Ack);
        // Same names, same secrets: nothing to push.
        assert!(!s.differs(&[any(1)]));
        assert!(s.differs(&[any(2)]));
        let r = s.respond(vec![any(2)], "n2".into());
        assert_eq!(r.version_info, "2");
        // The ACK of version 1 arrives late: stale.
        assert!(matches!(
            s.on_request(&req(&["default"], "1", "n1")),
            Received::Stale { .. }
        ));
        let mut nack = req(&["default"], "1", "n2");
        nack.error_detail = Some(Status {
            code: 3,
            message: "bad key".into(),
            details: vec![],
        });
        assert_eq!(s.on_request(&nack), Received::Nack("bad key".into()));
        assert!(!Received::Nack(String::new()).needs_response());
        // New names with the current nonce: answered.
        assert_eq!(
            s.on_request(&req(&["default", "ROOTCA"], "2", "n2")),
            Received::Subscribe
        );
        assert_eq!(s.names().unwrap(), ["default", "ROOTCA"]);
    }

    #[test]
    fn name_order_and_empty_names_do_not_count_as_a_change() {
        let mut s = StreamState::default();
        s.on_request(&req(&["a", "b"], "", ""));
        s.respond(vec![any(1)], "n1".into());
        assert_eq!(
            s.on_request(&req(&["b", "", "a"], "1", "n1")),
            Received::Ack
        );
    }
}
