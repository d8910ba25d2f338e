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

/// Binds `addr` and serves the router until `shutdown` completes. Returns the bound address
/// (useful with port 0) once listening.
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "health endpoint stopped");
        }
    });
    Ok((bound, task))
}

#[cfg(test)]
mod tests {
    use super::check_filter;

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
