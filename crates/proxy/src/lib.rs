//! `tessera proxy`: the data plane. Connections between workloads become HTTP/2 CONNECT streams
//! (HBONE, port 15008) over mutual TLS with the workloads' X509-SVIDs; the destination authorizes
//! on the SPIFFE ID proven in that same TLS session, never on an IP address.
//!
//! - [`identity`]: the proxy's SVID and bundles from the Workload API (rotation in place);
//! - [`outbound`]: explicit listeners and the transparent capture port → pooled tunnels;
//! - [`inbound`]: the tunnel server (mTLS, CONNECT target checks, policy) and the plaintext port;
//! - [`transparent`]: iptables rules, `SO_ORIGINAL_DST`, `SO_MARK`;
//! - [`stream`]: the stream tunnel (one mTLS connection per connection, the fast path);
//! - [`readahead`]: large socket reads under rustls (which reads 4 KiB at a time);
//! - [`sealed`]: the stream tunnel's data phase on its handshake's keys, records sealed in place;
//! - [`copy`]: bidirectional copy with adaptive buffers, none held while idle;
//! - [`live`]: policies pushed from the agent, re-authorization of open connections;
//! - [`telemetry`]: access log and metrics; [`run`]: wiring.

pub mod authz;
pub mod config;
pub mod copy;
pub mod destinations;
pub mod identity;
pub mod inbound;
pub mod l7;
pub mod live;
pub mod node;
pub mod outbound;
pub mod pool;
pub mod privileges;
pub mod readahead;
pub mod reload;
pub mod run;
pub mod sealed;
pub mod sockets;
pub mod stream;
pub mod telemetry;
pub mod tls;
pub mod transparent;

pub use identity::Identity;
pub use run::{ProxyOptions, RunningProxy, TransparentOptions, start};
pub use telemetry::Telemetry;
