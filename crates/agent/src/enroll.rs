//! Node-mode enrollment (issue 10): what a CNI plugin calls so that one node proxy can serve a
//! workload inside its network namespace. On the agent's admin socket (`--agent-admin-socket`,
//! mode 0600, root only by default) a caller attaches a workload by handing over its network
//! namespace as a file descriptor (SCM_RIGHTS), detaches it, or lists the enrolled workloads.
//!
//! Security rules:
//! - The agent attests the workload itself from the descriptor: it must be a network namespace
//!   (`tessera_workload_attest::netns_selectors_of_fd`), and its `netns:name:` selectors are
//!   derived by the agent. A caller may add selectors of type `attach:` only: `unix:`,
//!   `netns:`, `cgroup:` (or any other type) describe facts the agent attests, and a caller
//!   claiming them could have the agent vouch for a workload that is not what it says.
//! - The agent holds the descriptor until detach: that pins the namespace, whose inode the kernel
//!   would otherwise reuse after deletion (so an inode never identifies a later namespace).
//! - Every workload gets an ID of its own (random, never reused) and its own keys: each of its
//!   SVIDs is signed for a key generated for that workload alone (not shared with other
//!   workloads of the same identity, nor with the Workload API's cache), and the keys are
//!   zeroized when it is detached. The server signs only for entries this agent is
//!   authorized for (the SignX509Svids path).
//! - After an agent restart the enrolled workloads are restored from a snapshot in the data
//!   directory: each namespace is opened again by name and kept only if it is the same namespace
//!   as when it was enrolled: same device and inode, and the same namespace cookie in the same
//!   boot (`SO_NETNS_COOKIE`, never reused; Linux 5.14+), since an inode number freed while the
//!   agent was down can be given to a new namespace under the same name. The others are
//!   dropped and logged.
//!
//! Wire format: one request per connection, a 4-byte big-endian length then a JSON object; a
//! descriptor rides with the request's first bytes. The answer has the same framing:
//! `{"ok":true,...}` or `{"ok":false,"error":"..."}`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read as _, Write as _};
use std::os::fd::{AsFd as _, OwnedFd};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tessera_spiffe::Selector;
use tokio::sync::watch;

use crate::cache::Identity;

/// Largest request or answer.
pub const MAX_FRAME: usize = 64 * 1024;

/// A request on the admin socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// With exactly one descriptor: the workload's network namespace.
    Attach {
        #[serde(default)]
        selectors: Vec<String>,
    },
    Detach {
        workload: String,
    },
    List {},
    /// The delegated identity stream (node proxy): only for callers whose attested identity is
    /// in `authorized_delegates`.
    Watch {},
}

/// One SVID of an enrolled workload, as listed (public facts only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SvidInfo {
    pub spiffe_id: String,
    pub not_after: u64,
    /// SHA-256 of the certificate's public key (SubjectPublicKeyInfo), hex: which key it is.
    pub key_sha256: String,
}

/// An enrolled workload, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadInfo {
    pub id: String,
    /// The namespace's name under /run/netns.
    pub netns: String,
    pub selectors: Vec<String>,
    pub svids: Vec<SvidInfo>,
}

struct Held {
    identity: Arc<Identity>,
    entry_revision: u64,
    rotate_at: u64,
}

struct Workload {
    name: String,
    /// Held until detach: pins the namespace (its inode cannot be reused while held). The
    /// delegated identity stream to the node proxy will hand it over.
    _netns: OwnedFd,
    dev: u64,
    ino: u64,
    /// See [`Saved::cookie`].
    cookie: Option<u64>,
    selectors: BTreeSet<Selector>,
    /// By entry ID.
    svids: BTreeMap<String, Held>,
}

/// What the snapshot keeps of a workload.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Saved {
    id: String,
    name: String,
    dev: u64,
    ino: u64,
    /// The namespace's cookie (`netns_cookie`, never reused while the system runs) and the boot
    /// it was read in; absent in snapshots of before 2026-12-07 or before Linux 5.14.
    #[serde(default)]
    cookie: Option<u64>,
    #[serde(default)]
    boot_id: Option<String>,
    selectors: Vec<String>,
}

/// The enrolled workloads of this agent.
pub struct Enrollments {
    inner: Mutex<BTreeMap<String, Workload>>,
    /// Bumped on attach and detach (the SVID task and, later, delegated streams follow it).
    changed: watch::Sender<u64>,
    snapshot: PathBuf,
}

impl std::fmt::Debug for Enrollments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrollments").finish_non_exhaustive()
    }
}

/// The selectors a caller may add: `attach:` only (see the module's security rules).
pub fn caller_selectors(given: &[String]) -> Result<BTreeSet<Selector>, String> {
    let mut out = BTreeSet::new();
    for s in given {
        let sel = Selector::parse(s).map_err(|e| format!("selector {s:?}: {e}"))?;
        if sel.kind() != "attach" {
            return Err(format!(
                "selector {s:?}: a caller may add only attach: selectors; {}: selectors are attested by the agent itself",
                sel.kind()
            ));
        }
        out.insert(sel);
    }
    Ok(out)
}

