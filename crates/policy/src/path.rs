//! The request path as policy sees it: one spelling per resource.

/// The request path as policy sees it and the application receives it, so that one resource
/// has one spelling: a rule on `/admin*` must hold for `/%61dmin`, `/public/../admin` and
/// `//admin` too, since the application may decode or normalize them into `/admin`.
/// - RFC 3986 §6.2.2.2: percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are
///   decoded; every other escape is kept, with upper-case hex (§6.2.2.1). An encoded `/` (`%2F`)
///   or `\` (`%5C`) therefore stays encoded and is not a path separator here.
/// - RFC 3986 §6.2.2.3, §5.2.4: `.` and `..` segments are removed.
/// - Empty segments are merged (`//` → `/`), as Istio's `MERGE_SLASHES`; a trailing `/` stays.
///
/// A `%` not followed by two hex digits is a malformed request, refused rather than guessed at.
/// The query is left alone. `*` (the `OPTIONS *` form) is returned as it is.
pub fn normalize_path(raw: &str) -> Result<String, String> {
    if raw == "*" {
        return Ok(raw.to_owned());
    }
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

#[cfg(test)]
mod tests {
    use super::{normalize_path, without_params};

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
