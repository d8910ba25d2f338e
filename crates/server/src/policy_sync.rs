//! Policy sets owned by an external access-control system (`[[policy.sync]]`): each source (an
//! HTTPS endpoint polled with `If-None-Match`, or a directory of YAML/JSON files) is the source of
//! truth for the policies stored as `<set>/<name>`. A poll that brings a valid document makes the
//! stored set match it — create, update, delete — through the same store calls and change feed
//! as the `PolicyApi`, writing only what differs (so several servers polling one source agree
//! without fighting). An invalid document is refused whole with the reason and the last good set
//! stays in force; `tessera policy sync status` shows every source's state. Only the source
//! changes its set: `tessera policy apply/delete` of such a name is refused.
//!
//! Absence is not a statement: a reply or file with no value (empty, whitespace, a YAML null)
//! and a directory with no document are refused like an invalid document, since a broken
//! server, proxy, mount or deploy gives exactly that and reading it as "no policies" would
//! delete every policy of the set, DENY policies included. A source says "no policies" with an
//! empty list, `[]`.
//!
//! Whoever serves the document owns policy, so the endpoint is authenticated (a configured CA or
//! SPIFFE ID); plain `http://` is allowed to a loopback address only.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tessera_policy::NamedPolicy;
use tessera_proto::v1 as pb;
use tessera_spiffe::SpiffeId;
use tessera_store::Policy;

use crate::config::PolicySyncConfig;
use crate::federation::fetch::{self, EndpointUrl, Fetched};
use crate::state::State;

/// Largest document a source may serve (all files of a directory together).
const MAX_DOCUMENT_BYTES: usize = 4 << 20;
/// Longest one poll of an endpoint may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Checks one `[[policy.sync]]` entry (the config's validation); the error names the field.
pub(crate) fn check_source(s: &PolicySyncConfig) -> Result<(), String> {
    if s.set.is_empty()
        || s.set.len() > 64
        || !s
            .set
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(format!(
            "set {:?}: 1 to 64 letters, digits, `.`, `_` or `-` (its policies are named <set>/<name>)",
            s.set
        ));
    }
    match (&s.url, &s.directory) {
        (Some(_), Some(_)) | (None, None) => {
            return Err("give exactly one of url and directory".into());
        }
        (None, Some(dir)) => {
            if s.ca_file.is_some() || s.spiffe_id.is_some() {
                return Err("ca_file and spiffe_id are for an https url, not a directory".into());
            }
            if !dir.is_absolute() {
                return Err(format!(
                    "directory {}: must be an absolute path",
                    dir.display()
                ));
            }
        }
        (Some(url), None) => {
            let ep = fetch::parse_url_allowing_loopback_http(
                url,
                "whoever serves the document owns this policy set",
            )
            .map_err(|e| format!("url: {e}"))?;
            match (ep.tls, &s.ca_file, &s.spiffe_id) {
                (true, None, None) => {
                    return Err(
                        "an https url needs ca_file (the CA that signs the server's certificate) or spiffe_id (the server's SPIFFE ID): whoever serves the document owns this policy set".into(),
                    );
                }
                (true, Some(_), Some(_)) => {
                    return Err("give one of ca_file and spiffe_id, not both".into());
                }
                (false, Some(_), _) | (false, _, Some(_)) => {
                    return Err("ca_file and spiffe_id are for an https url".into());
                }
                _ => {}
            }
            if let Some(id) = &s.spiffe_id {
                let id = SpiffeId::parse(id).map_err(|e| format!("spiffe_id {id:?}: {e}"))?;
                if id.is_root() {
                    return Err(format!("spiffe_id {id}: a trust domain, not a workload ID"));
                }
            }
        }
    }
    if s.interval.0 == 0 {
        return Err("interval: must be more than 0s".into());
    }
    Ok(())
}

/// The stored name of policy `name` of set `set`.
fn stored_name(set: &str, name: &str) -> String {
    format!("{set}/{name}")
}