fn new_id() -> Result<String, String> {
    let mut b = [0u8; 12];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| format!("random workload ID: {e}"))?;
    Ok(format!("w-{}", hex::encode(b)))
}

fn key_sha256(leaf: &[u8]) -> String {
    use x509_parser::prelude::{FromDer as _, X509Certificate};
    match X509Certificate::from_der(leaf) {
        Ok((_, c)) => hex::encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            c.public_key().raw,
        )),
        Err(_) => String::new(),
    }
}

impl Workload {
    fn info(&self, id: &str) -> WorkloadInfo {
        WorkloadInfo {
            id: id.to_owned(),
            netns: self.name.clone(),
            selectors: self.selectors.iter().map(|s| s.to_string()).collect(),
            svids: self
                .svids
                .values()
                .map(|h| SvidInfo {
                    spiffe_id: h.identity.spiffe_id.to_string(),
                    not_after: h.identity.not_after,
                    key_sha256: h
                        .identity
                        .chain
                        .first()
                        .map(|c| key_sha256(c))
                        .unwrap_or_default(),
                })
                .collect(),
        }
    }
}

impl Enrollments {
    /// Restores the workloads saved in `data_dir` that still exist (same namespace by device
    /// and inode), dropping the others.
    pub fn restore(data_dir: &Path) -> Arc<Self> {
        let snapshot = data_dir.join("enrolled.json");
        let this = Arc::new(Self {
            inner: Mutex::new(BTreeMap::new()),
            changed: watch::channel(0).0,
            snapshot,
        });
        let saved: Vec<Saved> = match std::fs::read(&this.snapshot) {
            Ok(b) => match serde_json::from_slice(&b) {
                Ok(v) => v,
                Err(e) => {
                    tracing::error!(path = %this.snapshot.display(), error = %e, "enrolled-workload snapshot unreadable; starting with none");
                    Vec::new()
                }
            },
            Err(_) => Vec::new(),
        };
        let boot = tessera_workload_attest::boot_id();
        for s in saved {
            let path = format!("{}/{}", "/run/netns", s.name);
            let reopened = std::fs::File::open(&path)
                .map_err(|e| e.to_string())
                .and_then(|f| {
                    let fd: OwnedFd = f.into();
                    let (_, dev, ino) = tessera_workload_attest::netns_selectors_of_fd(fd.as_fd())?;
                    if (dev, ino) != (s.dev, s.ino) {
                        return Err("the name now names another namespace".into());
                    }
                    // Same inode is not proof: the inode of a namespace deleted while the agent
                    // was down may be given to a new one under the same name. Its cookie is
                    // never reused within a boot (and no namespace outlives a boot). Without
                    // one the workload is dropped rather than trusted on an inode number.
                    let now = tessera_workload_attest::netns_cookie(fd.as_fd()).ok();
                    let same_boot = s.boot_id.is_some() && s.boot_id == boot;
                    match (s.cookie, now) {
                        (Some(a), Some(b)) if a == b && same_boot => Ok(fd),
                        (Some(_), Some(_)) => Err(
                            "the name names a new namespace (another namespace cookie, or the system was restarted)".into(),
                        ),
                        _ => Err(
                            "cannot prove it is the namespace enrolled before the restart (no namespace cookie: Linux 5.14+ and a snapshot made by this version)".into(),
                        ),
                    }
                });
            let selectors: Result<BTreeSet<Selector>, _> =
                s.selectors.iter().map(|x| Selector::parse(x)).collect();
            match (reopened, selectors) {
                (Ok(netns), Ok(selectors)) => {
                    tracing::info!(workload = %s.id, netns = %s.name, "enrolled workload restored");
                    this.lock().insert(
                        s.id,
                        Workload {
                            name: s.name,
                            _netns: netns,
                            dev: s.dev,
                            ino: s.ino,
                            cookie: s.cookie,
                            selectors,
                            svids: BTreeMap::new(),
                        },
                    );
                }
                (Err(e), _) => {
                    tracing::warn!(workload = %s.id, netns = %s.name, reason = %e, "enrolled workload is gone: dropped");
                }
                (_, Err(e)) => {
                    tracing::warn!(workload = %s.id, error = %e, "enrolled workload with a bad selector: dropped");
                }
            }
        }
        this.save();
        this
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Workload>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self) {
        let boot = tessera_workload_attest::boot_id();
        let saved: Vec<Saved> = self
            .lock()
            .iter()
            .map(|(id, w)| Saved {
                id: id.clone(),
                name: w.name.clone(),
                dev: w.dev,
                ino: w.ino,
                cookie: w.cookie,
                boot_id: boot.clone(),
                selectors: w.selectors.iter().map(|s| s.to_string()).collect(),
            })
            .collect();
        let tmp = self.snapshot.with_extension("json.tmp");
        let written = serde_json::to_vec(&saved)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, &self.snapshot));
        if let Err(e) = written {
            tracing::error!(path = %self.snapshot.display(), error = %e, "cannot save the enrolled workloads");
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Enrolls the workload whose network namespace is `netns`.
    pub fn attach(&self, netns: OwnedFd, given: &[String]) -> Result<WorkloadInfo, String> {
        let extra = caller_selectors(given)?;
        let (derived, dev, ino) = tessera_workload_attest::netns_selectors_of_fd(netns.as_fd())?;
        let name = derived
            .first()
            .map(|s| s.value().trim_start_matches("name:").to_owned())
            .unwrap_or_default();
        let mut selectors: BTreeSet<Selector> = derived.into_iter().collect();
        selectors.extend(extra);
        let id = new_id()?;
        let cookie = tessera_workload_attest::netns_cookie(netns.as_fd()).ok();
        let w = Workload {
            name,
            _netns: netns,
            dev,
            ino,
            cookie,
            selectors,
            svids: BTreeMap::new(),
        };
        let info = w.info(&id);
        self.lock().insert(id.clone(), w);
        self.save();
        self.changed.send_modify(|n| *n += 1);
        tracing::info!(workload = %id, netns = %info.netns, selectors = ?info.selectors, "workload attached");
        Ok(info)
    }

    /// Detaches workload `id`: its namespace is released and its keys are zeroized (each
    /// key is `Zeroizing` and held only here).
    pub fn detach(&self, id: &str) -> Result<WorkloadInfo, String> {
        let w = self
            .lock()
            .remove(id)
            .ok_or_else(|| format!("no enrolled workload {id:?}"))?;
        let info = w.info(id);
        drop(w);
        self.save();
        self.changed.send_modify(|n| *n += 1);
        tracing::info!(workload = %id, netns = %info.netns, "workload detached");
        Ok(info)
    }

    pub fn list(&self) -> Vec<WorkloadInfo> {
        self.lock().iter().map(|(id, w)| w.info(id)).collect()
    }

    /// (workload ID, selectors) of every workload, for matching entries.
    pub(crate) fn selectors(&self) -> Vec<(String, BTreeSet<Selector>)> {
        self.lock()
            .iter()
            .map(|(id, w)| (id.clone(), w.selectors.clone()))
            .collect()
    }

    /// Which (entry ID, entry revision) pairs of workload `id` need signing now.
    pub(crate) fn due(&self, id: &str, entries: &[(String, u64)], now: u64) -> Vec<String> {
        let g = self.lock();
        let Some(w) = g.get(id) else {
            return Vec::new();
        };
        entries
            .iter()
            .filter(|(e, rev)| match w.svids.get(e) {
                None => true,
                Some(h) => h.entry_revision != *rev || now >= h.rotate_at,
            })
            .map(|(e, _)| e.clone())
            .collect()
    }

    /// Keeps only the SVIDs of `entries` for workload `id`, and stores newly signed ones.
    pub(crate) fn store(
        &self,
        id: &str,
        entries: &[(String, u64)],
        signed: Vec<(String, u64, Identity, u64)>,
    ) {
        let mut g = self.lock();
        let Some(w) = g.get_mut(id) else {
            return;
        };
        let before = w.svids.len();
        w.svids.retain(|e, _| entries.iter().any(|(x, _)| x == e));
        let changed = !signed.is_empty() || w.svids.len() != before;
        for (entry, rev, identity, rotate_at) in signed {
            w.svids.insert(
                entry,
                Held {
                    identity: Arc::new(identity),
                    entry_revision: rev,
                    rotate_at,
                },
            );
        }
        drop(g);
        if changed {
            self.changed.send_modify(|n| *n += 1);
        }
    }

    /// What the delegated stream sends: each workload with a duplicate of its namespace
    /// descriptor, its selectors and its SVIDs.
    fn view(&self) -> Vec<WorkloadView> {
        self.lock()
            .iter()
            .filter_map(|(id, w)| {
                let fd = w._netns.try_clone().ok()?;
                Some(WorkloadView {
                    id: id.clone(),
                    name: w.name.clone(),
                    netns: fd,
                    selectors: w.selectors.clone(),
                    svids: in_api_order(w.svids.values().map(|h| h.identity.clone()).collect()),
                })
            })
            .collect()
    }
}

