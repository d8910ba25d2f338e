//! The one implementation of [`Datastore`], over sqlx's `Any` driver: the same SQL serves
//! SQLite and PostgreSQL (BIGINT for integers and booleans, JSON text for sets, `$n`
//! placeholders that SQLite gets as plain `?`). What differs per backend here is how a write
//! transaction begins and the placeholder spelling; connection setup and migrations are in
//! [`crate::backend`].
//!
//! Entry creation is set-based (one lookup of identity keys, one counter update, multi-row
//! inserts), so a batch of 1,000 costs a handful of statements; a single create is a batch of one.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::any::{AnyArguments, AnyRow};
use sqlx::query::Query;
use sqlx::{Any, AnyPool, AssertSqlSafe, Row, Transaction};
use tessera_spiffe::{SpiffeId, TrustDomain};
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::StoreError;
use crate::datastore::{
    AdmitDestination, AgentQuery, Datastore, EntryQuery, MergeBundle, RevisionListener,
};
use crate::model::{
    self, Agent, Destination, Entry, Event, EventKind, FederationRelationship, FederationStatus,
    JoinToken, NewAgent, NewEntry, Policy, StoredBundle,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    Sqlite,
    Postgres,
}

pub(crate) struct SqlStore {
    pool: AnyPool,
    backend: Backend,
    /// SQLite only: writers queue here, in order, instead of polling SQLite's busy handler.
    /// PostgreSQL writers are serialized by the revision row lock, across servers too.
    write_lock: Option<Arc<Mutex<()>>>,
    /// PostgreSQL only: the channel every committed revision is announced on (`pg_notify` in
    /// the committing transaction, so the notification is delivered exactly when the change is
    /// visible). One per schema, so stores sharing a database do not wake each other.
    notify_channel: Option<Arc<str>>,
    /// PostgreSQL only: how the revision listener connects (its own connection, outside the
    /// pool, since LISTEN belongs to a session).
    listen: Option<sqlx::PgPool>,
    /// False while the revision listener's session is down (the database is unreachable):
    /// writes are refused at once then.
    reachable: Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for SqlStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlStore")
            .field("backend", &self.backend)
            .field("pool_size", &self.pool.size())
            .finish_non_exhaustive()
    }
}

/// Most parameters one `IN (...)` list gets; longer lists are queried in chunks.
const IN_CHUNK: usize = 500;
/// Most parameters one multi-row INSERT gets (SQLite allows 32766, PostgreSQL 65535).
const MAX_PARAMS: usize = 4_000;

const ENTRY_COLUMNS: &str = "id, spiffe_id, parent_id, selectors, x509_ttl_secs, jwt_ttl_secs, \
     dns_names, hint, admin, downstream, federates_with, created_revision, updated_revision";
const AGENT_COLUMNS: &str = "spiffe_id, attestation_type, selectors, serial, expires_at, banned, \
     created_revision, updated_revision";
const FEDERATION_COLUMNS: &str =
    "trust_domain, bundle_endpoint_url, profile, endpoint_spiffe_id, ca_bundle_pem";
const FEDERATION_STATUS_COLUMNS: &str =
    "last_attempt_at, last_success_at, last_error, last_error_at, next_refresh_at";

/// A value to bind. `Any` encodes only a few types reliably on both backends; these are they.
#[derive(Debug, Clone)]
enum Param {
    Text(String),
    OptText(Option<String>),
    Int(i64),
    OptInt(Option<i64>),
    Bytes(Vec<u8>),
}

/// SQL text with its parameters, numbered as they are added.
#[derive(Debug, Default)]
struct Sql {
    text: String,
    params: Vec<Param>,
}

impl Sql {
    fn new(text: &str) -> Self {
        Self {
            text: text.to_owned(),
            params: Vec::new(),
        }
    }

    fn push(&mut self, text: &str) -> &mut Self {
        self.text.push_str(text);
        self
    }

    /// Appends the placeholder of a new parameter.
    fn bind(&mut self, p: Param) -> &mut Self {
        self.params.push(p);
        self.text.push_str(&format!("${}", self.params.len()));
        self
    }

    /// Appends `(p1, p2, ...)`.
    fn bind_list(&mut self, ps: impl IntoIterator<Item = Param>) -> &mut Self {
        self.text.push('(');
        for (i, p) in ps.into_iter().enumerate() {
            if i > 0 {
                self.text.push_str(", ");
            }
            self.bind(p);
        }
        self.text.push(')');
        self
    }

    fn query(self, backend: Backend) -> Query<'static, Any, AnyArguments> {
        // Only our own fixed fragments and `$n` placeholders go into the text; values are bound.
        let text = match backend {
            Backend::Postgres => self.text,
            Backend::Sqlite => positional(&self.text),
        };
        let mut q = sqlx::query(AssertSqlSafe(text));
        for p in self.params {
            q = match p {
                Param::Text(s) => q.bind(s),
                Param::OptText(s) => q.bind(s),
                Param::Int(i) => q.bind(i),
                Param::OptInt(i) => q.bind(i),
                Param::Bytes(b) => q.bind(b),
            };
        }
        q
    }
}

/// `$1 ... $n` to `?`: for SQLite, which looks named parameters (`$n`, even `?n`) up in a list
/// by linear search, so a statement with thousands of them binds in quadratic time. Plain `?`
/// means the same here because [`Sql::bind`] numbers placeholders in textual order and uses each
/// once. The text holds no `$` but placeholders (only fixed fragments, no literals).
fn positional(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' {
            out.push('?');
            while chars.next_if(char::is_ascii_digit).is_some() {}
        } else {
            out.push(c);
        }
    }
    out
}

fn text(s: impl Into<String>) -> Param {
    Param::Text(s.into())
}

fn int(i: i64) -> Param {
    Param::Int(i)
}

/// Revisions are u64 in the API and BIGINT in the database; they never get near i64::MAX.
fn rev_param(r: u64) -> Param {
    Param::Int(i64::try_from(r).unwrap_or(i64::MAX))
}

// --- decoding rows: every failure names the table and column ---

fn corrupt(table: &'static str, column: &'static str, reason: impl ToString) -> StoreError {
    StoreError::Corrupt {
        table,
        column,
        reason: reason.to_string(),
    }
}

fn get_str(row: &AnyRow, t: &'static str, c: &'static str) -> Result<String, StoreError> {
    row.try_get::<String, _>(c).map_err(|e| corrupt(t, c, e))
}

fn get_opt_str(
    row: &AnyRow,
    t: &'static str,
    c: &'static str,
) -> Result<Option<String>, StoreError> {
    row.try_get::<Option<String>, _>(c)
        .map_err(|e| corrupt(t, c, e))
}

fn get_opt_i64(row: &AnyRow, t: &'static str, c: &'static str) -> Result<Option<i64>, StoreError> {
    row.try_get::<Option<i64>, _>(c)
        .map_err(|e| corrupt(t, c, e))
}

fn get_i64(row: &AnyRow, t: &'static str, c: &'static str) -> Result<i64, StoreError> {
    row.try_get::<i64, _>(c).map_err(|e| corrupt(t, c, e))
}

fn get_u64(row: &AnyRow, t: &'static str, c: &'static str) -> Result<u64, StoreError> {
    let v = get_i64(row, t, c)?;
    u64::try_from(v).map_err(|_| corrupt(t, c, format!("{v} is negative")))
}

fn get_u32(row: &AnyRow, t: &'static str, c: &'static str) -> Result<u32, StoreError> {
    let v = get_i64(row, t, c)?;
    u32::try_from(v).map_err(|_| corrupt(t, c, format!("{v} is out of range")))
}

fn get_bool(row: &AnyRow, t: &'static str, c: &'static str) -> Result<bool, StoreError> {
    match get_i64(row, t, c)? {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(corrupt(t, c, format!("{v} is not 0 or 1"))),
    }
}