/// The set that owns a stored policy name, when a sync source does.
pub(crate) fn owner<'a>(state: &'a State, name: &str) -> Option<&'a PolicySyncConfig> {
    state.cfg.policy.sync.iter().find(|s| {
        name.strip_prefix(s.set.as_str())
            .is_some_and(|r| r.starts_with('/'))
    })
}

/// What makes the stored set match the source: policies to write (new or changed) and names
/// to delete. Pure.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    pub(crate) put: Vec<Policy>,
    pub(crate) delete: Vec<String>,
}

/// `desired`: the source's policies (names without the set prefix); `current`: every stored
/// policy. Stored documents are canonical JSON (the `PolicyApi` stores `NamedPolicy::to_json`),
/// so comparing the text finds real changes only.
pub(crate) fn plan(set: &str, desired: &[NamedPolicy], current: &[Policy]) -> Plan {
    let prefix = format!("{set}/");
    let mine: BTreeMap<&str, &str> = current
        .iter()
        .filter(|p| p.id.starts_with(&prefix))
        .map(|p| (p.id.as_str(), p.document.as_str()))
        .collect();
    let mut out = Plan::default();
    let mut wanted = std::collections::BTreeSet::new();
    for p in desired {
        let id = stored_name(set, &p.name);
        let doc = p.to_json();
        if mine.get(id.as_str()) != Some(&doc.as_str()) {
            out.put.push(Policy {
                id: id.clone(),
                document: doc,
            });
        }
        wanted.insert(id);
    }
    out.delete = mine
        .keys()
        .filter(|id| !wanted.contains(**id))
        .map(|id| (*id).to_owned())
        .collect();
    out
}

/// Parses a source's documents (each one policy or a list) into one set: every policy valid,
/// names unique across documents, stored names valid. All or nothing. A document with no value
/// is refused (`parse_set_documents`); `[]` is an empty set.
pub(crate) fn parse_set(set: &str, docs: &[(String, String)]) -> Result<Vec<NamedPolicy>, String> {
    let mut all: Vec<NamedPolicy> = Vec::new();
    for (origin, text) in docs {
        let ps = tessera_policy::parse_set_documents(text).map_err(|e| format!("{origin}: {e}"))?;
        for p in ps {
            if let Some(prev) = all.iter().find(|q| q.name == p.name) {
                return Err(format!(
                    "{origin}: policy {:?} is defined twice in the source ({})",
                    p.name, prev.name
                ));
            }
            tessera_policy::validate_name(&stored_name(set, &p.name))
                .map_err(|e| format!("{origin}: {e}"))?;
            all.push(p);
        }
    }
    Ok(all)
}

/// One source's state, as `tessera policy sync status` shows it.
#[derive(Debug, Clone, Default)]
pub(crate) struct SourceStatus {
    pub(crate) last_attempt_at: Option<i64>,
    pub(crate) last_success_at: Option<i64>,
    /// The version last applied (the endpoint's ETag, or a digest of the directory).
    pub(crate) etag: Option<String>,
    pub(crate) policies: usize,
    /// The revision of the last change applied (0: none yet).
    pub(crate) revision: u64,
    pub(crate) last_error: Option<String>,
    pub(crate) last_error_at: Option<i64>,
}

/// Every source's status, by set.
#[derive(Debug, Default)]
pub(crate) struct SyncStatuses(Mutex<BTreeMap<String, SourceStatus>>);

impl SyncStatuses {
    fn update(&self, set: &str, f: impl FnOnce(&mut SourceStatus)) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(m.entry(set.to_owned()).or_default());
    }

    pub(crate) fn get(&self, set: &str) -> SourceStatus {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.get(set).cloned().unwrap_or_default()
    }

    /// Records the outcome of the poll made `at`; returns its error as it is to be logged,
    /// the same text the status keeps ([`crate::bounded_error`]: it repeats what the source
    /// sent, which may be megabytes, logged again on every poll).
    fn record(&self, set: &str, at: i64, r: Result<(), String>) -> Option<String> {
        let e = r.err().map(|e| crate::bounded_error(&e).into_owned());
        self.update(set, |st| {
            st.last_attempt_at = Some(at);
            match &e {
                None => {
                    st.last_success_at = Some(at);
                    st.last_error = None;
                }
                Some(e) => {
                    st.last_error = Some(e.clone());
                    st.last_error_at = Some(at);
                }
            }
        });
        e
    }
}

