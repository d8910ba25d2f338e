//! The bundle endpoint (SPIFFE Trust Domain and Bundle §5; SPIFFE Federation §4): `GET` over
//! HTTPS returns the trust domain's latest bundle as SPIFFE bundle JSON with
//! `Content-Type: application/json`. No client authentication — the bundle is public (§5.2).
//!
//! The bundle is read from the datastore on every request, so every server sharing it serves the
//! same latest bundle, including keys published ahead of a rotation.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::ResolvesServerCert;
use tessera_spiffe::Bundle;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{BundleEndpointConfig, BundleEndpointProfile};
use crate::state::State;
use crate::{ServerError, ServerError as E};

/// Loads the https_web certificate and key named in the config.
fn web_cert(cfg: &BundleEndpointConfig) -> Result<Arc<dyn ResolvesServerCert>, ServerError> {
    let (Some(cert_path), Some(key_path)) = (&cfg.cert_path, &cfg.key_path) else {
        return Err(E::Invalid(
            "bundle_endpoint: profile https_web needs cert_path and key_path".into(),
        ));
    };
    let chain = CertificateDer::pem_file_iter(cert_path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            E::Invalid(format!(
                "bundle_endpoint.cert_path {}: {e}",
                cert_path.display()
            ))
        })?;
    if chain.is_empty() {
        return Err(E::Invalid(format!(
            "bundle_endpoint.cert_path {}: no CERTIFICATE in it",
            cert_path.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| {
        E::Invalid(format!(
            "bundle_endpoint.key_path {}: {e}",
            key_path.display()
        ))
    })?;
    tessera_tls::web::fixed_cert(chain, key).map_err(|e| {
        E::Invalid(format!(
            "bundle_endpoint: certificate {} and key {} do not make a usable pair: {e}",
            cert_path.display(),
            key_path.display()
        ))
    })
}

/// The JSON served: the stored bundle with our `spiffe_refresh_hint` when it has none.
async fn bundle_json(state: &State) -> Result<Vec<u8>, String> {
    let stored = state
        .store
        .get_bundle(&state.td)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("no bundle published yet")?;
    let mut bundle =
        Bundle::parse(state.td.clone(), &stored.bundle_json).map_err(|e| e.to_string())?;
    if bundle.refresh_hint.is_none() {
        bundle.refresh_hint = Some(state.cfg.bundle_endpoint.refresh_hint.0);
    }
    Ok(bundle.to_json().into_bytes())
}

async fn handle(
    state: Arc<State>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let text = |code: StatusCode, msg: &str| {
        let mut r = Response::new(Full::new(Bytes::from(format!("{msg}\n"))));
        *r.status_mut() = code;
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here");
        r.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return Ok(r);
    }
    Ok(match bundle_json(&state).await {
        Ok(json) => {
            let mut r = Response::new(Full::new(Bytes::from(json)));
            // Trust Domain and Bundle §5.1: the bundle is served as application/json.
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => {
            tracing::error!(error = %e, "bundle endpoint: cannot read the bundle");
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the bundle is not available",
            )
        }
    })
}

/// Starts the bundle endpoint when configured. `svid` is the server's rotating SVID resolver,
/// presented in the https_spiffe profile.
pub(crate) async fn start(
    state: Arc<State>,
    svid: Arc<tessera_tls::SvidResolver>,
    mut stop: watch::Receiver<bool>,
) -> Result<Option<(SocketAddr, JoinHandle<()>)>, ServerError> {
    let cfg = &state.cfg.bundle_endpoint;
    let Some(addr) = cfg.bind_address else {
        return Ok(None);
    };
    let cert: Arc<dyn ResolvesServerCert> = match cfg.profile {
        BundleEndpointProfile::HttpsWeb => web_cert(cfg)?,
        BundleEndpointProfile::HttpsSpiffe => svid,
    };
    let tls =
        tessera_tls::web::bundle_endpoint_server_config(cert).map_err(|e| E::Tls(e.to_string()))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind(addr).await.map_err(|source| E::Io {
        what: format!("bind bundle endpoint {addr}"),
        source,
    })?;
    let local = listener.local_addr().map_err(|source| E::Io {
        what: "bundle endpoint address".into(),
        source,
    })?;
    let profile = cfg.profile;
    let task = tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => Some(r),
                _ = stop.wait_for(|s| *s) => None,
            };
            let (tcp, peer) = match accepted {
                None => return,
                Some(Ok(c)) => c,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "bundle endpoint: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let state = state.clone();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(
                    std::time::Duration::from_secs(10),
                    acceptor.accept(tcp),
                )
                .await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "bundle endpoint: TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                let svc = hyper::service::service_fn(move |req| handle(state.clone(), req));
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc);
                // A connection lives at most a minute: the answer is one small document.
                let _ = tokio::time::timeout(std::time::Duration::from_secs(60), conn).await;
            });
        }
    });
    tracing::info!(address = %local, profile = ?profile, "bundle endpoint started");
    Ok(Some((local, task)))
}
