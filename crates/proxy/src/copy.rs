//! Bidirectional copy with adaptive buffers.
//!
//! Each direction starts with a buffer of [`MIN_BUF`] and doubles it (up to [`MAX_BUF`]) whenever a
//! read fills it, so a bulk transfer moves large chunks with few system calls and TLS writes of
//! many records at once. A direction holds no buffer while it waits for data: when a read is
//! pending and nothing is left to write, the buffer goes back to the thread's cache
//! ([`crate::pool`]). An idle proxied connection therefore
//! costs no copy buffers at all (the memory-per-idle-connection target), and a busy one never
//! waits for an allocation larger than it has already proven to need.
//!
//! Half-close: when one side's read ends, the other side's write half is shut down (for TLS, a
//! `close_notify`), and the copy goes on in the other direction until it ends too.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};

/// The first buffer of a direction: one full TLS record of plaintext.
pub const MIN_BUF: usize = 16 * 1024;
/// The largest buffer a direction grows to.
pub const MAX_BUF: usize = 256 * 1024;

/// One direction's state.
#[derive(Debug)]
struct Half {
    /// Data read and not yet written; `None` while idle.
    buf: Option<BytesMut>,
    /// How much of `buf` has been written.
    pos: usize,
    /// The size of the next buffer allocated.
    size: usize,
    read_done: bool,
    need_flush: bool,
    done: bool,
    amt: u64,
}

impl Half {
    fn new() -> Self {
        Self {
            buf: None,
            pos: 0,
            size: MIN_BUF,
            read_done: false,
            need_flush: false,
            done: false,
            amt: 0,
        }
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            // Write out what was read before reading more.
            if let Some(buf) = self.buf.as_mut() {
                while self.pos < buf.len() {
                    let n = ready!(writer.as_mut().poll_write(cx, &buf[self.pos..]))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::WriteZero,
                            "the peer accepted no more data",
                        )));
                    }
                    self.pos += n;
                    self.amt += n as u64;
                    self.need_flush = true;
                }
                // Drained: a buffer smaller than the grown size is replaced on the next read.
                self.pos = 0;
                if buf.capacity() < self.size {
                    if let Some(small) = self.buf.take() {
                        crate::pool::give(small);
                    }
                } else {
                    buf.clear();
                }
            }
            if self.read_done {
                if self.need_flush {
                    ready!(writer.as_mut().poll_flush(cx))?;
                    self.need_flush = false;
                }
                ready!(writer.as_mut().poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(self.amt));
            }
            let size = self.size;
            let buf = self.buf.get_or_insert_with(|| crate::pool::take(size));
            match tokio_util::io::poll_read_buf(reader.as_mut(), cx, buf) {
                Poll::Pending => {
                    // Idle: give the (empty) buffer back, and push out what was written.
                    if let Some(b) = self.buf.take() {
                        crate::pool::give(b);
                    }
                    if self.need_flush {
                        ready!(writer.as_mut().poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(0)) => self.read_done = true,
                Poll::Ready(Ok(n)) => {
                    if n >= self.size && self.size < MAX_BUF {
                        self.size *= 2;
                    }
                }
            }
        }
    }
}

/// The bytes a copy has carried each way so far (there: first argument → second; back), readable
/// however the copy ends: also when its future is dropped, as live re-authorization does to
/// close a connection, so the access record still says what went through.
#[derive(Debug, Default)]
pub struct Progress {
    there: AtomicU64,
    back: AtomicU64,
}

impl Progress {
    /// (there, back).
    pub fn get(&self) -> (u64, u64) {
        (
            self.there.load(Ordering::Relaxed),
            self.back.load(Ordering::Relaxed),
        )
    }

    pub(crate) fn add_there(&self, n: u64) {
        self.there.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn add_back(&self, n: u64) {
        self.back.fetch_add(n, Ordering::Relaxed);
    }

    // Stores, where each direction has one writer that keeps its own total.
    pub(crate) fn set_there(&self, total: u64) {
        self.there.store(total, Ordering::Relaxed);
    }

    pub(crate) fn set_back(&self, total: u64) {
        self.back.store(total, Ordering::Relaxed);
    }
}

/// Copies `a` → `b` and `b` → `a` until both directions have ended; returns the bytes copied
/// each way (`a` → `b`, `b` → `a`).
pub async fn bidirectional<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    counted(a, b, &Progress::default()).await
}

/// [`bidirectional`], keeping `progress` up to date as it goes.
pub async fn counted<A, B>(a: &mut A, b: &mut B, progress: &Progress) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut ab = Half::new();
    let mut ba = Half::new();
    poll_fn(|cx| {
        let a_to_b = if ab.done {
            Poll::Ready(Ok(ab.amt))
        } else {
            ab.poll_copy(cx, Pin::new(&mut *a), Pin::new(&mut *b))
        };
        let b_to_a = if ba.done {
            Poll::Ready(Ok(ba.amt))
        } else {
            ba.poll_copy(cx, Pin::new(&mut *b), Pin::new(&mut *a))
        };
        progress.set_there(ab.amt);
        progress.set_back(ba.amt);
        match (a_to_b, b_to_a) {
            (Poll::Ready(Err(e)), _) | (_, Poll::Ready(Err(e))) => Poll::Ready(Err(e)),
            (Poll::Ready(Ok(x)), Poll::Ready(Ok(y))) => Poll::Ready(Ok((x, y))),
            _ => Poll::Pending,
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    #[tokio::test]
    async fn copies_both_ways_and_half_closes() {
        let (mut app_a, mut a) = duplex(1024);
        let (mut b, mut app_b) = duplex(1024);
        let task = tokio::spawn(async move { bidirectional(&mut a, &mut b).await });
        // More than MAX_BUF through a small pipe, so buffers grow and writes go in pieces.
        let big: Vec<u8> = (0..(MAX_BUF * 3)).map(|i| (i % 251) as u8).collect();
        let sent = big.clone();
        let writer = tokio::spawn(async move {
            app_a.write_all(&sent).await.unwrap();
            app_a.shutdown().await.unwrap();
            let mut back = Vec::new();
            app_a.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        app_b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, big, "a → b carried every byte in order");
        // The other direction still works after a → b ended (half-close).
        app_b.write_all(b"reply").await.unwrap();
        app_b.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"reply");
        let (x, y) = task.await.unwrap().unwrap();
        assert_eq!((x, y), (big.len() as u64, 5));
    }

    #[tokio::test]
    async fn an_idle_direction_holds_no_buffer() {
        let (_app_a, a) = duplex(64);
        let (b, _app_b) = duplex(64);
        let mut half = Half::new();
        let mut a = a;
        let mut b = b;
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(
            half.poll_copy(&mut cx, Pin::new(&mut a), Pin::new(&mut b))
                .is_pending()
        );
        assert!(half.buf.is_none(), "a pending read must free the buffer");
    }

    #[tokio::test]
    async fn buffers_grow_on_full_reads() {
        let mut half = Half::new();
        let data = vec![7u8; MAX_BUF * 4];
        let mut reader: &[u8] = &data;
        let mut sink = Vec::new();
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let r = half.poll_copy(&mut cx, Pin::new(&mut reader), Pin::new(&mut sink));
        assert!(matches!(r, Poll::Ready(Ok(n)) if n == data.len() as u64));
        assert_eq!(
            half.size, MAX_BUF,
            "full reads double the buffer up to MAX_BUF"
        );
        assert_eq!(sink, data);
    }
}
