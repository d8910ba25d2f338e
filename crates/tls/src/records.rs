//! TLS 1.3 record protection (RFC 8446 §5) on the traffic keys of a handshake rustls finished.
//!
//! The proxy's stream tunnel hands each connection to this layer once the handshake, the
//! identity checks and the admission exchange are done, so bulk data is sealed and opened in
//! the proxy's own buffers: plaintext is read from the workload's socket straight into its
//! record's place and sealed there, and received records are opened in the buffer they were read
//! into. rustls's buffered connection copies every byte two to four times on the way; this
//! layer copies none. The wire format is exactly TLS 1.3's, so either side may be rustls.
//!
//! Keys come from the application traffic secrets of the handshake (RFC 8446 §7.1), captured by
//! [`TrafficSecretLog`]; the key and IV derived from them here must equal the ones rustls
//! extracted, so a secret that belongs to another connection is refused rather than used. The
//! secrets let each direction move to its next key with a KeyUpdate (§4.6.3, §7.2): this side
//! sends one before a key reaches its limit, and follows the peer's.
//!
//! Pure: no I/O. What it accepts is deliberately narrow, because both ends are Tessera proxies
//! with session tickets off and no post-handshake authentication: application data, KeyUpdate,
//! and the `close_notify` alert. Any other content (another alert, another handshake message)
//! ends the connection with an error that names it.

use std::sync::Mutex;

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::hkdf;
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets, KeyLog};
use zeroize::Zeroizing;

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

/// A KeyUpdate handshake message: type 24, length 1, `request_update` (§4.6.3).
const KEY_UPDATE: u8 = 24;
const KEY_UPDATE_LEN: usize = 5;

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
        "peer sent a post-handshake message of type {0}; only KeyUpdate (24) is taken here (no tickets, no post-handshake authentication)"
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
    #[error(
        "no application traffic secret was captured for this connection (the config needs a TrafficSecretLog)"
    )]
    NoSecret,
    #[error(
        "the captured traffic secret does not give this connection's key and IV (RFC 8446 §7.3): it belongs to another connection"
    )]
    SecretMismatch,
    #[error(
        "malformed KeyUpdate: {0} bytes of handshake data where exactly one KeyUpdate must end the record (RFC 8446 §4.6.3, §5.1)"
    )]
    MalformedKeyUpdate(usize),
    #[error("KeyUpdate with request_update {0}: only 0 and 1 are defined (RFC 8446 §4.6.3)")]
    KeyUpdateRequest(u8),
}

impl RecordError {
    /// The alert to send before closing (§6.2), where the error is this side's finding about
    /// the peer's records; `None` where the peer already said why, or the limit is ours.
    pub fn alert(&self) -> Option<u8> {
        match self {
            Self::BadMac => Some(20),
            Self::Overflow(_) => Some(22),
            Self::MalformedAlert(_) | Self::MalformedKeyUpdate(_) => Some(50),
            Self::KeyUpdateRequest(_) => Some(47),
            Self::OuterType(_)
            | Self::NoContentType
            | Self::PostHandshake(_)
            | Self::ContentType(_) => Some(10),
            _ => None,
        }
    }
}

/// Captures the two application traffic secrets of one handshake (RFC 8446 §7.1) as rustls
/// derives them. Set as the `key_log` of a config cloned for that one connection, so the secrets
/// cannot be confused with another connection's; [`from_secrets`] takes them out (and checks
/// them against the keys rustls extracted). Nothing else is kept, and the secrets are zeroed
/// when dropped.
#[derive(Default)]
pub struct TrafficSecretLog {
    client: Mutex<Option<Zeroizing<Vec<u8>>>>,
    server: Mutex<Option<Zeroizing<Vec<u8>>>>,
}

const CLIENT_SECRET: &str = "CLIENT_TRAFFIC_SECRET_0";
const SERVER_SECRET: &str = "SERVER_TRAFFIC_SECRET_0";

impl std::fmt::Debug for TrafficSecretLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secrets.
        f.debug_struct("TrafficSecretLog").finish_non_exhaustive()
    }
}

impl KeyLog for TrafficSecretLog {
    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        let slot = match label {
            CLIENT_SECRET => &self.client,
            SERVER_SECRET => &self.server,
            _ => return,
        };
        if let Ok(mut s) = slot.lock() {
            *s = Some(Zeroizing::new(secret.to_vec()));
        }
    }

    fn will_log(&self, label: &str) -> bool {
        // Only the two application traffic secrets: the handshake and exporter secrets are
        // never copied out of rustls.
        label == CLIENT_SECRET || label == SERVER_SECRET
    }
}

impl TrafficSecretLog {
    fn take(&self, client: bool) -> Option<Zeroizing<Vec<u8>>> {
        let slot = if client { &self.client } else { &self.server };
        slot.lock().ok()?.take()
    }
}

