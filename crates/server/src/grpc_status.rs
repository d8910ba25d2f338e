//! The rules every gRPC server Tessera runs (the admin API, the agent API, the Workload API)
//! shares, in one builder ([`server`]): an error's message is at most [`MAX_MESSAGE`] bytes, and
//! one connection holds at most [`MAX_STREAMS_PER_CONNECTION`] streams.
//!
//! Messages name what was wrong and often repeat the value asked for (`no entry "…"`). A value
//! of hundreds of kilobytes made an answer whose `grpc-message` header went past the client's
//! HTTP/2 header-list limit (16 KiB by default), and the client saw no status at all, only a
//! broken connection.

use tonic::codegen::http;

/// Streams one connection may hold open (HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS`, RFC 9113
/// §6.5.2); a client waits for one to end before opening more. A client needs a handful (an
/// agent one Sync stream and short calls, a workload a few watches); each open stream holds the
/// server's resources, and without a limit one Workload API connection opened 25,000 and one
/// agent-API connection without a certificate 20,000 (300 MB).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 128;

/// What [`server`] puts under every service.
pub type Layers = tower::layer::util::Stack<
    tower::util::MapResponseLayer<
        fn(http::Response<tonic::body::Body>) -> http::Response<tonic::body::Body>,
    >,
    tower::layer::util::Identity,
>;

/// A tonic server builder with the rules of the module doc.
pub fn server() -> tonic::transport::Server<Layers> {
    tonic::transport::Server::builder()
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .layer(tower::util::MapResponseLayer::new(
            bound_message::<tonic::body::Body> as fn(_) -> _,
        ))
}

/// The longest `grpc-message` sent, in bytes of its percent-encoded form.
pub const MAX_MESSAGE: usize = 2048;

/// Cuts an error answer's `grpc-message` to [`MAX_MESSAGE`] bytes, marked as cut. Only the
/// headers are looked at: a handler's error is a trailers-only answer, its status in the headers.
pub fn bound_message<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    let Some(message) = headers.get("grpc-message") else {
        return response;
    };
    let bytes = message.as_bytes();
    if bytes.len() <= MAX_MESSAGE {
        return response;
    }
    // Never cut a `%XX` escape in two.
    let mut end = MAX_MESSAGE;
    if let Some(p) = bytes[end.saturating_sub(2)..end]
        .iter()
        .position(|b| *b == b'%')
    {
        end = end - 2 + p;
    }
    let mut cut = bytes[..end].to_vec();
    cut.extend_from_slice(b"...%20(cut%20to%202%20KiB)");
    if let Ok(v) = http::HeaderValue::from_bytes(&cut) {
        headers.insert("grpc-message", v);
    }
    response
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn with_message(m: &str) -> http::Response<()> {
        let mut r = http::Response::new(());
        r.headers_mut()
            .insert("grpc-message", http::HeaderValue::from_str(m).unwrap());
        r
    }

    #[test]
    fn a_long_message_is_cut_never_inside_an_escape() {
        let short = bound_message(with_message("no%20entry"));
        assert_eq!(short.headers()["grpc-message"], "no%20entry");
        for pad in 0..3 {
            let long = format!("{}{}", "a".repeat(MAX_MESSAGE - 3 + pad), "%22".repeat(100));
            let r = bound_message(with_message(&long));
            let m = r.headers()["grpc-message"].to_str().unwrap();
            let kept = m.strip_suffix("...%20(cut%20to%202%20KiB)").unwrap();
            assert!(kept.len() <= MAX_MESSAGE, "{}", kept.len());
            // Every `%` starts a whole escape.
            let b = kept.as_bytes();
            for (i, c) in b.iter().enumerate() {
                if *c == b'%' {
                    assert!(i + 3 <= b.len(), "an escape cut at {i}");
                }
            }
        }
        let r = bound_message(http::Response::new(()));
        assert!(r.headers().get("grpc-message").is_none());
    }
}
