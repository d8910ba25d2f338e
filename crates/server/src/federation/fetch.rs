//! One fetch of a federated trust domain's bundle: HTTPS GET of its bundle endpoint URL,
//! authenticated as the relationship's profile says (SPIFFE Trust Domain and Bundle §5.2).
//! Every failure comes back as one sentence naming the step that failed.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use tessera_spiffe::{BundleSet, BundleSource as _, SpiffeId};
use tessera_store::FederationRelationship;
use tessera_store::model::{PROFILE_HTTPS_SPIFFE, PROFILE_HTTPS_WEB};
use tessera_tls::{ExpectedPeer, SpiffeServerVerifier};

/// Largest bundle document we read; a bundle endpoint sending more is refused.
pub(crate) const MAX_BUNDLE_BYTES: usize = 1 << 20;

/// A bundle endpoint URL, checked: `https://host[:port]/path`.
#[derive(Debug, Clone)]
pub(crate) struct EndpointUrl {
    pub(crate) host: String,
    pub(crate) port: u16,
    /// Path and query, as sent in the request line.
    pub(crate) target: String,
    /// The Host header value.
    pub(crate) authority: String,
    /// `https` (else plain `http`, which only [`parse_url_allowing_loopback_http`] admits).
    pub(crate) tls: bool,
}

/// Parses a bundle endpoint URL; the error says what is wrong with it.
pub(crate) fn parse_url(s: &str) -> Result<EndpointUrl, String> {
    let url = url::Url::parse(s).map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    if url.scheme() != "https" {
        return Err(format!(
            "{s:?}: the scheme must be https (bundle endpoints are always served over TLS, Trust Domain and Bundle §5.2)"
        ));
    }
    endpoint(s, &url)
}

/// As [`parse_url`], also admitting `http://` to a loopback address (127.0.0.0/8, ::1): only a
/// process on this host can answer there. `why` says what the source is, for the error.
pub(crate) fn parse_url_allowing_loopback_http(s: &str, why: &str) -> Result<EndpointUrl, String> {
    let url = url::Url::parse(s).map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    match url.scheme() {
        "https" => endpoint(s, &url),
        "http" => {
            let loopback = match url.host() {
                Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                // A name may resolve anywhere: only a literal loopback address is trusted.
                _ => false,
            };
            if !loopback {
                return Err(format!(
                    "{s:?}: plain http is allowed only to a loopback address (127.0.0.1, [::1]); {why}, so use https with ca_file or spiffe_id"
                ));
            }
            endpoint(s, &url)
        }
        other => Err(format!(
            "{s:?}: the scheme must be https (or http to loopback), not {other:?}"
        )),
    }
}

fn endpoint(s: &str, url: &url::Url) -> Result<EndpointUrl, String> {
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("{s:?}: credentials in the URL are not allowed"));
    }
    if url.fragment().is_some() {
        return Err(format!("{s:?}: a fragment is not allowed"));
    }
    let host = match url.host() {
        Some(url::Host::Domain(d)) => d.to_owned(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        None => return Err(format!("{s:?}: the URL has no host")),
    };
    let port = url.port_or_known_default().unwrap_or(443);
    let mut target = url.path().to_owned();
    if let Some(q) = url.query() {
        target.push('?');
        target.push_str(q);
    }
    let authority = match url.port() {
        Some(p) => format!("{}:{p}", url.host_str().unwrap_or(&host)),
        None => url.host_str().unwrap_or(&host).to_owned(),
    };
    Ok(EndpointUrl {
        host,
        port,
        target,
        authority,
        tls: url.scheme() == "https",
    })
}

/// Parses the PEM CA certificates of an https_web relationship.
pub(crate) fn parse_ca_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("CA bundle: {e}"))?;
    if certs.is_empty() {
        return Err("CA bundle: no CERTIFICATE in it".into());
    }
    Ok(certs)
}

/// The TLS client configuration for a relationship: Web PKI for `https_web`; for `https_spiffe`
/// the endpoint's X509-SVID verified by `tessera_tls` against `bundles` (the latest bundle of
/// the endpoint's trust domain, usually the one the previous fetch brought) with the
/// relationship's endpoint SPIFFE ID required.
pub(crate) fn client_config(
    rel: &FederationRelationship,
    bundles: BundleSet,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let cfg = match rel.profile.as_str() {
        PROFILE_HTTPS_WEB => {
            let roots = rel.ca_bundle_pem.as_deref().map(parse_ca_pem).transpose()?;
            tessera_tls::web::web_client_config(roots.as_deref())
        }
        PROFILE_HTTPS_SPIFFE => {
            let id: &SpiffeId = rel
                .endpoint_spiffe_id
                .as_ref()
                .ok_or("https_spiffe relationship without an endpoint SPIFFE ID")?;
            let td = id.trust_domain();
            if bundles.bundle_for(&td).is_none() {
                return Err(format!(
                    "no bundle of {td} to authenticate the endpoint {id} with: give a bootstrap bundle (--bundle-file) or `tessera bundle set --trust-domain {td}`"
                ));
            }
            let verifier = SpiffeServerVerifier::new(
                Arc::new(arc_swap::ArcSwap::from_pointee(bundles)),
                ExpectedPeer::Exact(id.clone()),
            );
            tessera_tls::web::spiffe_client_config(Arc::new(verifier))
        }
        other => return Err(format!("unknown profile {other:?}")),
    };
    cfg.map(Arc::new)
        .map_err(|e| format!("TLS configuration: {e}"))
}