/// One direction's key: the AEAD key, the static IV, the next sequence number (§5.3), and the
/// traffic secret they were derived from, for the next KeyUpdate (§7.2).
struct DirectionKey {
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
    /// The hard limit: no record is sealed or opened under this key at or past it.
    limit: u64,
    /// Where this side's sealer moves to the next key (half the limit).
    update_at: u64,
    aead: &'static aead::Algorithm,
    hash: hkdf::Algorithm,
    secret: Zeroizing<Vec<u8>>,
    /// How many KeyUpdates this direction has gone through.
    generation: u64,
}

impl std::fmt::Debug for DirectionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key, the IV or the secret.
        f.debug_struct("DirectionKey")
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

/// An output length for HKDF-Expand.
struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// HKDF-Expand-Label(secret, label, "", out.len()) (§7.1): the info is the length, the label
/// prefixed by "tls13 ", and an empty context.
fn expand_label(
    hash: hkdf::Algorithm,
    secret: &[u8],
    label: &[u8],
    out: &mut [u8],
) -> Result<(), RecordError> {
    let length = u16::try_from(out.len())
        .map_err(|_| RecordError::Unsupported)?
        .to_be_bytes();
    let label_len = [u8::try_from(6 + label.len()).map_err(|_| RecordError::Unsupported)?];
    let info: [&[u8]; 5] = [&length, &label_len, b"tls13 ", label, &[0]];
    hkdf::Prk::new_less_safe(hash, secret)
        .expand(&info, Len(out.len()))
        .and_then(|okm| okm.fill(out))
        .map_err(|_| RecordError::Unsupported)
}

/// The key and IV of a traffic secret (§7.3).
fn traffic_keys(
    aead: &'static aead::Algorithm,
    hash: hkdf::Algorithm,
    secret: &[u8],
) -> Result<(Zeroizing<Vec<u8>>, [u8; 12]), RecordError> {
    let mut key = Zeroizing::new(vec![0; aead.key_len()]);
    expand_label(hash, secret, b"key", &mut key)?;
    let mut iv = [0; 12];
    expand_label(hash, secret, b"iv", &mut iv)?;
    Ok((key, iv))
}

