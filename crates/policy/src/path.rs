//! The request path as policy sees it: one spelling per resource.

/// The request path as policy sees it and the application receives it, so that one resource
/// has one spelling: a rule on `/admin*` must hold for `/%61dmin`, `/public/../admin` and
/// `//admin` too, since the application may decode or normalize them into `/admin`.
/// - RFC 3986 §6.2.2.2: percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are
///   decoded; every other escape is kept, with upper-case hex (§6.2.2.1). An encoded `/` (`%2F`)
///   or `\` (`%5C`) therefore stays encoded and is not a path separator here.
/// - RFC 3986 §6.2.2.3, §5.2.4: `.` and `..` segments are removed.
/// - A `\` is a `/`, as Istio's default (`BASE`) normalization has it: IIS and several Java and
///   Node stacks treat it as a separator, so `/x\..\admin` reaches their `/admin`.
/// - Empty segments are merged (`//` → `/`), as Istio's `MERGE_SLASHES`; a trailing `/` stays.
///
/// A `%` not followed by two hex digits is a malformed request, refused rather than guessed at.
/// So is `%00`, as Istio refuses it: an application that decodes the path and ends it at a NUL
/// would serve `/admin` for `/admin%00.png`, which a rule on `/admin` never saw.
/// The query is left alone. `*` (the `OPTIONS *` form) is returned as it is.
pub fn normalize_path(raw: &str) -> Result<String, String> {
    if raw == "*" {
        return Ok(raw.to_owned());
    }
    let slashed;
    let raw = if raw.contains('\\') {
        slashed = raw.replace('\\', "/");
        slashed.as_str()
    } else {
        raw
    };
    let mut decoded = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(at) = rest.find('%') {
        decoded.push_str(&rest[..at]);
        let hex = rest
            .get(at + 1..at + 3)
            .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        let Some(v) = hex else {
            return Err(format!(
                "the path has a malformed percent-encoding at byte {} (RFC 3986 §2.1: `%` and two hex digits)",
                raw.len() - rest.len() + at
            ));
        };
        if v == 0 {
            return Err(format!(
                "the path has an encoded NUL (%00) at byte {}",
                raw.len() - rest.len() + at
            ));
        }
        if v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~') {
            decoded.push(char::from(v));
        } else {
            decoded.push_str(&format!("%{v:02X}"));
        }
        rest = &rest[at + 3..];
    }
    decoded.push_str(rest);
    let Some(rest) = decoded.strip_prefix('/') else {
        return Err("the path does not start with `/` (RFC 9112 §3.2.1, origin-form)".into());
    };
    let segments: Vec<&str> = rest.split('/').collect();
    let last = segments.len().saturating_sub(1);
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (n, seg) in segments.into_iter().enumerate() {
        match seg {
            "." | "" => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
        // A path that ends in `/`, `/.` or `/..` names a directory: it keeps its trailing `/`.
        if n == last && matches!(seg, "." | ".." | "") && !out.is_empty() {
            out.push("");
        }
    }
    Ok(format!("/{}", out.join("/")))
}

/// The path as an application that drops segment parameters reads it, or `None` when it has
/// none. Servlet containers and the frameworks on them (Tomcat, Jetty, Spring) remove
/// `;params` from each segment before routing (RFC 3986 §3.3 leaves `;` to the scheme), so
/// `/admin;x/users` reaches their `/admin/users` handler, and `/public/..;/admin` their
/// `/admin`: rules must see that spelling too (see `index`). `path` is normalized; the result
/// is normalized again, since a stripped `..;` becomes a dot-segment.
pub fn without_params(path: &str) -> Option<String> {
    if !path.contains(';') {
        return None;
    }
    let stripped: Vec<&str> = path
        .split('/')
        .map(|seg| seg.split_once(';').map_or(seg, |(s, _)| s))
        .collect();
    normalize_path(&stripped.join("/")).ok()
}

