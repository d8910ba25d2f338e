//! Read-ahead under TLS.
//!
//! rustls pulls ciphertext from the socket at most 4 KiB at a time, so a 16 KiB record costs four
//! or more `read` system calls, and a bulk transfer spends much of its time entering the kernel.
//! [`ReadAhead`] sits between the socket and rustls: a small read is served from a buffer that
//! one large `read` filled. The buffer is allocated only when data is flowing and freed as soon
//! as it is drained and the socket has nothing more (back to [`crate::pool`]), so an idle connection holds none (the
//! memory-per-idle-connection target). Writes pass straight through.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The read-ahead buffer: several TLS records per system call, and below the allocator's
/// threshold for mapping memory (so taking and freeing it stays cheap).
pub const READ_AHEAD: usize = 64 * 1024;

/// A stream whose small reads are served from one large read.
#[derive(Debug)]
pub struct ReadAhead<S> {
    inner: S,
    buf: BytesMut,
    pos: usize,
}

impl<S> ReadAhead<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            buf: BytesMut::new(),
            pos: 0,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Whether a buffer is held now (for tests of the idle cost).
    pub fn holds_buffer(&self) -> bool {
        self.buf.capacity() > 0
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos == this.buf.len() {
            if out.remaining() >= READ_AHEAD {
                // A large read gains nothing from the buffer.
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            this.buf.clear();
            this.pos = 0;
            if this.buf.capacity() < READ_AHEAD {
                this.buf = crate::pool::take(READ_AHEAD);
            }
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.buf) {
                Poll::Pending => {
                    // Nothing to read: give the buffer back while the connection waits.
                    crate::pool::give(std::mem::take(&mut this.buf));
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(_)) => {}
            }
        }
        let n = (this.buf.len() - this.pos).min(out.remaining());
        out.put_slice(&this.buf[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn small_reads_see_every_byte_in_order_and_idle_frees_the_buffer() {
        let (mut w, r) = tokio::io::duplex(1 << 20);
        let mut r = ReadAhead::new(r);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
        w.write_all(&data).await.unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        while got.len() < data.len() {
            let n = r.read(&mut chunk).await.unwrap();
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, data);
        // Drained, and the peer has sent nothing more: a read is pending and no buffer is held.
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut b = ReadBuf::new(&mut chunk);
        assert!(Pin::new(&mut r).poll_read(&mut cx, &mut b).is_pending());
        assert!(!r.holds_buffer());
        // EOF still reads as EOF.
        drop(w);
        assert_eq!(r.read(&mut chunk).await.unwrap(), 0);
    }
}