struct WorkloadView {
    id: String,
    name: String,
    netns: OwnedFd,
    selectors: BTreeSet<Selector>,
    svids: Vec<Arc<Identity>>,
}

/// What the delegated identity stream needs from the agent: attestation of the caller (as the
/// Workload API does it), the cache (bundles, policies), and the authorized delegates.
pub struct Delegation {
    pub api: crate::workload_api::WorkloadApi,
    pub handle: tokio::runtime::Handle,
    pub authorized: Vec<tessera_spiffe::SpiffeId>,
}

impl std::fmt::Debug for Delegation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delegation")
            .field("authorized", &self.authorized)
            .finish_non_exhaustive()
    }
}

/// `svids` in the Workload API's order (`cache::sort_in_api_order`): the first is the
/// workload's default identity, the one its proxy presents and the one `policy_watch::build`
/// picks policies for, so both must agree.
fn in_api_order(mut svids: Vec<Arc<Identity>>) -> Vec<Arc<Identity>> {
    crate::cache::sort_in_api_order(&mut svids);
    svids
}

/// The bundles a workload holding `svids` may have, as the Workload API scopes them (§4.6): its
/// own trust domains and those its entries federate with. A federated trust domain's CA is
/// trusted by a workload's proxy only where an entry of that workload says so.
fn bundles_json(snapshot: &crate::cache::Snapshot, svids: &[Arc<Identity>]) -> serde_json::Value {
    let tds = crate::workload_api::view::trust_domains_for(snapshot, svids);
    snapshot
        .bundles
        .iter()
        .filter(|b| tds.contains(b.trust_domain()))
        .map(|b| {
            (
                b.trust_domain().to_string(),
                serde_json::Value::String(b.to_json()),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn b64(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn svids_json(svids: &[Arc<Identity>]) -> serde_json::Value {
    serde_json::Value::Array(
        svids
            .iter()
            .map(|i| {
                serde_json::json!({
                    "spiffe_id": i.spiffe_id.to_string(),
                    "chain": i.chain.iter().map(|c| b64(c)).collect::<Vec<_>>(),
                    "key_pkcs8": b64(&i.key_pkcs8),
                    "not_after": i.not_after,
                })
            })
            .collect(),
    )
}

/// One frame with a descriptor attached (SCM_RIGHTS).
/// Writes one frame with `fd` attached (SCM_RIGHTS) when given: both ends of the admin socket
/// (the agent's stream, `tessera workload attach`) frame this way.
pub fn write_frame_with_fd(
    s: &UnixStream,
    v: &serde_json::Value,
    fd: Option<std::os::fd::BorrowedFd<'_>>,
) -> std::io::Result<()> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, sendmsg};
    let body = v.to_string();
    let len = u32::try_from(body.len()).map_err(std::io::Error::other)?;
    let mut frame = len.to_be_bytes().to_vec();
    frame.extend_from_slice(body.as_bytes());
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut anc = SendAncillaryBuffer::new(&mut space);
    let fds;
    if let Some(fd) = fd {
        fds = [fd];
        anc.push(SendAncillaryMessage::ScmRights(&fds));
    }
    let sent = sendmsg(
        s,
        &[std::io::IoSlice::new(&frame)],
        &mut anc,
        SendFlags::empty(),
    )?;
    let mut rest = &frame[sent..];
    let mut w = s;
    while !rest.is_empty() {
        let n = std::io::Write::write(&mut w, rest)?;
        rest = &rest[n..];
    }
    Ok(())
}

/// The delegated identity stream: authorizes the caller, then sends `attached` (with the
/// namespace descriptor, SVIDs and keys, bundles), `svids`, `policies` and `detached` events
/// as enrollments, SVIDs, bundles or policies change (pushed, never polled by the caller), and
/// a `keepalive` after 30 s without one.
fn watch(enrollments: &Enrollments, d: &Delegation, s: &mut UnixStream) -> Result<(), String> {
    let peer = tessera_workload_attest::PeerProcess::from_socket(&*s)
        .map_err(|e| format!("the caller: {e}"))?;
    let attestation = d
        .handle
        .block_on(d.api.attest(peer))
        .map_err(|e| format!("attesting the caller: {e}"))?;
    let cache = d.api.cache().clone();
    let ids: Vec<String> =
        crate::workload_api::view::identities_for(&cache.current(), attestation.selectors())
            .iter()
            .map(|i| i.spiffe_id.to_string())
            .collect();
    // A delegate receives other workloads' keys: only identities the operator named may.
    if !d
        .authorized
        .iter()
        .any(|a| ids.iter().any(|i| i == a.as_str()))
    {
        return Err(format!(
            "not an authorized delegate: the caller's identities {ids:?} are not in authorized_delegates"
        ));
    }
    write_frame(s, &serde_json::json!({ "ok": true })).map_err(|e| e.to_string())?;
    let mut enr = enrollments.subscribe();
    let mut snaps = cache.subscribe();
    let mut pols = cache.subscribe_policies();
    let mut dests = cache.subscribe_destinations();
    // The destination map last sent (the trust domain's: once for the node, not per workload).
    let mut sent_destinations: Option<String> = None;
    // What was sent, by workload: (SVID key fingerprints, bundles JSON, policies JSON).
    let mut sent: BTreeMap<String, (Vec<String>, String, String)> = BTreeMap::new();
    let mut synced = false;
    loop {
        enr.borrow_and_update();
        let snapshot = snaps.borrow_and_update().clone();
        let policies = pols.borrow_and_update().clone();
        let destinations = dests.borrow_and_update().clone();
        // Before any workload is attached: each one serves with the map from its first
        // connection on.
        let map = serde_json::json!({
            "revision": destinations.revision,
            "destinations": destinations.documents.iter().map(|(name, doc)| serde_json::json!({
                "name": name, "document_json": doc,
            })).collect::<Vec<_>>(),
        });
        let docs = map["destinations"].to_string();
        if sent_destinations.as_ref() != Some(&docs) {
            write_frame(
                s,
                &serde_json::json!({"event": "destinations", "snapshot": map}),
            )
            .map_err(|e| format!("the delegate went away: {e}"))?;
            sent_destinations = Some(docs);
        }
        let view = enrollments.view();
        for w in &view {
            let bundles = bundles_json(&snapshot, &w.svids);
            let bundles_text = bundles.to_string();
            let fps: Vec<String> = w
                .svids
                .iter()
                .map(|i| i.chain.first().map(|c| key_sha256(c)).unwrap_or_default())
                .collect();
            let pol = crate::policy_watch::build(&snapshot, &w.selectors, &policies)
                .map(|p| {
                    serde_json::json!({
                        "spiffe_id": p.spiffe_id,
                        "default_action": p.default_action,
                        "revision": p.revision,
                        "policies": p.policies.iter().map(|x| serde_json::json!({
                            "name": x.name, "document_json": x.document_json,
                        })).collect::<Vec<_>>(),
                    })
                })
                .unwrap_or(serde_json::Value::Null);
            let pol_text = pol.to_string();
            let io = |e: std::io::Error| format!("the delegate went away: {e}");
            match sent.get(&w.id) {
                None if w.svids.is_empty() => continue, // sent once it has an identity
                Some(_) if w.svids.is_empty() => {
                    // Its last entry is gone (deleted, or no longer matching): nothing may be
                    // served in its name any more, so the delegate stops serving it as it does
                    // on a detach, closing its connections. A later match attaches it again.
                    write_frame(
                        s,
                        &serde_json::json!({"event": "detached", "workload": w.id}),
                    )
                    .map_err(io)?;
                    sent.remove(&w.id);
                    continue;
                }
                None => {
                    write_frame_with_fd(
                        s,
                        &serde_json::json!({
                            "event": "attached",
                            "workload": w.id, "netns": w.name,
                            "svids": svids_json(&w.svids), "bundles": bundles,
                            // In force before the delegate binds the workload's ports (the
                            // `policies` event below is for delegates that predate this).
                            "policies": pol,
                        }),
                        Some(w.netns.as_fd()),
                    )
                    .map_err(io)?;
                    write_frame(s, &serde_json::json!({"event": "policies", "workload": w.id, "snapshot": pol}))
                        .map_err(io)?;
                }
                Some((f, b, p)) => {
                    if *f != fps || *b != bundles_text {
                        write_frame(
                            s,
                            &serde_json::json!({
                                "event": "svids", "workload": w.id,
                                "svids": svids_json(&w.svids), "bundles": bundles,
                            }),
                        )
                        .map_err(io)?;
                    }
                    if *p != pol_text {
                        write_frame(s, &serde_json::json!({"event": "policies", "workload": w.id, "snapshot": pol}))
                            .map_err(io)?;
                    }
                }
            }
            sent.insert(w.id.clone(), (fps, bundles_text, pol_text));
        }
        let gone: Vec<String> = sent
            .keys()
            .filter(|id| !view.iter().any(|w| &w.id == *id))
            .cloned()
            .collect();
        for id in gone {
            write_frame(s, &serde_json::json!({"event": "detached", "workload": id}))
                .map_err(|e| format!("the delegate went away: {e}"))?;
            sent.remove(&id);
        }
        if !synced {
            // Everything this stream will announce now has been: a delegate that served
            // workloads before (a reconnect) drains those it did not hear of again.
            write_frame(s, &serde_json::json!({"event": "synced"}))
                .map_err(|e| format!("the delegate went away: {e}"))?;
            synced = true;
        }
        // `None`: nothing changed for 30 s; a keepalive then finds a delegate that went away,
        // so its thread ends.
        let woke = d.handle.block_on(async {
            tokio::select! {
                r = enr.changed() => Some(r.is_err()),
                r = snaps.changed() => Some(r.is_err()),
                r = pols.changed() => Some(r.is_err()),
                r = dests.changed() => Some(r.is_err()),
                () = tokio::time::sleep(Duration::from_secs(30)) => None,
            }
        });
        match woke {
            Some(true) => return Ok(()),
            Some(false) => {}
            None => write_frame(s, &serde_json::json!({"event": "keepalive"}))
                .map_err(|e| format!("the delegate went away: {e}"))?,
        }
    }
}

// ---- the admin socket ----

fn read_frame(s: &mut UnixStream, first: Vec<u8>) -> Result<Vec<u8>, String> {
    let mut buf = first;
    while buf.len() < 4 {
        let mut b = [0u8; 4096];
        let n = s.read(&mut b).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("the request ended early".into());
        }
        buf.extend_from_slice(&b[..n]);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_FRAME {
        return Err(format!("request of {len} bytes; at most {MAX_FRAME}"));
    }
    while buf.len() < 4 + len {
        let mut b = vec![0u8; (4 + len - buf.len()).min(MAX_FRAME)];
        let n = s.read(&mut b).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("the request ended early".into());
        }
        buf.extend_from_slice(&b[..n]);
    }
    if buf.len() > 4 + len {
        return Err("bytes after the request".into());
    }
    Ok(buf.split_off(4))
}

/// Reads one answer frame (length, then JSON) of at most [`MAX_FRAME`] bytes.
pub fn read_answer(s: &mut UnixStream) -> Result<serde_json::Value, String> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)
        .map_err(|e| format!("reading the answer: {e}"))?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(format!("an answer of {len} bytes"));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)
        .map_err(|e| format!("reading the answer: {e}"))?;
    serde_json::from_slice(&body).map_err(|e| format!("a bad answer: {e}"))
}