fn get_bytes(row: &AnyRow, t: &'static str, c: &'static str) -> Result<Vec<u8>, StoreError> {
    row.try_get::<Vec<u8>, _>(c).map_err(|e| corrupt(t, c, e))
}

fn get_json<T: DeserializeOwned>(
    row: &AnyRow,
    t: &'static str,
    c: &'static str,
) -> Result<T, StoreError> {
    let s = get_str(row, t, c)?;
    serde_json::from_str(&s).map_err(|e| corrupt(t, c, e))
}

fn get_id(row: &AnyRow, t: &'static str, c: &'static str) -> Result<SpiffeId, StoreError> {
    let s = get_str(row, t, c)?;
    SpiffeId::parse(&s).map_err(|e| corrupt(t, c, e))
}

fn get_td(row: &AnyRow, t: &'static str, c: &'static str) -> Result<TrustDomain, StoreError> {
    let s = get_str(row, t, c)?;
    TrustDomain::new(&s).map_err(|e| corrupt(t, c, e))
}

fn entry_from_row(row: &AnyRow) -> Result<Entry, StoreError> {
    const T: &str = "entries";
    Ok(Entry {
        id: get_str(row, T, "id")?,
        spiffe_id: get_id(row, T, "spiffe_id")?,
        parent_id: get_id(row, T, "parent_id")?,
        selectors: get_json(row, T, "selectors")?,
        x509_ttl_secs: get_u32(row, T, "x509_ttl_secs")?,
        jwt_ttl_secs: get_u32(row, T, "jwt_ttl_secs")?,
        dns_names: get_json(row, T, "dns_names")?,
        hint: get_str(row, T, "hint")?,
        admin: get_bool(row, T, "admin")?,
        downstream: get_bool(row, T, "downstream")?,
        federates_with: get_json(row, T, "federates_with")?,
        created_revision: get_u64(row, T, "created_revision")?,
        updated_revision: get_u64(row, T, "updated_revision")?,
    })
}

fn agent_from_row(row: &AnyRow) -> Result<Agent, StoreError> {
    const T: &str = "agents";
    Ok(Agent {
        spiffe_id: get_id(row, T, "spiffe_id")?,
        attestation_type: get_str(row, T, "attestation_type")?,
        selectors: get_json(row, T, "selectors")?,
        serial: get_str(row, T, "serial")?,
        expires_at: get_i64(row, T, "expires_at")?,
        banned: get_bool(row, T, "banned")?,
        created_revision: get_u64(row, T, "created_revision")?,
        updated_revision: get_u64(row, T, "updated_revision")?,
    })
}

fn bundle_from_row(row: &AnyRow) -> Result<StoredBundle, StoreError> {
    const T: &str = "bundles";
    Ok(StoredBundle {
        trust_domain: get_td(row, T, "trust_domain")?,
        bundle_json: get_bytes(row, T, "bundle")?,
        updated_revision: get_u64(row, T, "updated_revision")?,
    })
}

fn federation_from_row(row: &AnyRow) -> Result<FederationRelationship, StoreError> {
    const T: &str = "federation_relationships";
    let endpoint_spiffe_id = match get_opt_str(row, T, "endpoint_spiffe_id")? {
        Some(s) => Some(SpiffeId::parse(&s).map_err(|e| corrupt(T, "endpoint_spiffe_id", e))?),
        None => None,
    };
    Ok(FederationRelationship {
        trust_domain: get_td(row, T, "trust_domain")?,
        bundle_endpoint_url: get_str(row, T, "bundle_endpoint_url")?,
        profile: get_str(row, T, "profile")?,
        endpoint_spiffe_id,
        ca_bundle_pem: get_opt_str(row, T, "ca_bundle_pem")?,
    })
}

fn federation_status_from_row(row: &AnyRow) -> Result<FederationStatus, StoreError> {
    const T: &str = "federation_relationships";
    Ok(FederationStatus {
        last_attempt_at: get_opt_i64(row, T, "last_attempt_at")?,
        last_success_at: get_opt_i64(row, T, "last_success_at")?,
        last_error: get_opt_str(row, T, "last_error")?,
        last_error_at: get_opt_i64(row, T, "last_error_at")?,
        next_refresh_at: get_opt_i64(row, T, "next_refresh_at")?,
    })
}

/// A table of named JSON documents (policies, destinations): one id column, one document
/// column, the revision of the last change, and an event kind for each kind of change.
#[derive(Debug, Clone, Copy)]
struct Documents {
    table: &'static str,
    /// What a "not found" error calls one.
    what: &'static str,
    updated: EventKind,
    deleted: EventKind,
}

const POLICIES: Documents = Documents {
    table: "policies",
    what: "policy",
    updated: EventKind::PolicyUpdated,
    deleted: EventKind::PolicyDeleted,
};

const DESTINATIONS: Documents = Documents {
    table: "destinations",
    what: "destination",
    updated: EventKind::DestinationUpdated,
    deleted: EventKind::DestinationDeleted,
};

/// Whether a document may join the others of its table, given as (id, document).
type AdmitDocument<'a> = dyn Fn(&[(String, String)]) -> Result<(), String> + Send + Sync + 'a;

/// (id, document) of a row of a [`Documents`] table.
fn document_from_row(t: Documents, row: &AnyRow) -> Result<(String, String), StoreError> {
    Ok((
        get_str(row, t.table, "id")?,
        get_str(row, t.table, "document")?,
    ))
}

fn event_from_row(row: &AnyRow) -> Result<Event, StoreError> {
    let kind = get_str(row, "events", "kind")?;
    Ok(Event {
        revision: get_u64(row, "events", "revision")?,
        kind: EventKind::parse(&kind)
            .ok_or_else(|| corrupt("events", "kind", format!("unknown event kind {kind:?}")))?,
        key: get_str(row, "events", "key")?,
    })
}

// --- encoding ---

fn json<T: Serialize + ?Sized>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Other(format!("encoding JSON: {e}")))
}

fn sha256_hex(parts: &[&[u8]]) -> String {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for p in parts {
        ctx.update(p);
    }
    hex::encode(ctx.finish().as_ref())
}

/// SHA-256 of SPIFFE ID, parent ID and the canonical (sorted) selector JSON, NUL-separated (no
/// SPIFFE ID contains NUL). One entry per key: creating the same entry again is idempotent.
fn identity_key(e: &NewEntry, selectors_json: &str) -> String {
    sha256_hex(&[
        e.spiffe_id.as_str().as_bytes(),
        b"\0",
        e.parent_id.as_str().as_bytes(),
        b"\0",
        selectors_json.as_bytes(),
    ])
}

/// Join tokens are stored and looked up by hash only.
fn token_hash(token: &str) -> String {
    sha256_hex(&[token.as_bytes()])
}

fn new_entry_id() -> Result<String, StoreError> {
    use aws_lc_rs::rand::SecureRandom;
    let mut b = [0u8; 16];
    aws_lc_rs::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| StoreError::Other("the system random generator failed".into()))?;
    Ok(hex::encode(b))
}

/// An entry with `e`'s content; id and revisions to be filled in.
fn entry_of(e: &NewEntry) -> Entry {
    Entry {
        id: String::new(),
        spiffe_id: e.spiffe_id.clone(),
        parent_id: e.parent_id.clone(),
        selectors: e.selectors.clone(),
        x509_ttl_secs: e.x509_ttl_secs,
        jwt_ttl_secs: e.jwt_ttl_secs,
        dns_names: e.dns_names.clone(),
        hint: e.hint.clone(),
        admin: e.admin,
        downstream: e.downstream,
        federates_with: e.federates_with.clone(),
        created_revision: 0,
        updated_revision: 0,
    }
}

fn bool_param(b: bool) -> Param {
    int(i64::from(b))
}

