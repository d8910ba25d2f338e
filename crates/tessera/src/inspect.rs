//! `tessera id check` and `tessera svid inspect`: show what the SPIFFE rules say about an input.
//! All decisions come from `tessera-spiffe` and `tessera-tls`; this module only reads files and
//! formats what they found.

use std::process::ExitCode;

use anyhow::{Context, bail};
use rustls_pki_types::{CertificateDer, UnixTime};
use serde::Serialize;
use tessera_spiffe::x509::check_svid_chain;
use tessera_spiffe::{Bundle, IdError, SpiffeId, TrustDomain};
use tessera_tls::{PeerRole, verify_svid};
use x509_parser::prelude::*;

use crate::cli::{Output, SvidInspectArgs};

/// Input files larger than this are refused: no certificate chain or bundle comes near it.
const MAX_INPUT: u64 = 4 * 1024 * 1024;

pub(crate) fn id_check(input: &str, output: Output) -> ExitCode {
    let result = SpiffeId::parse(input);
    match output {
        Output::Json => {
            let v = match &result {
                Ok(id) => serde_json::json!({
                    "valid": true, "spiffe_id": id, "trust_domain": id.trust_domain_str(), "path": id.path(),
                }),
                Err(e) => serde_json::json!({ "valid": false, "error": e.to_string() }),
            };
            outln!("{v:#}");
        }
        Output::Human => match &result {
            Ok(id) => {
                outln!("valid SPIFFE ID");
                outln!("  trust domain: {}", id.trust_domain_str());
                outln!(
                    "  path:         {}",
                    if id.is_root() {
                        "(none: this is the trust domain's own ID)"
                    } else {
                        id.path()
                    }
                );
            }
            Err(e) => {
                errln!("invalid SPIFFE ID: {e}");
                if let Some(at) = error_offset(e) {
                    // Point at the offending byte when the input is printable on one line.
                    if input.len() <= 200 && !input.contains(['\n', '\r']) {
                        let col = input.get(..at).map_or(at, |p| p.chars().count());
                        errln!("  {input}");
                        errln!("  {}^", " ".repeat(col));
                    }
                }
            }
        },
    }
    if result.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn error_offset(e: &IdError) -> Option<usize> {
    use IdError::*;
    match e {
        TrustDomainChar { at, .. }
        | Port { at }
        | UserInfo { at }
        | Query { at }
        | Fragment { at }
        | PercentEncoded { at }
        | EmptySegment { at }
        | DotSegment { at }
        | TrailingSlash { at }
        | PathChar { at, .. } => Some(*at),
        _ => None,
    }
}

#[derive(Serialize)]
struct CertView {
    index: usize,
    role: &'static str,
    subject: String,
    issuer: String,
    serial: String,
    not_before: String,
    not_after: String,
    expired: bool,
    not_yet_valid: bool,
    uri_sans: Vec<String>,
    dns_sans: Vec<String>,
    is_ca: bool,
    key_usage: Vec<&'static str>,
    extended_key_usage: Option<Vec<String>>,
    public_key: String,
}

#[derive(Serialize)]
struct Report {
    spiffe_id: Option<String>,
    certificates: Vec<CertView>,
    violations: Vec<String>,
    /// Set when a bundle was given: whether the chain verified against it.
    verified: Option<bool>,
    verify_error: Option<String>,
    valid: bool,
}

pub(crate) fn svid_inspect(args: &SvidInspectArgs) -> anyhow::Result<ExitCode> {
    let bytes = read_limited(&args.file)?;
    let chain = read_chain(&bytes).with_context(|| format!("{}", args.file.display()))?;
    let check = check_svid_chain(&chain);
    let now = i64::try_from(UnixTime::now().as_secs()).unwrap_or(i64::MAX);
    let mut certificates = Vec::new();
    for (index, der) in chain.iter().enumerate() {
        // read_chain already parsed each one.
        if let Ok((_, cert)) = X509Certificate::from_der(der) {
            certificates.push(view(index, &cert, now));
        }
    }
    let mut violations: Vec<String> = check.violations.iter().map(ToString::to_string).collect();
    for c in &certificates {
        if c.expired {
            violations.push(format!(
                "certificate {} expired at {}",
                c.index, c.not_after
            ));
        }
        if c.not_yet_valid {
            violations.push(format!(
                "certificate {} is not valid before {}",
                c.index, c.not_before
            ));
        }
    }
    let (verified, verify_error) = match &args.bundle {
        None => (None, None),
        Some(path) => match verify_against(args, path, &chain, check.spiffe_id.as_ref()) {
            Ok(()) => (Some(true), None),
            Err(e) => (Some(false), Some(format!("{e:#}"))),
        },
    };
    let valid = violations.is_empty() && verified != Some(false);
    let report = Report {
        spiffe_id: check.spiffe_id.map(|i| i.to_string()),
        certificates,
        violations,
        verified,
        verify_error,
        valid,
    };
    match args.output {
        Output::Json => outln!("{}", serde_json::to_string_pretty(&report)?),
        Output::Human => print_human(&report),
    }
    Ok(if report.valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn verify_against(
    args: &SvidInspectArgs,
    path: &std::path::Path,
    chain: &[Vec<u8>],
    leaf_id: Option<&SpiffeId>,
) -> anyhow::Result<()> {
    let td = match (&args.trust_domain, leaf_id) {
        (Some(td), _) => TrustDomain::new(td).with_context(|| format!("--trust-domain {td:?}"))?,
        (None, Some(id)) => id.trust_domain(),
        (None, None) => {
            bail!("the leaf has no valid SPIFFE ID, so its trust domain's bundle cannot be chosen")
        }
    };
    let bytes = read_limited(path)?;
    let bundle = if bytes.trim_ascii_start().starts_with(b"{") {
        Bundle::parse(td, &bytes)?
    } else {
        let mut b = Bundle::new(td);
        for der in read_chain(&bytes).with_context(|| format!("bundle {}", path.display()))? {
            b.add_x509_authority(der)?;
        }
        b
    };
    let chain: Vec<CertificateDer<'_>> = chain
        .iter()
        .map(|d| CertificateDer::from(d.as_slice()))
        .collect();
    verify_svid(&chain, &bundle, UnixTime::now(), PeerRole::Client)?;
    Ok(())
}

fn read_limited(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if meta.len() > MAX_INPUT {
        bail!(
            "{} is {} bytes; at most {MAX_INPUT} are accepted",
            path.display(),
            meta.len()
        );
    }
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Certificates from PEM (CERTIFICATE blocks; other blocks such as keys are skipped) or from
/// one or more concatenated DER certificates.
fn read_chain(bytes: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
    if bytes.trim_ascii_start().starts_with(b"-----BEGIN") {
        let blocks = ::pem::parse_many(bytes).context("not valid PEM")?;
        let certs: Vec<Vec<u8>> = blocks
            .into_iter()
            .filter(|p| p.tag() == "CERTIFICATE")
            .map(::pem::Pem::into_contents)
            .collect();
        if certs.is_empty() {
            bail!("no CERTIFICATE block in the PEM input");
        }
        for (i, der) in certs.iter().enumerate() {
            parse_one(der).with_context(|| format!("PEM certificate {i}"))?;
        }
        return Ok(certs);
    }
    let mut rest = bytes;
    let mut certs = Vec::new();
    while !rest.is_empty() {
        let consumed = parse_one(rest).with_context(|| {
            format!(
                "DER certificate {} (byte {})",
                certs.len(),
                bytes.len() - rest.len()
            )
        })?;
        certs.push(rest[..consumed].to_vec());
        rest = &rest[consumed..];
    }
    if certs.is_empty() {
        bail!("the input is empty");
    }
    Ok(certs)
}

/// Parses one certificate at the start of `der` and returns its length.
fn parse_one(der: &[u8]) -> anyhow::Result<usize> {
    match X509Certificate::from_der(der) {
        Ok((rest, _)) => Ok(der.len() - rest.len()),
        Err(e) => bail!("not an X.509 certificate: {e}"),
    }
}

fn view(index: usize, cert: &X509Certificate<'_>, now: i64) -> CertView {
    let mut uri_sans = Vec::new();
    let mut dns_sans = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(u) => uri_sans.push((*u).to_owned()),
                GeneralName::DNSName(d) => dns_sans.push((*d).to_owned()),
                _ => {}
            }
        }
    }
    let is_ca = matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
    let mut key_usage = Vec::new();
    if let Ok(Some(ku)) = cert.key_usage() {
        let ku = ku.value;
        for (set, name) in [
            (ku.digital_signature(), "digitalSignature"),
            (ku.non_repudiation(), "contentCommitment"),
            (ku.key_encipherment(), "keyEncipherment"),
            (ku.data_encipherment(), "dataEncipherment"),
            (ku.key_agreement(), "keyAgreement"),
            (ku.key_cert_sign(), "keyCertSign"),
            (ku.crl_sign(), "cRLSign"),
            (ku.encipher_only(), "encipherOnly"),
            (ku.decipher_only(), "decipherOnly"),
        ] {
            if set {
                key_usage.push(name);
            }
        }
    }
    let extended_key_usage = match cert.extended_key_usage() {
        Ok(Some(eku)) => {
            let e = eku.value;
            let mut v: Vec<String> = [
                (e.any, "any"),
                (e.server_auth, "serverAuth"),
                (e.client_auth, "clientAuth"),
                (e.code_signing, "codeSigning"),
                (e.email_protection, "emailProtection"),
                (e.time_stamping, "timeStamping"),
                (e.ocsp_signing, "OCSPSigning"),
            ]
            .into_iter()
            .filter(|(set, _)| *set)
            .map(|(_, n)| n.to_owned())
            .collect();
            v.extend(e.other.iter().map(ToString::to_string));
            Some(v)
        }
        _ => None,
    };
    let validity = cert.validity();
    CertView {
        index,
        role: if index == 0 { "leaf" } else { "signing" },
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        serial: cert.raw_serial_as_string(),
        not_before: validity.not_before.to_string(),
        not_after: validity.not_after.to_string(),
        expired: validity.not_after.timestamp() < now,
        not_yet_valid: validity.not_before.timestamp() > now,
        uri_sans,
        dns_sans,
        is_ca,
        key_usage,
        extended_key_usage,
        public_key: describe_key(cert.public_key()),
    }
}

fn describe_key(spki: &SubjectPublicKeyInfo<'_>) -> String {
    use x509_parser::public_key::PublicKey;
    match spki.parsed() {
        Ok(PublicKey::EC(p)) => format!("EC ({} bits)", p.key_size()),
        Ok(PublicKey::RSA(r)) => format!("RSA ({} bits)", r.key_size()),
        Ok(PublicKey::Unknown(_)) | Err(_) => spki.algorithm.algorithm.to_id_string(),
        Ok(_) => "other".to_owned(),
    }
}

fn print_human(r: &Report) {
    for c in &r.certificates {
        outln!(
            "certificate {} ({}{})",
            c.index,
            c.role,
            if c.is_ca { ", CA" } else { "" }
        );
        outln!("  subject:     {}", c.subject);
        outln!("  issuer:      {}", c.issuer);
        outln!("  serial:      {}", c.serial);
        let state = if c.expired {
            "  EXPIRED"
        } else if c.not_yet_valid {
            "  NOT YET VALID"
        } else {
            ""
        };
        outln!("  valid:       {} .. {}{state}", c.not_before, c.not_after);
        for u in &c.uri_sans {
            outln!("  URI SAN:     {u}");
        }
        for d in &c.dns_sans {
            outln!("  DNS SAN:     {d}");
        }
        outln!(
            "  key usage:   {}",
            if c.key_usage.is_empty() {
                "(none)".to_owned()
            } else {
                c.key_usage.join(", ")
            }
        );
        if let Some(eku) = &c.extended_key_usage {
            outln!("  ext. usage:  {}", eku.join(", "));
        }
        outln!("  public key:  {}", c.public_key);
    }
    outln!("");
    match &r.spiffe_id {
        Some(id) => outln!("SPIFFE ID: {id}"),
        None => outln!("SPIFFE ID: (none)"),
    }
    match r.verified {
        Some(true) => outln!("chain verifies against the bundle"),
        Some(false) => outln!(
            "chain does NOT verify: {}",
            r.verify_error.as_deref().unwrap_or("")
        ),
        None => {}
    }
    if r.violations.is_empty() {
        outln!("X509-SVID rules: all satisfied");
    } else {
        outln!("X509-SVID rules broken:");
        for v in &r.violations {
            outln!("  - {v}");
        }
    }
}