/// Why a path pattern's literal part never occurs in a path as [`normalize_path`] writes it,
/// or `None` when it can. Requests are matched after normalization, so a rule on `/a//b` or
/// `/caf%c3%a9` would silently never apply (a DENY that denies nothing). `complete_first` /
/// `complete_last`: whether the literal's first / last segment is a whole segment (an exact or
/// prefix pattern starts at the path's start; a suffix pattern ends at its end).
pub(crate) fn pattern_problem(
    lit: &str,
    complete_first: bool,
    complete_last: bool,
) -> Option<String> {
    if lit.contains('\\') {
        return Some("requests are matched with `\\` as `/`; write `/`".into());
    }
    if lit.contains("//") {
        return Some("requests are matched with `//` merged into `/`; write one `/`".into());
    }
    let bytes = lit.as_bytes();
    for (at, _) in lit.match_indices('%') {
        let hex = &bytes[at + 1..bytes.len().min(at + 3)];
        if hex.len() < 2 && !complete_last && at + 1 + hex.len() == bytes.len() {
            // A prefix may end inside an escape (`/a%2` for `/a%2F…`).
            if hex
                .iter()
                .all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(c))
            {
                continue;
            }
        }
        let Some(v) = std::str::from_utf8(hex)
            .ok()
            .filter(|h| h.len() == 2 && h.bytes().all(|c| c.is_ascii_hexdigit()))
            .and_then(|h| u8::from_str_radix(h, 16).ok())
        else {
            return Some(format!(
                "malformed percent-encoding at byte {at} (`%` and two hex digits)"
            ));
        };
        if v == 0 {
            return Some("requests with %00 are refused, never matched".into());
        }
        if v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~') {
            return Some(format!(
                "requests are matched with %{v:02X} decoded; write `{}`",
                char::from(v)
            ));
        }
        if hex.iter().any(u8::is_ascii_lowercase) {
            return Some(format!(
                "requests are matched with escapes in upper case; write %{v:02X}"
            ));
        }
    }
    let segments: Vec<&str> = lit.split('/').collect();
    let last = segments.len() - 1;
    for (i, seg) in segments.iter().enumerate() {
        let complete = (i > 0 || complete_first) && (i < last || complete_last);
        if complete && matches!(*seg, "." | "..") {
            return Some(format!(
                "requests are matched with `{seg}` segments removed (RFC 3986 §5.2.4)"
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::{normalize_path, pattern_problem, without_params};

    #[test]
    fn a_pattern_no_normalized_path_can_match_is_named() {
        // (literal, complete first, complete last, refused)
        for (lit, first, last, bad) in [
            ("/admin", true, true, false),
            ("/admin/", true, false, false),
            ("/a/.well", true, false, false),
            ("/a%2", true, false, false),
            ("/a%2F", true, true, false),
            ("/caf%C3%A9", true, true, false),
            (".html", false, true, false),
            ("/enc/caf%c3%a9", true, true, true),
            ("/enc/%7euser", true, true, true),
            ("/enc/%41", true, true, true),
            ("/enc//x", true, true, true),
            ("/enc/./y", true, true, true),
            ("/enc/../y", true, false, true),
            ("/a/.", true, true, true),
            ("/a\\b", true, true, true),
            ("/a%00", true, true, true),
            ("/a%zz", true, true, true),
            ("/a%2", true, true, true),
        ] {
            assert_eq!(pattern_problem(lit, first, last).is_some(), bad, "{lit}");
            if !bad && first && last {
                assert_eq!(normalize_path(lit).unwrap(), lit, "{lit}");
            }
        }
    }

    #[test]
    fn backslash_is_a_separator_and_an_encoded_nul_is_refused() {
        assert_eq!(normalize_path("/x\\..\\admin").unwrap(), "/admin");
        assert_eq!(normalize_path("/public/..\\other").unwrap(), "/other");
        assert_eq!(normalize_path("/a%5Cb").unwrap(), "/a%5Cb");
        let e = normalize_path("/admin%00").unwrap_err();
        assert!(e.contains("%00") && e.contains("byte 6"), "{e}");
    }

    #[test]
    fn segment_parameters_are_dropped_as_servlet_containers_drop_them() {
        for (path, want) in [
            ("/admin;x/users", Some("/admin/users")),
            ("/public/..;/admin", Some("/admin")),
            ("/a;b=c;d/e;f", Some("/a/e")),
            ("/;x/admin", Some("/admin")),
            ("/x/;y", Some("/x/")),
            ("/a%3Bb/c", None),
            ("/plain/path", None),
        ] {
            assert_eq!(without_params(path).as_deref(), want, "{path}");
        }
    }

    #[test]
    fn one_resource_has_one_path() {
        for (raw, want) in [
            ("/", "/"),
            ("/admin", "/admin"),
            ("/%61dmin", "/admin"),
            ("/%7Euser/%2d_%2E", "/~user/-_."),
            ("/public/../admin", "/admin"),
            ("/public/%2e%2e/admin", "/admin"),
            ("/./admin/.", "/admin/"),
            ("/a/b/..", "/a/"),
            ("/..", "/"),
            ("/../../etc", "/etc"),
            ("//admin//x/", "/admin/x/"),
            ("/a%2fb/%5c..", "/a%2Fb/%5C.."),
            ("/caf%c3%a9", "/caf%C3%A9"),
            ("/sp%20ace", "/sp%20ace"),
            ("*", "*"),
        ] {
            assert_eq!(normalize_path(raw).unwrap(), want, "{raw}");
        }
    }

    #[test]
    fn a_malformed_escape_is_refused_with_where_it_is() {
        for (raw, at) in [
            ("/a%", 2),
            ("/a%4", 2),
            ("/%zz", 1),
            ("/ok/%+1", 4),
            ("/%é", 1),
        ] {
            let e = normalize_path(raw).unwrap_err();
            assert!(e.contains(&format!("at byte {at}")), "{raw}: {e}");
        }
        assert!(
            normalize_path("admin")
                .unwrap_err()
                .contains("does not start with `/`")
        );
    }
}
