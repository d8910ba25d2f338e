//! Outside text repeated in messages, bounded: an error names the value that was wrong, but a
//! value of megabytes (from a bundle endpoint, a policy source, an API request) must not make
//! an error of megabytes, which is logged at every retry, stored and printed. Every crate cuts
//! such text with [`abbreviate`].

use std::borrow::Cow;

/// `text` when it has at most `max` bytes; otherwise its first `max` bytes (cut back to a
/// character boundary) followed by `… (N bytes cut)`.
pub fn abbreviate(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!(
        "{}… ({} bytes cut)",
        text.get(..end).unwrap_or_default(),
        text.len() - end
    ))
}

#[cfg(test)]
mod tests {
    use super::abbreviate;

    #[test]
    fn abbreviate_cuts_on_a_character_boundary_and_says_how_much() {
        assert_eq!(abbreviate("short", 5), "short");
        assert_eq!(abbreviate("abcdef", 4), "abcd… (2 bytes cut)");
        // `é` is two bytes: a cut at 2 would split it, so it goes back to 1.
        assert_eq!(abbreviate("aéz", 2), "a… (3 bytes cut)");
        assert_eq!(abbreviate("ééé", 0), "… (6 bytes cut)");
        let long = "é".repeat(1 << 20);
        assert!(abbreviate(&long, 64).len() <= 64 + 30);
    }
}
