//! TLS 1.3 record protection (RFC 8446 §5) on the traffic keys of a handshake rustls finished.
//!
//! The proxy's stream tunnel hands each connection to this layer once the handshake, the
//! identity checks and the admission exchange are done, so bulk data is sealed and opened in
//! the proxy's own buffers: plaintext is read from the workload's socket straight into its
//! record's place and sealed there, and received records are opened in the buffer they were read
//! into. rustls's buffered connection copies every byte two to four times on the way; this
//! layer copies none. The wire format is exactly TLS 1.3's, so either side may be rustls.
//!
//! Pure: no I/O. What it accepts is deliberately narrow, because both ends are Tessera proxies
//! with session tickets off and no post-handshake authentication: application data, and the
//! `close_notify` alert. Any other content (another alert, a handshake message such as
//! KeyUpdate) ends the connection with an error that names it.

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets};

/// The record header: type, legacy version, length (§5.1).
pub const HEADER: usize = 5;
/// The largest plaintext of one record, 2^14 bytes (§5.1).
pub const MAX_PLAINTEXT: usize = 1 << 14;
/// The AEAD tag of every suite Tessera offers (all TLS 1.3 suites use a 16-byte tag).
pub const TAG: usize = 16;
/// What a sealed record adds to its plaintext: header, inner content type, tag.
pub const OVERHEAD: usize = HEADER + 1 + TAG;
/// The largest record accepted: `TLSCiphertext.length` may not exceed 2^14 + 256 (§5.2).
pub const MAX_RECORD: usize = HEADER + MAX_PLAINTEXT + 256;

const CONTENT_ALERT: u8 = 21;
const CONTENT_HANDSHAKE: u8 = 22;
const CONTENT_APPDATA: u8 = 23;

/// Why a record could not be sealed or opened; the text names what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    #[error("record of type {0}: protected TLS 1.3 records are application_data (RFC 8446 §5.2)")]
    OuterType(u8),
    #[error("record of {0} bytes: larger than 2^14 + 256 (RFC 8446 §5.2, record_overflow)")]
    Overflow(usize),
    #[error("record does not decrypt with this connection's key (RFC 8446 §5.2, bad_record_mac)")]
    BadMac,
    #[error("record has no content type: all padding (RFC 8446 §5.4, unexpected_message)")]
    NoContentType,
    #[error("peer sent alert {0} (level {1}); only close_notify is accepted here")]
    Alert(u8, u8),
    #[error("malformed alert of {0} bytes (RFC 8446 §6)")]
    MalformedAlert(usize),
    #[error(
        "peer sent a post-handshake message of type {0} (a KeyUpdate is 24); this connection does not take them"
    )]
    PostHandshake(u8),
    #[error("record of content type {0} is not expected after the handshake")]
    ContentType(u8),
    #[error(
        "this key has protected its limit of {0} records; the connection ends instead of wrapping the sequence number (RFC 8446 §5.3, §5.5)"
    )]
    KeyExhausted(u64),
    #[error("plaintext of {0} bytes does not fit in one record (at most 2^14)")]
    TooLong(usize),
    #[error("record buffer of {0} bytes is too small")]
    Room(usize),
    #[error("TLS 1.2 or unknown traffic secrets: this layer speaks TLS 1.3 only")]
    Unsupported,
}

impl RecordError {
    /// The alert to send before closing (§6.2), where the error is this side's finding about
    /// the peer's records; `None` where the peer already said why, or the limit is ours.
    pub fn alert(&self) -> Option<u8> {
        match self {
            Self::BadMac => Some(20),
            Self::Overflow(_) => Some(22),
            Self::MalformedAlert(_) => Some(50),
            Self::OuterType(_)
            | Self::NoContentType
            | Self::PostHandshake(_)
            | Self::ContentType(_) => Some(10),
            _ => None,
        }
    }
}

/// One direction's key: the AEAD key, the static IV and the next sequence number (§5.3).
struct DirectionKey {
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
    limit: u64,
}

