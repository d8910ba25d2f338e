//! The stream tunnel (ALPN `tessera-stream/1`): the fast path beside HTTP/2 CONNECT. One mutual-TLS
//! connection carries one proxied connection, so bytes go straight from the workload's socket
//! into TLS records and back, with no HTTP/2 framing, flow-control windows or hand-off between
//! tasks. Identity is exactly as on the HTTP/2 path: the same TLS configs (so the same SPIFFE
//! verifiers), and the inbound side runs the same admission (target address, declared port,
//! policy) before it connects anywhere.
//!
//! Wire format, after the TLS handshake (big-endian lengths):
//! - client → server: `u16 len`, then `len` bytes of ASCII `IP:PORT` (the CONNECT target);
//! - server → client: `u16 status` (HTTP status codes: 200 admitted, 403 refused, ...), `u16 len`,
//!   then `len` bytes of UTF-8 reason;
//! - then raw bytes both ways; a TLS `close_notify` is the half-close.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// ALPN of the stream tunnel.
pub const ALPN_STREAM: &[u8] = b"tessera-stream/1";
/// The longest target accepted (`[IPv6]:port` is at most 47 bytes).
pub const MAX_TARGET: usize = 64;
/// The longest reason sent back.
pub const MAX_REASON: usize = 1024;

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// The request naming `target`. The outbound side hands it to rustls before the handshake
/// ends, so it leaves in the same write as the client's Finished: rustls sends such data only
/// once the handshake is complete, i.e. after the server's certificate and SPIFFE ID were
/// verified, never to an unverified peer.
pub fn request(target: SocketAddr) -> Vec<u8> {
    let t = target.to_string();
    let mut msg = Vec::with_capacity(2 + t.len());
    msg.extend_from_slice(&(t.len() as u16).to_be_bytes());
    msg.extend_from_slice(t.as_bytes());
    msg
}

/// Reads the target text; the caller validates it exactly as an HTTP/2 CONNECT authority.
pub async fn read_request<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<String> {
    let len = usize::from(r.read_u16().await?);
    if len == 0 || len > MAX_TARGET {
        return Err(bad(format!(
            "stream tunnel target of {len} bytes (expected 1..={MAX_TARGET})"
        )));
    }
    let mut t = vec![0; len];
    r.read_exact(&mut t).await?;
    String::from_utf8(t).map_err(|_| bad("stream tunnel target is not UTF-8".into()))
}

/// Sends the admission result in one TLS record.
pub async fn write_response<W: AsyncWrite + Unpin>(
    w: &mut W,
    status: u16,
    reason: &str,
) -> io::Result<()> {
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let reason = &reason[..end];
    let mut msg = Vec::with_capacity(4 + reason.len());
    msg.extend_from_slice(&status.to_be_bytes());
    msg.extend_from_slice(&(reason.len() as u16).to_be_bytes());
    msg.extend_from_slice(reason.as_bytes());
    w.write_all(&msg).await?;
    w.flush().await
}

/// The admission result, (status, reason), from the plaintext of the record that carried it
/// ([`write_response`] sends it in one record, so the record is exactly the result).
pub fn parse_response(msg: &[u8]) -> io::Result<(u16, String)> {
    let (Some(status), Some(len)) = (msg.get(..2), msg.get(2..4)) else {
        return Err(bad(format!(
            "stream tunnel admission of {} bytes (at least 4)",
            msg.len()
        )));
    };
    let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
    if len > MAX_REASON {
        return Err(bad(format!(
            "stream tunnel reason of {len} bytes (at most {MAX_REASON})"
        )));
    }
    if msg.len() != 4 + len {
        return Err(bad(format!(
            "stream tunnel admission record of {} bytes, expected {}",
            msg.len(),
            4 + len
        )));
    }
    let status = u16::from_be_bytes([status[0], status[1]]);
    Ok((status, String::from_utf8_lossy(&msg[4..]).into_owned()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test]
    async fn request_and_response_round_trip() {
        let (mut a, mut b) = tokio::io::duplex(256);
        let target: SocketAddr = "198.18.0.2:8080".parse().unwrap();
        a.write_all(&request(target)).await.unwrap();
        assert_eq!(read_request(&mut b).await.unwrap(), "198.18.0.2:8080");
        write_response(&mut b, 403, "denied by policy")
            .await
            .unwrap();
        drop(b);
        let mut msg = Vec::new();
        a.read_to_end(&mut msg).await.unwrap();
        assert_eq!(
            parse_response(&msg).unwrap(),
            (403, "denied by policy".to_owned())
        );
    }

    #[test]
    fn a_short_long_or_oversized_admission_is_refused() {
        for (msg, what) in [
            (&[0u8, 200, 0][..], "at least 4"),
            (&[0, 200, 0, 2, b'o'][..], "expected 6"),
            (&[0, 200, 0, 0, b'x'][..], "expected 4"),
            (&[0, 200, 0xff, 0xff][..], "at most"),
        ] {
            let e = parse_response(msg).unwrap_err();
            assert!(e.to_string().contains(what), "{what}: {e}");
        }
        assert_eq!(
            parse_response(&[0, 200, 0, 0]).unwrap(),
            (200, String::new())
        );
    }

    #[tokio::test]
    async fn oversized_or_empty_targets_are_refused() {
        for len in [0u16, (MAX_TARGET + 1) as u16, u16::MAX] {
            let (mut a, mut b) = tokio::io::duplex(256);
            a.write_all(&len.to_be_bytes()).await.unwrap();
            let e = read_request(&mut b).await.unwrap_err();
            assert!(e.to_string().contains("expected 1..="), "{e}");
        }
    }

    #[tokio::test]
    async fn long_reasons_are_cut_on_a_char_boundary() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let reason = "é".repeat(MAX_REASON);
        write_response(&mut b, 502, &reason).await.unwrap();
        drop(b);
        let mut msg = Vec::new();
        a.read_to_end(&mut msg).await.unwrap();
        let (status, got) = parse_response(&msg).unwrap();
        assert_eq!(status, 502);
        assert!(got.len() <= MAX_REASON && reason.starts_with(&got));
    }
}
