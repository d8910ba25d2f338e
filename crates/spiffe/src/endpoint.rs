//! Workload API endpoint addresses (`SPIFFE_ENDPOINT_SOCKET`), per SPIFFE Workload Endpoint §4.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

/// Where the Workload API is served.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EndpointAddr {
    /// `unix:///abs/path` (or `unix:/abs/path`, the same URI without the empty authority).
    Unix(PathBuf),
    /// `tcp://IP:port`.
    Tcp(SocketAddr),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    #[error("workload endpoint address is empty")]
    Empty,
    #[error(
        "workload endpoint address {addr:?}: scheme must be `unix` or `tcp` (Workload Endpoint §4)"
    )]
    Scheme { addr: String },
    #[error(
        "workload endpoint address {addr:?}: a `unix` address MUST NOT have an authority (host) (Workload Endpoint §4)"
    )]
    UnixAuthority { addr: String },
    #[error(
        "workload endpoint address {addr:?}: a `unix` address needs an absolute socket path, like unix:///run/tessera/agent.sock (Workload Endpoint §4)"
    )]
    UnixPath { addr: String },
    #[error(
        "workload endpoint address {addr:?}: {component} is not allowed; only scheme and {allowed} may be set (Workload Endpoint §4)"
    )]
    ExtraComponent {
        addr: String,
        component: &'static str,
        allowed: &'static str,
    },
    #[error(
        "workload endpoint address {addr:?}: a `tcp` host MUST be an IP address, not a name (Workload Endpoint §4)"
    )]
    TcpHost { addr: String },
    #[error(
        "workload endpoint address {addr:?}: a `tcp` address needs a port between 1 and 65535 (Workload Endpoint §4)"
    )]
    TcpPort { addr: String },
}

impl EndpointAddr {
    pub fn parse(addr: &str) -> Result<Self, EndpointError> {
        if addr.is_empty() {
            return Err(EndpointError::Empty);
        }
        let owned = || addr.to_owned();
        let extra = |component, allowed| EndpointError::ExtraComponent {
            addr: addr.to_owned(),
            component,
            allowed,
        };
        // Query, fragment and userinfo are never valid in either scheme ("no other component may be set").
        if addr.contains('?') {
            return Err(extra("a query", "path (unix) or host and port (tcp)"));
        }
        if addr.contains('#') {
            return Err(extra("a fragment", "path (unix) or host and port (tcp)"));
        }
        if let Some(rest) = addr.strip_prefix("unix:") {
            let path = match rest.strip_prefix("//") {
                Some(after) => {
                    let auth_end = after.find('/').unwrap_or(after.len());
                    if auth_end != 0 {
                        return Err(EndpointError::UnixAuthority { addr: owned() });
                    }
                    after
                }
                None => rest,
            };
            // The path is taken literally: percent-decoding would give two spellings to one socket.
            if !path.starts_with('/') || path.len() < 2 || path.ends_with('/') {
                return Err(EndpointError::UnixPath { addr: owned() });
            }
            if path.contains('%') {
                return Err(extra(
                    "percent-encoding in the path",
                    "a literal absolute path",
                ));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        if let Some(auth) = addr.strip_prefix("tcp://") {
            if auth.contains('/') {
                return Err(extra("a path", "host and port"));
            }
            if auth.contains('@') {
                return Err(extra("userinfo", "host and port"));
            }
            let (host, port) =
                split_host_port(auth).ok_or(EndpointError::TcpPort { addr: owned() })?;
            let ip =
                IpAddr::from_str(host).map_err(|_| EndpointError::TcpHost { addr: owned() })?;
            let port = match port.parse::<u16>() {
                Ok(p) if p != 0 && port.bytes().all(|b| b.is_ascii_digit()) => p,
                _ => return Err(EndpointError::TcpPort { addr: owned() }),
            };
            return Ok(Self::Tcp(SocketAddr::new(ip, port)));
        }
        Err(EndpointError::Scheme { addr: owned() })
    }
}

/// `host:port` or `[v6]:port`; the host is returned without brackets.
fn split_host_port(auth: &str) -> Option<(&str, &str)> {
    if let Some(rest) = auth.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = after.strip_prefix(':')?;
        return Some((host, port));
    }
    let (host, port) = auth.rsplit_once(':')?;
    if host.contains(':') {
        // An unbracketed IPv6 address: the port is ambiguous.
        return None;
    }
    Some((host, port))
}

impl FromStr for EndpointAddr {
    type Err = EndpointError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for EndpointAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(p) => write!(f, "unix://{}", p.display()),
            Self::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_address_rules() {
        let ok: &[(&str, EndpointAddr)] = &[
            (
                "unix:///run/agent.sock",
                EndpointAddr::Unix("/run/agent.sock".into()),
            ),
            (
                "unix:/run/agent.sock",
                EndpointAddr::Unix("/run/agent.sock".into()),
            ),
            (
                "tcp://127.0.0.1:8000",
                EndpointAddr::Tcp("127.0.0.1:8000".parse().unwrap()),
            ),
            (
                "tcp://[::1]:8000",
                EndpointAddr::Tcp("[::1]:8000".parse().unwrap()),
            ),
        ];
        for (input, want) in ok {
            assert_eq!(&EndpointAddr::parse(input).unwrap(), want, "{input}");
            assert_eq!(EndpointAddr::parse(&want.to_string()).unwrap(), *want);
        }
        let bad: &[(&str, &str)] = &[
            ("", "empty"),
            ("/run/agent.sock", "scheme must be"),
            ("http://127.0.0.1:80", "scheme must be"),
            ("unix://host/run/agent.sock", "MUST NOT have an authority"),
            ("unix://", "absolute socket path"),
            ("unix:///", "absolute socket path"),
            ("unix:relative.sock", "absolute socket path"),
            ("unix:///run/agent.sock?x=1", "a query is not allowed"),
            ("unix:///run/agent.sock#x", "a fragment is not allowed"),
            ("unix:///run/a%20b.sock", "percent-encoding"),
            ("tcp://localhost:8000", "MUST be an IP address"),
            ("tcp://127.0.0.1", "needs a port"),
            ("tcp://127.0.0.1:0", "needs a port"),
            ("tcp://127.0.0.1:70000", "needs a port"),
            ("tcp://127.0.0.1:+80", "needs a port"),
            ("tcp://::1:8000", "needs a port"),
            ("tcp://127.0.0.1:8000/foo", "a path is not allowed"),
            ("tcp://user@127.0.0.1:8000", "userinfo is not allowed"),
        ];
        for (input, want) in bad {
            let err = EndpointAddr::parse(input).unwrap_err().to_string();
            assert!(err.contains(want), "{input}: {err}");
        }
    }
}