/// Writes one frame (length, then JSON).
pub fn write_frame(s: &mut UnixStream, v: &serde_json::Value) -> std::io::Result<()> {
    let body = v.to_string();
    let len = u32::try_from(body.len()).map_err(std::io::Error::other)?;
    s.write_all(&len.to_be_bytes())?;
    s.write_all(body.as_bytes())
}

/// Receives the first bytes of a request and the descriptors that came with them.
fn recv_with_fds(s: &UnixStream) -> Result<(Vec<u8>, Vec<OwnedFd>), String> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, recvmsg};
    let mut data = vec![0u8; MAX_FRAME + 4];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
    let mut anc = RecvAncillaryBuffer::new(&mut space);
    let r = recvmsg(
        s,
        &mut [std::io::IoSliceMut::new(&mut data)],
        &mut anc,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(|e| format!("recvmsg: {e}"))?;
    let mut fds = Vec::new();
    for m in anc.drain() {
        if let RecvAncillaryMessage::ScmRights(it) = m {
            fds.extend(it);
        }
    }
    if r.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
        return Err("too many descriptors with the request (at most one)".into());
    }
    data.truncate(r.bytes);
    Ok((data, fds))
}

fn handle(
    enrollments: &Enrollments,
    delegation: Option<&Delegation>,
    s: &mut UnixStream,
) -> Option<serde_json::Value> {
    let outcome = (|| -> Result<serde_json::Value, String> {
        let (first, mut fds) = recv_with_fds(s)?;
        let body = read_frame(s, first)?;
        let req: Request =
            serde_json::from_slice(&body).map_err(|e| format!("bad request: {e}"))?;
        if !matches!(req, Request::Attach { .. }) && !fds.is_empty() {
            return Err("this request takes no descriptor".into());
        }
        match req {
            Request::Attach { selectors } => {
                if fds.len() != 1 {
                    return Err(format!(
                        "attach takes exactly one descriptor (the workload's network namespace), not {}",
                        fds.len()
                    ));
                }
                let fd = fds.remove(0);
                let w = enrollments.attach(fd, &selectors)?;
                Ok(serde_json::json!({ "ok": true, "workload": w }))
            }
            Request::Detach { workload } => {
                let w = enrollments.detach(&workload)?;
                Ok(serde_json::json!({ "ok": true, "workload": w }))
            }
            Request::List {} => {
                Ok(serde_json::json!({ "ok": true, "workloads": enrollments.list() }))
            }
            Request::Watch {} => {
                let d = delegation.ok_or("this agent has no delegated identity stream")?;
                // Long-lived: the stream's own frames are the answer.
                let _ = s.set_read_timeout(None);
                let _ = s.set_write_timeout(None);
                watch(enrollments, d, s)?;
                Ok(serde_json::Value::Null)
            }
        }
    })();
    match outcome {
        Ok(serde_json::Value::Null) => None,
        Ok(v) => Some(v),
        Err(e) => Some(serde_json::json!({ "ok": false, "error": e })),
    }
}

