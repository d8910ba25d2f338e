//! The one error type of the datastore, and the mapping from sqlx errors to it.

/// What went wrong in a datastore call, in the caller's terms.
///
/// `Unavailable` is the one the server watches: the database cannot be reached (connection
/// refused, pool exhausted, a standby refusing writes, SQLite busy for too long), so the server
/// reports itself degraded and keeps serving from what it has, rather than failing closed forever.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("{what} already exists")]
    AlreadyExists { what: String },
    /// A bad input; nothing was changed. `field` names it as the API does (`selectors`,
    /// `dns_names[2]`, `entries[3].x509_ttl_secs`).
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    /// A banned agent may not renew or re-attest; it must be evicted (deleted) first.
    #[error("agent {spiffe_id} is banned: evict it before it can attest or renew again")]
    Banned { spiffe_id: String },
    /// The events after `requested` were pruned (the feed is kept from `pruned_through + 1` on):
    /// the reader must take a snapshot instead of a delta.
    #[error(
        "events after revision {requested} were pruned (kept from revision {} on): take a snapshot",
        pruned_through + 1
    )]
    Compacted { requested: u64, pruned_through: u64 },
    /// The reader's revision is ahead of the store's (the database was restored from a backup
    /// or replaced): its state is not this store's, so it must take a snapshot.
    #[error(
        "revision {requested} is ahead of the store's {current} (was the database restored or replaced?): take a snapshot"
    )]
    FutureRevision { requested: u64, current: u64 },
    #[error("datastore unavailable: {0}")]
    Unavailable(String),
    /// A stored value that does not decode: the database was changed behind our back or by a
    /// newer version. Names the place so an operator can find it.
    #[error("datastore row in {table}.{column} does not decode: {reason}")]
    Corrupt {
        table: &'static str,
        column: &'static str,
        reason: String,
    },
    /// The change would contradict what is stored (two destinations claiming one address and
    /// port); nothing was changed.
    #[error("{0}")]
    Conflict(String),
    #[error("datastore error: {0}")]
    Other(String),
}

impl StoreError {
    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn not_found(what: impl Into<String>) -> Self {
        Self::NotFound { what: what.into() }
    }

    pub(crate) fn already_exists(what: impl Into<String>) -> Self {
        Self::AlreadyExists { what: what.into() }
    }

    /// Prefixes the field of an `Invalid` error (`entries[3].` + `selectors`).
    pub(crate) fn in_field(self, prefix: &str) -> Self {
        match self {
            Self::Invalid { field, reason } => Self::Invalid {
                field: format!("{prefix}.{field}"),
                reason,
            },
            other => other,
        }
    }
}

/// Database errors that mean "the database is not usable right now" rather than "this request
/// is wrong". PostgreSQL SQLSTATEs: connection exceptions (class 08), operator intervention
/// (57P01..57P03: shutdown, cannot connect now), too many connections (53300), a read-only
/// transaction (25006: a standby after a failover), lock wait timeout (55P03: another server
/// holds the revision lock too long). SQLite: BUSY (5) and LOCKED (6), with their extended codes,
/// once busy_timeout has passed.
fn is_unavailable(db: &dyn sqlx::error::DatabaseError) -> bool {
    let Some(code) = db.code() else { return false };
    if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        // Extended result codes keep the primary code in the low byte.
        return code.parse::<i32>().is_ok_and(|c| matches!(c & 0xff, 5 | 6));
    }
    code.starts_with("08")
        || matches!(
            &*code,
            "57P01" | "57P02" | "57P03" | "53300" | "25006" | "55P03"
        )
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_) => Self::Unavailable(e.to_string()),
            sqlx::Error::Database(ref db) => {
                if db.is_unique_violation() {
                    Self::AlreadyExists {
                        what: db.message().to_owned(),
                    }
                } else if is_unavailable(db.as_ref()) {
                    Self::Unavailable(e.to_string())
                } else {
                    Self::Other(e.to_string())
                }
            }
            other => Self::Other(other.to_string()),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        match e {
            sqlx::migrate::MigrateError::Execute(inner) => match Self::from(inner) {
                Self::Unavailable(m) => Self::Unavailable(m),
                other => Self::Other(format!("applying migrations: {other}")),
            },
            other => Self::Other(format!("applying migrations: {other}")),
        }
    }
}
