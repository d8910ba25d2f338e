//! Which secrets an SDS caller gets for the resource names it asks for, computed from a cache
//! snapshot and the caller's identities. Pure: no I/O, no clocks. The stream compares results so
//! that it pushes only when what *this* caller gets has changed.
//!
//! Names, as SPIRE's agent serves them (Envoy configurations written for SPIRE work unchanged):
//! - the default SVID name (`default`): the caller's first identity, the one the Workload API
//!   lists first (SPIFFE Workload API §8: the default identity);
//! - a SPIFFE ID: the caller's identity with that ID;
//! - the default bundle name (`ROOTCA`): the agent's own trust domain's bundle;
//! - the all-bundles name (`ALL`): every bundle the caller may use, in one SPIFFE validator;
//! - `spiffe://<trust domain>`: that trust domain's bundle;
//! - no name at all: every identity (named by SPIFFE ID) and every bundle (named by trust domain).
//!
//! The bundles a caller may use are those the Workload API would give it (its own trust domains
//! and those its entries federate with), among all bundles the cache holds.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine as _;
use prost::Message as _;
use tessera_proto::xds::envoy::config::core::v3::{
    DataSource, Node, TypedExtensionConfig, data_source, node,
};
use tessera_proto::xds::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, SpiffeCertValidatorConfig, TlsCertificate, secret,
    spiffe_cert_validator_config,
};
use tessera_spiffe::bundle::BundleSource as _;
use tessera_spiffe::{Bundle, SpiffeId, TrustDomain};

use crate::config::SdsConfig;
use crate::workload_api::view;
use crate::{Identity, Snapshot};

/// The only resource type SDS serves.
pub const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
const SPIFFE_VALIDATOR_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig";
/// Envoy's SPIFFE certificate validator extension.
const SPIFFE_VALIDATOR_NAME: &str = "envoy.tls.cert_validator.spiffe";
/// Node metadata key (the one SPIRE reads) with which one Envoy asks for plain `trusted_ca`.
pub const DISABLE_SPIFFE_VALIDATOR_KEY: &str = "disable_spiffe_cert_validation";

/// How bundles are handed to Envoy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validation {
    /// `envoy.tls.cert_validator.spiffe`: each CA is trusted only for its own trust domain's IDs
    /// (SPIFFE X.509-SVID §5: a bundle authenticates SVIDs of its trust domain only). Envoy ≥ 1.18.
    Spiffe,
    /// Plain `trusted_ca`: for older Envoys, or when asked for.
    Plain,
}

/// Why a request cannot be answered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SdsError {
    /// Names that are neither configured names nor identities or bundles of this caller.
    #[error("the caller is not authorized for, or there is no, resource named {}", quoted(.0))]
    Unauthorized(Vec<String>),
    /// `ALL` only makes sense with the SPIFFE validator: in one `trusted_ca`, a federated CA could
    /// vouch for IDs of any trust domain.
    #[error(
        "resource {0:?} (all bundles) needs Envoy's SPIFFE certificate validator (Envoy >= 1.18, not disabled by node metadata `{DISABLE_SPIFFE_VALIDATOR_KEY}` or the agent's `sds.disable_spiffe_cert_validation`); ask for `spiffe://<trust domain>` names instead"
    )]
    AllNeedsSpiffeValidator(String),
    #[error("type_url {0:?}: this server serves only {SECRET_TYPE_URL}")]
    WrongType(String),
    /// The caller matches no entry (the Workload API's rule, with SPIRE's message).
    #[error("no identity issued")]
    NoIdentity,
    #[error("the agent has no trust bundle for trust domain `{0}` yet")]
    MissingBundle(String),
}

