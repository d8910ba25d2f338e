//! The stream tunnel's data phase, on the keys of its own handshake.
//!
//! rustls runs the handshake (and with it every SPIFFE check, in `tessera-tls`) and the
//! admission exchange; then each proxy takes the connection's traffic keys from rustls and
//! carries the bytes as TLS 1.3 records sealed and opened in place
//! ([`tessera_tls::records`]). The wire does not change: these are the same records rustls
//! would send, under the same keys, with the same sequence numbers. What changes is the work
//! per byte: plaintext is read from the workload's socket into a buffer and sealed where it
//! lies, and every two records go out with their headers and tags in one `writev`; received
//! records are opened where they were read and each one's plaintext goes to the workload at
//! once. rustls's buffered connection copies each byte once more on the sending side and three
//! times more on the receiving side (read-ahead → deframer → plaintext queue → caller).
//!
//! The keys are never used twice: rustls's record layer is consumed by the extraction, and the
//! sequence numbers carry on from where it stopped (RFC 8446 §5.3). Nothing of the connection
//! is lost in the hand-over: [`ReadAhead`] hands rustls whole records only, so every byte rustls
//! read was decrypted and consumed (checked here), and every byte after it is still in the
//! read-ahead buffer.
//!
//! Keys move on with KeyUpdate (RFC 8446 §4.6.3): the connection's config logged its traffic
//! secrets (`crate::tls::server_config_for`, carried in the [`ReadAhead`]), the seal side updates
//! its key before the AES-GCM limit and answers a peer's request before its next data, and the
//! open side follows every update. A long-lived connection has no end set by its key.
//!
//! Like [`crate::copy`], a direction holds no buffer while it waits for data, and a half-close
//! is a `close_notify` (RFC 8446 §6.1), after which the other direction goes on.

use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;

use bytes::{BufMut, BytesMut};
use tessera_tls::records::{self, Frame, MAX_PLAINTEXT, MAX_RECORD, Opened, Opener, Sealer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::net::tcp::WriteHalf;

use crate::readahead::ReadAhead;

// Sizes, measured (BENCHMARKS.md, netns pair, 2 vCPUs): what decides throughput here is how
// soon the next process in the pipeline gets its first bytes, not the number of system calls.
// Sealing a whole 64 KiB read before writing any of it gave 0.47-0.50x direct; writing every
// two records as soon as they are sealed, 0.64x, with less CPU per byte (one record: 0.57x;
// four: 0.54x). On the receiving side each record goes to the workload as soon as it is opened.

/// The workload-side read starts here and doubles, when a read fills it, up to [`MAX_BATCH`].
pub const MIN_BATCH: usize = 32 * 1024;
/// The largest read from the workload.
pub const MAX_BATCH: usize = 256 * 1024;
/// Records sealed per `writev` to the tunnel.
const WRITE_RECORDS: usize = 2;
/// Records opened per write to the workload.
const WRITE_RECORDS_OUT: usize = 1;
/// The largest read from the tunnel.
pub const OPEN_READ: usize = 64 * 1024;
/// The receiving side's buffer: two of the largest reads, so a partial record at the end of
/// a read is moved at most once every other read.
const OPEN_BUF: usize = 2 * OPEN_READ;

/// A stream-tunnel connection whose keys left rustls.
#[derive(Debug)]
pub struct Sealed {
    tcp: TcpStream,
    sealer: Sealer,
    opener: Opener,
    /// Bytes read past the admission exchange, not yet opened.
    pending: BytesMut,
    /// The peer had sent `close_notify` before the hand-over.
    peer_closed: bool,
    /// The client's last handshake flight, not sent yet ([`ReadAhead::hold_last_flight`]).
    held: Vec<u8>,
    /// Plaintext sent by [`Sealed::send_early`], before the data phase.
    early: u64,
    /// A KeyUpdate before the data phase asked for one back (RFC 8446 §4.6.3).
    update_requested: bool,
}

fn handover(why: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("stream tunnel key hand-over: {why}"))
}

impl Sealed {
    /// The outbound side, after the peer admitted the connection.
    pub fn from_client(
        tls: tokio_rustls::client::TlsStream<ReadAhead<TcpStream>>,
    ) -> io::Result<Self> {
        let (io, conn) = tls.into_inner();
        Self::take(io, conn.into())
    }

