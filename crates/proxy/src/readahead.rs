//! Read-ahead under TLS.
//!
//! rustls pulls ciphertext from the socket at most 4 KiB at a time, so a 16 KiB record costs four
//! or more `read` system calls, and a bulk transfer spends much of its time entering the kernel.
//! [`ReadAhead`] sits between the socket and rustls: a small read is served from a buffer that
//! one large `read` filled. The buffer is allocated only when data is flowing and freed as soon
//! as it is drained and the socket has nothing more (back to [`crate::pool`]), so an idle connection holds none (the
//! memory-per-idle-connection target). Writes pass straight through.
//!
//! Record-aligned mode (on from the start; the HTTP/2 tunnel turns it off after the handshake):
//! no read hands rustls bytes past the end of a protected record (outer type
//! `application_data`, RFC 8446 §5.2). rustls decrypts every whole record it is given, so when
//! the stream tunnel takes the connection's keys from rustls (`crate::sealed`), everything rustls
//! has read is processed, and every later byte is still here, whole records and all, for
//! [`ReadAhead::into_parts`]. Plaintext handshake and `change_cipher_spec` records (§5, §D.4)
//! go out together with the record after them: they exist only at the start of a handshake,
//! before any data, and a peer's ServerHello, CCS and encrypted flight handed over in one read
//! let rustls answer with one write (given the ServerHello alone, rustls sends its CCS at once,
//! in a segment of its own that wakes the peer for nothing).
//!
//! Holding the client's last flight ([`ReadAhead::hold_last_flight`], the stream tunnel's
//! outbound side): in TLS 1.3 a client writes nothing between the server's first protected
//! record and its own Finished (RFC 8446 §2, §4.4), so every write after a protected record was
//! read is that last flight (with any data queued behind it). It is kept here instead of sent,
//! so that the workload's first bytes, sealed under the new keys, leave in the same write
//! (`crate::sealed::Sealed::send_early`): one segment and one wake-up of the server proxy
//! instead of two, and the first bytes reach the server without waiting for the admission.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tessera_tls::records::{HEADER, TrafficSecretLog};
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
    aligned: bool,
    /// In aligned mode, the bytes of the current record not yet handed out (0 at a boundary).
    record_left: usize,
    /// The application traffic secrets the handshake over this stream logged, for the stream
    /// tunnel's hand-over (`crate::sealed`); `None` where the keys stay with rustls.
    secrets: Option<Arc<TrafficSecretLog>>,
    /// Writes after the first protected record are kept in `held` (see the module notes).
    hold: bool,
    /// A protected record has been handed out.
    protected_seen: bool,
    held: Vec<u8>,
}