/// One write transaction.
struct Write {
    tx: Transaction<'static, Any>,
    backend: Backend,
    // Declared after `tx`, so dropped after it: the next SQLite writer starts only once this
    // transaction is finished.
    _serialized: Option<OwnedMutexGuard<()>>,
    /// The last revision this transaction took, announced at commit.
    revision: Option<u64>,
    notify_channel: Option<Arc<str>>,
}

impl Write {
    /// Takes the next revision. On PostgreSQL this row lock is held until commit, so no other
    /// writer, on any server, can take a revision until this one is visible; on SQLite the
    /// database write lock (BEGIN IMMEDIATE) does the same.
    async fn next_revision(&mut self) -> Result<u64, StoreError> {
        let row = sqlx::query("UPDATE revision SET value = value + 1 WHERE id = 1 RETURNING value")
            .fetch_one(&mut *self.tx)
            .await?;
        let revision = get_u64(&row, "revision", "value")?;
        self.revision = Some(revision);
        Ok(revision)
    }

    async fn event(&mut self, revision: u64, kind: EventKind, key: &str) -> Result<(), StoreError> {
        let mut sql = Sql::new("INSERT INTO events (revision, kind, key) VALUES ");
        sql.bind_list([rev_param(revision), text(kind.as_str()), text(key)]);
        self.execute(sql).await?;
        Ok(())
    }

    async fn execute(&mut self, sql: Sql) -> Result<u64, StoreError> {
        Ok(sql
            .query(self.backend)
            .execute(&mut *self.tx)
            .await?
            .rows_affected())
    }

    async fn fetch_optional(&mut self, sql: Sql) -> Result<Option<AnyRow>, StoreError> {
        Ok(sql
            .query(self.backend)
            .fetch_optional(&mut *self.tx)
            .await?)
    }

    async fn fetch_all(&mut self, sql: Sql) -> Result<Vec<AnyRow>, StoreError> {
        Ok(sql.query(self.backend).fetch_all(&mut *self.tx).await?)
    }

    async fn fetch_one(&mut self, sql: Sql, what: &str) -> Result<AnyRow, StoreError> {
        self.fetch_optional(sql)
            .await?
            .ok_or_else(|| StoreError::Other(format!("{what}: the statement returned no row")))
    }

    /// Takes `n` more revisions after one from [`Self::next_revision`] in this transaction (so
    /// the lock is held and they follow it).
    async fn take_more_revisions(&mut self, n: u64) -> Result<(), StoreError> {
        let mut sql = Sql::new("UPDATE revision SET value = value + ");
        sql.bind(rev_param(n)).push(" WHERE id = 1");
        self.execute(sql).await?;
        self.revision = self.revision.map(|r| r + n);
        Ok(())
    }

    /// Inserts `rows` (each `columns.len()` values) with multi-row INSERTs.
    async fn insert_rows(
        &mut self,
        table: &str,
        columns: &str,
        rows: Vec<Vec<Param>>,
    ) -> Result<(), StoreError> {
        let width = rows.first().map_or(1, Vec::len).max(1);
        let mut rows = rows.into_iter().peekable();
        while rows.peek().is_some() {
            let mut sql = Sql::new(&format!("INSERT INTO {table} ({columns}) VALUES "));
            for (i, row) in rows.by_ref().take(MAX_PARAMS / width).enumerate() {
                if i > 0 {
                    sql.push(", ");
                }
                sql.bind_list(row);
            }
            self.execute(sql).await?;
        }
        Ok(())
    }

    async fn commit(mut self) -> Result<(), StoreError> {
        // Queued in the transaction: PostgreSQL delivers it at commit, to every server that
        // listens, and drops it on rollback. Listeners still catch up by revision, so a lost
        // notification delays nothing beyond the next one (or the listener's reconnect).
        if let (Some(channel), Some(revision)) = (self.notify_channel.clone(), self.revision) {
            let mut sql = Sql::new("SELECT pg_notify(");
            sql.bind(text(&*channel))
                .push(", ")
                .bind(text(revision.to_string()))
                .push(")");
            self.execute(sql).await?;
        }
        self.tx.commit().await?;
        Ok(())
    }

    async fn rollback(self) -> Result<(), StoreError> {
        self.tx.rollback().await?;
        Ok(())
    }
}

impl SqlStore {
    pub(crate) fn new(pool: AnyPool, backend: Backend) -> Self {
        let write_lock = (backend == Backend::Sqlite).then(|| Arc::new(Mutex::new(())));
        Self {
            pool,
            backend,
            write_lock,
            notify_channel: None,
            listen: None,
            reachable: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        }
    }

    /// PostgreSQL: announce revisions on `channel`, and listen with `options`.
    pub(crate) fn with_notifications(
        mut self,
        channel: String,
        options: sqlx::postgres::PgConnectOptions,
    ) -> Self {
        self.notify_channel = Some(Arc::from(channel));
        // Lazy: nothing connects until the first listen; the listener detaches its connection.
        self.listen = Some(
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                // Fail fast while the database is down; the listener retries with backoff.
                .acquire_timeout(std::time::Duration::from_secs(2))
                .connect_lazy_with(options),
        );
        self
    }