    /// The inbound side, after it sent the admission.
    pub fn from_server(
        tls: tokio_rustls::server::TlsStream<ReadAhead<TcpStream>>,
    ) -> io::Result<Self> {
        let (io, conn) = tls.into_inner();
        Self::take(io, conn.into())
    }

    fn take(mut io: ReadAhead<TcpStream>, mut conn: rustls::Connection) -> io::Result<Self> {
        let client = matches!(conn, rustls::Connection::Client(_));
        let log = io
            .take_secrets()
            .ok_or_else(|| handover("the connection's config logged no traffic secrets"))?;
        let state = conn.process_new_packets().map_err(handover)?;
        // Plaintext rustls decrypted and nobody read would be lost with its record layer.
        if state.plaintext_bytes_to_read() != 0 {
            return Err(handover(format!(
                "{} bytes of data arrived before the admission was read",
                state.plaintext_bytes_to_read()
            )));
        }
        let peer_closed = state.peer_has_closed();
        let held = io.take_held();
        let (tcp, pending) = io
            .into_parts()
            .map_err(|_| handover("rustls holds part of a record"))?;
        // Fails if rustls still has records to send (none: the admission was flushed).
        let secrets = conn.dangerous_extract_secrets().map_err(handover)?;
        let (sealer, opener) = records::from_secrets(&secrets, &log, client).map_err(handover)?;
        Ok(Self {
            tcp,
            sealer,
            opener,
            pending,
            peer_closed,
            held,
            early: 0,
            update_requested: false,
        })
    }

    /// Outbound, right after the handshake: sends the held last flight (the client's Finished
    /// and the request) and, in the same write, whatever the workload has already sent, sealed
    /// under the new keys. For a client that speaks first (most protocols) its first bytes
    /// then cross in the segment that completes the handshake, instead of one round trip
    /// later, behind the admission.
    ///
    /// Why this is safe: rustls makes the Finished only after it verified the server's chain,
    /// its CertificateVerify (RFC 8446 §4.4.3) and the expected SPIFFE ID, so these bytes go to
    /// the proven peer only, under this handshake's keys. The peer proxy keeps them unread
    /// until it has admitted the connection (`Inbound::stream_tunnel` reads the request,
    /// decides, and only then relays), and drops them with the connection if it refuses.
    pub async fn send_early(&mut self, plain: &TcpStream) -> io::Result<()> {
        let mut buf = crate::pool::take(WRITE_RECORDS * MAX_PLAINTEXT);
        // Only what is there now: this never waits for the workload.
        let read = plain.try_read_buf(&mut (&mut buf).limit(WRITE_RECORDS * MAX_PLAINTEXT));
        // Ok(0), the workload's end, is left for the seal loop: a socket at its end reads 0
        // again there, and the loop sends close_notify with the half-close as usual.
        let n = match read {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => {
                crate::pool::give(buf);
                return Err(e);
            }
        };
        let frames = seal_records(&mut self.sealer, &mut buf[..n])?;
        let held = std::mem::take(&mut self.held);
        let mut slices: Vec<IoSlice<'_>> = std::iter::once(IoSlice::new(&held))
            .chain(record_slices(&buf[..n], &frames))
            .collect();
        write_all_vectored(&mut self.tcp, &mut slices).await?;
        self.early = n as u64;
        crate::pool::give(buf);
        Ok(())
    }

    /// Sends the held last flight, if it is still held.
    async fn release_held(&mut self) -> io::Result<()> {
        if !self.held.is_empty() {
            let held = std::mem::take(&mut self.held);
            self.tcp.write_all(&held).await?;
        }
        Ok(())
    }

    /// Outbound: the peer's admission result, the first data record of its side
    /// (`crate::stream::write_response` sends it in one record). What came behind it stays for
    /// the data phase.
    pub async fn read_admission(&mut self) -> io::Result<(u16, String)> {
        use tokio::io::AsyncReadExt;
        self.release_held().await?;
        let ended = || {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the tunnel ended before the peer's admission",
            )
        };
        if self.peer_closed {
            return Err(ended());
        }
        let mut buf = std::mem::take(&mut self.pending);
        let mut start = 0;
        loop {
            while start < buf.len() {
                match self.opener.open(&mut buf[start..]).map_err(record_error)? {
                    Opened::Need(_) => break,
                    Opened::Data { len, data } if !data.is_empty() => {
                        let plain = start + data.start..start + data.end;
                        let admission = crate::stream::parse_response(&buf[plain]);
                        self.pending = BytesMut::from(&buf[start + len..]);
                        return admission;
                    }
                    Opened::Data { len, .. } => start += len,
                    Opened::KeyUpdate { len, requested } => {
                        start += len;
                        self.update_requested |= requested;
                    }
                    Opened::Closed { .. } => return Err(ended()),
                }
            }
            buf.reserve(MAX_RECORD);
            if self.tcp.read_buf(&mut buf).await? == 0 {
                return Err(ended());
            }
        }
    }
}