fn quoted(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The validation flavour for `node`: the SPIFFE validator for Envoy ≥ 1.18 (the first release
/// with it) unless the agent's config or the node's metadata turns it off; plain otherwise (also
/// for a caller that does not say which Envoy it is).
pub fn validation_for(node: Option<&Node>, disabled_by_config: bool) -> Validation {
    let Some(node) = node else {
        return Validation::Plain;
    };
    if disabled_by_config || metadata_disables_spiffe(node) {
        return Validation::Plain;
    }
    match &node.user_agent_version_type {
        Some(node::UserAgentVersionType::UserAgentBuildVersion(build)) => match &build.version {
            Some(v) if v.major_number > 1 || (v.major_number == 1 && v.minor_number >= 18) => {
                Validation::Spiffe
            }
            _ => Validation::Plain,
        },
        _ => Validation::Plain,
    }
}

fn metadata_disables_spiffe(node: &Node) -> bool {
    use prost_types::value::Kind;
    let value = node
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get(DISABLE_SPIFFE_VALIDATOR_KEY))
        .and_then(|v| v.kind.as_ref());
    match value {
        Some(Kind::BoolValue(b)) => *b,
        Some(Kind::StringValue(s)) => s.eq_ignore_ascii_case("true"),
        _ => false,
    }
}

/// Checks a request's `type_url`: empty (Envoy always sets it, other clients may not) or Secret.
pub fn check_type_url(type_url: &str) -> Result<(), SdsError> {
    if type_url.is_empty() || type_url == SECRET_TYPE_URL {
        Ok(())
    } else {
        Err(SdsError::WrongType(type_url.to_owned()))
    }
}

/// The secrets for `requested` (empty names are ignored; none at all means everything), in a
/// stable order: identities before bundles for "everything", else the order asked for.
pub fn secrets(
    snapshot: &Snapshot,
    identities: &[Arc<Identity>],
    names: &SdsConfig,
    requested: &[String],
    validation: Validation,
) -> Result<Vec<prost_types::Any>, SdsError> {
    let Some(default) = identities.first() else {
        return Err(SdsError::NoIdentity);
    };
    let bundles = caller_bundles(snapshot, identities)?;
    let own = snapshot
        .trust_domain
        .as_ref()
        .ok_or_else(|| SdsError::MissingBundle("(the agent's own; not synced yet)".into()))?;

    let mut wanted: Vec<&str> = Vec::new();
    for name in requested.iter().filter(|n| !n.is_empty()) {
        if !wanted.contains(&name.as_str()) {
            wanted.push(name);
        }
    }
    let mut out = Vec::new();
    if wanted.is_empty() {
        let mut seen = Vec::new();
        for i in identities {
            if !seen.contains(&&i.spiffe_id) {
                seen.push(&i.spiffe_id);
                out.push(tls_secret(i.spiffe_id.as_str(), i));
            }
        }
        for (td, bundle) in &bundles {
            out.push(validation_secret(td.id().as_str(), &[bundle], validation));
        }
        return Ok(out);
    }

    let mut refused = Vec::new();
    for name in wanted {
        if name == names.default_svid_name {
            out.push(tls_secret(name, default));
        } else if name == names.default_bundle_name {
            let bundle = bundles
                .get(own)
                .ok_or_else(|| SdsError::MissingBundle(own.to_string()))?;
            out.push(validation_secret(name, &[bundle], validation));
        } else if name == names.default_all_bundles_name {
            if validation != Validation::Spiffe {
                return Err(SdsError::AllNeedsSpiffeValidator(name.to_owned()));
            }
            let all: Vec<&Bundle> = bundles.values().copied().collect();
            out.push(validation_secret(name, &all, validation));
        } else {
            match lookup(name, identities, &bundles) {
                Some(Found::Identity(i)) => out.push(tls_secret(name, i)),
                Some(Found::Bundle(b)) => out.push(validation_secret(name, &[b], validation)),
                None => refused.push(name.to_owned()),
            }
        }
    }
    if refused.is_empty() {
        Ok(out)
    } else {
        Err(SdsError::Unauthorized(refused))
    }
}

enum Found<'a> {
    Identity(&'a Identity),
    Bundle(&'a Bundle),
}

/// A SPIFFE ID name: the trust domain's bundle when it has no path, else the caller's identity.
fn lookup<'a>(
    name: &str,
    identities: &'a [Arc<Identity>],
    bundles: &BTreeMap<TrustDomain, &'a Bundle>,
) -> Option<Found<'a>> {
    let id = SpiffeId::parse(name).ok()?;
    if id.path().is_empty() {
        bundles.get(&id.trust_domain()).map(|b| Found::Bundle(b))
    } else {
        identities
            .iter()
            .find(|i| i.spiffe_id == id)
            .map(|i| Found::Identity(i))
    }
}

/// The bundles the caller may use (the Workload API's rule: its own trust domains, which must be
/// present, and those its entries federate with), by trust domain. A bundle without X.509
/// authorities trusts nothing and is left out.
fn caller_bundles<'a>(
    snapshot: &'a Snapshot,
    identities: &[Arc<Identity>],
) -> Result<BTreeMap<TrustDomain, &'a Bundle>, SdsError> {
    let mut out = BTreeMap::new();
    for td in view::trust_domains_for(snapshot, identities) {
        let own = snapshot.trust_domain.as_ref() == Some(&td)
            || identities.iter().any(|i| i.spiffe_id.trust_domain() == td);
        match snapshot.bundles.bundle_for(&td) {
            Some(b) if !b.x509_authorities().is_empty() => {
                out.insert(td, b);
            }
            _ if own => return Err(SdsError::MissingBundle(td.to_string())),
            _ => {}
        }
    }
    Ok(out)
}

fn tls_secret(name: &str, identity: &Identity) -> prost_types::Any {
    let chain = pem_blocks("CERTIFICATE", identity.chain.iter().map(Vec::as_slice));
    let key = pem_blocks(
        "PRIVATE KEY",
        std::iter::once(identity.key_pkcs8.as_slice()),
    );
    to_any(Secret {
        name: name.to_owned(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: Some(inline(chain)),
            private_key: Some(inline(key)),
        })),
    })
}