    async fn begin_write(&self) -> Result<Write, StoreError> {
        if !self.reachable.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Unavailable(
                "the database is unreachable (this server's listening session to it is down)"
                    .into(),
            ));
        }
        let guard = match &self.write_lock {
            Some(lock) => Some(Arc::clone(lock).lock_owned().await),
            None => None,
        };
        let tx = match self.backend {
            // IMMEDIATE takes SQLite's write lock now (waiting up to busy_timeout), so a
            // transaction never has to upgrade a read snapshot that another writer made stale.
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        };
        Ok(Write {
            tx,
            backend: self.backend,
            _serialized: guard,
            revision: None,
            notify_channel: self.notify_channel.clone(),
        })
    }

    async fn fetch_all(&self, sql: Sql) -> Result<Vec<AnyRow>, StoreError> {
        Ok(sql.query(self.backend).fetch_all(&self.pool).await?)
    }

    async fn fetch_optional(&self, sql: Sql) -> Result<Option<AnyRow>, StoreError> {
        Ok(sql.query(self.backend).fetch_optional(&self.pool).await?)
    }

    /// Creates the validated `entries` that do not exist yet, in one transaction, set-wise:
    /// one lookup of their identity keys, one counter update, multi-row inserts.
    async fn create_many(&self, entries: &[NewEntry]) -> Result<Vec<(Entry, bool)>, StoreError> {
        let mut keyed = Vec::with_capacity(entries.len());
        for e in entries {
            let selectors = json(&e.selectors)?;
            let key = identity_key(e, &selectors);
            keyed.push((e, selectors, key));
        }
        let mut w = self.begin_write().await?;
        // Take a revision (and with it the writers' lock) before looking, so two concurrent
        // identical creates see each other and the second returns the first's entry.
        let first = w.next_revision().await?;
        let mut existing: HashMap<String, Entry> = HashMap::new();
        let keys: Vec<&str> = keyed.iter().map(|(_, _, k)| k.as_str()).collect();
        for chunk in keys.chunks(IN_CHUNK) {
            let mut sql = Sql::new(&format!(
                "SELECT {ENTRY_COLUMNS}, identity_key FROM entries WHERE identity_key IN "
            ));
            sql.bind_list(chunk.iter().map(|k| text(*k)));
            for row in w.fetch_all(sql).await? {
                existing.insert(
                    get_str(&row, "entries", "identity_key")?,
                    entry_from_row(&row)?,
                );
            }
        }

        let mut out = Vec::with_capacity(keyed.len());
        let (mut entry_rows, mut selector_rows, mut event_rows) =
            (Vec::new(), Vec::new(), Vec::new());
        let mut revision = first;
        for (e, selectors, key) in keyed {
            // Also idempotent within the batch: a repeat gets the entry its first occurrence made.
            if let Some(found) = existing.get(&key) {
                out.push((found.clone(), false));
                continue;
            }
            let id = new_entry_id()?;
            entry_rows.push(vec![
                text(&id),
                text(e.spiffe_id.as_str()),
                text(e.parent_id.as_str()),
                text(selectors),
                int(e.x509_ttl_secs.into()),
                int(e.jwt_ttl_secs.into()),
                text(json(&e.dns_names)?),
                text(&e.hint),
                bool_param(e.admin),
                bool_param(e.downstream),
                text(json(&e.federates_with)?),
                rev_param(revision),
                rev_param(revision),
                text(&key),
            ]);
            for s in &e.selectors {
                selector_rows.push(vec![text(&id), text(s.to_string())]);
            }
            event_rows.push(vec![
                rev_param(revision),
                text(EventKind::EntryCreated.as_str()),
                text(&id),
            ]);
            let entry = Entry {
                id,
                created_revision: revision,
                updated_revision: revision,
                ..entry_of(e)
            };
            existing.insert(key, entry.clone());
            out.push((entry, true));
            revision += 1;
        }

        let created = revision - first;
        if created == 0 {
            // Nothing new: give the revision back with the rollback.
            w.rollback().await?;
            return Ok(out);
        }
        if created > 1 {
            w.take_more_revisions(created - 1).await?;
        }
        w.insert_rows(
            "entries",
            &format!("{ENTRY_COLUMNS}, identity_key"),
            entry_rows,
        )
        .await?;
        w.insert_rows("entry_selectors", "entry_id, selector", selector_rows)
            .await?;
        w.insert_rows("events", "revision, kind, key", event_rows)
            .await?;
        w.commit().await?;
        Ok(out)
    }

    async fn insert_entry_selectors(
        w: &mut Write,
        id: &str,
        e: &NewEntry,
    ) -> Result<(), StoreError> {
        let rows = e
            .selectors
            .iter()
            .map(|s| vec![text(id), text(s.to_string())])
            .collect();
        w.insert_rows("entry_selectors", "entry_id, selector", rows)
            .await
    }

    async fn entries_where_parent_in(&self, parents: &[&str]) -> Result<Vec<Entry>, StoreError> {
        let mut sql = Sql::new(&format!(
            "SELECT {ENTRY_COLUMNS} FROM entries WHERE parent_id IN "
        ));
        sql.bind_list(parents.iter().map(|p| text(*p)));
        sql.push(" ORDER BY id");
        self.fetch_all(sql)
            .await?
            .iter()
            .map(entry_from_row)
            .collect()
    }

    async fn agent_banned(w: &mut Write, id: &SpiffeId) -> Result<Option<bool>, StoreError> {
        let mut sql = Sql::new("SELECT banned FROM agents WHERE spiffe_id = ");
        sql.bind(text(id.as_str()));
        match w.fetch_optional(sql).await? {
            Some(row) => Ok(Some(get_bool(&row, "agents", "banned")?)),
            None => Ok(None),
        }
    }
}

impl SqlStore {
    /// Creates or replaces a named document; returns the revision.
    async fn set_document(
        &self,
        t: Documents,
        id: &str,
        document: &str,
    ) -> Result<u64, StoreError> {
        self.set_document_checked(t, id, document, false, None)
            .await
    }

    /// [`Self::set_document`], refused if `create_only` and `id` exists, or if `admit` refuses
    /// the other documents of the table (id, document) as they are once this transaction holds
    /// the revision counter: no other writer's change can come between the check and the write.
    /// Each check reads only what it needs: the one id, or the other documents.
    async fn set_document_checked(
        &self,
        t: Documents,
        id: &str,
        document: &str,
        create_only: bool,
        admit: Option<&AdmitDocument<'_>>,
    ) -> Result<u64, StoreError> {
        let mut w = self.begin_write().await?;
        // First: on PostgreSQL the revision row's lock is what orders writers, so what is read
        // below includes every change committed before this one and none can follow it until
        // this commits.
        let revision = w.next_revision().await?;
        if create_only {
            let mut sql = Sql::new(&format!("SELECT id FROM {} WHERE id = ", t.table));
            sql.bind(text(id));
            if w.fetch_optional(sql).await?.is_some() {
                return Err(StoreError::AlreadyExists {
                    what: format!("{} {id:?}", t.what),
                });
            }
        }
        if let Some(admit) = admit {
            let mut sql = Sql::new(&format!(
                "SELECT id, document FROM {} WHERE id <> ",
                t.table
            ));
            sql.bind(text(id)).push(" ORDER BY id");
            let others = w
                .fetch_all(sql)
                .await?
                .iter()
                .map(|row| document_from_row(t, row))
                .collect::<Result<Vec<_>, _>>()?;
            admit(&others).map_err(StoreError::Conflict)?;
        }
        let mut sql = Sql::new(&format!(
            "INSERT INTO {} (id, document, updated_revision) VALUES ",
            t.table
        ));
        sql.bind_list([text(id), text(document), rev_param(revision)])
            .push(
                " ON CONFLICT (id) DO UPDATE SET document = excluded.document, \
                 updated_revision = excluded.updated_revision",
            );
        w.execute(sql).await?;
        w.event(revision, t.updated, id).await?;
        w.commit().await?;
        Ok(revision)
    }

    async fn get_document(
        &self,
        t: Documents,
        id: &str,
    ) -> Result<Option<(String, String)>, StoreError> {
        let mut sql = Sql::new(&format!("SELECT id, document FROM {} WHERE id = ", t.table));
        sql.bind(text(id));
        self.fetch_optional(sql)
            .await?
            .as_ref()
            .map(|row| document_from_row(t, row))
            .transpose()
    }

    async fn list_documents(&self, t: Documents) -> Result<Vec<(String, String)>, StoreError> {
        let sql = Sql::new(&format!("SELECT id, document FROM {} ORDER BY id", t.table));
        self.fetch_all(sql)
            .await?
            .iter()
            .map(|row| document_from_row(t, row))
            .collect()
    }

    async fn delete_document(
        &self,
        t: Documents,
        id: &str,
    ) -> Result<(String, String), StoreError> {
        let mut w = self.begin_write().await?;
        let revision = w.next_revision().await?;
        let mut sql = Sql::new(&format!("DELETE FROM {} WHERE id = ", t.table));
        sql.bind(text(id)).push(" RETURNING id, document");
        let Some(row) = w.fetch_optional(sql).await? else {
            w.rollback().await?;
            return Err(StoreError::not_found(format!("{} {id}", t.what)));
        };
        let doc = document_from_row(t, &row)?;
        w.event(revision, t.deleted, id).await?;
        w.commit().await?;
        Ok(doc)
    }
}