impl<S> ReadAhead<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            buf: BytesMut::new(),
            pos: 0,
            aligned: true,
            record_left: 0,
            secrets: None,
            hold: false,
            protected_seen: false,
            held: Vec::new(),
        }
    }

    /// Keeps the client's last handshake flight instead of writing it, until
    /// [`Self::take_held`]: for a TLS 1.3 client whose owner takes the keys after the handshake
    /// and sends the flight itself, together with its first records.
    pub fn hold_last_flight(mut self) -> Self {
        self.hold = true;
        self
    }

    /// The bytes written and kept so far (the last flight), for the caller to send.
    pub fn take_held(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.held)
    }

    fn holding(&self) -> bool {
        self.hold && self.protected_seen
    }

    /// Carries `log`, the `key_log` of this connection's TLS config, to the hand-over.
    pub fn with_secrets(mut self, log: Arc<TrafficSecretLog>) -> Self {
        self.secrets = Some(log);
        self
    }

    /// The traffic secrets carried for the hand-over, if any.
    pub fn take_secrets(&mut self) -> Option<Arc<TrafficSecretLog>> {
        self.secrets.take()
    }

    /// Turns record-aligned reads off (for a connection whose keys stay with rustls), and drops
    /// the traffic secrets kept for a hand-over that will not come.
    pub fn unaligned(&mut self) {
        self.aligned = false;
        self.secrets = None;
    }

    /// The socket and the bytes read from it and not yet handed out, if every read so far ended
    /// on a record boundary (so the reader holds no part of a record).
    pub fn into_parts(mut self) -> Result<(S, BytesMut), S> {
        if !self.aligned || self.record_left != 0 {
            return Err(self.inner);
        }
        // A copy of the (usually empty) rest, so the read-ahead buffer goes back to the cache
        // whole instead of staying allocated for the connection's life.
        let rest = BytesMut::from(&self.buf[self.pos..]);
        crate::pool::give(std::mem::take(&mut self.buf));
        Ok((self.inner, rest))
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
        loop {
            let avail = this.buf.len() - this.pos;
            let mut n = avail.min(out.remaining());
            if this.aligned {
                if this.record_left == 0 && avail >= HEADER {
                    let (len, protected) = group_len(&this.buf[this.pos..]);
                    this.record_left = len;
                    this.protected_seen |= protected;
                }
                n = n.min(this.record_left);
            } else if avail == 0 && out.remaining() >= READ_AHEAD {
                // A large read gains nothing from the buffer.
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            if n > 0 {
                out.put_slice(&this.buf[this.pos..this.pos + n]);
                this.pos += n;
                this.record_left = this.record_left.saturating_sub(n);
                return Poll::Ready(Ok(()));
            }
            // Nothing to hand out: read more, keeping a partial record header.
            if avail == 0 {
                this.buf.clear();
                this.pos = 0;
            } else if this.pos > 0 {
                this.buf.copy_within(this.pos.., 0);
                this.buf.truncate(avail);
                this.pos = 0;
            }
            if this.buf.capacity() < READ_AHEAD {
                let mut bigger = crate::pool::take(READ_AHEAD);
                bigger.extend_from_slice(&this.buf);
                crate::pool::give(std::mem::replace(&mut this.buf, bigger));
            }
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.buf) {
                Poll::Pending => {
                    if this.buf.is_empty() {
                        // Nothing to read: give the buffer back while the connection waits.
                        crate::pool::give(std::mem::take(&mut this.buf));
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(0)) => {
                    // The end: hand out a partial header as it is (rustls reports it).
                    let n = this.buf.len().min(out.remaining());
                    out.put_slice(&this.buf[..n]);
                    this.pos = n;
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Ok(_)) => {}
            }
        }
    }
}