/// Whether the peer of an admin-socket connection is root or the user the agent runs as
/// (`SO_PEERCRED`, read by the kernel when the peer connected).
fn admitted_caller(s: &UnixStream) -> Result<(), String> {
    let cred = rustix::net::sockopt::socket_peercred(s)
        .map_err(|e| format!("cannot read the caller's credentials (SO_PEERCRED): {e}"))?;
    let own = nix::unistd::geteuid().as_raw();
    let uid = cred.uid.as_raw();
    if uid == 0 || uid == own {
        Ok(())
    } else {
        Err(format!(
            "uid {uid} is neither root nor the agent's user ({own})"
        ))
    }
}

/// Admin-socket connections served at once (each on a thread of its own).
pub const ADMIN_CONNECTIONS: usize = 64;

/// Serves the admin socket at `path` (created mode 0600, replacing a stale one, refusing a live
/// one) on threads of
/// its own: requests are rare and short, and a blocking socket carries descriptors simply.
pub fn serve(
    path: &Path,
    enrollments: Arc<Enrollments>,
    delegation: Option<Arc<Delegation>>,
) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A stale socket is replaced; a live agent's is never taken over (see
    // `tessera_server::unix_socket`).
    tessera_server::unix_socket::claim(path).map_err(std::io::Error::other)?;
    let listener = UnixListener::bind(path)?;
    // Root only (or whoever runs the agent): attaching makes the agent sign for a namespace.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let open = Arc::new(tokio::sync::Semaphore::new(ADMIN_CONNECTIONS));
    std::thread::Builder::new()
        .name("agent-admin".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut s) = conn else { continue };
                // The mode above is set after `bind`, so for a moment the socket had the
                // umask's; the caller is checked too. Root or the agent's own user only.
                if let Err(e) = admitted_caller(&s) {
                    tracing::warn!(error = %e, "agent admin socket: caller refused");
                    continue;
                }
                // One thread per connection, and at most ADMIN_CONNECTIONS of them: a caller
                // that opens connections and never finishes them must not take every thread
                // and descriptor of the agent.
                let Ok(slot) = open.clone().try_acquire_owned() else {
                    tracing::warn!(
                        max = ADMIN_CONNECTIONS,
                        "agent admin socket: too many open connections; one refused"
                    );
                    let _ = write_frame(
                        &mut s,
                        &serde_json::json!({ "ok": false, "error": format!(
                            "the agent already serves {ADMIN_CONNECTIONS} admin connections; try again"
                        ) }),
                    );
                    continue;
                };
                let enrollments = enrollments.clone();
                let delegation = delegation.clone();
                let _ = std::thread::Builder::new()
                    .name("agent-admin-req".into())
                    .spawn(move || {
                        let _slot = slot;
                        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                        let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
                        if let Some(answer) = handle(&enrollments, delegation.as_deref(), &mut s) {
                            let _ = write_frame(&mut s, &answer);
                        }
                    });
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn identity(entry: &str, id: &str, federates: &[&str]) -> Arc<Identity> {
        Arc::new(Identity {
            entry_id: entry.to_owned(),
            spiffe_id: tessera_spiffe::SpiffeId::parse(id).unwrap(),
            selectors: [Selector::parse("attach:app:x").unwrap()].into(),
            hint: String::new(),
            federates_with: federates
                .iter()
                .map(|f| tessera_spiffe::TrustDomain::new(f).unwrap())
                .collect(),
            chain: vec![b"leaf".to_vec()],
            key_pkcs8: zeroize::Zeroizing::new(b"key".to_vec()),
            not_after: 0,
        })
    }

    /// Connections that never send a request hold their threads until their time-out; beyond
    /// ADMIN_CONNECTIONS of them the next caller is told why and its connection closed, and a
    /// slot is free again once one of them ends.
    #[test]
    fn the_admin_socket_serves_a_bounded_number_of_connections() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        serve(&path, Enrollments::restore(dir.path()), None).unwrap();
        let mut idle: Vec<UnixStream> = (0..ADMIN_CONNECTIONS)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        let mut extra = UnixStream::connect(&path).unwrap();
        extra
            .set_read_timeout(Some(Duration::from_secs(4)))
            .unwrap();
        let answer = read_answer(&mut extra).unwrap();
        assert_eq!(answer["ok"], false);
        let error = answer["error"].as_str().unwrap();
        assert!(error.contains("admin connections"), "{error}");
        // One ends: its thread sees EOF, and a new caller is served again.
        drop(idle.pop());
        let deadline = std::time::Instant::now() + Duration::from_secs(4);
        loop {
            let mut again = UnixStream::connect(&path).unwrap();
            // A refused connection may be closed before the request is written (EPIPE): the
            // answer read below says which.
            let _ = write_frame(&mut again, &serde_json::json!({"op": "list"}));
            again
                .set_read_timeout(Some(Duration::from_secs(4)))
                .unwrap();
            let answer = read_answer(&mut again)
                .unwrap_or_else(|e| serde_json::json!({ "ok": false, "error": e }));
            if answer["ok"] != false || std::time::Instant::now() > deadline {
                assert_ne!(answer["ok"], false, "{answer}");
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// After a restart a workload is restored only if its name still names the same namespace
    /// by cookie, in the same boot: a namespace deleted while the agent was down and created
    /// again under the same name may get the same inode number, and must not inherit the
    /// workload's selectors and keys. Needs root (skipped with a printed reason otherwise; never
    /// in CI).
    #[test]
    fn a_namespace_is_restored_only_by_its_cookie_in_the_same_boot() {
        if !tessera_test_util::netns::usable(
            "a_namespace_is_restored_only_by_its_cookie_in_the_same_boot",
        ) {
            return;
        }
        let mut net = tessera_test_util::netns::Net::new();
        let ns = net.node("rs", std::net::Ipv4Addr::new(198, 18, 40, 1));
        let dir = tempfile::tempdir().unwrap();
        let e = Enrollments::restore(dir.path());
        let fd: OwnedFd = std::fs::File::open(format!("/run/netns/{ns}"))
            .unwrap()
            .into();
        e.attach(fd, &[]).unwrap();
        drop(e);
        let e = Enrollments::restore(dir.path());
        assert_eq!(e.len(), 1, "the same namespace is restored");
        drop(e);
        let snap = dir.path().join("enrolled.json");
        let saved: Vec<serde_json::Value> =
            serde_json::from_slice(&std::fs::read(&snap).unwrap()).unwrap();
        let Some(cookie) = saved[0]["cookie"].as_u64() else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "no namespace cookie recorded: the kernel is older than Linux 5.14"
            );
            eprintln!("skipping the rest: no namespace cookie (Linux 5.14+)");
            return;
        };
        // Another cookie: as if the namespace had been created again with the old inode.
        // Another boot: cookies count again from 1. No cookie: an older snapshot.
        for (field, value) in [
            ("cookie", serde_json::json!(cookie + 1)),
            ("boot_id", serde_json::json!("another-boot")),
            ("cookie", serde_json::Value::Null),
        ] {
            let mut changed = saved.clone();
            changed[0][field] = value.clone();
            std::fs::write(&snap, serde_json::to_vec(&changed).unwrap()).unwrap();
            let e = Enrollments::restore(dir.path());
            assert_eq!(e.len(), 0, "{field} {value}: not restored");
        }
    }

    #[test]
    fn a_workload_gets_only_its_own_and_its_federated_bundles() {
        let mut set = tessera_spiffe::BundleSet::new();
        for td in ["example.org", "fed.org", "other.org"] {
            set.insert(tessera_test_util::TestCa::new(td).bundle())
                .unwrap();
        }
        let snapshot = crate::cache::Snapshot {
            version: 1,
            trust_domain: Some(tessera_spiffe::TrustDomain::new("example.org").unwrap()),
            identities: Vec::new(),
            bundles: set,
        };
        let keys = |v: serde_json::Value| -> Vec<String> {
            v.as_object().unwrap().keys().cloned().collect()
        };
        let plain = [identity("e1", "spiffe://example.org/a", &[])];
        assert_eq!(keys(bundles_json(&snapshot, &plain)), ["example.org"]);
        let federating = [identity("e2", "spiffe://example.org/b", &["fed.org"])];
        assert_eq!(
            keys(bundles_json(&snapshot, &federating)),
            ["example.org", "fed.org"]
        );
    }

    #[test]
    fn the_default_identity_is_the_workload_apis_first() {
        // Entry ids order one way, SPIFFE IDs the other: the Workload API's order wins.
        let v = in_api_order(vec![
            identity("a", "spiffe://example.org/z", &[]),
            identity("b", "spiffe://example.org/a", &[]),
        ]);
        assert_eq!(v[0].spiffe_id.as_str(), "spiffe://example.org/a");
    }

    #[test]
    fn the_admin_socket_admits_root_and_the_agents_user_only() {
        let (a, _b) = UnixStream::pair().unwrap();
        admitted_caller(&a).unwrap();
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping the other-user half: it needs root to connect as another user");
            return;
        }
        // A caller of another user (nobody): a thread whose own credentials (the raw
        // per-thread `setresuid`, not libc's process-wide one) are nobody's connects.
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("admin.sock");
        let l = UnixListener::bind(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        let p = path.clone();
        let caller = std::thread::spawn(move || {
            let nobody = rustix::thread::Uid::from_raw(65534);
            rustix::thread::set_thread_res_uid(nobody, nobody, nobody).unwrap();
            UnixStream::connect(&p)
        })
        .join()
        .unwrap()
        .unwrap();
        // Queued in the backlog: accepted now, with the credentials it connected with.
        let (s, _) = l.accept().unwrap();
        let e = admitted_caller(&s).unwrap_err();
        assert!(e.contains("uid 65534"), "{e}");
        drop(caller);
    }

    #[test]
    fn callers_may_add_attach_selectors_only() {
        let ok = caller_selectors(&["attach:app:web".into(), "attach:tier:1".into()]).unwrap();
        assert_eq!(ok.len(), 2);
        for bad in [
            "unix:uid:0",
            "netns:name:other",
            "cgroup:path:/x",
            "k8s:ns:a",
            "nocolon",
        ] {
            let e = caller_selectors(&[bad.into()]).unwrap_err();
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn requests_parse_strictly() {
        let r: Request =
            serde_json::from_str(r#"{"op":"attach","selectors":["attach:a:b"]}"#).unwrap();
        assert_eq!(
            r,
            Request::Attach {
                selectors: vec!["attach:a:b".into()]
            }
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"list"}"#).unwrap(),
            Request::List {}
        );
        for bad in [
            r#"{"op":"steal"}"#,
            r#"{"op":"detach"}"#,
            r#"{"op":"list","x":1}"#,
            "[]",
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_regular_file_is_not_a_namespace() {
        let d = tempfile::tempdir().unwrap();
        let e = Enrollments::restore(d.path());
        let f = std::fs::File::open("/proc/self/status").unwrap();
        let err = e.attach(f.into(), &[]).unwrap_err();
        assert!(err.contains("not a namespace"), "{err}");
        if let Ok(m) = std::fs::File::open("/proc/self/ns/mnt") {
            // Root: EINVAL from setns ("not a network namespace"); others: EPERM. Refused both.
            let err = e.attach(m.into(), &[]).unwrap_err();
            assert!(err.contains("namespace"), "{err}");
        }
        assert!(e.is_empty());
    }
}