#[async_trait]
impl Datastore for SqlStore {
    fn backend(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn create_entry(&self, entry: NewEntry) -> Result<(Entry, bool), StoreError> {
        entry.validate()?;
        self.create_many(std::slice::from_ref(&entry))
            .await?
            .pop()
            .ok_or_else(|| StoreError::Other("creating the entry returned nothing".into()))
    }

    async fn create_entries(
        &self,
        entries: Vec<NewEntry>,
    ) -> Result<Vec<(Entry, bool)>, StoreError> {
        if entries.len() > model::MAX_BATCH {
            return Err(StoreError::invalid(
                "entries",
                format!("at most {} entries per batch", model::MAX_BATCH),
            ));
        }
        for (i, e) in entries.iter().enumerate() {
            e.validate()
                .map_err(|err| err.in_field(&format!("entries[{i}]")))?;
        }
        self.create_many(&entries).await
    }

    async fn get_entry(&self, id: &str) -> Result<Option<Entry>, StoreError> {
        let mut sql = Sql::new(&format!("SELECT {ENTRY_COLUMNS} FROM entries WHERE id = "));
        sql.bind(text(id));
        self.fetch_optional(sql)
            .await?
            .as_ref()
            .map(entry_from_row)
            .transpose()
    }

    async fn list_entries(&self, q: &EntryQuery) -> Result<Vec<Entry>, StoreError> {
        if q.with_selectors.len() > model::MAX_SELECTORS {
            return Err(StoreError::invalid(
                "with_selectors",
                format!("at most {} selectors are allowed", model::MAX_SELECTORS),
            ));
        }
        let mut sql = Sql::new(&format!("SELECT {ENTRY_COLUMNS} FROM entries WHERE 1 = 1"));
        if let Some(p) = &q.parent_id {
            sql.push(" AND parent_id = ").bind(text(p.as_str()));
        }
        if let Some(s) = &q.spiffe_id {
            sql.push(" AND spiffe_id = ").bind(text(s.as_str()));
        }
        if !q.with_selectors.is_empty() {
            // The entries that have every one of the wanted selectors: as many matching rows in
            // entry_selectors as selectors were asked for (the selectors of an entry are unique).
            sql.push(" AND id IN (SELECT entry_id FROM entry_selectors WHERE selector IN ");
            sql.bind_list(q.with_selectors.iter().map(|s| text(s.to_string())));
            sql.push(" GROUP BY entry_id HAVING COUNT(*) = ")
                .bind(int(q.with_selectors.len() as i64))
                .push(")");
        }
        if let Some(after) = &q.after {
            sql.push(" AND id > ").bind(text(after));
        }
        sql.push(" ORDER BY id");
        if let Some(limit) = q.limit {
            sql.push(" LIMIT ").bind(int(limit.into()));
        }
        self.fetch_all(sql)
            .await?
            .iter()
            .map(entry_from_row)
            .collect()
    }

    async fn list_entries_by_parents(
        &self,
        parents: &[SpiffeId],
    ) -> Result<Vec<Entry>, StoreError> {
        let parents: BTreeSet<&str> = parents.iter().map(SpiffeId::as_str).collect();
        let parents: Vec<&str> = parents.into_iter().collect();
        let mut out = Vec::new();
        for chunk in parents.chunks(IN_CHUNK) {
            out.extend(self.entries_where_parent_in(chunk).await?);
        }
        if parents.len() > IN_CHUNK {
            out.sort_by(|a, b| a.id.cmp(&b.id));
        }
        Ok(out)
    }

    async fn update_entry(&self, id: &str, entry: NewEntry) -> Result<Entry, StoreError> {
        entry.validate()?;
        let selectors = json(&entry.selectors)?;
        let key = identity_key(&entry, &selectors);
        let mut w = self.begin_write().await?;
        let revision = w.next_revision().await?;
        let mut sql = Sql::new("SELECT id FROM entries WHERE id = ");
        sql.bind(text(id));
        if w.fetch_optional(sql).await?.is_none() {
            w.rollback().await?;
            return Err(StoreError::not_found(format!("entry {id}")));
        }
        let mut sql = Sql::new("SELECT id FROM entries WHERE identity_key = ");
        sql.bind(text(&key)).push(" AND id <> ").bind(text(id));
        if let Some(row) = w.fetch_optional(sql).await? {
            let other = get_str(&row, "entries", "id")?;
            w.rollback().await?;
            return Err(StoreError::already_exists(format!(
                "entry {other} with the same spiffe_id, parent_id and selectors"
            )));
        }
        let mut sql = Sql::new("UPDATE entries SET spiffe_id = ");
        sql.bind(text(entry.spiffe_id.as_str()))
            .push(", parent_id = ")
            .bind(text(entry.parent_id.as_str()))
            .push(", selectors = ")
            .bind(text(selectors))
            .push(", identity_key = ")
            .bind(text(key))
            .push(", x509_ttl_secs = ")
            .bind(int(entry.x509_ttl_secs.into()))
            .push(", jwt_ttl_secs = ")
            .bind(int(entry.jwt_ttl_secs.into()))
            .push(", dns_names = ")
            .bind(text(json(&entry.dns_names)?))
            .push(", hint = ")
            .bind(text(&entry.hint))
            .push(", admin = ")
            .bind(bool_param(entry.admin))
            .push(", downstream = ")
            .bind(bool_param(entry.downstream))
            .push(", federates_with = ")
            .bind(text(json(&entry.federates_with)?))
            .push(", updated_revision = ")
            .bind(rev_param(revision))
            .push(" WHERE id = ")
            .bind(text(id))
            .push(&format!(" RETURNING {ENTRY_COLUMNS}"));
        let row = w.fetch_one(sql, "updating the entry").await?;
        let updated = entry_from_row(&row)?;
        let mut sql = Sql::new("DELETE FROM entry_selectors WHERE entry_id = ");
        sql.bind(text(id));
        w.execute(sql).await?;
        Self::insert_entry_selectors(&mut w, id, &entry).await?;
        w.event(revision, EventKind::EntryUpdated, id).await?;
        w.commit().await?;
        Ok(updated)
    }

    async fn delete_entry(&self, id: &str) -> Result<Entry, StoreError> {
        let mut w = self.begin_write().await?;
        let revision = w.next_revision().await?;
        let mut sql = Sql::new("DELETE FROM entry_selectors WHERE entry_id = ");
        sql.bind(text(id));
        w.execute(sql).await?;
        let mut sql = Sql::new("DELETE FROM entries WHERE id = ");
        sql.bind(text(id))
            .push(&format!(" RETURNING {ENTRY_COLUMNS}"));
        let Some(row) = w.fetch_optional(sql).await? else {
            w.rollback().await?;
            return Err(StoreError::not_found(format!("entry {id}")));
        };
        let entry = entry_from_row(&row)?;
        w.event(revision, EventKind::EntryDeleted, id).await?;
        w.commit().await?;
        Ok(entry)
    }

    async fn create_or_replace_agent(&self, agent: NewAgent) -> Result<Agent, StoreError> {
        agent.validate()?;
        let mut w = self.begin_write().await?;
        let revision = w.next_revision().await?;
        let id = agent.spiffe_id.as_str();
        let (sql, kind) = match Self::agent_banned(&mut w, &agent.spiffe_id).await? {
            Some(true) => {
                w.rollback().await?;
                return Err(StoreError::Banned {
                    spiffe_id: id.to_owned(),
                });
            }
            Some(false) => {
                let mut sql = Sql::new("UPDATE agents SET attestation_type = ");
                sql.bind(text(&agent.attestation_type))
                    .push(", selectors = ")
                    .bind(text(json(&agent.selectors)?))
                    .push(", serial = ")
                    .bind(text(&agent.serial))
                    .push(", expires_at = ")
                    .bind(int(agent.expires_at))
                    .push(", updated_revision = ")
                    .bind(rev_param(revision))
                    .push(" WHERE spiffe_id = ")
                    .bind(text(id));
                (sql, EventKind::AgentUpdated)
            }
            None => {
                let mut sql = Sql::new(&format!("INSERT INTO agents ({AGENT_COLUMNS}) VALUES "));
                sql.bind_list([
                    text(id),
                    text(&agent.attestation_type),
                    text(json(&agent.selectors)?),
                    text(&agent.serial),
                    int(agent.expires_at),
                    bool_param(false),
                    rev_param(revision),
                    rev_param(revision),
                ]);
                (sql, EventKind::AgentCreated)
            }
        };
        let mut sql = sql;
        sql.push(&format!(" RETURNING {AGENT_COLUMNS}"));
        let row = w.fetch_one(sql, "writing the agent").await?;
        let stored = agent_from_row(&row)?;
        w.event(revision, kind, id).await?;
        w.commit().await?;
        Ok(stored)
    }

    async fn get_agent(&self, id: &SpiffeId) -> Result<Option<Agent>, StoreError> {
        let mut sql = Sql::new(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents WHERE spiffe_id = "
        ));
        sql.bind(text(id.as_str()));
        self.fetch_optional(sql)
            .await?
            .as_ref()
            .map(agent_from_row)
            .transpose()
    }