/// The bytes from the start of `buf` (a record boundary, at least one whole header) to the end
/// of the first protected record: plaintext handshake and `change_cipher_spec` records whose
/// next header is here too, then the record after them; and whether that last record is
/// protected (outer type `application_data`, RFC 8446 §5.2). Every TLS record starts with its
/// type, the version, then a big-endian length (§5.1).
fn group_len(buf: &[u8]) -> (usize, bool) {
    const CHANGE_CIPHER_SPEC: u8 = 20;
    const HANDSHAKE: u8 = 22;
    const APPLICATION_DATA: u8 = 23;
    let mut group = 0;
    while let Some(h) = buf.get(group..group + HEADER) {
        group += HEADER + usize::from(u16::from_be_bytes([h[3], h[4]]));
        if !matches!(h[0], CHANGE_CIPHER_SPEC | HANDSHAKE) {
            return (group, h[0] == APPLICATION_DATA);
        }
    }
    (group, false)
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.holding() {
            self.held.extend_from_slice(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.holding() {
            let before = self.held.len();
            for b in bufs {
                self.held.extend_from_slice(b);
            }
            return Poll::Ready(Ok(self.held.len() - before));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // What was held goes out before the end (a caller that shuts down instead of taking it).
        while !self.held.is_empty() {
            let this = &mut *self;
            let n = std::task::ready!(Pin::new(&mut this.inner).poll_write(cx, &this.held))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            this.held.drain(..n);
        }
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
        let mut r = ReadAhead::new(r).with_secrets(Arc::default());
        r.unaligned();
        // Keys that stay with rustls: the secrets kept for a hand-over are gone.
        assert!(r.take_secrets().is_none());
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

    /// A TLS-like record: the 5-byte header, then `len` bytes of `fill`.
    fn record(len: u16, fill: u8) -> Vec<u8> {
        let mut r = vec![23, 3, 3];
        r.extend(len.to_be_bytes());
        r.extend(std::iter::repeat_n(fill, usize::from(len)));
        r
    }

    #[tokio::test]
    async fn aligned_reads_end_on_record_boundaries_and_the_rest_stays() {
        let (mut w, r) = tokio::io::duplex(1 << 20);
        let mut r = ReadAhead::new(r);
        let mut wire = record(10, 1);
        wire.extend(record(20_000, 2));
        wire.extend(record(3, 3));
        // The first piece cuts the second record's header in two.
        w.write_all(&wire[..17]).await.unwrap();
        let mut chunk = vec![0u8; 64 * 1024];
        assert_eq!(
            r.read(&mut chunk).await.unwrap(),
            15,
            "only the first record"
        );
        // Half a header is not handed out: the read waits for the rest of it.
        let rest = wire[17..].to_vec();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            w.write_all(&rest).await.unwrap();
            w
        });
        let mut second = 0;
        while second < 20_005 {
            let n = r.read(&mut chunk).await.unwrap();
            assert!(
                n > 0 && second + n <= 20_005,
                "a read ran past the second record"
            );
            second += n;
        }
        let _w = writer.await.unwrap();
        // Between records, the third is still in the reader, whole, for the caller.
        let (_, rest) = r.into_parts().map_err(|_| "not at a boundary").unwrap();
        assert_eq!(&rest[..], &record(3, 3)[..]);
    }

    fn typed(typ: u8, len: u16, fill: u8) -> Vec<u8> {
        let mut r = record(len, fill);
        r[0] = typ;
        r
    }

    #[tokio::test]
    async fn handshake_records_go_out_with_the_protected_record_after_them() {
        let (mut w, r) = tokio::io::duplex(1 << 20);
        let mut r = ReadAhead::new(r);
        // ServerHello, change_cipher_spec, the encrypted flight, then data after the handshake.
        let mut wire = typed(22, 90, 1);
        wire.extend(typed(20, 1, 1));
        wire.extend(record(700, 2));
        wire.extend(record(30, 3));
        wire.extend(record(40, 4));
        w.write_all(&wire).await.unwrap();
        let mut chunk = vec![0u8; 64 * 1024];
        assert_eq!(r.read(&mut chunk).await.unwrap(), 95 + 6 + 705);
        // Protected records: one a read.
        assert_eq!(r.read(&mut chunk).await.unwrap(), 35);
        let (_, rest) = r.into_parts().map_err(|_| "not at a boundary").unwrap();
        assert_eq!(&rest[..], &record(40, 4)[..]);
    }

    #[test]
    fn a_group_ends_at_the_first_protected_record_or_a_header_not_yet_read() {
        let mut wire = typed(22, 10, 1);
        assert_eq!(
            group_len(&wire[..HEADER]),
            (15, false),
            "a partial plaintext record"
        );
        assert_eq!(group_len(&wire), (15, false), "no next header yet");
        wire.extend(&typed(20, 1, 1)[..3]);
        assert_eq!(
            group_len(&wire),
            (15, false),
            "half a header is not counted"
        );
        let mut wire = typed(22, 10, 1);
        wire.extend(typed(21, 2, 1));
        wire.extend(typed(22, 10, 1));
        assert_eq!(group_len(&wire), (22, false), "an alert ends the group too");
        assert_eq!(group_len(&record(5, 1)), (10, true));
    }

    /// Holding: writes before the first protected record go out (a ClientHello); from then on
    /// they are kept, in order, for the caller; a shutdown sends what is still kept.
    #[tokio::test]
    async fn the_last_flight_is_held_from_the_first_protected_record() {
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let mut r = ReadAhead::new(near).hold_last_flight();
        r.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(
            &got, b"hello",
            "a write before any protected record goes out"
        );
        let mut wire = typed(22, 90, 1);
        wire.extend(typed(20, 1, 1));
        wire.extend(record(700, 2));
        far.write_all(&wire).await.unwrap();
        let mut chunk = vec![0u8; 4096];
        assert_eq!(r.read(&mut chunk).await.unwrap(), 95 + 6 + 705);
        r.write_all(b"fin").await.unwrap();
        let n = r
            .write_vectored(&[io::IoSlice::new(b"is"), io::IoSlice::new(b"hed")])
            .await
            .unwrap();
        assert_eq!(n, 5, "a held vectored write takes every slice");
        r.flush().await.unwrap();
        assert_eq!(r.take_held(), b"finished", "kept in order, flush or not");
        r.write_all(b"late").await.unwrap();
        r.shutdown().await.unwrap();
        let mut rest = Vec::new();
        far.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"late", "only what was still held, then the end");
    }

    #[tokio::test]
    async fn mid_record_the_parts_are_refused() {
        let (mut w, r) = tokio::io::duplex(1 << 20);
        let mut r = ReadAhead::new(r);
        w.write_all(&record(100, 1)).await.unwrap();
        let mut chunk = [0u8; 10];
        r.read_exact(&mut chunk).await.unwrap();
        assert!(r.into_parts().is_err());
    }
}