/// The status reply for every configured source.
pub(crate) fn status_pb(state: &State) -> Vec<pb::PolicySyncStatus> {
    state
        .cfg
        .policy
        .sync
        .iter()
        .map(|s| {
            let st = state.policy_sync.get(&s.set);
            pb::PolicySyncStatus {
                set: s.set.clone(),
                source: source_name(s),
                interval_secs: s.interval.0,
                last_attempt_unix: st.last_attempt_at.unwrap_or(0),
                last_success_unix: st.last_success_at.unwrap_or(0),
                etag: st.etag.unwrap_or_default(),
                policies: u64::try_from(st.policies).unwrap_or(u64::MAX),
                revision: st.revision,
                last_error: st.last_error.unwrap_or_default(),
                last_error_unix: st.last_error_at.unwrap_or(0),
            }
        })
        .collect()
}

fn source_name(s: &PolicySyncConfig) -> String {
    match (&s.url, &s.directory) {
        (Some(u), _) => u.clone(),
        (None, Some(d)) => d.display().to_string(),
        (None, None) => String::new(),
    }
}

fn now() -> i64 {
    i64::try_from(crate::ca::unix_now()).unwrap_or(i64::MAX)
}

/// What one read of a source brought.
enum Read {
    Unchanged,
    Documents {
        docs: Vec<(String, String)>,
        version: Option<String>,
    },
}

/// The TLS client for an https source: Web PKI against `ca_file`, or the SPIFFE verifier of
/// `tessera_tls` against this server's stored bundles with `spiffe_id` required.
async fn tls_for(state: &State, s: &PolicySyncConfig) -> Result<Arc<rustls::ClientConfig>, String> {
    let cfg = if let Some(ca) = &s.ca_file {
        let pem =
            std::fs::read_to_string(ca).map_err(|e| format!("ca_file {}: {e}", ca.display()))?;
        let roots =
            fetch::parse_ca_pem(&pem).map_err(|e| format!("ca_file {}: {e}", ca.display()))?;
        tessera_tls::web::web_client_config(Some(&roots))
    } else if let Some(id) = &s.spiffe_id {
        let id = SpiffeId::parse(id).map_err(|e| format!("spiffe_id {id:?}: {e}"))?;
        let mut bundles = tessera_spiffe::BundleSet::new();
        for b in state
            .store
            .list_bundles()
            .await
            .map_err(|e| format!("datastore: {e}"))?
        {
            if let Ok(parsed) =
                tessera_spiffe::Bundle::parse(b.trust_domain.clone(), &b.bundle_json)
            {
                bundles.upsert(parsed);
            }
        }
        let verifier = tessera_tls::SpiffeServerVerifier::new(
            Arc::new(arc_swap::ArcSwap::from_pointee(bundles)),
            tessera_tls::ExpectedPeer::Exact(id),
        );
        tessera_tls::web::spiffe_client_config(Arc::new(verifier))
    } else {
        return Err("an https url needs ca_file or spiffe_id".into());
    };
    cfg.map(Arc::new)
        .map_err(|e| format!("TLS configuration: {e}"))
}

async fn read_url(
    state: &State,
    s: &PolicySyncConfig,
    ep: &EndpointUrl,
    etag: Option<&str>,
) -> Result<Read, String> {
    let tls = if ep.tls {
        Some(tls_for(state, s).await?)
    } else {
        None
    };
    let url = source_name(s);
    match fetch::get_endpoint(ep, tls, etag, MAX_DOCUMENT_BYTES, FETCH_TIMEOUT)
        .await
        .map_err(|e| format!("GET {url}: {e}"))?
    {
        Fetched::NotModified => Ok(Read::Unchanged),
        Fetched::Body { body, etag } => {
            let text = String::from_utf8(body).map_err(|_| format!("GET {url}: not UTF-8"))?;
            Ok(Read::Documents {
                docs: vec![(url, text)],
                version: etag,
            })
        }
    }
}