    async fn list_agents(&self, q: &AgentQuery) -> Result<Vec<Agent>, StoreError> {
        let mut sql = Sql::new(&format!("SELECT {AGENT_COLUMNS} FROM agents WHERE 1 = 1"));
        if let Some(banned) = q.banned {
            sql.push(" AND banned = ").bind(bool_param(banned));
        }
        if let Some(after) = &q.after {
            sql.push(" AND spiffe_id > ").bind(text(after.as_str()));
        }
        sql.push(" ORDER BY spiffe_id");
        if let Some(limit) = q.limit {
            sql.push(" LIMIT ").bind(int(limit.into()));
        }
        self.fetch_all(sql)
            .await?
            .iter()
            .map(agent_from_row)
            .collect()
    }

    async fn update_agent_svid(
        &self,
        id: &SpiffeId,
        from_serial: &str,
        serial: &str,
        expires_at: i64,
    ) -> Result<Agent, StoreError> {
        model::validate_serial(serial)?;
        let mut w = self.begin_write().await?;
        let revision = w.next_revision().await?;
        match Self::agent_banned(&mut w, id).await? {
            None => {
                w.rollback().await?;
                return Err(StoreError::not_found(format!("agent {id}")));
            }
            Some(true) => {
                w.rollback().await?;
                return Err(StoreError::Banned {
                    spiffe_id: id.to_string(),
                });
            }
            Some(false) => {}
        }
        let mut sql = Sql::new("UPDATE agents SET serial = ");
        sql.bind(text(serial))
            .push(", expires_at = ")
            .bind(int(expires_at))
            .push(", updated_revision = ")
            .bind(rev_param(revision))
            .push(" WHERE spiffe_id = ")
            .bind(text(id.as_str()))
            .push(" AND serial = ")
            .bind(text(from_serial))
            .push(&format!(" RETURNING {AGENT_COLUMNS}"));
        let Some(row) = w.fetch_optional(sql).await? else {
            w.rollback().await?;
            return Err(StoreError::not_found(format!(
                "agent {id} with SVID serial {from_serial} (its SVID changed since)"
            )));
        };
        let agent = agent_from_row(&row)?;
        w.event(revision, EventKind::AgentUpdated, id.as_str())
            .await?;
        w.commit().await?;
        Ok(agent)
    }

    async fn set_agent_banned(&self, id: &SpiffeId, banned: bool) -> Result<Agent, StoreError> {
        let mut w = self.begin_write().await?;
        let revision = w.next_revision().await?;
        let mut sql = Sql::new("UPDATE agents SET banned = ");
        sql.bind(bool_param(banned))
            .push(", updated_revision = ")
            .bind(rev_param(revision))
            .push(" WHERE spiffe_id = ")
            .bind(text(id.as_str()))
            .push(&format!(" RETURNING {AGENT_COLUMNS}"));
        let Some(row) = w.fetch_optional(sql).await? else {
            w.rollback().await?;
            return Err(StoreError::not_found(format!("agent {id}")));
        };
        let agent = agent_from_row(&row)?;
        let kind = if banned {
            EventKind::AgentBanned
        } else {
            EventKind::AgentUnbanned
        };
        w.event(revision, kind, id.as_str()).await?;
        w.commit().await?;
        Ok(agent)
    }

    async fn delete_agent(&self, id: &SpiffeId) -> Result<Agent, StoreError> {
        let mut w = self.begin_write().await?;
        let revision = w.next_revision().await?;
        let mut sql = Sql::new("DELETE FROM agents WHERE spiffe_id = ");
        sql.bind(text(id.as_str()))
            .push(&format!(" RETURNING {AGENT_COLUMNS}"));
        let Some(row) = w.fetch_optional(sql).await? else {
            w.rollback().await?;
            return Err(StoreError::not_found(format!("agent {id}")));
        };
        let agent = agent_from_row(&row)?;
        w.event(revision, EventKind::AgentDeleted, id.as_str())
            .await?;
        w.commit().await?;
        Ok(agent)
    }

    async fn create_join_token(&self, token: &JoinToken) -> Result<(), StoreError> {
        token.validate()?;
        let hash = token_hash(&token.token);
        let mut w = self.begin_write().await?;
        let revision = w.next_revision().await?;
        let mut sql = Sql::new("SELECT 1 AS found FROM join_tokens WHERE token_hash = ");
        sql.bind(text(&hash));
        if w.fetch_optional(sql).await?.is_some() {
            w.rollback().await?;
            return Err(StoreError::already_exists("join token"));
        }
        let mut sql = Sql::new("INSERT INTO join_tokens (token_hash, expires_at) VALUES ");
        sql.bind_list([text(&hash), int(token.expires_at)]);
        w.execute(sql).await?;
        w.event(revision, EventKind::JoinTokenCreated, &hash)
            .await?;
        w.commit().await
    }

    async fn consume_join_token(
        &self,
        token: &str,
        now: i64,
    ) -> Result<Option<JoinToken>, StoreError> {
        if model::validate_token(token).is_err() {
            // Not a token we could have stored.
            return Ok(None);
        }
        let hash = token_hash(token);
        let mut w = self.begin_write().await?;
        let revision = w.next_revision().await?;
        // One statement finds and removes the token, so of many concurrent consumers exactly one
        // gets its row back; the others find nothing (and writers are serialized anyway).
        let mut sql = Sql::new("DELETE FROM join_tokens WHERE token_hash = ");
        sql.bind(text(&hash))
            .push(" AND expires_at > ")
            .bind(int(now))
            .push(" RETURNING expires_at");
        let Some(row) = w.fetch_optional(sql).await? else {
            w.rollback().await?;
            return Ok(None);
        };
        let expires_at = get_i64(&row, "join_tokens", "expires_at")?;
        w.event(revision, EventKind::JoinTokenConsumed, &hash)
            .await?;
        w.commit().await?;
        Ok(Some(JoinToken {
            token: token.to_owned(),
            expires_at,
        }))
    }

    async fn prune_join_tokens(&self, now: i64) -> Result<u64, StoreError> {
        let mut w = self.begin_write().await?;
        let mut sql = Sql::new("DELETE FROM join_tokens WHERE expires_at <= ");
        sql.bind(int(now));
        let n = w.execute(sql).await?;
        w.commit().await?;
        Ok(n)
    }

    async fn get_bundle(&self, td: &TrustDomain) -> Result<Option<StoredBundle>, StoreError> {
        let mut sql = Sql::new(
            "SELECT trust_domain, bundle, updated_revision FROM bundles WHERE trust_domain = ",
        );
        sql.bind(text(td.as_str()));
        self.fetch_optional(sql)
            .await?
            .as_ref()
            .map(bundle_from_row)
            .transpose()
    }

    async fn set_bundle(&self, td: &TrustDomain, bundle_json: &[u8]) -> Result<u64, StoreError> {
        model::validate_bundle(td, bundle_json)?;
        let mut w = self.begin_write().await?;
        let revision = w.next_revision().await?;
        let mut sql =
            Sql::new("INSERT INTO bundles (trust_domain, bundle, updated_revision) VALUES ");
        sql.bind_list([
            text(td.as_str()),
            Param::Bytes(bundle_json.to_vec()),
            rev_param(revision),
        ])
        .push(
            " ON CONFLICT (trust_domain) DO UPDATE SET bundle = excluded.bundle, \
             updated_revision = excluded.updated_revision",
        );
        w.execute(sql).await?;
        w.event(revision, EventKind::BundleUpdated, td.as_str())
            .await?;
        w.commit().await?;
        Ok(revision)
    }