/// Carries `plain` ↔ `tunnel` until both directions have ended; returns the plaintext bytes
/// each way (`plain` → `tunnel`, `tunnel` → `plain`).
pub async fn bidirectional(plain: &mut TcpStream, tunnel: &mut Sealed) -> io::Result<(u64, u64)> {
    counted(plain, tunnel, &crate::copy::Progress::default()).await
}

/// [`bidirectional`], keeping `progress` (plaintext → tunnel, tunnel → plaintext) up to date as
/// it goes.
pub async fn counted(
    plain: &mut TcpStream,
    tunnel: &mut Sealed,
    progress: &crate::copy::Progress,
) -> io::Result<(u64, u64)> {
    tunnel.release_held().await?;
    let Sealed {
        tcp,
        sealer,
        opener,
        pending,
        peer_closed,
        early,
        update_requested,
        ..
    } = tunnel;
    let mid_write = AtomicBool::new(false);
    // Set by the open side when the peer's KeyUpdate asks for one back (RFC 8446 §4.6.3).
    let update_requested = AtomicBool::new(*update_requested);
    let r = {
        let (plain_r, plain_w) = plain.split();
        let (tcp_r, tcp_w) = tcp.split();
        let early = *early;
        progress.set_there(early);
        let sealed = |n: u64| progress.set_there(early + n);
        let seal = seal_loop(
            plain_r,
            tcp_w,
            sealer,
            &mid_write,
            &update_requested,
            sealed,
        );
        tokio::try_join!(
            async { seal.await.map(|n| n + early) },
            open_loop(
                tcp_r,
                plain_w,
                opener,
                std::mem::take(pending),
                *peer_closed,
                &update_requested,
                |n| progress.set_back(n),
            ),
        )
    };
    if let Err(e) = &r
        && let Some(desc) = e
            .get_ref()
            .and_then(|e| e.downcast_ref::<records::RecordError>())
            .and_then(records::RecordError::alert)
        && !mid_write.load(Ordering::Relaxed)
        && let Ok(alert) = sealer.fatal(desc)
    {
        // §5.2, §6.2: a record that fails to open ends the connection with an alert that says
        // why. Best effort: the connection closes either way.
        let _ = tcp.try_write(&alert);
    }
    r
}