fn validation_secret(name: &str, bundles: &[&Bundle], validation: Validation) -> prost_types::Any {
    let context = match validation {
        Validation::Spiffe => {
            let config = SpiffeCertValidatorConfig {
                trust_domains: bundles
                    .iter()
                    .map(|b| spiffe_cert_validator_config::TrustDomain {
                        // Envoy wants the bare trust domain name here, not `spiffe://...`.
                        name: b.trust_domain().as_str().to_owned(),
                        trust_bundle: Some(inline(bundle_pem(b))),
                    })
                    .collect(),
            };
            CertificateValidationContext {
                trusted_ca: None,
                custom_validator_config: Some(TypedExtensionConfig {
                    name: SPIFFE_VALIDATOR_NAME.to_owned(),
                    typed_config: Some(prost_types::Any {
                        type_url: SPIFFE_VALIDATOR_TYPE_URL.to_owned(),
                        value: config.encode_to_vec(),
                    }),
                }),
            }
        }
        Validation::Plain => CertificateValidationContext {
            trusted_ca: Some(inline(
                bundles
                    .iter()
                    .flat_map(|b| bundle_pem(b))
                    .collect::<Vec<u8>>(),
            )),
            custom_validator_config: None,
        },
    };
    to_any(Secret {
        name: name.to_owned(),
        r#type: Some(secret::Type::ValidationContext(context)),
    })
}

fn bundle_pem(bundle: &Bundle) -> Vec<u8> {
    pem_blocks(
        "CERTIFICATE",
        bundle.x509_authorities().iter().map(Vec::as_slice),
    )
}

fn inline(bytes: Vec<u8>) -> DataSource {
    DataSource {
        specifier: Some(data_source::Specifier::InlineBytes(bytes)),
    }
}

fn to_any(secret: Secret) -> prost_types::Any {
    prost_types::Any {
        type_url: SECRET_TYPE_URL.to_owned(),
        value: secret.encode_to_vec(),
    }
}

/// RFC 7468 PEM: base64 in 64-character lines between BEGIN/END lines.
fn pem_blocks<'a>(label: &str, ders: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = String::new();
    for der in ders {
        out.push_str(&format!("-----BEGIN {label}-----\n"));
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        for line in b64.as_bytes().chunks(64) {
            // base64 output is ASCII.
            out.push_str(&String::from_utf8_lossy(line));
            out.push('\n');
        }
        out.push_str(&format!("-----END {label}-----\n"));
    }
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tessera_proto::xds::envoy::config::core::v3::BuildVersion;
    use tessera_proto::xds::envoy::r#type::v3::SemanticVersion;

    fn envoy(major: u32, minor: u32) -> Node {
        Node {
            user_agent_name: "envoy".into(),
            user_agent_version_type: Some(node::UserAgentVersionType::UserAgentBuildVersion(
                BuildVersion {
                    version: Some(SemanticVersion {
                        major_number: major,
                        minor_number: minor,
                        patch: 0,
                    }),
                    metadata: None,
                },
            )),
            ..Default::default()
        }
    }

    #[test]
    fn spiffe_validator_from_envoy_1_18() {
        assert_eq!(
            validation_for(Some(&envoy(1, 17)), false),
            Validation::Plain
        );
        assert_eq!(
            validation_for(Some(&envoy(1, 18)), false),
            Validation::Spiffe
        );
        assert_eq!(
            validation_for(Some(&envoy(1, 40)), false),
            Validation::Spiffe
        );
        assert_eq!(
            validation_for(Some(&envoy(2, 0)), false),
            Validation::Spiffe
        );
        assert_eq!(validation_for(None, false), Validation::Plain);
        assert_eq!(validation_for(Some(&envoy(1, 40)), true), Validation::Plain);
    }

    #[test]
    fn node_metadata_forces_plain() {
        let mut node = envoy(1, 40);
        node.metadata = Some(prost_types::Struct {
            fields: [(
                DISABLE_SPIFFE_VALIDATOR_KEY.to_owned(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::BoolValue(true)),
                },
            )]
            .into(),
        });
        assert_eq!(validation_for(Some(&node), false), Validation::Plain);
    }

    #[test]
    fn type_url_must_be_secret_or_empty() {
        assert!(check_type_url("").is_ok());
        assert!(check_type_url(SECRET_TYPE_URL).is_ok());
        let e = check_type_url("type.googleapis.com/envoy.config.cluster.v3.Cluster").unwrap_err();
        assert!(e.to_string().contains("Cluster"));
    }

    #[test]
    fn pem_lines_are_64_characters() {
        let pem =
            String::from_utf8(pem_blocks("CERTIFICATE", std::iter::once(&[7u8; 100][..]))).unwrap();
        let lines: Vec<&str> = pem.lines().collect();
        assert_eq!(lines[0], "-----BEGIN CERTIFICATE-----");
        assert_eq!(lines[1].len(), 64);
        assert_eq!(lines.last().unwrap(), &"-----END CERTIFICATE-----");
    }

    #[test]
    fn refusal_names_every_refused_name() {
        let e = SdsError::Unauthorized(vec!["spiffe://example.org/x".into(), "bogus".into()]);
        let msg = e.to_string();
        assert!(msg.contains("\"spiffe://example.org/x\"") && msg.contains("\"bogus\""));
    }
}