impl std::fmt::Debug for DirectionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key or the IV.
        f.debug_struct("DirectionKey")
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl DirectionKey {
    fn new(seq: u64, secrets: &ConnectionTrafficSecrets) -> Result<Self, RecordError> {
        // §5.5: AES-GCM may protect at most 2^24.5 full-size records under one key; rustls keeps
        // to 2^24, and so does this layer. ChaCha20-Poly1305 has no such limit short of the
        // sequence number itself, which must never wrap (§5.3).
        let (alg, key, iv, limit) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
                (&aead::AES_128_GCM, key, iv, 1 << 24)
            }
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
                (&aead::AES_256_GCM, key, iv, 1 << 24)
            }
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv, u64::MAX)
            }
            _ => return Err(RecordError::Unsupported),
        };
        let key = UnboundKey::new(alg, key.as_ref()).map_err(|_| RecordError::Unsupported)?;
        let iv: [u8; 12] = iv
            .as_ref()
            .try_into()
            .map_err(|_| RecordError::Unsupported)?;
        Ok(Self {
            key: LessSafeKey::new(key),
            iv,
            seq,
            limit,
        })
    }

    /// The per-record nonce: the sequence number, left-padded to the IV's length, XORed with the
    /// static IV (§5.3). Each sequence number is used once, then the next is taken.
    fn next_nonce(&mut self) -> Result<Nonce, RecordError> {
        if self.seq >= self.limit {
            return Err(RecordError::KeyExhausted(self.limit));
        }
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq += 1;
        Ok(Nonce::assume_unique_for_key(nonce))
    }
}

/// Seals records in place.
#[derive(Debug)]
pub struct Sealer(DirectionKey);

/// Opens records in place.
#[derive(Debug)]
pub struct Opener(DirectionKey);

/// The two directions of a connection whose handshake rustls completed, from
/// `dangerous_extract_secrets` (both sequence numbers carried over).
pub fn from_secrets(s: &ExtractedSecrets) -> Result<(Sealer, Opener), RecordError> {
    Ok((
        Sealer(DirectionKey::new(s.tx.0, &s.tx.1)?),
        Opener(DirectionKey::new(s.rx.0, &s.rx.1)?),
    ))
}

/// What a record adds around plaintext sealed in place: the header before it, and the
/// encrypted content type and the tag after it. On the wire: `header`, the sealed data,
/// `trailer`.
#[derive(Debug, Clone, Copy)]
pub struct Frame {
    pub header: [u8; HEADER],
    pub trailer: [u8; 1 + TAG],
}

impl Sealer {
    /// Seals `data` (at most 2^14 bytes) in place as one application-data record, with no
    /// copy: the plaintext becomes the ciphertext where it lies.
    pub fn seal_in_place(&mut self, data: &mut [u8]) -> Result<Frame, RecordError> {
        self.seal_parts(data, CONTENT_APPDATA)
    }

    /// Seals the application data at `rec[HEADER..HEADER + len]` into one contiguous record in
    /// `rec`, which must have `OVERHEAD - HEADER` bytes of room after the plaintext. Returns the
    /// record's length.
    pub fn seal_data(&mut self, rec: &mut [u8], len: usize) -> Result<usize, RecordError> {
        self.seal(rec, len, CONTENT_APPDATA)
    }

    /// A `close_notify` alert (§6.1): the end of this side's data; the other side may go on.
    pub fn close_notify(&mut self) -> Result<Vec<u8>, RecordError> {
        // Alert level warning (1), description close_notify (0).
        self.alert(1, 0)
    }

    /// A fatal alert (level 2) with `description` (§6.2), sent before closing on an error.
    pub fn fatal(&mut self, description: u8) -> Result<Vec<u8>, RecordError> {
        self.alert(2, description)
    }

    fn alert(&mut self, level: u8, description: u8) -> Result<Vec<u8>, RecordError> {
        let mut rec = vec![0; OVERHEAD + 2];
        rec[HEADER] = level;
        rec[HEADER + 1] = description;
        let n = self.seal(&mut rec, 2, CONTENT_ALERT)?;
        rec.truncate(n);
        Ok(rec)
    }

    fn seal(&mut self, rec: &mut [u8], len: usize, content: u8) -> Result<usize, RecordError> {
        let total = len + OVERHEAD;
        if rec.len() < total {
            return Err(RecordError::Room(rec.len()));
        }
        let frame = self.seal_parts(&mut rec[HEADER..HEADER + len], content)?;
        rec[..HEADER].copy_from_slice(&frame.header);
        rec[HEADER + len..total].copy_from_slice(&frame.trailer);
        Ok(total)
    }