/// GETs the bundle at `url` over `tls`, within `timeout`; returns the body.
pub(crate) async fn get(
    url: &str,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<Vec<u8>, String> {
    let ep = parse_url(url)?;
    match get_endpoint(&ep, Some(tls), None, MAX_BUNDLE_BYTES, timeout)
        .await
        .map_err(|e| format!("GET {url}: {e}"))?
    {
        Fetched::Body { body, .. } => Ok(body),
        Fetched::NotModified => Err(format!("GET {url}: 304 without a condition")),
    }
}

/// What a (conditional) GET brought.
#[derive(Debug)]
pub(crate) enum Fetched {
    /// `If-None-Match` matched: nothing changed.
    NotModified,
    Body {
        body: Vec<u8>,
        etag: Option<String>,
    },
}

/// GETs `ep` (over `tls` when the URL is https; `tls` must then be given), with
/// `If-None-Match: etag` when given, within `timeout`, reading at most `max` bytes. Redirects are
/// not followed: the configuration names the endpoint to trust.
pub(crate) async fn get_endpoint(
    ep: &EndpointUrl,
    tls: Option<Arc<rustls::ClientConfig>>,
    etag: Option<&str>,
    max: usize,
    timeout: Duration,
) -> Result<Fetched, String> {
    tokio::time::timeout(timeout, get_inner(ep, tls, etag, max))
        .await
        .map_err(|_| format!("no answer within {}s", timeout.as_secs()))?
}

async fn get_inner(
    ep: &EndpointUrl,
    tls: Option<Arc<rustls::ClientConfig>>,
    etag: Option<&str>,
    max: usize,
) -> Result<Fetched, String> {
    let tcp = tokio::net::TcpStream::connect((ep.host.as_str(), ep.port))
        .await
        .map_err(|e| format!("cannot connect to {}:{}: {e}", ep.host, ep.port))?;
    match (ep.tls, tls) {
        (true, Some(tls)) => {
            let name = ServerName::try_from(ep.host.clone())
                .map_err(|e| format!("{:?} is not a valid TLS server name: {e}", ep.host))?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS handshake failed: {e}"))?;
            request(ep, stream, etag, max).await
        }
        (true, None) => Err("an https URL needs a TLS configuration".into()),
        (false, _) => request(ep, tcp, etag, max).await,
    }
}

async fn request<S>(
    ep: &EndpointUrl,
    io: S,
    etag: Option<&str>,
    max: usize,
) -> Result<Fetched, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = hyper::Request::get(ep.target.as_str())
        .header(hyper::header::HOST, ep.authority.as_str())
        .header(hyper::header::ACCEPT, "application/json");
    if let Some(tag) = etag {
        req = req.header(hyper::header::IF_NONE_MATCH, tag);
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    let result = async {
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        let status = resp.status();
        if status == hyper::StatusCode::NOT_MODIFIED && etag.is_some() {
            return Ok(Fetched::NotModified);
        }
        if status != hyper::StatusCode::OK {
            return Err(format!("the endpoint answered HTTP {status}, not 200"));
        }
        let etag = resp
            .headers()
            .get(hyper::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = Limited::new(resp.into_body(), max)
            .collect()
            .await
            .map_err(|e| format!("reading the body (at most {max} bytes): {e}"))?;
        Ok(Fetched::Body {
            body: body.to_bytes().to_vec(),
            etag,
        })
    }
    .await;
    driver.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        let ep = parse_url("https://b.test:8443/bundle?x=1").unwrap();
        assert_eq!(
            (
                ep.host.as_str(),
                ep.port,
                ep.target.as_str(),
                ep.authority.as_str()
            ),
            ("b.test", 8443, "/bundle?x=1", "b.test:8443")
        );
        let ep = parse_url("https://[::1]/").unwrap();
        assert_eq!(
            (ep.host.as_str(), ep.port, ep.authority.as_str()),
            ("::1", 443, "[::1]")
        );
        for (bad, why) in [
            ("http://b.test/", "scheme must be https"),
            ("b.test/bundle", "not a URL"),
            ("https://user:pw@b.test/", "credentials"),
            ("https://b.test/#frag", "fragment"),
        ] {
            let err = parse_url(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
