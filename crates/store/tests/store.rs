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
    destinations_round_trip,
    destination_admission_runs_inside_the_write,
    concurrent_creates_of_one_policy_store_one,
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

/// Several servers on one PostgreSQL: two store handles on one schema stand for two servers.
mod postgres_ha {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use tessera_spiffe::{Bundle, TrustDomain};
    use tessera_test_util::TestCa;

    use crate::suite::{entry, id};

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    /// Records are bundle JSON; the merge is their union (what the server does, minus expiry).
    fn merge(
        records: &[(String, Vec<u8>)],
        stored: Option<&[u8]>,
    ) -> Result<Option<Vec<u8>>, String> {
        let mut out = Bundle::new(td());
        for (_, r) in records {
            let b = Bundle::parse(td(), r).map_err(|e| e.to_string())?;
            for der in b.x509_authorities() {
                out.add_x509_authority(der.clone()).unwrap();
            }
        }
        let same = stored.is_some_and(|s| {
            let prev = Bundle::parse(td(), s).unwrap();
            prev.x509_authorities().iter().collect::<BTreeSet<_>>()
                == out.x509_authorities().iter().collect::<BTreeSet<_>>()
        });
        Ok((!same).then(|| out.to_json().into_bytes()))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn servers_publishing_at_once_keep_each_others_keys_and_hear_each_others_commits() {
        let Some(schema) = tessera_test_util::pg::fresh_schema("ha_publish").await else {
            return;
        };
        let a = tessera_store::open(&schema.url).await.unwrap();
        let b = tessera_store::open(&schema.url).await.unwrap();
        let listener = b
            .listen_revisions()
            .await
            .unwrap()
            .expect("postgres listens");
        assert!(*listener.connected.borrow());
        let mut heard = listener.revisions;
        let start = *heard.borrow_and_update();

        // A commit through A wakes B's listener with its revision (LISTEN/NOTIFY, no polling).
        let (created, _) = a
            .create_entry(entry(
                "ha",
                &id("spiffe://example.org/agent"),
                &["unix:uid:1"],
            ))
            .await
            .unwrap();
        tokio::time::timeout(
            Duration::from_secs(5),
            heard.wait_for(|r| *r >= created.created_revision),
        )
        .await
        .expect("B hears A's commit within 5 s")
        .unwrap();
        assert!(created.created_revision > start);

        // 8 servers publish their own CA at once: every key ends up in the bundle.
        let cas: Vec<TestCa> = (0..8).map(|_| TestCa::new("example.org")).collect();
        let mut tasks = Vec::new();
        for (i, ca) in cas.iter().enumerate() {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            let record = ca.bundle().to_json().into_bytes();
            tasks.push(tokio::spawn(async move {
                store
                    .publish_authorities(&td(), &format!("server-{i}"), &record, &merge)
                    .await
                    .unwrap()
            }));
        }
        let mut revisions = BTreeSet::new();
        for t in tasks {
            revisions.insert(
                t.await
                    .unwrap()
                    .expect("each publication changed the bundle"),
            );
        }
        assert_eq!(revisions.len(), 8, "one revision each");
        let stored = a.get_bundle(&td()).await.unwrap().unwrap();
        let bundle = Bundle::parse(td(), &stored.bundle_json).unwrap();
        let have: BTreeSet<_> = bundle.x509_authorities().iter().cloned().collect();
        let want: BTreeSet<_> = cas.iter().map(|c| c.root().to_vec()).collect();
        assert_eq!(have, want);
        assert_eq!(a.list_authority_records().await.unwrap().len(), 8);
        // Publishing the same record again changes nothing and takes no revision.
        let before = a.current_revision().await.unwrap();
        let again = b
            .publish_authorities(
                &td(),
                "server-0",
                &cas[0].bundle().to_json().into_bytes(),
                &merge,
            )
            .await
            .unwrap();
        assert_eq!(again, None);
        assert_eq!(a.current_revision().await.unwrap(), before);
        drop(heard);
        schema.drop().await;
    }
}