    fn seal_parts(&mut self, data: &mut [u8], content: u8) -> Result<Frame, RecordError> {
        if data.len() > MAX_PLAINTEXT {
            return Err(RecordError::TooLong(data.len()));
        }
        let nonce = self.0.next_nonce()?;
        // The header is the additional data (§5.2): outer type application_data, legacy
        // version 0x0303, the length of the ciphertext (the data, the inner content type, the tag).
        let header = header(data.len() + 1 + TAG);
        let mut trailer = [0; 1 + TAG];
        // TLSInnerPlaintext is the data, then its real content type, no padding (§5.2, §5.4);
        // the type byte is sealed into the trailer, before the tag.
        self.0
            .key
            .seal_in_place_scatter(nonce, Aad::from(header), data, &[content], &mut trailer)
            .map_err(|_| RecordError::BadMac)?;
        Ok(Frame { header, trailer })
    }
}

fn header(body: usize) -> [u8; HEADER] {
    let [hi, lo] = (body as u16).to_be_bytes();
    [CONTENT_APPDATA, 3, 3, hi, lo]
}

/// What the next bytes of a received stream hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened {
    /// Not a whole record yet: at least this many bytes in all are needed.
    Need(usize),
    /// A record of `len` bytes holding application data at `data` (a range of the buffer).
    Data {
        len: usize,
        data: std::ops::Range<usize>,
    },
    /// A record of `len` bytes holding `close_notify`: the peer sends no more (§6.1).
    Closed { len: usize },
}