/// Every `*.yaml`, `*.yml` and `*.json` file of `dir` (sorted by name), and a digest of names
/// and contents as the version. At most [`MAX_DOCUMENT_BYTES`] in all are read.
fn read_dir(dir: &Path, last: Option<&str>) -> Result<Read, String> {
    use std::hash::{Hash as _, Hasher as _};
    let mut names: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("directory {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|x| x.to_str())
                    .is_some_and(|x| matches!(x, "yaml" | "yml" | "json"))
        })
        .collect();
    if names.is_empty() {
        // Refused, not read as "no policies": a volume not mounted yet, a deploy that removed
        // the files, or the wrong directory all look like this, and an empty set would delete
        // every policy of the set, DENY policies included. As an endpoint sends `[]`, a
        // directory says "no policies" with a file holding `[]` (an empty *file* is refused by
        // the parser like an empty reply).
        return Err(format!(
            "directory {}: no *.yaml, *.yml or *.json file; to remove every policy of the set, leave one file holding an empty list `[]`",
            dir.display()
        ));
    }
    names.sort();
    let mut docs = Vec::with_capacity(names.len());
    let mut total = 0usize;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for p in names {
        let text = read_file_bounded(&p, MAX_DOCUMENT_BYTES - total)?.ok_or_else(|| {
            format!(
                "directory {}: more than {MAX_DOCUMENT_BYTES} bytes of documents (at {})",
                dir.display(),
                p.display()
            )
        })?;
        total += text.len();
        p.hash(&mut h);
        text.hash(&mut h);
        docs.push((p.display().to_string(), text));
    }
    let version = format!("dir-{:016x}", h.finish());
    if last == Some(version.as_str()) {
        return Ok(Read::Unchanged);
    }
    Ok(Read::Documents {
        docs,
        version: Some(version),
    })
}

/// The text of the file `path` when it holds at most `limit` bytes; `None` when it holds more.
/// Its size is checked before it is read, and the read stops after `limit + 1` bytes, so a file
/// that grows in between (or whose size says less than it holds) costs at most that much memory.
fn read_file_bounded(path: &Path, limit: usize) -> Result<Option<String>, String> {
    let at = |e: std::io::Error| format!("{}: {e}", path.display());
    let file = std::fs::File::open(path).map_err(at)?;
    if file.metadata().map_err(at)?.len() > u64::try_from(limit).unwrap_or(u64::MAX) {
        return Ok(None);
    }
    let Some(bytes) = read_at_most(file, limit).map_err(at)? else {
        return Ok(None);
    };
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| format!("{}: not UTF-8", path.display()))
}

/// What `r` yields when that is at most `limit` bytes; `None` (having read `limit + 1`) when
/// it yields more.
fn read_at_most(r: impl std::io::Read, limit: usize) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    r.take(u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1))
        .read_to_end(&mut bytes)?;
    Ok((bytes.len() <= limit).then_some(bytes))
}

/// Applies `plan` through the store and the feed, as `tessera-sync:<set>` in the audit log.
/// Returns the last revision written (0: nothing to do).
async fn apply(state: &State, set: &str, plan: Plan) -> Result<u64, String> {
    let who = crate::audit::Caller {
        spiffe_id: Some(format!("policy-sync:{set}")),
        ..Default::default()
    };
    let mut revision = 0;
    for p in plan.put {
        let detail = serde_json::json!({ "name": p.id, "sync_set": set });
        let r = state
            .store
            .set_policy(&p)
            .await
            .map_err(|e| format!("storing {}: {e}", p.id));
        state.audit.record(
            &who,
            "sync_policy",
            detail,
            &r.as_ref().map(|_| ()).map_err(Clone::clone),
        );
        revision = r?;
        state.feed.notify(revision);
    }
    for id in plan.delete {
        let detail = serde_json::json!({ "name": id, "sync_set": set });
        let r = state
            .store
            .delete_policy(&id)
            .await
            .map(|_| ())
            .map_err(|e| format!("deleting {id}: {e}"));
        state.audit.record(&who, "sync_delete_policy", detail, &r);
        r?;
        revision = state
            .store
            .current_revision()
            .await
            .map_err(|e| format!("datastore: {e}"))?;
        state.feed.notify(revision);
    }
    Ok(revision)
}