    async fn delete_bundle(&self, td: &TrustDomain) -> Result<(), StoreError> {
        let mut w = self.begin_write().await?;
        let revision = w.next_revision().await?;
        let mut sql = Sql::new("DELETE FROM bundles WHERE trust_domain = ");
        sql.bind(text(td.as_str()));
        if w.execute(sql).await? == 0 {
            w.rollback().await?;
            return Err(StoreError::not_found(format!("bundle of {td}")));
        }
        w.event(revision, EventKind::BundleDeleted, td.as_str())
            .await?;
        w.commit().await
    }

    async fn list_bundles(&self) -> Result<Vec<StoredBundle>, StoreError> {
        let sql = Sql::new(
            "SELECT trust_domain, bundle, updated_revision FROM bundles ORDER BY trust_domain",
        );
        self.fetch_all(sql)
            .await?
            .iter()
            .map(bundle_from_row)
            .collect()
    }

    async fn get_ca_journal(&self, server_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut sql = Sql::new("SELECT journal FROM ca_journals WHERE server_id = ");
        sql.bind(text(server_id));
        self.fetch_optional(sql)
            .await?
            .map(|row| get_bytes(&row, "ca_journals", "journal"))
            .transpose()
    }

    async fn set_ca_journal(&self, server_id: &str, journal: &[u8]) -> Result<(), StoreError> {
        model::validate_server_id(server_id)?;
        let mut w = self.begin_write().await?;
        let mut sql = Sql::new("INSERT INTO ca_journals (server_id, journal) VALUES ");
        sql.bind_list([text(server_id), Param::Bytes(journal.to_vec())])
            .push(" ON CONFLICT (server_id) DO UPDATE SET journal = excluded.journal");
        w.execute(sql).await?;
        w.commit().await
    }

