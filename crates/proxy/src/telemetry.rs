//! The access log (one JSON line per connection, `"kind": "connection"`, and one per request on
//! ports declared `:http`, `"kind": "http_request"`) and the proxy's Prometheus metrics.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::Serialize;

/// Which path a connection took.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// A workload's connection leaving through the tunnel.
    Outbound,
    /// A peer's tunnel stream arriving for this workload.
    Inbound,
    /// Plaintext arriving on an intercepted port (transparent mode).
    InboundPlaintext,
    /// An unmapped destination passed through without the tunnel.
    Passthrough,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
            Self::InboundPlaintext => "inbound_plaintext",
            Self::Passthrough => "passthrough",
        }
    }
}

/// One connection's record.
#[derive(Debug, Clone, Serialize)]
pub struct AccessRecord {
    /// `connection`.
    kind: &'static str,
    pub direction: Direction,
    pub src_spiffe_id: Option<String>,
    pub dst_spiffe_id: Option<String>,
    pub src_addr: Option<SocketAddr>,
    pub dst_addr: Option<SocketAddr>,
    /// `allow` or `deny`.
    pub decision: &'static str,
    pub reason: String,
    /// Bytes from the source to the destination.
    pub bytes_sent: u64,
    /// Bytes from the destination back to the source.
    pub bytes_received: u64,
    pub duration_ms: u64,
}

impl AccessRecord {
    pub fn new(direction: Direction) -> Self {
        Self {
            kind: "connection",
            direction,
            src_spiffe_id: None,
            dst_spiffe_id: None,
            src_addr: None,
            dst_addr: None,
            decision: "deny",
            reason: String::new(),
            bytes_sent: 0,
            bytes_received: 0,
            duration_ms: 0,
        }
    }
}

/// One request's record on a port declared `:http` (inbound).
#[derive(Debug, Clone, Serialize)]
pub struct HttpRecord {
    /// `http_request`.
    pub(crate) kind: &'static str,
    /// `None`: plaintext admitted to policy in PERMISSIVE mode (no identity).
    pub src_spiffe_id: Option<String>,
    pub dst_spiffe_id: Option<String>,
    pub src_addr: SocketAddr,
    pub dst_addr: SocketAddr,
    /// As the client sent them (before the path is normalized).
    pub method: String,
    pub path: String,
    pub host: String,
    /// `allow` (forwarded), `deny` (policy), `invalid` (refused as malformed).
    pub decision: &'static str,
    pub reason: String,
    pub response_code: u16,
    /// From the request's start to its response head.
    pub duration_ms: u64,
}

impl Default for HttpRecord {
    fn default() -> Self {
        let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
        Self {
            kind: "http_request",
            src_spiffe_id: None,
            dst_spiffe_id: None,
            src_addr: unspecified,
            dst_addr: unspecified,
            method: String::new(),
            path: String::new(),
            host: String::new(),
            decision: "deny",
            reason: String::new(),
            response_code: 0,
            duration_ms: 0,
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnLabels {
    direction: &'static str,
    decision: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    direction: &'static str,
    flow: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    /// `allow` (forwarded; the application answered, or 502 if it could not be reached),
    /// `deny` (policy, 403 or gRPC PERMISSION_DENIED), `invalid` (400).
    decision: &'static str,
    response_code: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    side: &'static str,
    result: &'static str,
}

/// Metrics and the access log of one proxy.
#[derive(Debug)]
pub struct Telemetry {
    connections: Family<ConnLabels, Counter>,
    bytes: Family<BytesLabels, Counter>,
    duration: Family<ConnLabels, Histogram>,
    handshakes: Family<HandshakeLabels, Counter>,
    http_requests: Family<HttpLabels, Counter>,
    http_duration: Family<HttpLabels, Histogram>,
    pub(crate) active: Gauge,
    pub(crate) pooled: Gauge,
    sink: Sink,
}

struct Sink(Mutex<Box<dyn Write + Send>>);

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("access log sink")
    }
}

/// Counts one proxied connection in the `active` gauge for as long as it lives, also when its
/// task is cancelled (a drain).
#[derive(Debug)]
pub(crate) struct ActiveGuard(Gauge);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Telemetry {
    pub(crate) fn active_guard(&self) -> ActiveGuard {
        self.active.inc();
        ActiveGuard(self.active.clone())
    }