/// One poll: read, and when the source changed, parse whole and reconcile. The version is
/// recorded only after the set was applied, so a failure is retried in full next time.
async fn poll(state: &State, s: &PolicySyncConfig) -> Result<(), String> {
    let last = state.policy_sync.get(&s.set).etag;
    let read = match (&s.url, &s.directory) {
        (Some(url), _) => {
            let ep = fetch::parse_url_allowing_loopback_http(url, "whoever serves it owns policy")?;
            read_url(state, s, &ep, last.as_deref()).await?
        }
        (None, Some(dir)) => read_dir(dir, last.as_deref())?,
        (None, None) => return Err("no url or directory".into()),
    };
    let Read::Documents { docs, version } = read else {
        return Ok(());
    };
    let desired = parse_set(&s.set, &docs)?;
    let current = state
        .store
        .list_policies()
        .await
        .map_err(|e| format!("datastore: {e}"))?;
    let plan = plan(&s.set, &desired, &current);
    let changes = plan.put.len() + plan.delete.len();
    let revision = apply(state, &s.set, plan).await?;
    if changes > 0 {
        tracing::info!(set = %s.set, policies = desired.len(), changes, revision, "policy set synced from its source");
    }
    state.policy_sync.update(&s.set, |st| {
        st.etag = version;
        st.policies = desired.len();
        if revision > 0 {
            st.revision = revision;
        }
    });
    Ok(())
}

