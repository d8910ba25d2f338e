//! Opening a store: what differs between SQLite and PostgreSQL is connection setup and
//! migrations; everything after that is [`crate::sql`].

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sqlx::AnyPool;
use sqlx::any::AnyPoolOptions;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{Executor, SqlStr};

use crate::sql::{Backend, SqlStore};
use crate::{Datastore, StoreError};

const SQLITE_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "initial",
        include_str!("../migrations/sqlite/0001_initial.sql"),
    ),
    (
        2,
        "federation",
        include_str!("../migrations/sqlite/0002_federation.sql"),
    ),
    (3, "ha", include_str!("../migrations/sqlite/0003_ha.sql")),
    (
        4,
        "destinations",
        include_str!("../migrations/sqlite/0004_destinations.sql"),
    ),
];
const POSTGRES_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "initial",
        include_str!("../migrations/postgres/0001_initial.sql"),
    ),
    (
        2,
        "federation",
        include_str!("../migrations/postgres/0002_federation.sql"),
    ),
    (3, "ha", include_str!("../migrations/postgres/0003_ha.sql")),
    (
        4,
        "destinations",
        include_str!("../migrations/postgres/0004_destinations.sql"),
    ),
];

/// Opens the store named by `url`: `sqlite:///path/to/store.db` (relative paths allowed:
/// `sqlite://data/store.db`) or `postgres://user@host/db` (`postgresql://` too).
pub async fn open(url: &str) -> Result<Arc<dyn Datastore>, StoreError> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        if path.is_empty() || path.contains('?') {
            return Err(StoreError::invalid(
                "datastore url",
                "sqlite:// needs a file path and takes no options, like sqlite:///var/lib/tessera/store.db",
            ));
        }
        return open_sqlite(Path::new(path)).await;
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return open_postgres(url).await;
    }
    // Show only the scheme: the rest may hold a password.
    let scheme = url.split_once("://").map_or("(none)", |(s, _)| s);
    Err(StoreError::invalid(
        "datastore url",
        format!(
            "scheme {scheme:?} is not supported: use sqlite:///path/to/store.db or postgres://user@host/database"
        ),
    ))
}

/// Opens (creating if needed) the SQLite store at `path`, in WAL mode, and applies migrations.
///
/// The file is created with mode 0600 and its directory, if created here, with 0700: the store
/// holds the CA journal. An existing file is tightened to 0600. SQLite gives its `-wal` and
/// `-shm` files the database file's mode.
pub async fn open_sqlite(path: impl AsRef<Path>) -> Result<Arc<dyn Datastore>, StoreError> {
    let path = std::path::absolute(path.as_ref())
        .map_err(|e| io_error("datastore path", path.as_ref(), &e))?;
    prepare_sqlite_file(&path)?;
    sqlx::any::install_default_drivers();
    let url = format!("sqlite://{}?mode=rw", percent_encode_path(&path));
    let pool = AnyPoolOptions::new()
        // Readers run beside the one writer in WAL mode.
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(30))
        .after_connect(|conn, _| {
            Box::pin(async move {
                // busy_timeout: how long a writer waits for another process's lock before the
                // call fails as Unavailable (writers of this process queue in SqlStore).
                // synchronous = FULL: a commit is on disk when it returns, even across a power
                // loss, so a CA key is never used while the journal that publishes it is lost.
                conn.execute(sqlx::raw_sql(
                    "PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON; PRAGMA synchronous = FULL;",
                ))
                .await?;
                Ok(())
            })
        })
        .connect(&url)
        .await?;
    // WAL is a property of the file and needs an exclusive moment to set, so once, here.
    let row = sqlx::query("PRAGMA journal_mode = WAL")
        .fetch_one(&pool)
        .await?;
    let mode: String = sqlx::Row::try_get(&row, 0)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Other(format!(
            "{}: SQLite refused WAL mode (journal_mode is {mode}); is it on a network file system?",
            path.display()
        )));
    }
    migrate(&pool, SQLITE_MIGRATIONS).await?;
    tracing::info!(path = %path.display(), "datastore opened (sqlite)");
    Ok(Arc::new(SqlStore::new(pool, Backend::Sqlite)))
}

/// Connection pool settings for PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresOptions {
    /// Connections this server keeps at most (16).
    pub max_connections: u32,
    /// How long a call waits for a connection, retrying a database that refuses, before it
    /// fails as `Unavailable` (10 s). Also bounds how long [`open_postgres_with`] keeps trying.
    pub acquire_timeout: Duration,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(10),
        }
    }
}

