//! Outside text repeated in messages, bounded. An error names the value that was wrong, but a
//! value of megabytes must not make a message of megabytes: a policy sync source that serves a
//! 3 MB principal made a 3 MB log line on every poll and a 3 MB status, and `tessera policy
//! apply -f` printed it whole.
//!
//! [`PolicyError::bounded`] bounds an error of the policy crate: quoted values (`"…"` as `{:?}`
//! writes them, `` `…` `` as serde writes a key) longer than [`MAX_VALUE`] bytes keep their
//! start, so the reason after a value is still read, and the whole message keeps at most
//! [`MAX_MESSAGE`] bytes. Bounding twice changes nothing: a part is cut only when it is longer
//! than what is kept by more than a cut marker's length.

use std::borrow::Cow;

use tessera_spiffe::abbreviate;

use crate::PolicyError;

/// Quoted values in a [`PolicyError`]'s message longer than this (bytes) are shortened.
pub(crate) const MAX_VALUE: usize = 100;
/// A policy name or field longer than this (bytes) is shortened: a valid name has at most 256
/// bytes, so only an invalid one is.
const MAX_NAME: usize = 256;
/// The longest message kept whole once its quoted values are shortened (bytes).
pub(crate) const MAX_MESSAGE: usize = 1024;
/// Longer than any `… (N bytes cut)` marker: a part is cut only when it is longer than what is
/// kept by more than this, so an abbreviated part is never cut again.
const MARKER: usize = 40;

/// [`abbreviate`] to `keep` bytes, only when `text` is longer than `keep` and a marker.
fn shorten(text: &str, keep: usize) -> Cow<'_, str> {
    if text.len() <= keep + MARKER {
        Cow::Borrowed(text)
    } else {
        abbreviate(text, keep)
    }
}

impl PolicyError {
    /// This error with its policy name, field and message bounded (see the module doc): what a
    /// file, a policy sync source or an API request holds is repeated in the message, and may
    /// be megabytes. Every error goes through it ([`PolicyError::new`]).
    pub(crate) fn bounded(self) -> Self {
        let message = match shorten_quoted(&self.message) {
            Cow::Borrowed(_) => self.message,
            Cow::Owned(m) => m,
        };
        let name = |s: String| {
            if s.len() > MAX_NAME {
                abbreviate(&s, MAX_VALUE).into_owned()
            } else {
                s
            }
        };
        Self {
            policy: name(self.policy),
            field: name(self.field),
            message: match shorten(&message, MAX_MESSAGE) {
                Cow::Borrowed(_) => message,
                Cow::Owned(m) => m,
            },
        }
    }
}

/// `msg` with every quoted run (`"…"`, honouring `\` escapes, or `` `…` ``) longer than
/// [`MAX_VALUE`] bytes (and a marker) abbreviated; a quote never closed runs to the end.
fn shorten_quoted(msg: &str) -> Cow<'_, str> {
    if msg.len() <= MAX_VALUE + MARKER {
        return Cow::Borrowed(msg);
    }
    let mut out = String::new();
    let mut rest = msg;
    let mut changed = false;
    while let Some(open) = rest.find(['"', '`']) {
        let quote = rest.as_bytes()[open];
        out.push_str(&rest[..=open]);
        let body = &rest[open + 1..];
        let close = closing(body, quote);
        let inside = &body[..close.unwrap_or(body.len())];
        let short = shorten(inside, MAX_VALUE);
        changed |= matches!(short, Cow::Owned(_));
        out.push_str(&short);
        match close {
            Some(c) => {
                out.push(char::from(quote));
                rest = &body[c + 1..];
            }
            None => {
                rest = "";
                break;
            }
        }
    }
    if !changed {
        return Cow::Borrowed(msg);
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// Where `quote` closes in `body` (the text after the opening one). Only ASCII bytes are
/// compared, so the index found is a character boundary.
fn closing(body: &str, quote: u8) -> Option<usize> {
    let b = body.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if quote == b'"' && b[i] == b'\\' {
            i += 2;
            continue;
        }
        if b[i] == quote {
            return Some(i);
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounded(policy: &str, field: &str, message: String) -> PolicyError {
        let e = PolicyError::new(policy, field, message).bounded();
        // Bounding twice changes nothing.
        assert_eq!(e.clone().bounded(), e);
        e
    }

    #[test]
    fn a_bounded_error_keeps_the_start_of_a_long_value_and_the_reason_after_it() {
        let value = format!("spiffe://example.org/{}", "a".repeat(3 << 20));
        let e = bounded(
            "p",
            "rules[0].from.principals[0]",
            format!("{value:?}: not a SPIFFE ID"),
        );
        assert!(e.message.len() < 200, "{}", e.message.len());
        assert!(
            e.message.starts_with("\"spiffe://example.org/aaa")
                && e.message.ends_with(" bytes cut)\": not a SPIFFE ID"),
            "{}",
            e.message
        );
        assert_eq!(e.field, "rules[0].from.principals[0]");
        // A serde key in backticks, an escaped quote inside a value, a short value after.
        let key = "k".repeat(500);
        let e = bounded(
            "p",
            "rules[0]",
            format!(
                "unknown field `{key}`, expected `from`; {:?} and \"ok\"",
                "x\"y".repeat(100)
            ),
        );
        assert!(
            e.message.starts_with("unknown field `kkk")
                && e.message.contains("cut)`, expected `from`; \"x\\\"y")
                && e.message.ends_with("cut)\" and \"ok\""),
            "{}",
            e.message
        );
        // An unclosed quote, and a long text without quotes: the whole message is bounded.
        for m in [format!("\"{}", "z".repeat(5000)), "w ".repeat(5000)] {
            let e = bounded("p", "f", m);
            assert!(
                e.message.len() <= MAX_MESSAGE + MARKER,
                "{}",
                e.message.len()
            );
        }
        // A short message and a valid 256-byte name are kept whole; a longer name is not.
        let name = "n".repeat(256);
        let e = bounded(&name, "name", "\"short\": bad".into());
        assert_eq!(
            (e.policy.as_str(), e.message.as_str()),
            (name.as_str(), "\"short\": bad")
        );
        let e = bounded(&"n".repeat(3 << 20), "name", String::new());
        assert!(e.policy.len() < 200, "{}", e.policy.len());
    }
}
