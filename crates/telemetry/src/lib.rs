//! Logging setup, the Prometheus registry, and the HTTP endpoint every Tessera process exposes:
//! `/live` (the process runs), `/ready` (it can do its job; the body says why not) and `/metrics`
//! (Prometheus text format).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;

/// Installs the global tracing subscriber (human-readable to stderr). `filter` is a log level
/// (`error`, `warn`, `info`, `debug`, `trace`, `off`) or comma-separated `target=level`
/// directives such as `info,tessera_server=debug`; `RUST_LOG` overrides it. Calling it twice is
/// harmless.
///
/// A filter that is not one of those is refused: `EnvFilter` would read a bare word such as
/// `bogus` as a target name and log nothing at all, silently.
///
/// A failed write of a log line is dropped, never reported on stderr: when stderr is a closed
/// pipe (a log collector that died), reporting it would fail the same way, and `eprintln!`
/// panics on that, which would end a server over a lost log line.
pub fn init_logging(filter: &str) -> Result<(), String> {
    check_filter(filter)?;
    let env = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(env)
        .with_writer(std::io::stderr)
        .log_internal_errors(false)
        .try_init();
    Ok(())
}

const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Whether `filter` is a level or `target=level` directives (see [`init_logging`]).
pub fn check_filter(filter: &str) -> Result<(), String> {
    let bad = |why: String| {
        Err(format!(
            "log level {filter:?}: {why}; expected one of {} or target=level directives (info,tessera_proxy=debug)",
            LEVELS.join(", ")
        ))
    };
    if filter.trim().is_empty() {
        return bad("empty".into());
    }
    for d in filter.split(',').map(str::trim) {
        let (target, level) = match d.split_once('=') {
            Some((t, l)) => (Some(t.trim()), l.trim()),
            None => (None, d),
        };
        if target.is_some_and(|t| {
            t.is_empty()
                || !t
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':' || c == '-')
        }) {
            return bad(format!("{d:?} names no valid target"));
        }
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return bad(format!("{level:?} is not a level"));
        }
    }
    Ok(())
}

/// Answers whether the process is ready: `Ok(())` or the reason it is not.
pub type ReadyCheck =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// A [`ReadyCheck`] from a check that needs no waiting (a flag, a cached state): `Ok(())` or
/// the reason it is not ready.
pub fn ready_when<E: Into<String>>(
    check: impl Fn() -> Result<(), E> + Send + Sync + 'static,
) -> ReadyCheck {
    Arc::new(move || {
        let r = check().map_err(Into::into);
        Box::pin(async move { r })
    })
}

#[derive(Clone)]
struct HealthState {
    registry: Arc<Mutex<Registry>>,
    ready: ReadyCheck,
}

/// The health and metrics router; serve it with [`serve`].
pub fn router(registry: Arc<Mutex<Registry>>, ready: ReadyCheck) -> Router {
    Router::new()
        .route("/live", get(|| async { "live\n" }))
        .route("/ready", get(ready_handler))
        .route("/metrics", get(metrics_handler))
        .with_state(HealthState { registry, ready })
}

async fn ready_handler(State(s): State<HealthState>) -> impl IntoResponse {
    match (s.ready)().await {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn metrics_handler(State(s): State<HealthState>) -> impl IntoResponse {
    let mut body = String::new();
    let result = match s.registry.lock() {
        Ok(reg) => encode(&mut body, &reg).map_err(|e| e.to_string()),
        Err(_) => Err("metrics registry poisoned".to_owned()),
    };
    match result {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            e,
        ),
    }
}

/// Connections the health endpoint serves at once; more are closed as they arrive.
pub const MAX_CONNECTIONS: usize = 512;

/// How long one connection to the health endpoint may last. A probe or a scrape takes
/// milliseconds; without a bound, clients that connect and send nothing (or a header a byte at
/// a time) would hold descriptors until the process has none left for its real work (the
/// Workload API, the tunnel).
pub const CONNECTION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves `router` on `addr` until `shutdown` completes; returns the bound address (useful with
/// port 0) and the task. HTTP/1.1 and HTTP/2; at most [`MAX_CONNECTIONS`] connections at once,
/// each closed after [`CONNECTION_LIFETIME`].
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(accept_loop(listener, router, shutdown));
    Ok((bound, task))
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut shutdown = std::pin::pin!(shutdown);
    let mut failing = false;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = &mut shutdown => return,
        };
        let stream = match accepted {
            Ok((s, _)) => {
                failing = false;
                s
            }
            Err(e) => {
                // Out of descriptors (EMFILE) or the like: say so once, wait, try again.
                if !failing {
                    tracing::warn!(error = %e, "health endpoint: accept failed; retrying");
                }
                failing = true;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Full: closed at once, so a flood costs no descriptor for longer than this.
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::check_filter;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    async fn get_live(addr: std::net::SocketAddr) -> String {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        c.read_to_string(&mut text).await.unwrap();
        text
    }

    /// Clients that connect and send nothing cannot take the process's descriptors: beyond
    /// MAX_CONNECTIONS a connection is closed at once, and each lasts CONNECTION_LIFETIME at
    /// most; the endpoint answers again as soon as they are gone.
    #[tokio::test]
    async fn idle_connections_are_bounded_in_number_and_in_time() {
        let registry = std::sync::Arc::new(std::sync::Mutex::new(
            prometheus_client::registry::Registry::default(),
        ));
        let router = super::router(registry, super::ready_when(|| Ok::<(), String>(())));
        let (addr, _task) = super::serve(
            "127.0.0.1:0".parse().unwrap(),
            router,
            std::future::pending(),
        )
        .await
        .unwrap();
        assert!(get_live(addr).await.starts_with("HTTP/1.1 200"));

        let mut idle = Vec::new();
        for _ in 0..super::MAX_CONNECTIONS {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // Let the server take them all before the next one.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let mut over = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(std::time::Duration::from_secs(2), over.read(&mut buf))
            .await
            .expect("closed at once, not held");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");

        // Held ones are closed when their lifetime is up.
        let started = std::time::Instant::now();
        let n = tokio::time::timeout(
            super::CONNECTION_LIFETIME + std::time::Duration::from_secs(5),
            idle[0].read(&mut buf),
        )
        .await
        .expect("closed after its lifetime");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        assert!(started.elapsed() < super::CONNECTION_LIFETIME + std::time::Duration::from_secs(5));
        drop(idle);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(get_live(addr).await.starts_with("HTTP/1.1 200"));
    }

    #[test]
    fn a_filter_is_levels_or_target_directives_and_nothing_else() {
        for ok in [
            "info",
            "WARN",
            "off",
            "info,tessera_proxy=debug",
            "tessera_server::sync=trace",
        ] {
            assert_eq!(check_filter(ok), Ok(()), "{ok}");
        }
        for (bad, says) in [
            ("bogus", "\"bogus\" is not a level"),
            ("", "empty"),
            ("info,tessera_proxy=loud", "\"loud\" is not a level"),
            ("=debug", "names no valid target"),
            ("a b=info", "names no valid target"),
        ] {
            let e = check_filter(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