/// Opens the PostgreSQL store at `url` with default pool settings and applies migrations
/// (under sqlx's advisory lock, so servers starting together migrate once).
pub async fn open_postgres(url: &str) -> Result<Arc<dyn Datastore>, StoreError> {
    open_postgres_with(url, &PostgresOptions::default()).await
}

/// [`open_postgres`] with explicit pool settings.
pub async fn open_postgres_with(
    url: &str,
    options: &PostgresOptions,
) -> Result<Arc<dyn Datastore>, StoreError> {
    sqlx::any::install_default_drivers();
    let pool = AnyPoolOptions::new()
        .max_connections(options.max_connections)
        .acquire_timeout(options.acquire_timeout)
        .after_connect(|conn, _| {
            Box::pin(async move {
                // A server that stalls inside a transaction (or loses its network) must not hold
                // the revision lock for everyone: Postgres ends such sessions, and a writer that
                // cannot get the lock in time fails as Unavailable instead of hanging.
                conn.execute("SET idle_in_transaction_session_timeout = '30s'")
                    .await?;
                conn.execute("SET lock_timeout = '15s'").await?;
                Ok(())
            })
        })
        .connect(url)
        .await?;
    migrate(&pool, POSTGRES_MIGRATIONS).await?;
    let schema: String = sqlx::query_scalar("SELECT current_schema()::text")
        .fetch_one(&pool)
        .await?;
    let listen_options: sqlx::postgres::PgConnectOptions = url
        .parse()
        .map_err(|e| StoreError::invalid("datastore url", format!("{e}")))?;
    tracing::info!("datastore opened (postgres)");
    Ok(Arc::new(
        SqlStore::new(pool, Backend::Postgres)
            .with_notifications(notify_channel(&schema), listen_options),
    ))
}

/// The NOTIFY channel of the store in `schema`: one per schema, so stores sharing a database
/// (tests do) do not wake each other; hashed, since channel names stop at 63 bytes.
fn notify_channel(schema: &str) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, schema.as_bytes());
    format!("tessera_revisions_{}", hex::encode(&digest.as_ref()[..8]))
}

async fn migrate(
    pool: &AnyPool,
    migrations: &[(i64, &str, &'static str)],
) -> Result<(), StoreError> {
    let migrator = Migrator::with_migrations(
        migrations
            .iter()
            .map(|&(version, description, sql)| {
                Migration::new(
                    version,
                    description.to_owned().into(),
                    MigrationType::Simple,
                    SqlStr::from_static(sql),
                    false,
                )
            })
            .collect(),
    );
    migrator.run(pool).await?;
    Ok(())
}

fn io_error(what: &str, path: &Path, e: &io::Error) -> StoreError {
    StoreError::Other(format!("{what} {}: {e}", path.display()))
}

/// Creates the directory (0700) and the database file (0600) if missing, and makes sure an
/// existing file and its WAL companions are 0600.
fn prepare_sqlite_file(path: &Path) -> Result<(), StoreError> {
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io_error("creating datastore directory", dir, &e))?;
    }
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| io_error("opening datastore file", path, &e))?;
    for p in [
        path.to_path_buf(),
        suffixed(path, "-wal"),
        suffixed(path, "-shm"),
    ] {
        match fs::metadata(&p) {
            Ok(m) if m.permissions().mode() & 0o777 != 0o600 => {
                fs::set_permissions(&p, fs::Permissions::from_mode(0o600))
                    .map_err(|e| io_error("restricting datastore file", &p, &e))?;
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("checking datastore file", &p, &e)),
        }
    }
    Ok(())
}

fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Percent-encodes everything but unreserved characters and `/`, so any path survives the trip
/// through a URL (sqlx decodes it back).
fn percent_encode_path(path: &Path) -> String {
    let mut out = String::new();
    for &b in path.as_os_str().as_encoded_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_survive_the_url() {
        assert_eq!(
            percent_encode_path(Path::new("/a b/c?d#e%f/ö.db")),
            "/a%20b/c%3Fd%23e%25f/%C3%B6.db"
        );
    }

    #[test]
    fn the_two_schemas_stay_in_step() {
        // One set of queries serves both backends, so the schemas may differ only in the
        // blob type's name.
        assert_eq!(SQLITE_MIGRATIONS.len(), POSTGRES_MIGRATIONS.len());
        for (s, p) in SQLITE_MIGRATIONS.iter().zip(POSTGRES_MIGRATIONS) {
            assert_eq!((s.0, s.1), (p.0, p.1));
            let sqlite = s.2.replace("BLOB", "BYTEA");
            let body = |s: &str| s.lines().skip(1).collect::<Vec<_>>().join("\n");
            assert_eq!(body(&sqlite), body(p.2), "migration {}", s.0);
        }
    }
}