/// Polls every configured source until the server stops.
pub(crate) fn spawn(state: Arc<State>) -> Vec<tokio::task::JoinHandle<()>> {
    state
        .cfg
        .policy
        .sync
        .clone()
        .into_iter()
        .map(|s| {
            let state = state.clone();
            tokio::spawn(async move {
                let mut stopping = state.stopping.clone();
                loop {
                    let at = now();
                    let r = poll(&state, &s).await;
                    if let Some(e) = state.policy_sync.record(&s.set, at, r) {
                        tracing::warn!(set = %s.set, source = %source_name(&s), error = %e, "policy sync failed; the last good set stays in force");
                    }
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(s.interval.0)) => {}
                        _ = stopping.wait_for(|v| *v) => return,
                    }
                }
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::Secs;

    fn src(url: Option<&str>, dir: Option<&str>) -> PolicySyncConfig {
        PolicySyncConfig {
            set: "central".into(),
            url: url.map(str::to_owned),
            directory: dir.map(Into::into),
            interval: Secs(10),
            ca_file: None,
            spiffe_id: None,
        }
    }

    #[test]
    fn sources_are_checked() {
        assert!(check_source(&src(Some("http://127.0.0.1:8080/p"), None)).is_ok());
        assert!(check_source(&src(Some("http://[::1]/p"), None)).is_ok());
        assert!(check_source(&src(None, Some("/etc/tessera/policies.d"))).is_ok());
        let mut with_ca = src(Some("https://pap.example/p"), None);
        with_ca.ca_file = Some("/etc/ca.pem".into());
        assert!(check_source(&with_ca).is_ok());
        let mut with_id = src(Some("https://pap.example/p"), None);
        with_id.spiffe_id = Some("spiffe://example.org/pap".into());
        assert!(check_source(&with_id).is_ok());
        let mut both = with_ca.clone();
        both.spiffe_id = Some("spiffe://example.org/pap".into());
        let mut bad_set = src(None, Some("/d"));
        bad_set.set = "a/b".into();
        let mut zero = src(None, Some("/d"));
        zero.interval = Secs(0);
        let mut root_id = src(Some("https://pap.example/p"), None);
        root_id.spiffe_id = Some("spiffe://example.org".into());
        let mut dir_ca = src(None, Some("/d"));
        dir_ca.ca_file = Some("/ca.pem".into());
        for (s, why) in [
            (src(Some("http://pap.example/p"), None), "loopback"),
            (src(Some("http://10.0.0.1/p"), None), "loopback"),
            (src(Some("https://pap.example/p"), None), "ca_file"),
            (src(Some("ftp://127.0.0.1/p"), None), "scheme"),
            (src(None, None), "exactly one"),
            (src(Some("http://127.0.0.1/p"), Some("/d")), "exactly one"),
            (src(None, Some("relative/dir")), "absolute"),
            (both, "not both"),
            (bad_set, "set"),
            (zero, "interval"),
            (root_id, "trust domain"),
            (dir_ca, "https url"),
        ] {
            let e = check_source(&s).unwrap_err();
            assert!(e.contains(why), "{s:?}: {e}");
        }
    }

    fn named(name: &str, action: &str) -> NamedPolicy {
        NamedPolicy::from_json(name, &format!(r#"{{"action":"{action}","rules":[{{}}]}}"#)).unwrap()
    }

    #[test]
    fn the_plan_writes_only_differences_and_deletes_only_its_own_set() {
        let stored = |id: &str, p: &NamedPolicy| Policy {
            id: id.into(),
            document: p.to_json(),
        };
        let a = named("a", "ALLOW");
        let b = named("b", "DENY");
        let current = vec![
            stored("central/a", &a),
            stored("central/old", &b),
            // Another set's and a manual policy of the same short name: never touched.
            stored("other/old", &b),
            stored("old", &b),
        ];
        let b2 = named("b", "AUDIT");
        let p = plan("central", &[a.clone(), b2.clone()], &current);
        assert_eq!(
            p.put.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
            ["central/b"]
        );
        assert_eq!(p.delete, ["central/old"]);
        // Nothing to do once it matches.
        let now = vec![stored("central/a", &a), stored("central/b", &b2)];
        assert_eq!(plan("central", &[a, b2], &now), Plan::default());
        // A source that sends an empty list empties the set; one that sends nothing is refused
        // before any plan is made.
        let empty = parse_set("central", &[("pap".into(), "[]".into())]).unwrap();
        assert_eq!(
            plan("central", &empty, &now).delete,
            ["central/a", "central/b"]
        );
        for nothing in ["", " \n", "~", "null"] {
            let e = parse_set("central", &[("https://pap/p".into(), nothing.into())]).unwrap_err();
            assert!(
                e.starts_with("https://pap/p: ") && e.contains("empty") && e.contains("`[]`"),
                "{nothing:?}: {e}"
            );
        }
    }

    #[test]
    fn a_set_is_parsed_whole() {
        let docs = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(o, t)| ((*o).to_owned(), (*t).to_owned()))
                .collect::<Vec<_>>()
        };
        let ok = parse_set(
            "central",
            &docs(&[
                ("a.yaml", "- name: a\n  action: ALLOW\n"),
                ("b.json", r#"{"name":"b","action":"DENY"}"#),
            ]),
        )
        .unwrap();
        assert_eq!(ok.len(), 2);
        let dup = parse_set(
            "central",
            &docs(&[
                ("a.yaml", "- name: a\n  action: ALLOW\n"),
                ("b.yaml", "- name: a\n  action: DENY\n"),
            ]),
        )
        .unwrap_err();
        assert!(dup.contains("b.yaml") && dup.contains("twice"), "{dup}");
        let bad = parse_set(
            "central",
            &docs(&[
                ("a.yaml", "- name: a\n  action: ALLOW\n"),
                (
                    "c.yaml",
                    "- name: c\n  action: ALLOW\n  rules: [{to: {ports: [0]}}]\n",
                ),
            ]),
        )
        .unwrap_err();
        assert!(
            bad.contains("c.yaml") && bad.contains("rules[0].to.ports[0]"),
            "{bad}"
        );
    }

    #[test]
    fn a_directory_is_versioned_by_its_contents() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a.yaml"), "- name: a\n  action: ALLOW\n").unwrap();
        std::fs::write(d.path().join("notes.txt"), "ignored").unwrap();
        let Read::Documents { docs, version } = read_dir(d.path(), None).unwrap() else {
            panic!("documents expected");
        };
        assert_eq!(docs.len(), 1);
        assert!(matches!(
            read_dir(d.path(), version.as_deref()).unwrap(),
            Read::Unchanged
        ));
        std::fs::write(d.path().join("a.yaml"), "- name: a\n  action: DENY\n").unwrap();
        assert!(matches!(
            read_dir(d.path(), version.as_deref()).unwrap(),
            Read::Documents { .. }
        ));
        assert!(read_dir(&d.path().join("missing"), None).is_err());
    }

    fn documents(dir: &Path) -> Result<Vec<(String, String)>, String> {
        match read_dir(dir, None)? {
            Read::Documents { docs, .. } => Ok(docs),
            Read::Unchanged => panic!("documents expected"),
        }
    }

    #[test]
    fn a_directory_says_no_policies_with_an_empty_list_not_with_nothing() {
        let d = tempfile::tempdir().unwrap();
        // No document at all (a volume not mounted, the files removed): refused.
        std::fs::write(d.path().join("README.txt"), "not a document").unwrap();
        let e = documents(d.path()).unwrap_err();
        assert!(e.contains("no *.yaml") && e.contains("`[]`"), "{e}");
        // An empty file: refused by the parser, naming the file.
        std::fs::write(d.path().join("a.yaml"), "").unwrap();
        let e = parse_set("central", &documents(d.path()).unwrap()).unwrap_err();
        assert!(e.contains("a.yaml") && e.contains("empty"), "{e}");
        // A file holding `[]`: the empty set.
        std::fs::write(d.path().join("a.yaml"), "[]\n").unwrap();
        assert!(
            parse_set("central", &documents(d.path()).unwrap())
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn a_directory_file_over_the_limit_is_refused_by_its_size_before_it_is_read() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a.yaml"), "[]\n").unwrap();
        // Not UTF-8: reading it whole (as a 300 MB file was, on every poll) would fail on the
        // encoding; refused by its size, it is never read.
        std::fs::write(d.path().join("b.yaml"), vec![0xff; MAX_DOCUMENT_BYTES]).unwrap();
        let e = documents(d.path()).unwrap_err();
        assert!(
            e.contains(&format!("more than {MAX_DOCUMENT_BYTES} bytes")) && e.contains("b.yaml"),
            "{e}"
        );
        // Exactly the limit in all is read.
        std::fs::write(d.path().join("a.yaml"), "").unwrap();
        std::fs::write(d.path().join("b.yaml"), vec![b' '; MAX_DOCUMENT_BYTES]).unwrap();
        assert_eq!(documents(d.path()).unwrap()[1].1.len(), MAX_DOCUMENT_BYTES);
    }

    #[test]
    fn a_file_growing_while_read_is_read_only_to_the_limit() {
        // Whatever its size said, the read stops one byte past the limit: an endless reader
        // ends.
        assert_eq!(read_at_most(std::io::repeat(b'a'), 16).unwrap(), None);
        assert_eq!(
            read_at_most(&b"0123456789abcdef"[..], 16)
                .unwrap()
                .unwrap()
                .len(),
            16
        );
    }

    #[test]
    fn an_error_is_logged_and_shown_bounded() {
        let statuses = SyncStatuses::default();
        // A document with a 3 MB value, repeated in the error.
        let e = format!(
            "https://pap/p: policy \"p\": {:?}: bad",
            "é".repeat(3 << 20)
        );
        let logged = statuses.record("central", 7, Err(e)).unwrap();
        let st = statuses.get("central");
        assert_eq!(st.last_error.as_deref(), Some(logged.as_str()));
        assert!(
            logged.len() < crate::MAX_ERROR_BYTES + 32 && logged.ends_with(" bytes cut)"),
            "{}",
            logged.len()
        );
        assert!(logged.starts_with("https://pap/p: policy \"p\": \"éé"));
        assert_eq!((st.last_error_at, st.last_attempt_at), (Some(7), Some(7)));
        // A short error is kept whole; a success clears it.
        assert_eq!(
            statuses.record("central", 8, Err("GET x: 500".into())),
            Some("GET x: 500".into())
        );
        assert_eq!(statuses.record("central", 9, Ok(())), None);
        let st = statuses.get("central");
        assert_eq!((st.last_error, st.last_success_at), (None, Some(9)));
    }
}