    /// Connections being proxied now (both directions).
    pub fn active_connections(&self) -> i64 {
        self.active.get()
    }

    /// Registers the metrics in `registry`; access records go to `sink` (stdout by default).
    pub fn new(registry: &mut Registry, sink: Box<dyn Write + Send>) -> Self {
        let t = Self {
            connections: Family::default(),
            bytes: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 4.0, 12))
            }),
            handshakes: Family::default(),
            http_requests: Family::default(),
            // 100 µs to ~26 s.
            http_duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0001, 4.0, 10))
            }),
            active: Gauge::default(),
            pooled: Gauge::default(),
            sink: Sink(Mutex::new(sink)),
        };
        let r = registry.sub_registry_with_prefix("tessera_proxy");
        r.register(
            "connections",
            "Proxied connections by direction and decision",
            t.connections.clone(),
        );
        r.register("bytes", "Bytes proxied", t.bytes.clone());
        r.register(
            "connection_duration_seconds",
            "Connection duration",
            t.duration.clone(),
        );
        r.register(
            "tls_handshakes",
            "Tunnel TLS handshakes by side and result",
            t.handshakes.clone(),
        );
        r.register(
            "http_requests",
            "Requests on ports declared :http, by decision and response code",
            t.http_requests.clone(),
        );
        r.register(
            "http_request_duration_seconds",
            "Request start to response head on ports declared :http",
            t.http_duration.clone(),
        );
        r.register(
            "active_connections",
            "Connections being proxied now",
            t.active.clone(),
        );
        r.register(
            "pooled_tunnels",
            "Outbound tunnel connections in the pool",
            t.pooled.clone(),
        );
        t
    }

    pub fn handshake(&self, server_side: bool, ok: bool) {
        self.handshakes
            .get_or_create(&HandshakeLabels {
                side: if server_side { "server" } else { "client" },
                result: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    /// Records one request on an `:http` port (`took`: from its start to its response head):
    /// metrics and the access log line.
    pub fn http_request(&self, mut rec: HttpRecord, took: Duration) {
        rec.duration_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
        let labels = HttpLabels {
            decision: rec.decision,
            response_code: rec.response_code,
        };
        self.http_requests.get_or_create(&labels).inc();
        self.http_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        self.write_line(&rec, rec.decision == "deny");
    }

    /// Records a finished (or refused) connection: metrics, the access log line, and a tracing
    /// event (denials at warn).
    pub fn record(&self, mut rec: AccessRecord, took: Duration) {
        rec.duration_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
        let labels = ConnLabels {
            direction: rec.direction.as_str(),
            decision: rec.decision,
        };
        self.connections.get_or_create(&labels).inc();
        self.duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        for (flow, n) in [("sent", rec.bytes_sent), ("received", rec.bytes_received)] {
            self.bytes
                .get_or_create(&BytesLabels {
                    direction: rec.direction.as_str(),
                    flow,
                })
                .inc_by(n);
        }
        self.write_line(&rec, rec.decision == "deny");
    }

    /// Writes one access-log line (and a tracing event: denials at warn).
    fn write_line(&self, rec: &impl Serialize, warn: bool) {
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        // One line, serialized once and written with one `write` (an unbuffered file would
        // otherwise see a system call per JSON token, and lines of other writers between them).
        #[derive(serde::Serialize)]
        struct Line<'a, R> {
            ts_ms: u128,
            #[serde(flatten)]
            rec: &'a R,
        }
        let Ok(mut line) = serde_json::to_vec(&Line { ts_ms: ts, rec }) else {
            return;
        };
        if warn {
            tracing::warn!(target: "tessera_proxy::access", "{}", String::from_utf8_lossy(&line));
        } else {
            tracing::debug!(target: "tessera_proxy::access", "{}", String::from_utf8_lossy(&line));
        }
        line.push(b'\n');
        if let Ok(mut sink) = self.sink.0.lock() {
            let _ = sink.write_all(&line);
            let _ = sink.flush();
        }
    }
}