    async fn publish_authorities(
        &self,
        td: &TrustDomain,
        server_id: &str,
        record: &[u8],
        merge: &MergeBundle,
    ) -> Result<Option<u64>, StoreError> {
        model::validate_server_id(server_id)?;
        let mut w = self.begin_write().await?;
        // Taken first: the counter row's lock serializes publishers on every server, so each
        // one merges the records as the previous one left them.
        let revision = w.next_revision().await?;
        let mut sql = Sql::new("SELECT record FROM server_authorities WHERE server_id = ");
        sql.bind(text(server_id));
        let old = w
            .fetch_optional(sql)
            .await?
            .map(|row| get_bytes(&row, "server_authorities", "record"))
            .transpose()?;
        let record_changed = old.as_deref() != Some(record);
        if record_changed {
            let mut sql = Sql::new("INSERT INTO server_authorities (server_id, record) VALUES ");
            sql.bind_list([text(server_id), Param::Bytes(record.to_vec())])
                .push(" ON CONFLICT (server_id) DO UPDATE SET record = excluded.record");
            w.execute(sql).await?;
        }
        let records = w
            .fetch_all(Sql::new(
                "SELECT server_id, record FROM server_authorities ORDER BY server_id",
            ))
            .await?
            .iter()
            .map(|row| {
                Ok((
                    get_str(row, "server_authorities", "server_id")?,
                    get_bytes(row, "server_authorities", "record")?,
                ))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let mut sql = Sql::new("SELECT bundle FROM bundles WHERE trust_domain = ");
        sql.bind(text(td.as_str()));
        let stored = w
            .fetch_optional(sql)
            .await?
            .map(|row| get_bytes(&row, "bundles", "bundle"))
            .transpose()?;
        let merged = match merge(&records, stored.as_deref()) {
            Ok(m) => m,
            Err(reason) => {
                w.rollback().await?;
                return Err(StoreError::invalid("authority record", reason));
            }
        };
        if merged.is_none() && !record_changed {
            // Nothing changed: the rollback gives the revision back.
            w.rollback().await?;
            return Ok(None);
        }
        if let Some(json) = merged {
            if let Err(e) = model::validate_bundle(td, &json) {
                w.rollback().await?;
                return Err(e);
            }
            let mut sql =
                Sql::new("INSERT INTO bundles (trust_domain, bundle, updated_revision) VALUES ");
            sql.bind_list([text(td.as_str()), Param::Bytes(json), rev_param(revision)])
                .push(
                    " ON CONFLICT (trust_domain) DO UPDATE SET bundle = excluded.bundle, \
                     updated_revision = excluded.updated_revision",
                );
            w.execute(sql).await?;
        }
        // Also when only the record changed (a taint): the other servers re-read the records
        // on this event and push the new tainted set to their agents.
        w.event(revision, EventKind::BundleUpdated, td.as_str())
            .await?;
        w.commit().await?;
        Ok(Some(revision))
    }

    async fn list_authority_records(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.fetch_all(Sql::new(
            "SELECT server_id, record FROM server_authorities ORDER BY server_id",
        ))
        .await?
        .iter()
        .map(|row| {
            Ok((
                get_str(row, "server_authorities", "server_id")?,
                get_bytes(row, "server_authorities", "record")?,
            ))
        })
        .collect()
    }

    async fn listen_revisions(&self) -> Result<Option<RevisionListener>, StoreError> {
        let (Some(listen), Some(channel)) = (&self.listen, &self.notify_channel) else {
            return Ok(None);
        };
        let start = self.current_revision().await?;
        let (tx, revisions) = tokio::sync::watch::channel(start);
        let (up, connected) = tokio::sync::watch::channel(true);
        tokio::spawn(crate::listen::run(
            listen.clone(),
            channel.to_string(),
            self.pool.clone(),
            tx,
            up,
            self.reachable.clone(),
        ));
        Ok(Some(RevisionListener {
            revisions,
            connected,
        }))
    }

    async fn set_federation_relationship(
        &self,
        rel: &FederationRelationship,
    ) -> Result<u64, StoreError> {
        rel.validate()?;
        let mut w = self.begin_write().await?;
        let revision = w.next_revision().await?;
        let mut sql = Sql::new(&format!(
            "INSERT INTO federation_relationships ({FEDERATION_COLUMNS}, updated_revision) VALUES "
        ));
        sql.bind_list([
            text(rel.trust_domain.as_str()),
            text(&rel.bundle_endpoint_url),
            text(&rel.profile),
            Param::OptText(rel.endpoint_spiffe_id.as_ref().map(|i| i.to_string())),
            Param::OptText(rel.ca_bundle_pem.clone()),
            rev_param(revision),
        ])
        .push(
            " ON CONFLICT (trust_domain) DO UPDATE SET \
             bundle_endpoint_url = excluded.bundle_endpoint_url, profile = excluded.profile, \
             endpoint_spiffe_id = excluded.endpoint_spiffe_id, \
             ca_bundle_pem = excluded.ca_bundle_pem, \
             updated_revision = excluded.updated_revision",
        );
        w.execute(sql).await?;
        w.event(
            revision,
            EventKind::FederationUpdated,
            rel.trust_domain.as_str(),
        )
        .await?;
        w.commit().await?;
        Ok(revision)
    }

    async fn get_federation_relationship(
        &self,
        td: &TrustDomain,
    ) -> Result<Option<FederationRelationship>, StoreError> {
        let mut sql = Sql::new(&format!(
            "SELECT {FEDERATION_COLUMNS} FROM federation_relationships WHERE trust_domain = "
        ));
        sql.bind(text(td.as_str()));
        self.fetch_optional(sql)
            .await?
            .as_ref()
            .map(federation_from_row)
            .transpose()
    }

    async fn list_federation_relationships(
        &self,
    ) -> Result<Vec<FederationRelationship>, StoreError> {
        let sql = Sql::new(&format!(
            "SELECT {FEDERATION_COLUMNS} FROM federation_relationships ORDER BY trust_domain"
        ));
        self.fetch_all(sql)
            .await?
            .iter()
            .map(federation_from_row)
            .collect()
    }

    async fn delete_federation_relationship(
        &self,
        td: &TrustDomain,
    ) -> Result<FederationRelationship, StoreError> {
        let mut w = self.begin_write().await?;
        let revision = w.next_revision().await?;
        let mut sql = Sql::new("DELETE FROM federation_relationships WHERE trust_domain = ");
        sql.bind(text(td.as_str()))
            .push(&format!(" RETURNING {FEDERATION_COLUMNS}"));
        let Some(row) = w.fetch_optional(sql).await? else {
            w.rollback().await?;
            return Err(StoreError::not_found(format!(
                "federation relationship with {td}"
            )));
        };
        let rel = federation_from_row(&row)?;
        w.event(revision, EventKind::FederationDeleted, td.as_str())
            .await?;
        w.commit().await?;
        Ok(rel)
    }

    async fn set_federation_status(
        &self,
        td: &TrustDomain,
        status: &FederationStatus,
    ) -> Result<(), StoreError> {
        let mut error = status.last_error.clone();
        if let Some(e) = &mut error
            && e.len() > model::MAX_FETCH_ERROR_LEN
        {
            let mut cut = model::MAX_FETCH_ERROR_LEN;
            while !e.is_char_boundary(cut) {
                cut -= 1;
            }
            e.truncate(cut);
        }
        let mut w = self.begin_write().await?;
        let mut sql = Sql::new("UPDATE federation_relationships SET last_attempt_at = ");
        sql.bind(Param::OptInt(status.last_attempt_at))
            .push(", last_success_at = ")
            .bind(Param::OptInt(status.last_success_at))
            .push(", last_error = ")
            .bind(Param::OptText(error))
            .push(", last_error_at = ")
            .bind(Param::OptInt(status.last_error_at))
            .push(", next_refresh_at = ")
            .bind(Param::OptInt(status.next_refresh_at))
            .push(" WHERE trust_domain = ")
            .bind(text(td.as_str()));
        if w.execute(sql).await? == 0 {
            w.rollback().await?;
            return Err(StoreError::not_found(format!(
                "federation relationship with {td}"
            )));
        }
        w.commit().await
    }

    async fn get_federation_status(
        &self,
        td: &TrustDomain,
    ) -> Result<Option<FederationStatus>, StoreError> {
        let mut sql = Sql::new(&format!(
            "SELECT {FEDERATION_STATUS_COLUMNS} FROM federation_relationships WHERE trust_domain = "
        ));
        sql.bind(text(td.as_str()));
        self.fetch_optional(sql)
            .await?
            .as_ref()
            .map(federation_status_from_row)
            .transpose()
    }

    async fn set_policy(&self, policy: &Policy) -> Result<u64, StoreError> {
        policy.validate()?;
        self.set_document(POLICIES, &policy.id, &policy.document)
            .await
    }

    async fn create_policy(&self, policy: &Policy) -> Result<u64, StoreError> {
        policy.validate()?;
        self.set_document_checked(POLICIES, &policy.id, &policy.document, true, None)
            .await
    }

    async fn get_policy(&self, id: &str) -> Result<Option<Policy>, StoreError> {
        Ok(self
            .get_document(POLICIES, id)
            .await?
            .map(|(id, document)| Policy { id, document }))
    }

    async fn list_policies(&self) -> Result<Vec<Policy>, StoreError> {
        Ok(self
            .list_documents(POLICIES)
            .await?
            .into_iter()
            .map(|(id, document)| Policy { id, document })
            .collect())
    }

    async fn delete_policy(&self, id: &str) -> Result<Policy, StoreError> {
        let (id, document) = self.delete_document(POLICIES, id).await?;
        Ok(Policy { id, document })
    }

    async fn set_destination(
        &self,
        d: &Destination,
        create_only: bool,
        admit: &AdmitDestination<'_>,
    ) -> Result<u64, StoreError> {
        d.validate()?;
        let admit_rows = |others: &[(String, String)]| {
            let others: Vec<Destination> = others
                .iter()
                .map(|(id, document)| Destination {
                    id: id.clone(),
                    document: document.clone(),
                })
                .collect();
            admit(&others)
        };
        self.set_document_checked(
            DESTINATIONS,
            &d.id,
            &d.document,
            create_only,
            Some(&admit_rows),
        )
        .await
    }

    async fn get_destination(&self, id: &str) -> Result<Option<Destination>, StoreError> {
        Ok(self
            .get_document(DESTINATIONS, id)
            .await?
            .map(|(id, document)| Destination { id, document }))
    }

    async fn list_destinations(&self) -> Result<Vec<Destination>, StoreError> {
        Ok(self
            .list_documents(DESTINATIONS)
            .await?
            .into_iter()
            .map(|(id, document)| Destination { id, document })
            .collect())
    }

    async fn delete_destination(&self, id: &str) -> Result<Destination, StoreError> {
        let (id, document) = self.delete_document(DESTINATIONS, id).await?;
        Ok(Destination { id, document })
    }

    async fn current_revision(&self) -> Result<u64, StoreError> {
        let row = self
            .fetch_optional(Sql::new("SELECT value FROM revision WHERE id = 1"))
            .await?
            .ok_or_else(|| corrupt("revision", "value", "the counter row is missing"))?;
        get_u64(&row, "revision", "value")
    }

    async fn events_after(&self, revision: u64, limit: u32) -> Result<Vec<Event>, StoreError> {
        let mut sql = Sql::new("SELECT revision, kind, key FROM events WHERE revision > ");
        sql.bind(rev_param(revision))
            .push(" ORDER BY revision LIMIT ")
            .bind(int(limit.into()));
        let events = self
            .fetch_all(sql)
            .await?
            .iter()
            .map(event_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        // Read the marks *after* the events: pruning deletes events and raises the prune mark
        // in one transaction, so if it removed any of the events this reader needed, the mark
        // read now shows it (a prune after our read took nothing from us; refusing then is only
        // conservative). The counter only grows, so one read after is also enough to tell a
        // reader that is ahead of this store.
        let row = self
            .fetch_optional(Sql::new(
                "SELECT value, pruned_through FROM revision WHERE id = 1",
            ))
            .await?
            .ok_or_else(|| corrupt("revision", "value", "the counter row is missing"))?;
        let current = get_u64(&row, "revision", "value")?;
        let pruned_through = get_u64(&row, "revision", "pruned_through")?;
        if revision > current {
            return Err(StoreError::FutureRevision {
                requested: revision,
                current,
            });
        }
        if revision < pruned_through {
            return Err(StoreError::Compacted {
                requested: revision,
                pruned_through,
            });
        }
        Ok(events)
    }

    async fn prune_events(&self, before_revision: u64) -> Result<u64, StoreError> {
        let mut w = self.begin_write().await?;
        // Raise the mark to before_revision - 1, never past the current revision and never down;
        // this locks the counter row like any write.
        let mut sql = Sql::new("UPDATE revision SET pruned_through = CASE WHEN ");
        let through = rev_param(before_revision.saturating_sub(1));
        sql.bind(through.clone())
            .push(" > value THEN value WHEN ")
            .bind(through.clone())
            .push(" > pruned_through THEN ")
            .bind(through)
            .push(" ELSE pruned_through END WHERE id = 1 RETURNING pruned_through");
        let row = w.fetch_one(sql, "raising the prune mark").await?;
        let pruned_through = get_u64(&row, "revision", "pruned_through")?;
        let mut sql = Sql::new("DELETE FROM events WHERE revision <= ");
        sql.bind(rev_param(pruned_through));
        let n = w.execute(sql).await?;
        w.commit().await?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_gets_positional_placeholders_in_bind_order() {
        let mut sql = Sql::new("SELECT x FROM t WHERE a = ");
        sql.bind(int(1)).push(" AND b IN ");
        sql.bind_list((0..11).map(int));
        assert_eq!(sql.params.len(), 12);
        assert!(
            sql.text
                .ends_with("$1 AND b IN ($2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)")
        );
        assert_eq!(
            positional(&sql.text),
            "SELECT x FROM t WHERE a = ? AND b IN (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        );
    }
}