fn record_error(e: records::RecordError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Reads into a buffer of `size` from the thread's cache, holding none while it waits.
async fn read_pooled<R: AsyncRead + Unpin>(r: &mut R, size: usize) -> io::Result<BytesMut> {
    poll_fn(|cx| {
        let mut buf = crate::pool::take(size);
        match tokio_util::io::poll_read_buf(Pin::new(&mut *r), cx, &mut buf) {
            Poll::Ready(Ok(_)) => Poll::Ready(Ok(buf)),
            other => {
                crate::pool::give(buf);
                other.map_ok(|_| BytesMut::new())
            }
        }
    })
    .await
}

/// Writes every slice, in as few `writev` calls as the socket takes.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut slices: &mut [IoSlice<'_>],
) -> io::Result<()> {
    while !slices.is_empty() {
        let n = poll_fn(|cx| Pin::new(&mut *w).poll_write_vectored(cx, slices)).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

/// Sends the last bytes of a direction and then its FIN, in one TCP segment where they fit:
/// `MSG_MORE` holds the bytes back, and the half-close that follows at once sets FIN on them
/// (Linux `tcp_send_fin` marks the unsent tail of the write queue) and pushes. The peer then
/// reads the end of the data and the end of the stream in one wake-up, and one segment and its
/// ACK fewer cross the link on every close. A close that never comes (an error, a drop) still
/// sends them: closing a socket pushes its queue.
async fn send_last_and_half_close(
    w: &mut WriteHalf<'_>,
    mut slices: &mut [IoSlice<'_>],
) -> io::Result<()> {
    use rustix::net::{SendAncillaryBuffer, SendFlags, sendmsg};
    let tcp: &TcpStream = w.as_ref();
    while !slices.is_empty() {
        tcp.writable().await?;
        let sent = tcp.try_io(Interest::WRITABLE, || {
            sendmsg(
                tcp,
                slices,
                &mut SendAncillaryBuffer::default(),
                SendFlags::MORE | SendFlags::NOSIGNAL,
            )
            .map_err(io::Error::from)
        });
        match sent {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    w.shutdown().await
}

/// Writes the opened plaintext at `ranges` of `buf` (then forgets them); returns its length.
/// `last`: the peer's `close_notify` came after it, so the half-close towards the workload
/// follows, in the same segment.
async fn write_ranges(
    w: &mut WriteHalf<'_>,
    buf: &[u8],
    ranges: &mut Vec<std::ops::Range<usize>>,
    last: bool,
) -> io::Result<u64> {
    let mut slices: Vec<IoSlice<'_>> = ranges
        .iter()
        .map(|r| IoSlice::new(&buf[r.clone()]))
        .collect();
    if last {
        send_last_and_half_close(w, &mut slices).await?;
    } else {
        write_all_vectored(w, &mut slices).await?;
    }
    let n = ranges.iter().map(|r| r.len() as u64).sum();
    ranges.clear();
    Ok(n)
}

/// Workload → tunnel: reads plaintext, seals it in place (at most 2^14 bytes a record), writes
/// header, ciphertext and trailer of every record in one `writev`. At the workload's end, a
/// `close_notify` and a TCP half-close.
async fn seal_loop<R>(
    mut r: R,
    mut w: WriteHalf<'_>,
    sealer: &mut Sealer,
    mid_write: &AtomicBool,
    update_requested: &AtomicBool,
    progress: impl Fn(u64),
) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
{
    let mut size = MIN_BATCH;
    let mut total = 0u64;
    loop {
        let mut buf = read_pooled(&mut r, size).await?;
        let n = buf.len();
        if n == 0 {
            crate::pool::give(buf);
            let close = sealer.close_notify().map_err(record_error)?;
            send_last_and_half_close(&mut w, &mut [IoSlice::new(&close)]).await?;
            return Ok(total);
        }
        if n == size && size < MAX_BATCH {
            size *= 2;
        }
        // A few records at a time, each group written as soon as it is sealed, so the next
        // process in the pipeline starts on the first bytes while the rest are sealed.
        mid_write.store(true, Ordering::Relaxed);
        for group in buf.chunks_mut(WRITE_RECORDS * MAX_PLAINTEXT) {
            // §4.6.3: the peer asked for an update, which goes before this side's next
            // application data; §5.5: or this key has sealed as many records as it should.
            // Checked per group: a group is at most WRITE_RECORDS records, far below the margin
            // between the update point and the key's hard limit.
            let requested = update_requested.load(Ordering::Relaxed)
                && update_requested.swap(false, Ordering::Relaxed);
            if requested || sealer.needs_update() {
                let update = sealer.key_update(false).map_err(record_error)?;
                w.write_all(&update).await?;
            }
            // On the heap, not in this future: an idle connection's task stays small.
            let frames = seal_records(sealer, group)?;
            let mut slices: Vec<IoSlice<'_>> = record_slices(group, &frames).collect();
            write_all_vectored(&mut w, &mut slices).await?;
        }
        mid_write.store(false, Ordering::Relaxed);
        total += n as u64;
        progress(total);
        crate::pool::give(buf);
    }
}

/// Seals `plain` in place as records of at most `MAX_PLAINTEXT` bytes each; returns each
/// record's header and trailer.
fn seal_records(sealer: &mut Sealer, plain: &mut [u8]) -> io::Result<Vec<Frame>> {
    plain
        .chunks_mut(MAX_PLAINTEXT)
        .map(|chunk| sealer.seal_in_place(chunk))
        .collect::<Result<Vec<Frame>, _>>()
        .map_err(record_error)
}

/// The records [`seal_records`] made of `sealed`, as header / ciphertext / trailer slices in
/// wire order, for one `writev`.
fn record_slices<'a>(sealed: &'a [u8], frames: &'a [Frame]) -> impl Iterator<Item = IoSlice<'a>> {
    sealed
        .chunks(MAX_PLAINTEXT)
        .zip(frames)
        .flat_map(|(chunk, frame)| {
            [
                IoSlice::new(&frame.header),
                IoSlice::new(chunk),
                IoSlice::new(&frame.trailer),
            ]
        })
}

/// Tunnel → workload: reads records, opens every whole one in place, writes their plaintext in
/// one `writev`. At `close_notify`, a TCP half-close towards the workload. The tunnel's end
/// without `close_notify` is an error: the data may have been cut short (RFC 8446 §6.1).
async fn open_loop<R>(
    mut r: R,
    mut w: WriteHalf<'_>,
    opener: &mut Opener,
    pending: BytesMut,
    peer_closed: bool,
    update_requested: &AtomicBool,
    progress: impl Fn(u64),
) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
{
    if peer_closed {
        w.shutdown().await?;
        return Ok(0);
    }
    let mut buf = BytesMut::new();
    if !pending.is_empty() {
        buf = crate::pool::take(OPEN_BUF.max(pending.len().next_power_of_two()));
        buf.extend_from_slice(&pending);
    }
    drop(pending);
    let mut start = 0;
    let mut total = 0u64;
    let mut ranges: Vec<std::ops::Range<usize>> = Vec::new();
    loop {
        let mut closed = false;
        while start < buf.len() {
            match opener.open(&mut buf[start..]).map_err(record_error)? {
                Opened::Need(_) => break,
                Opened::Data { len, data } => {
                    if !data.is_empty() {
                        ranges.push(start + data.start..start + data.end);
                    }
                    start += len;
                    if ranges.len() == WRITE_RECORDS_OUT {
                        // Written as soon as opened: the workload starts on them meanwhile.
                        total += write_ranges(&mut w, &buf, &mut ranges, false).await?;
                        progress(total);
                    }
                }
                Opened::KeyUpdate { len, requested } => {
                    // The opener holds the peer's next key; the seal side answers a request
                    // before its next record.
                    start += len;
                    if requested {
                        update_requested.store(true, Ordering::Relaxed);
                    }
                }
                Opened::Closed { len } => {
                    // §6.1: anything after close_notify is ignored.
                    start += len;
                    closed = true;
                    break;
                }
            }
        }
        total += write_ranges(&mut w, &buf, &mut ranges, closed).await?;
        progress(total);
        if closed {
            crate::pool::give(buf);
            return Ok(total);
        }
        if start == buf.len() {
            // Everything opened: no buffer while waiting for the next records.
            crate::pool::give(std::mem::take(&mut buf));
            start = 0;
        } else if buf.capacity() - buf.len() < OPEN_READ.max(MAX_RECORD) {
            // Part of a record, and too little room after it: move it to the front of a new
            // buffer (less than one record, at most once every other read).
            let mut next = crate::pool::take(OPEN_BUF);
            next.extend_from_slice(&buf[start..]);
            crate::pool::give(std::mem::replace(&mut buf, next));
            start = 0;
        }
        let n = if buf.is_empty() {
            // Between records: no buffer is held while the read waits.
            buf = poll_fn(|cx| {
                let mut b = crate::pool::take(OPEN_BUF);
                let mut lim = (&mut b).limit(OPEN_READ);
                match tokio_util::io::poll_read_buf(Pin::new(&mut r), cx, &mut lim) {
                    Poll::Ready(Ok(_)) => Poll::Ready(Ok(b)),
                    other => {
                        crate::pool::give(b);
                        other.map_ok(|_| BytesMut::new())
                    }
                }
            })
            .await?;
            buf.len()
        } else {
            let mut lim = (&mut buf).limit(OPEN_READ);
            poll_fn(|cx| tokio_util::io::poll_read_buf(Pin::new(&mut r), cx, &mut lim)).await?
        };
        if n == 0 {
            crate::pool::give(buf);
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer proxy closed the tunnel without close_notify (RFC 8446 §6.1): data may be cut short",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use rustls_pki_types::{PrivateKeyDer, ServerName};
    use tessera_test_util::{TestCa, bundle_set};
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;
    use crate::Identity;
    use crate::tls::{ClientConfigs, TunnelProtocol};

    fn identity(ca: &TestCa, id: &str) -> Arc<Identity> {
        let svid = ca.issue(id);
        Identity::with_svid(
            svid.chain,
            PrivateKeyDer::Pkcs8(svid.key),
            bundle_set(&[ca]),
        )
        .unwrap()
    }

    /// What the middle does to the client → server bytes: flip a bit of the byte at
    /// `flip_at`, or end both connections (no close_notify) once `cut_at` bytes have passed.
    struct Middle {
        passed: AtomicUsize,
        flip_at: AtomicUsize,
        cut_at: AtomicUsize,
    }

    impl Middle {
        /// A middle that passes every byte as it is, until a test sets an offset.
        fn honest() -> Arc<Self> {
            Arc::new(Self {
                passed: 0.into(),
                flip_at: usize::MAX.into(),
                cut_at: usize::MAX.into(),
            })
        }
    }

    /// A TCP forwarder between the two proxies, so a test can damage the wire.
    async fn middle(to: SocketAddr, m: Arc<Middle>) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut c, _) = l.accept().await.unwrap();
            let mut s = TcpStream::connect(to).await.unwrap();
            let (mut cr, mut cw) = c.split();
            let (mut sr, mut sw) = s.split();
            let up = async {
                let mut buf = [0u8; 1];
                // One byte at a time: exact offsets.
                while cr.read_exact(&mut buf).await.is_ok() {
                    let at = m.passed.fetch_add(1, Ordering::SeqCst);
                    if at == m.cut_at.load(Ordering::SeqCst) {
                        break;
                    }
                    if at == m.flip_at.load(Ordering::SeqCst) {
                        buf[0] ^= 0x10;
                    }
                    if sw.write_all(&buf).await.is_err() {
                        break;
                    }
                }
                let _ = sw.shutdown().await;
            };
            let down = async {
                let _ = tokio::io::copy(&mut sr, &mut cw).await;
                let _ = cw.shutdown().await;
            };
            tokio::join!(up, down);
        });
        addr
    }

    /// What one side's data phase ended with: its result, and how many KeyUpdates it sent and
    /// followed.
    struct Carried {
        result: io::Result<(u64, u64)>,
        sent_updates: u64,
        followed_updates: u64,
    }

    async fn carry(mut plain: TcpStream, mut sealed: Sealed) -> Carried {
        let result = bidirectional(&mut plain, &mut sealed).await;
        Carried {
            result,
            sent_updates: sealed.sealer.generation(),
            followed_updates: sealed.opener.generation(),
        }
    }

    type Side = tokio::task::JoinHandle<Carried>;

    async fn tunnel(m: Arc<Middle>, banner: &[u8]) -> (TcpStream, TcpStream, Side, Side) {
        tunnel_with(m, banner, b"", false, u64::MAX, false).await
    }

    /// One stream-tunnel connection through `m`, carried by both sides: handshake, request,
    /// admission, and the server application's first bytes (`banner`) sent before the client
    /// has read the admission, so they arrive behind it. As in the product, the client holds
    /// its last flight and sends it with the client application's bytes already there
    /// (`early`), which the server leaves unread until it has admitted the connection. Each side
    /// updates its key every `update_every` records; with `request`, the client's first record
    /// is a KeyUpdate that asks the server for one in return. Returns the client application's
    /// socket, the server application's socket, and both sides' ends.
    async fn tunnel_with(
        m: Arc<Middle>,
        banner: &[u8],
        early: &[u8],
        ended: bool,
        update_every: u64,
        request: bool,
    ) -> (TcpStream, TcpStream, Side, Side) {
        let ca = TestCa::new("example.org");
        let server_id = identity(&ca, "spiffe://example.org/bar");
        let client_id = identity(&ca, "spiffe://example.org/foo");
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let via = middle(l.local_addr().unwrap(), m).await;
        let scfg = crate::tls::server_config(&server_id).unwrap();
        let banner = banner.to_vec();
        let server = tokio::spawn(async move {
            let (tcp, _) = l.accept().await.unwrap();
            let log = Arc::default();
            let mut tls =
                tokio_rustls::TlsAcceptor::from(crate::tls::server_config_for(&scfg, &log))
                    .accept(ReadAhead::new(tcp).with_secrets(log))
                    .await
                    .unwrap();
            let target = crate::stream::read_request(&mut tls).await.unwrap();
            assert_eq!(target, "127.0.0.1:9");
            // The early bytes are there, still sealed, and must survive the hand-over.
            tokio::time::sleep(Duration::from_millis(20)).await;
            crate::stream::write_response(&mut tls, 200, "")
                .await
                .unwrap();
            let mut sealed = Sealed::from_server(tls).unwrap();
            sealed.sealer.update_every(update_every);
            let (mut app, plain) = loopback().await;
            app.write_all(&banner).await.unwrap();
            (app, tokio::spawn(carry(plain, sealed)))
        });
        let ccfg = ClientConfigs::new(TunnelProtocol::Stream)
            .get(&client_id, &"spiffe://example.org/bar".parse().unwrap())
            .unwrap();
        let tcp = TcpStream::connect(via).await.unwrap();
        let req = crate::stream::request("127.0.0.1:9".parse().unwrap());
        let log = Arc::default();
        let tls = tokio_rustls::TlsConnector::from(crate::tls::client_config_for(&ccfg, &log))
            .connect_with(
                ServerName::IpAddress(via.ip().into()),
                ReadAhead::new(tcp).with_secrets(log).hold_last_flight(),
                |c| {
                    std::io::Write::write_all(&mut c.writer(), &req).unwrap();
                },
            )
            .await
            .unwrap();
        let (mut client_app, plain) = loopback().await;
        client_app.write_all(early).await.unwrap();
        if ended {
            client_app.shutdown().await.unwrap();
        }
        let mut sealed = Sealed::from_client(tls).unwrap();
        sealed.sealer.update_every(update_every);
        // Give the early bytes time to reach the client's plain socket.
        tokio::time::sleep(Duration::from_millis(20)).await;
        sealed.send_early(&plain).await.unwrap();
        let (server_app, server_side) = server.await.unwrap();
        // The banner arrives behind the admission before the client reads the admission.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (status, _) = sealed.read_admission().await.unwrap();
        assert_eq!(status, 200);
        if request {
            let update = sealed.sealer.key_update(true).unwrap();
            sealed.tcp.write_all(&update).await.unwrap();
        }
        let client_side = tokio::spawn(carry(plain, sealed));
        (client_app, server_app, client_side, server_side)
    }

    /// `up` from the client application, then its half-close; then `down` back from the server
    /// application. Checks every byte of both, in order.
    async fn exchange(mut client: TcpStream, mut server: TcpStream, up: &[u8], down: &[u8]) {
        let sent = up.to_vec();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(
            got == up,
            "client → server: every byte, in order, then the half-close ({} of {})",
            got.len(),
            up.len()
        );
        // The server's direction still works after the client's ended.
        server.write_all(down).await.unwrap();
        server.shutdown().await.unwrap();
        let back = writer.await.unwrap();
        assert!(
            back == down,
            "server → client after the half-close ({} of {})",
            back.len(),
            down.len()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn both_sides_carry_every_byte_both_ways_with_half_close() {
        let (mut client, server, client_side, server_side) =
            tunnel(Middle::honest(), b"banner").await;
        let mut banner = [0u8; 6];
        tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut banner))
            .await
            .expect("the banner behind the admission was lost in the hand-over")
            .unwrap();
        assert_eq!(
            &banner, b"banner",
            "bytes behind the admission survive the hand-over"
        );
        // More than a batch, and not a whole number of records, each way.
        let up: Vec<u8> = (0..3 * MAX_BATCH + 12_345)
            .map(|i| (i % 251) as u8)
            .collect();
        let down: Vec<u8> = (0..MAX_BATCH + 777).map(|i| (i % 241) as u8).collect();
        exchange(client, server, &up, &down).await;
        assert_eq!(
            client_side.await.unwrap().result.unwrap(),
            (up.len() as u64, 6 + down.len() as u64)
        );
        assert_eq!(
            server_side.await.unwrap().result.unwrap(),
            (6 + down.len() as u64, up.len() as u64)
        );
    }

    /// The client application's first bytes, more than one record of them, leave with the
    /// client's Finished, wait unread at the server until it has admitted the connection, and
    /// come first, followed by the rest, in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn early_bytes_ride_with_the_finished_and_arrive_first() {
        let early: Vec<u8> = (0..MAX_PLAINTEXT + 3_000)
            .map(|i| (i % 253) as u8)
            .collect();
        let (client, server, client_side, server_side) =
            tunnel_with(Middle::honest(), b"", &early, false, u64::MAX, false).await;
        let rest: Vec<u8> = (0..MAX_BATCH + 11).map(|i| (i % 247) as u8).collect();
        let down = b"answer".to_vec();
        let mut server = server;
        let mut first = vec![0u8; early.len()];
        tokio::time::timeout(Duration::from_secs(10), server.read_exact(&mut first))
            .await
            .expect("the early bytes were lost in the hand-over")
            .unwrap();
        assert!(first == early, "the early bytes arrive first, intact");
        exchange(client, server, &rest, &down).await;
        let total = (early.len() + rest.len()) as u64;
        assert_eq!(
            client_side.await.unwrap().result.unwrap(),
            (total, down.len() as u64),
            "the early bytes are counted as sent"
        );
        assert_eq!(
            server_side.await.unwrap().result.unwrap(),
            (down.len() as u64, total)
        );
    }

    /// A workload that sent nothing and ended its direction before the hand-over: the server
    /// application sees the end at once, and its answer still comes back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_workload_that_ended_before_the_handover_half_closes_the_tunnel() {
        let (mut client, mut server, client_side, server_side) =
            tunnel_with(Middle::honest(), b"", b"", true, u64::MAX, false).await;
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), server.read_to_end(&mut got))
            .await
            .expect("the workload's end did not reach the server application")
            .unwrap();
        assert!(got.is_empty());
        server.write_all(b"still answered").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"still answered");
        assert_eq!(client_side.await.unwrap().result.unwrap(), (0, 14));
        assert_eq!(server_side.await.unwrap().result.unwrap(), (14, 0));
    }

    /// Both directions move to new keys every few records, and the server answers the
    /// client's request for an update (RFC 8446 §4.6.3); every byte arrives, in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn key_updates_in_both_directions_lose_nothing() {
        for (every, request) in [(u64::MAX, true), (3, false)] {
            let (client, server, client_side, server_side) =
                tunnel_with(Middle::honest(), b"", b"", false, every, request).await;
            let up: Vec<u8> = (0..2 * MAX_BATCH + 999).map(|i| (i % 251) as u8).collect();
            let down: Vec<u8> = (0..MAX_BATCH + 5).map(|i| (i % 239) as u8).collect();
            exchange(client, server, &up, &down).await;
            let (c, s) = (client_side.await.unwrap(), server_side.await.unwrap());
            assert_eq!(c.result.unwrap(), (up.len() as u64, down.len() as u64));
            assert_eq!(s.result.unwrap(), (down.len() as u64, up.len() as u64));
            // Each side followed every update the other sent.
            assert_eq!(c.sent_updates, s.followed_updates);
            assert_eq!(s.sent_updates, c.followed_updates);
            if request {
                // The request, and the one update it asked for.
                assert_eq!((c.sent_updates, s.sent_updates), (1, 1));
            } else {
                // An update once 3 records are sealed (checked per group of WRITE_RECORDS):
                // at least one per 3 + WRITE_RECORDS of the 33 and 17 full records.
                assert!(c.sent_updates >= 33 / 5, "{}", c.sent_updates);
                assert!(s.sent_updates >= 17 / 5, "{}", s.sent_updates);
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flipped_bit_ends_the_connection_and_the_sender_is_told() {
        let m = Middle::honest();
        let (mut client, mut server, client_side, server_side) = tunnel(m.clone(), b"").await;
        // The next record's first ciphertext byte.
        m.flip_at
            .store(m.passed.load(Ordering::SeqCst) + 5 + 3, Ordering::SeqCst);
        client.write_all(b"tampered in flight").await.unwrap();
        let e = server_side.await.unwrap().result.unwrap_err();
        assert!(e.to_string().contains("bad_record_mac"), "{e}");
        let mut got = Vec::new();
        let _ = server.read_to_end(&mut got).await;
        assert!(
            got.is_empty(),
            "nothing of a record that failed to open reaches the workload"
        );
        // The server's fatal alert reaches the client's side.
        let e = client_side.await.unwrap().result.unwrap_err();
        assert!(e.to_string().contains("alert 20"), "{e}");
        drop(client);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tunnel_cut_without_close_notify_is_an_error_not_an_end() {
        let m = Middle::honest();
        let (mut client, _server, _client_side, server_side) = tunnel(m.clone(), b"").await;
        // Cut in the middle of the next record.
        m.cut_at
            .store(m.passed.load(Ordering::SeqCst) + 20, Ordering::SeqCst);
        client.write_all(&[7u8; 100]).await.unwrap();
        let e = server_side.await.unwrap().result.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
        assert!(e.to_string().contains("close_notify"), "{e}");
    }

    /// A connected loopback pair: (application's end, proxy's end).
    async fn loopback() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }
}
