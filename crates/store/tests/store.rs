//! Runs the shared suite (`suite/mod.rs`) against SQLite always and against PostgreSQL when
//! `TESSERA_TEST_POSTGRES_URL` is set (`eval "$(bash .ci/postgres.sh)"` starts one). With
//! `CI=true` and no URL the PostgreSQL half fails instead of skipping: CI must run it.
//! Each case gets a fresh store: a temp dir for SQLite, a new schema for PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed fixture should panic

mod suite;

use std::future::Future;
use std::sync::Arc;

use tessera_store::Datastore;

macro_rules! both_backends {
    ($($case:ident),* $(,)?) => {
        mod on_sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::with_sqlite(crate::suite::$case).await;
                }
            )*
        }
        mod on_postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::with_postgres(stringify!($case), crate::suite::$case).await;
                }
            )*
        }
    };
}

both_backends!(
    creating_the_same_entry_twice_returns_the_first,
    invalid_entries_name_the_field_and_change_nothing,
    updating_and_deleting_entries_bump_revisions,
    entries_are_listed_by_filter_and_page,
    entries_are_listed_for_an_agent_and_its_aliases,
    events_come_in_revision_order_and_resume_after_any_revision,
    a_join_token_is_consumed_once_under_16_concurrent_consumers,
    expired_and_unknown_join_tokens_are_refused,
    agents_attest_renew_get_banned_and_evicted,
    bundles_are_stored_per_trust_domain,
    ca_journals_are_kept_per_server_outside_the_feed,
    federation_relationships_and_policies_round_trip,
    concurrent_writers_get_contiguous_revisions_seen_once_by_a_resuming_reader,
);

async fn with_sqlite<F, Fut>(case: F)
where
    F: FnOnce(Arc<dyn Datastore>) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let store = tessera_store::open_sqlite(dir.path().join("store.db"))
        .await
        .unwrap();
    assert_eq!(store.backend(), "sqlite");
    case(store).await;
}

/// Runs `case` on a store in a new schema of the test database, and drops the schema after,
/// also when the case panics.
async fn with_postgres<F, Fut>(name: &str, case: F)
where
    F: FnOnce(Arc<dyn Datastore>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(schema) = tessera_test_util::pg::fresh_schema(name).await else {
        return;
    };
    let store = tessera_store::open(&schema.url).await.unwrap();
    assert_eq!(store.backend(), "postgres");
    let outcome = tokio::spawn(case(store)).await;
    schema.drop().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

mod sqlite_only {
    use std::os::unix::fs::PermissionsExt;

    use sqlx::{Connection, Row};
    use tessera_store::{EntryQuery, JoinToken, StoreError};

    use crate::suite::{agent_id, entry};

    fn mode(p: &std::path::Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[tokio::test]
    async fn a_sqlite_store_survives_reopening_and_is_private_to_its_owner() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("var/lib/tessera");
        let path = data.join("store.db");
        let s = tessera_store::open(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        let (e, _) = s
            .create_entry(entry("web", &agent_id(1), &["unix:uid:1"]))
            .await
            .unwrap();
        s.set_ca_journal("server-a", b"journal").await.unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&path.with_extension("db-wal")), 0o600);
        assert_eq!(mode(&data), 0o700);
        drop(s);

        // Loosened behind our back: tightened again on open.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let s = tessera_store::open_sqlite(&path).await.unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(s.get_entry(&e.id).await.unwrap(), Some(e.clone()));
        assert_eq!(s.current_revision().await.unwrap(), 1);
        assert_eq!(
            s.get_ca_journal("server-a").await.unwrap().unwrap(),
            b"journal"
        );
        // Idempotency holds across restarts.
        let (again, created) = s.create_entry(e.to_new()).await.unwrap();
        assert!(!created);
        assert_eq!(again, e);
    }

    #[tokio::test]
    async fn join_tokens_are_stored_as_hashes_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let s = tessera_store::open_sqlite(&path).await.unwrap();
        let secret = "9f3c2a1b-do-not-store-me";
        s.create_join_token(&JoinToken {
            token: secret.into(),
            expires_at: 10,
        })
        .await
        .unwrap();
        let mut raw = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        let row = sqlx::query("SELECT token_hash FROM join_tokens")
            .fetch_one(&mut raw)
            .await
            .unwrap();
        let hash: String = row.get(0);
        let want = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, secret.as_bytes());
        assert_eq!(hash, hex::encode(want.as_ref()));
        raw.close().await.unwrap();
        drop(s);
        for file in ["store.db", "store.db-wal"] {
            if let Ok(bytes) = std::fs::read(dir.path().join(file)) {
                assert!(
                    !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                    "{file} holds the token"
                );
            }
        }
    }

    #[tokio::test]
    async fn a_row_that_does_not_decode_is_an_error_naming_table_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let s = tessera_store::open_sqlite(&path).await.unwrap();
        s.create_entry(entry("web", &agent_id(1), &["unix:uid:1"]))
            .await
            .unwrap();
        let mut raw = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        sqlx::query("UPDATE entries SET selectors = '[\"no-colon\"]'")
            .execute(&mut raw)
            .await
            .unwrap();
        match s.list_entries(&EntryQuery::default()).await {
            Err(StoreError::Corrupt { table, column, .. }) => {
                assert_eq!((table, column), ("entries", "selectors"))
            }
            other => panic!("{other:?}"),
        }
        sqlx::query("UPDATE entries SET selectors = '[\"unix:uid:1\"]', admin = 7")
            .execute(&mut raw)
            .await
            .unwrap();
        let err = s.list_entries(&EntryQuery::default()).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "datastore row in entries.admin does not decode: 7 is not 0 or 1"
        );
    }
}

mod opening {
    use tessera_store::StoreError;

    #[tokio::test]
    async fn unknown_url_schemes_are_refused_by_name() {
        for (url, want) in [
            (
                "mysql://root:secret@db/tessera",
                "\"mysql\" is not supported",
            ),
            ("/var/lib/tessera/store.db", "\"(none)\" is not supported"),
            ("sqlite://", "needs a file path"),
            ("sqlite:///x.db?mode=memory", "takes no options"),
        ] {
            match tessera_store::open(url).await {
                Err(e @ StoreError::Invalid { .. }) => {
                    let msg = e.to_string();
                    assert!(msg.starts_with("datastore url: "), "{msg}");
                    assert!(msg.contains(want), "{url}: {msg}");
                    assert!(!msg.contains("secret"), "{msg}");
                }
                other => panic!("{url}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn an_unreachable_postgres_is_unavailable() {
        // Port 1 on loopback: nothing listens, every attempt is refused until the timeout.
        let options = tessera_store::PostgresOptions {
            acquire_timeout: std::time::Duration::from_millis(300),
            ..Default::default()
        };
        let url = "postgres://tessera:secret@127.0.0.1:1/tessera";
        match tessera_store::open_postgres_with(url, &options).await {
            Err(e @ StoreError::Unavailable(_)) => assert!(!e.to_string().contains("secret")),
            other => panic!("{other:?}"),
        }
    }
}