impl DirectionKey {
    fn new(
        seq: u64,
        extracted: &ConnectionTrafficSecrets,
        secret: Zeroizing<Vec<u8>>,
    ) -> Result<Self, RecordError> {
        // §5.5: AES-GCM may protect at most 2^24.5 full-size records under one key; the hard
        // limit here is 2^24 and this side updates its key at 2^23, as rustls does.
        // ChaCha20-Poly1305 has no such limit short of the sequence number itself, which must
        // never wrap (§5.3). The hash is the suite's (SHA-384 only for AES-256-GCM).
        let (aead, hash, key, iv, limit) = match extracted {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
                (&aead::AES_128_GCM, hkdf::HKDF_SHA256, key, iv, 1 << 24)
            }
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
                (&aead::AES_256_GCM, hkdf::HKDF_SHA384, key, iv, 1 << 24)
            }
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (
                &aead::CHACHA20_POLY1305,
                hkdf::HKDF_SHA256,
                key,
                iv,
                u64::MAX,
            ),
            _ => return Err(RecordError::Unsupported),
        };
        if secret.len() != hkdf::KeyType::len(&hash) {
            return Err(RecordError::SecretMismatch);
        }
        let (derived_key, derived_iv) = traffic_keys(aead, hash, &secret)?;
        // The secret must be this connection's: its keys are the ones rustls extracted.
        if aws_lc_rs::constant_time::verify_slices_are_equal(&derived_key, key.as_ref()).is_err()
            || aws_lc_rs::constant_time::verify_slices_are_equal(&derived_iv, iv.as_ref()).is_err()
        {
            return Err(RecordError::SecretMismatch);
        }
        Self::with_keys(aead, hash, secret, (&derived_key, derived_iv), seq, limit)
    }

    #[cfg(test)]
    fn from_secret(
        aead: &'static aead::Algorithm,
        hash: hkdf::Algorithm,
        secret: Zeroizing<Vec<u8>>,
        seq: u64,
        limit: u64,
    ) -> Result<Self, RecordError> {
        let (key, iv) = traffic_keys(aead, hash, &secret)?;
        Self::with_keys(aead, hash, secret, (&key, iv), seq, limit)
    }

    /// A direction on `secret`, whose key and IV (§7.3) the caller derived.
    fn with_keys(
        aead: &'static aead::Algorithm,
        hash: hkdf::Algorithm,
        secret: Zeroizing<Vec<u8>>,
        (key, iv): (&[u8], [u8; 12]),
        seq: u64,
        limit: u64,
    ) -> Result<Self, RecordError> {
        Ok(Self {
            key: LessSafeKey::new(
                UnboundKey::new(aead, key).map_err(|_| RecordError::Unsupported)?,
            ),
            iv,
            seq,
            limit,
            update_at: limit / 2,
            aead,
            hash,
            secret,
            generation: 0,
        })
    }

    /// Moves to the next generation (§7.2): application_traffic_secret_N+1 =
    /// HKDF-Expand-Label(application_traffic_secret_N, "traffic upd", "", Hash.length), its
    /// key and IV, and sequence number 0 (§5.3).
    fn update(&mut self) -> Result<(), RecordError> {
        let mut next = Zeroizing::new(vec![0; self.secret.len()]);
        expand_label(self.hash, &self.secret, b"traffic upd", &mut next)?;
        let (key, iv) = traffic_keys(self.aead, self.hash, &next)?;
        let (update_at, generation) = (self.update_at, self.generation);
        *self = Self::with_keys(self.aead, self.hash, next, (&key, iv), 0, self.limit)?;
        self.update_at = update_at;
        self.generation = generation + 1;
        Ok(())
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

/// The two directions of a connection whose handshake rustls completed: the keys and sequence
/// numbers of `dangerous_extract_secrets`, and the traffic secrets `log` captured for it (the
/// config's `key_log` for this one connection). `client` says which side this is.
pub fn from_secrets(
    s: &ExtractedSecrets,
    log: &TrafficSecretLog,
    client: bool,
) -> Result<(Sealer, Opener), RecordError> {
    let tx = log.take(client).ok_or(RecordError::NoSecret)?;
    let rx = log.take(!client).ok_or(RecordError::NoSecret)?;
    Ok((
        Sealer(DirectionKey::new(s.tx.0, &s.tx.1, tx)?),
        Opener(DirectionKey::new(s.rx.0, &s.rx.1, rx)?),
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

    /// Whether this direction's key has protected as many records as it should (half its
    /// limit): the caller sends [`Sealer::key_update`] before the next record.
    pub fn needs_update(&self) -> bool {
        self.0.seq >= self.0.update_at
    }

    /// How many KeyUpdates this side has sent.
    pub fn generation(&self) -> u64 {
        self.0.generation
    }

    /// Updates the key after `records` records instead of half the limit (never later).
    pub fn update_every(&mut self, records: u64) {
        self.0.update_at = records.min(self.0.limit / 2);
    }

    /// A KeyUpdate record (§4.6.3), sealed under the current key, after which this direction
    /// uses the next one (§7.2). `requested` asks the peer to update its own key in turn.
    pub fn key_update(&mut self, requested: bool) -> Result<Vec<u8>, RecordError> {
        let msg: [u8; KEY_UPDATE_LEN] = [KEY_UPDATE, 0, 0, 1, u8::from(requested)];
        let rec = self.record(CONTENT_HANDSHAKE, &msg)?;
        self.0.update()?;
        Ok(rec)
    }

    /// A fatal alert (level 2) with `description` (§6.2), sent before closing on an error.
    pub fn fatal(&mut self, description: u8) -> Result<Vec<u8>, RecordError> {
        self.alert(2, description)
    }

    fn alert(&mut self, level: u8, description: u8) -> Result<Vec<u8>, RecordError> {
        self.record(CONTENT_ALERT, &[level, description])
    }

    /// One record of `content` type holding `body`, in a buffer of its own.
    fn record(&mut self, content: u8, body: &[u8]) -> Result<Vec<u8>, RecordError> {
        let mut rec = vec![0; OVERHEAD + body.len()];
        rec[HEADER..HEADER + body.len()].copy_from_slice(body);
        let n = self.seal(&mut rec, body.len(), content)?;
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
    /// A record of `len` bytes holding a KeyUpdate: the peer's later records use its next key,
    /// which this opener now holds. With `requested`, this side must update its own key before
    /// it sends its next application data (§4.6.3).
    KeyUpdate { len: usize, requested: bool },
}

impl Opener {
    /// How many of the peer's KeyUpdates this side has followed.
    pub fn generation(&self) -> u64 {
        self.0.generation
    }

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
            CONTENT_HANDSHAKE => match inner[..end] {
                // §4.6.3: KeyUpdate, length 1, request_update 0 or 1. §5.1: a message before a
                // key change must end its record, so it is the record's only content here.
                [KEY_UPDATE, 0, 0, 1, request] => {
                    let requested = match request {
                        0 => false,
                        1 => true,
                        other => return Err(RecordError::KeyUpdateRequest(other)),
                    };
                    self.0.update()?;
                    Ok(Opened::KeyUpdate { len, requested })
                }
                [KEY_UPDATE, ..] => Err(RecordError::MalformedKeyUpdate(end)),
                // Tickets are off and post-handshake authentication is never offered: no other
                // handshake message may come.
                _ => Err(RecordError::PostHandshake(
                    inner.first().copied().unwrap_or(0),
                )),
            },
            other => Err(RecordError::ContentType(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Sealer, Opener) {
        let mk = || {
            DirectionKey::from_secret(
                &aead::AES_128_GCM,
                hkdf::HKDF_SHA256,
                Zeroizing::new(vec![7; 32]),
                0,
                1 << 24,
            )
            .expect("key")
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
        rec[HEADER] = 4; // NewSessionTicket
        let n = s.seal(&mut rec, 5, CONTENT_HANDSHAKE).expect("seal");
        assert_eq!(o.open(&mut rec[..n]), Err(RecordError::PostHandshake(4)));
    }

    /// A handshake record with `content`, sealed under `s`'s current key.
    fn handshake_record(s: &mut Sealer, content: &[u8]) -> Vec<u8> {
        s.record(CONTENT_HANDSHAKE, content).expect("seal")
    }

    fn data_of(o: &mut Opener, rec: &mut [u8]) -> Vec<u8> {
        match o.open(rec).expect("open") {
            Opened::Data { data, .. } => rec[data].to_vec(),
            other => panic!("expected data, got {other:?}"),
        }
    }

    #[test]
    fn key_updates_move_both_ends_to_the_next_key_every_time() {
        let (mut s, mut o) = pair();
        for generation in 0..5u8 {
            let mut rec = sealed(&mut s, &[generation; 3]);
            assert_eq!(data_of(&mut o, &mut rec), [generation; 3]);
            let requested = generation % 2 == 1;
            let mut update = s.key_update(requested).expect("key update");
            assert_eq!(s.0.seq, 0, "the new key starts at sequence number 0 (§5.3)");
            assert_eq!(
                o.open(&mut update),
                Ok(Opened::KeyUpdate {
                    len: update.len(),
                    requested
                })
            );
        }
        let mut rec = sealed(&mut s, b"after five updates");
        assert_eq!(data_of(&mut o, &mut rec), b"after five updates");

        // After an update, a record under the old key does not open...
        let (mut s1, mut o1) = pair();
        let (mut s2, _) = pair();
        let mut update = s1.key_update(false).expect("key update");
        assert!(matches!(o1.open(&mut update), Ok(Opened::KeyUpdate { .. })));
        let mut stale = sealed(&mut s2, b"old key");
        assert_eq!(o1.open(&mut stale), Err(RecordError::BadMac));
        // ...and an opener that missed the update cannot read the new key's records.
        let (mut s3, mut o3) = pair();
        let _dropped = s3.key_update(false).expect("key update");
        let mut fresh = sealed(&mut s3, b"new key");
        assert_eq!(o3.open(&mut fresh), Err(RecordError::BadMac));
    }

    #[test]
    fn the_sealer_asks_for_an_update_at_half_the_limit() {
        let (mut s, mut o) = pair();
        assert_eq!(s.0.update_at, 1 << 23);
        s.update_every(3);
        for _ in 0..3 {
            assert!(!s.needs_update());
            let mut rec = sealed(&mut s, b"r");
            assert_eq!(data_of(&mut o, &mut rec), b"r");
        }
        assert!(s.needs_update());
        let mut update = s.key_update(false).expect("key update");
        assert!(matches!(o.open(&mut update), Ok(Opened::KeyUpdate { .. })));
        assert!(!s.needs_update(), "a new key, counted from 0");
        // Never later than half the hard limit.
        s.update_every(u64::MAX);
        assert_eq!(s.0.update_at, 1 << 23);
    }

    #[test]
    fn malformed_key_updates_are_refused_with_their_alerts() {
        let cases: [(&[u8], RecordError, u8); 4] = [
            (&[24, 0, 0, 1, 2], RecordError::KeyUpdateRequest(2), 47),
            (&[24, 0, 0, 2, 0, 0], RecordError::MalformedKeyUpdate(6), 50),
            // Another message after it: the KeyUpdate would not end its record (§5.1).
            (
                &[24, 0, 0, 1, 1, 24, 0, 0, 1, 1],
                RecordError::MalformedKeyUpdate(10),
                50,
            ),
            (&[24, 0, 0], RecordError::MalformedKeyUpdate(3), 50),
        ];
        for (content, err, alert) in cases {
            let (mut s, mut o) = pair();
            let mut rec = handshake_record(&mut s, content);
            assert_eq!(o.open(&mut rec), Err(err.clone()), "{content:?}");
            assert_eq!(err.alert(), Some(alert));
        }
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