impl Opener {
    /// Opens the record at the start of `buf` in place. Decrypts nothing until the whole record
    /// is there.
    pub fn open(&mut self, buf: &mut [u8]) -> Result<Opened, RecordError> {
        if buf.len() < HEADER {
            return Ok(Opened::Need(HEADER));
        }
        // §5.2: the outer type of every protected record is application_data; the legacy
        // version "MUST be ignored for all purposes" (§5.1).
        if buf[0] != CONTENT_APPDATA {
            return Err(RecordError::OuterType(buf[0]));
        }
        let body = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
        let len = HEADER + body;
        if len > MAX_RECORD {
            return Err(RecordError::Overflow(body));
        }
        if buf.len() < len {
            return Ok(Opened::Need(len));
        }
        if body < 1 + TAG {
            // Too short to hold a tag and a content type: it cannot authenticate.
            return Err(RecordError::BadMac);
        }
        let nonce = self.0.next_nonce()?;
        let (head, rest) = buf[..len].split_at_mut(HEADER);
        // §5.2: a record that fails to decrypt ends the connection (bad_record_mac).
        let inner = self
            .0
            .key
            .open_in_place(nonce, Aad::from(&head[..]), rest)
            .map_err(|_| RecordError::BadMac)?;
        // §5.4: the content type is the last non-zero byte; zeros after it are padding.
        let Some(end) = inner.iter().rposition(|&b| b != 0) else {
            return Err(RecordError::NoContentType);
        };
        if end > MAX_PLAINTEXT {
            return Err(RecordError::Overflow(end));
        }
        match inner[end] {
            CONTENT_APPDATA => Ok(Opened::Data {
                len,
                data: HEADER..HEADER + end,
            }),
            CONTENT_ALERT => match inner[..end] {
                // §6.1: close_notify (description 0) ends the peer's direction.
                [_, 0] => Ok(Opened::Closed { len }),
                [level, desc] => Err(RecordError::Alert(desc, level)),
                _ => Err(RecordError::MalformedAlert(end)),
            },
            CONTENT_HANDSHAKE => Err(RecordError::PostHandshake(
                inner.first().copied().unwrap_or(0),
            )),
            other => Err(RecordError::ContentType(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Sealer, Opener) {
        let mk = || DirectionKey {
            key: LessSafeKey::new(UnboundKey::new(&aead::AES_128_GCM, &[7; 16]).expect("key")),
            iv: [9; 12],
            seq: 0,
            limit: 1 << 24,
        };
        (Sealer(mk()), Opener(mk()))
    }

    fn sealed(s: &mut Sealer, data: &[u8]) -> Vec<u8> {
        let mut rec = vec![0; data.len() + OVERHEAD];
        rec[HEADER..HEADER + data.len()].copy_from_slice(data);
        let n = s.seal_data(&mut rec, data.len()).expect("seal");
        rec.truncate(n);
        rec
    }

    #[test]
    fn a_sealed_record_opens_to_its_data() {
        let (mut s, mut o) = pair();
        for msg in [&b"hello"[..], &[0u8; MAX_PLAINTEXT][..], b""] {
            let mut rec = sealed(&mut s, msg);
            assert_eq!(rec.len(), msg.len() + OVERHEAD);
            assert_eq!(rec[0], 23);
            match o.open(&mut rec).expect("open") {
                Opened::Data { len, data } => {
                    assert_eq!(len, rec.len());
                    assert_eq!(&rec[data], msg);
                }
                other => panic!("expected data, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_record_sealed_in_place_is_the_contiguous_record() {
        let (mut a, _) = pair();
        let (mut b, mut o) = pair();
        let msg = b"in place, no copy";
        let contiguous = sealed(&mut a, msg);
        let mut data = msg.to_vec();
        let frame = b.seal_in_place(&mut data).expect("seal");
        let mut wire = frame.header.to_vec();
        wire.extend(&data);
        wire.extend(frame.trailer);
        assert_eq!(wire, contiguous);
        assert!(matches!(o.open(&mut wire), Ok(Opened::Data { .. })));
    }

    #[test]
    fn a_partial_record_needs_the_rest() {
        let (mut s, mut o) = pair();
        let mut rec = sealed(&mut s, b"0123456789");
        assert_eq!(o.open(&mut rec[..3]), Ok(Opened::Need(HEADER)));
        let n = rec.len();
        assert_eq!(o.open(&mut rec[..n - 1]), Ok(Opened::Need(n)));
        // Nothing was consumed: the whole record still opens with sequence number 0.
        assert!(matches!(o.open(&mut rec), Ok(Opened::Data { .. })));
    }

    #[test]
    fn tampering_replay_reorder_and_bad_framing_are_refused() {
        let (mut s, mut o) = pair();
        let _first = sealed(&mut s, b"first");
        let second = sealed(&mut s, b"second");
        // Reordered: the second record under the first sequence number does not authenticate.
        let mut copy = second.clone();
        assert_eq!(o.open(&mut copy), Err(RecordError::BadMac));

        let (mut s, mut o) = pair();
        let first = sealed(&mut s, b"first");
        let mut flipped = first.clone();
        flipped[HEADER + 1] ^= 1;
        assert_eq!(o.open(&mut flipped), Err(RecordError::BadMac));

        let (_, mut o) = pair();
        let mut replay = first.clone();
        assert!(matches!(o.open(&mut replay), Ok(Opened::Data { .. })));
        let mut replay = first.clone();
        assert_eq!(o.open(&mut replay), Err(RecordError::BadMac));

        let (_, mut o) = pair();
        let mut wrong_type = first.clone();
        wrong_type[0] = 22;
        assert_eq!(o.open(&mut wrong_type), Err(RecordError::OuterType(22)));
        let mut huge = [23u8, 3, 3, 0x48, 0x01];
        assert_eq!(o.open(&mut huge), Err(RecordError::Overflow(0x4801)));
        let mut tiny = [23u8, 3, 3, 0, 3, 1, 2, 3];
        assert_eq!(o.open(&mut tiny), Err(RecordError::BadMac));
    }

    #[test]
    fn close_notify_is_the_end_and_other_alerts_are_errors() {
        let (mut s, mut o) = pair();
        let mut rec = s.close_notify().expect("seal");
        assert_eq!(o.open(&mut rec), Ok(Opened::Closed { len: rec.len() }));

        let mut rec = vec![0; OVERHEAD + 2];
        rec[HEADER] = 2;
        rec[HEADER + 1] = 40;
        let n = s.seal(&mut rec, 2, CONTENT_ALERT).expect("seal");
        assert_eq!(o.open(&mut rec[..n]), Err(RecordError::Alert(40, 2)));

        let mut rec = vec![0; OVERHEAD + 5];
        rec[HEADER] = 24; // KeyUpdate
        let n = s.seal(&mut rec, 5, CONTENT_HANDSHAKE).expect("seal");
        assert_eq!(o.open(&mut rec[..n]), Err(RecordError::PostHandshake(24)));
    }

    #[test]
    fn a_key_is_never_used_past_its_limit() {
        let (mut s, mut o) = pair();
        s.0.limit = 2;
        o.0.limit = 1;
        let mut a = sealed(&mut s, b"a");
        let mut b = sealed(&mut s, b"b");
        let mut rec = vec![0; OVERHEAD + 1];
        assert_eq!(s.seal_data(&mut rec, 1), Err(RecordError::KeyExhausted(2)));
        assert!(o.open(&mut a).is_ok());
        assert_eq!(o.open(&mut b), Err(RecordError::KeyExhausted(1)));
        assert_eq!(
            s.seal_data(
                &mut vec![0; MAX_PLAINTEXT + 1 + OVERHEAD],
                MAX_PLAINTEXT + 1
            ),
            Err(RecordError::TooLong(MAX_PLAINTEXT + 1))
        );
    }
}
