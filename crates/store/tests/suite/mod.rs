//! The behaviour every backend must have: each case takes a fresh, empty store.
//! `tests/store.rs` runs each against SQLite and PostgreSQL.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tessera_spiffe::{Bundle, Selector, SpiffeId, TrustDomain};
use tessera_store::{
    AgentQuery, Datastore, Destination, EntryQuery, EventKind, FederationRelationship,
    FederationStatus, JoinToken, NewAgent, NewEntry, Policy, StoreError,
};

pub(crate) fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

pub(crate) fn td(s: &str) -> TrustDomain {
    TrustDomain::new(s).unwrap()
}

pub(crate) fn agent_id(n: usize) -> SpiffeId {
    id(&format!(
        "spiffe://example.org/tessera/agent/join_token/node-{n}"
    ))
}

pub(crate) fn entry(path: &str, parent: &SpiffeId, selectors: &[&str]) -> NewEntry {
    NewEntry::new(
        id(&format!("spiffe://example.org/{path}")),
        parent.clone(),
        selectors.iter().map(|s| Selector::parse(s).unwrap()),
    )
}

fn new_agent(n: usize, serial: &str) -> NewAgent {
    NewAgent {
        spiffe_id: agent_id(n),
        attestation_type: "join_token".into(),
        selectors: [Selector::parse("agent:join_token:t1").unwrap()].into(),
        serial: serial.into(),
        expires_at: 1_000,
    }
}

fn invalid_field(r: Result<impl std::fmt::Debug, StoreError>) -> String {
    match r {
        Err(StoreError::Invalid { field, .. }) => field,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

async fn kinds_after(s: &dyn Datastore, rev: u64) -> Vec<(u64, EventKind, String)> {
    s.events_after(rev, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.revision, e.kind, e.key))
        .collect()
}

pub(crate) async fn creating_the_same_entry_twice_returns_the_first(s: Arc<dyn Datastore>) {
    let parent = agent_id(1);
    let e = entry("web", &parent, &["unix:uid:1000", "unix:gid:1000"]);
    let (first, created) = s.create_entry(e.clone()).await.unwrap();
    assert!(created);
    assert_eq!(first.id.len(), 32);
    assert!(first.id.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!((first.created_revision, first.updated_revision), (1, 1));
    assert_eq!(first.to_new(), e);

    // Identical SPIFFE ID, parent and selector set: the existing entry, no revision used,
    // even if other fields differ.
    let mut again = e.clone();
    again.x509_ttl_secs = 60;
    let (second, created) = s.create_entry(again).await.unwrap();
    assert!(!created);
    assert_eq!(second, first);
    assert_eq!(s.current_revision().await.unwrap(), 1);

    // A different selector set, parent or SPIFFE ID is another entry.
    let (other, created) = s
        .create_entry(entry("web", &parent, &["unix:uid:1000"]))
        .await
        .unwrap();
    assert!(created && other.id != first.id);
    let (_, created) = s
        .create_entry(entry("web", &agent_id(2), &["unix:uid:1000"]))
        .await
        .unwrap();
    assert!(created);

    // A batch: idempotent per entry, also within the batch, one revision per created entry,
    // and the revision taken for a trailing duplicate is given back.
    let new1 = entry("db", &parent, &["unix:uid:5432"]);
    let out = s
        .create_entries(vec![e.clone(), new1.clone(), new1.clone()])
        .await
        .unwrap();
    let flags: Vec<bool> = out.iter().map(|(_, c)| *c).collect();
    assert_eq!(flags, [false, true, false]);
    assert_eq!(out[0].0, first);
    assert_eq!(out[1].0, out[2].0);
    assert_eq!(out[1].0.created_revision, 4);
    assert_eq!(s.current_revision().await.unwrap(), 4);
    let revs: Vec<u64> = kinds_after(&*s, 0).await.iter().map(|e| e.0).collect();
    assert_eq!(revs, [1, 2, 3, 4]);

    // Creating the same entries concurrently: still one entry.
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let s = Arc::clone(&s);
            let e = entry("cache", &parent, &["unix:uid:6379"]);
            tokio::spawn(async move { s.create_entry(e).await.unwrap() })
        })
        .collect();
    let mut created = 0;
    let mut ids = HashSet::new();
    for t in tasks {
        let (entry, c) = t.await.unwrap();
        created += usize::from(c);
        ids.insert(entry.id);
    }
    assert_eq!((created, ids.len()), (1, 1));
    assert_eq!(s.current_revision().await.unwrap(), 5);
}

pub(crate) async fn invalid_entries_name_the_field_and_change_nothing(s: Arc<dyn Datastore>) {
    let parent = agent_id(1);
    let mut no_selectors = entry("web", &parent, &["unix:uid:1"]);
    no_selectors.selectors.clear();
    match s.create_entry(no_selectors.clone()).await {
        Err(StoreError::Invalid { field, reason }) => {
            assert_eq!(field, "selectors");
            assert_eq!(
                reason,
                "at least one selector is required (an empty set would match every caller)"
            );
        }
        other => panic!("{other:?}"),
    }
    let mut root = entry("web", &parent, &["unix:uid:1"]);
    root.spiffe_id = id("spiffe://example.org");
    assert_eq!(invalid_field(s.create_entry(root).await), "spiffe_id");
    let mut ttl = entry("web", &parent, &["unix:uid:1"]);
    ttl.x509_ttl_secs = 0;
    assert_eq!(invalid_field(s.create_entry(ttl).await), "x509_ttl_secs");
    let mut dns = entry("web", &parent, &["unix:uid:1"]);
    dns.dns_names = vec!["web.example.org".into(), "not a name".into()];
    assert_eq!(invalid_field(s.create_entry(dns).await), "dns_names[1]");
    let mut hint = entry("web", &parent, &["unix:uid:1"]);
    hint.hint = "x".repeat(1025);
    assert_eq!(invalid_field(s.create_entry(hint).await), "hint");

    // All or nothing in a batch, and the field says which entry.
    let good = entry("web", &parent, &["unix:uid:1"]);
    let field = invalid_field(s.create_entries(vec![good.clone(), no_selectors]).await);
    assert_eq!(field, "entries[1].selectors");
    let too_many = vec![good.clone(); tessera_store::model::MAX_BATCH + 1];
    assert_eq!(invalid_field(s.create_entries(too_many).await), "entries");
    assert_eq!(s.current_revision().await.unwrap(), 0);
    assert!(
        s.list_entries(&EntryQuery::default())
            .await
            .unwrap()
            .is_empty()
    );

    // An update with a bad entry changes nothing either.
    let (e, _) = s.create_entry(good.clone()).await.unwrap();
    let mut bad = good;
    bad.jwt_ttl_secs = 0;
    assert_eq!(
        invalid_field(s.update_entry(&e.id, bad).await),
        "jwt_ttl_secs"
    );
    assert_eq!(s.get_entry(&e.id).await.unwrap().unwrap(), e);
    assert_eq!(s.current_revision().await.unwrap(), 1);
}

pub(crate) async fn updating_and_deleting_entries_bump_revisions(s: Arc<dyn Datastore>) {
    let parent = agent_id(1);
    let (a, _) = s
        .create_entry(entry("a", &parent, &["unix:uid:1"]))
        .await
        .unwrap();
    let (b, _) = s
        .create_entry(entry("b", &parent, &["unix:uid:2"]))
        .await
        .unwrap();

    let mut change = a.to_new();
    change.dns_names = vec!["a.example.org".into()];
    change
        .selectors
        .insert(Selector::parse("unix:gid:1").unwrap());
    change.admin = true;
    let updated = s.update_entry(&a.id, change.clone()).await.unwrap();
    assert_eq!(updated.id, a.id);
    assert_eq!((updated.created_revision, updated.updated_revision), (1, 3));
    assert_eq!(updated.to_new(), change);
    assert_eq!(s.get_entry(&a.id).await.unwrap().unwrap(), updated);
    // The selector index follows the update.
    let q = EntryQuery {
        with_selectors: [Selector::parse("unix:gid:1").unwrap()].into(),
        ..Default::default()
    };
    assert_eq!(s.list_entries(&q).await.unwrap(), vec![updated.clone()]);

    // Updating into another entry's identity is refused; a missing entry is not found;
    // neither uses a revision.
    let clash = s.update_entry(&a.id, b.to_new()).await;
    assert!(
        matches!(clash, Err(StoreError::AlreadyExists { .. })),
        "{clash:?}"
    );
    let missing = s
        .update_entry("00000000000000000000000000000000", change)
        .await;
    assert!(
        matches!(missing, Err(StoreError::NotFound { .. })),
        "{missing:?}"
    );
    assert_eq!(s.current_revision().await.unwrap(), 3);

    let deleted = s.delete_entry(&a.id).await.unwrap();
    assert_eq!(deleted, updated);
    assert_eq!(s.get_entry(&a.id).await.unwrap(), None);
    assert!(s.list_entries(&q).await.unwrap().is_empty());
    assert!(matches!(
        s.delete_entry(&a.id).await,
        Err(StoreError::NotFound { .. })
    ));
    // Its identity is free again.
    let (again, created) = s.create_entry(a.to_new()).await.unwrap();
    assert!(created && again.id != a.id);

    assert_eq!(
        kinds_after(&*s, 0).await,
        vec![
            (1, EventKind::EntryCreated, a.id.clone()),
            (2, EventKind::EntryCreated, b.id.clone()),
            (3, EventKind::EntryUpdated, a.id.clone()),
            (4, EventKind::EntryDeleted, a.id.clone()),
            (5, EventKind::EntryCreated, again.id.clone()),
        ]
    );
}

pub(crate) async fn entries_are_listed_by_filter_and_page(s: Arc<dyn Datastore>) {
    let (p1, p2) = (agent_id(1), agent_id(2));
    let mut all = Vec::new();
    for i in 0..10 {
        let parent = if i % 2 == 0 { &p1 } else { &p2 };
        let sels: Vec<String> = if i < 5 {
            vec![format!("unix:uid:{i}"), "k8s:ns:prod".into()]
        } else {
            vec![format!("unix:uid:{i}")]
        };
        let sels: Vec<&str> = sels.iter().map(String::as_str).collect();
        let path = if i == 3 {
            "shared".to_owned()
        } else {
            format!("w{i}")
        };
        all.push(s.create_entry(entry(&path, parent, &sels)).await.unwrap().0);
    }
    let (dup, _) = s
        .create_entry(entry("shared", &p1, &["unix:uid:99"]))
        .await
        .unwrap();
    all.push(dup.clone());
    all.sort_by(|a, b| a.id.cmp(&b.id));

    let everything = s.list_entries(&EntryQuery::default()).await.unwrap();
    assert_eq!(everything, all);

    let by_parent = s
        .list_entries(&EntryQuery {
            parent_id: Some(p2.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(by_parent.len(), 5);
    assert!(by_parent.iter().all(|e| e.parent_id == p2));

    let by_id = s
        .list_entries(&EntryQuery {
            spiffe_id: Some(id("spiffe://example.org/shared")),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(by_id.len(), 2);

    // Superset: entries having all the given selectors, and maybe more.
    let prod: BTreeSet<Selector> = [Selector::parse("k8s:ns:prod").unwrap()].into();
    let q = EntryQuery {
        with_selectors: prod.clone(),
        ..Default::default()
    };
    assert_eq!(s.list_entries(&q).await.unwrap().len(), 5);
    let mut both = prod.clone();
    both.insert(Selector::parse("unix:uid:2").unwrap());
    let got = s
        .list_entries(&EntryQuery {
            with_selectors: both.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].selectors, both);
    both.insert(Selector::parse("unix:uid:3").unwrap());
    let none = EntryQuery {
        with_selectors: both,
        ..Default::default()
    };
    assert!(s.list_entries(&none).await.unwrap().is_empty());
    // Filters combine.
    let got = s
        .list_entries(&EntryQuery {
            parent_id: Some(p1.clone()),
            with_selectors: prod,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(got.len(), 3);

    // Pages of 4 in id order, resumed after the last id.
    let mut paged = Vec::new();
    let mut after = None;
    loop {
        let page = s
            .list_entries(&EntryQuery {
                after: after.clone(),
                limit: Some(4),
                ..Default::default()
            })
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 4);
        after = page.last().map(|e| e.id.clone());
        paged.extend(page);
    }
    assert_eq!(paged, all);
}

pub(crate) async fn entries_are_listed_for_an_agent_and_its_aliases(s: Arc<dyn Datastore>) {
    let alias = id("spiffe://example.org/tessera/alias/zone-a");
    for n in 0..5 {
        for j in 0..3 {
            s.create_entry(entry(&format!("n{n}/w{j}"), &agent_id(n), &["unix:uid:1"]))
                .await
                .unwrap();
        }
    }
    s.create_entry(entry("zonal", &alias, &["unix:uid:1"]))
        .await
        .unwrap();
    let got = s
        .list_entries_by_parents(&[agent_id(1), alias.clone(), agent_id(1)])
        .await
        .unwrap();
    assert_eq!(got.len(), 4);
    assert!(got.windows(2).all(|w| w[0].id < w[1].id));
    assert!(
        got.iter()
            .all(|e| e.parent_id == agent_id(1) || e.parent_id == alias)
    );
    assert!(s.list_entries_by_parents(&[]).await.unwrap().is_empty());
    assert!(
        s.list_entries_by_parents(&[agent_id(9)])
            .await
            .unwrap()
            .is_empty()
    );
    // More parents than one IN list takes.
    let many: Vec<SpiffeId> = (0..1200).map(agent_id).collect();
    let got = s.list_entries_by_parents(&many).await.unwrap();
    assert_eq!(got.len(), 15);
    assert!(got.windows(2).all(|w| w[0].id < w[1].id));
}

pub(crate) async fn events_come_in_revision_order_and_resume_after_any_revision(
    s: Arc<dyn Datastore>,
) {
    let parent = agent_id(1);
    let (e, _) = s
        .create_entry(entry("a", &parent, &["unix:uid:1"]))
        .await
        .unwrap();
    s.create_or_replace_agent(new_agent(1, "01")).await.unwrap();
    s.set_bundle(&td("example.org"), br#"{"keys":[]}"#)
        .await
        .unwrap();
    s.set_policy(&Policy {
        id: "p1".into(),
        document: "{}".into(),
    })
    .await
    .unwrap();
    s.create_join_token(&JoinToken {
        token: "tok".into(),
        expires_at: 100,
    })
    .await
    .unwrap();
    s.consume_join_token("tok", 10).await.unwrap().unwrap();
    s.set_agent_banned(&agent_id(1), true).await.unwrap();
    s.set_agent_banned(&agent_id(1), false).await.unwrap();
    s.delete_agent(&agent_id(1)).await.unwrap();
    s.delete_entry(&e.id).await.unwrap();
    s.delete_bundle(&td("example.org")).await.unwrap();
    s.delete_policy("p1").await.unwrap();

    let all = kinds_after(&*s, 0).await;
    let kinds: Vec<EventKind> = all.iter().map(|e| e.1).collect();
    assert_eq!(
        kinds,
        [
            EventKind::EntryCreated,
            EventKind::AgentCreated,
            EventKind::BundleUpdated,
            EventKind::PolicyUpdated,
            EventKind::JoinTokenCreated,
            EventKind::JoinTokenConsumed,
            EventKind::AgentBanned,
            EventKind::AgentUnbanned,
            EventKind::AgentDeleted,
            EventKind::EntryDeleted,
            EventKind::BundleDeleted,
            EventKind::PolicyDeleted,
        ]
    );
    let revs: Vec<u64> = all.iter().map(|e| e.0).collect();
    assert_eq!(revs, (1..=12).collect::<Vec<_>>());
    assert_eq!(all[1].2, agent_id(1).to_string());
    assert_eq!(all[2].2, "example.org");
    // Token events carry the token's hash, never the token.
    assert_eq!(all[4].2.len(), 64);
    assert_ne!(all[4].2, "tok");
    assert_eq!(s.current_revision().await.unwrap(), 12);

    // Resume after every revision, in small pages.
    for from in 0..=12u64 {
        let mut got = Vec::new();
        let mut last = from;
        loop {
            let page = s.events_after(last, 3).await.unwrap();
            if page.is_empty() {
                break;
            }
            last = page.last().unwrap().revision;
            got.extend(page.into_iter().map(|e| e.revision));
        }
        assert_eq!(got, (from + 1..=12).collect::<Vec<_>>());
    }
    // A reader ahead of the store (a restored database) is told, not served an empty delta.
    match s.events_after(13, 10).await {
        Err(StoreError::FutureRevision {
            requested: 13,
            current: 12,
        }) => {}
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        s.events_after(u64::MAX, 10).await,
        Err(StoreError::FutureRevision { .. })
    ));

    // Pruning: readers that need pruned events are told so, others are served.
    assert_eq!(s.prune_events(6).await.unwrap(), 5);
    let from5 = s.events_after(5, 100).await.unwrap();
    assert_eq!(from5.first().map(|e| e.revision), Some(6));
    match s.events_after(4, 100).await {
        Err(StoreError::Compacted {
            requested: 4,
            pruned_through: 5,
        }) => {}
        other => panic!("{other:?}"),
    }
    // Pruning never goes past the current revision and never goes back.
    assert_eq!(s.prune_events(1_000).await.unwrap(), 7);
    assert!(s.events_after(12, 10).await.unwrap().is_empty());
    assert!(matches!(
        s.events_after(11, 10).await,
        Err(StoreError::Compacted {
            pruned_through: 12,
            ..
        })
    ));
    assert_eq!(s.prune_events(3).await.unwrap(), 0);
    assert!(s.events_after(11, 10).await.is_err());
    // New changes continue the sequence.
    s.create_entry(entry("b", &parent, &["unix:uid:2"]))
        .await
        .unwrap();
    assert_eq!(kinds_after(&*s, 12).await[0].0, 13);
}

pub(crate) async fn a_join_token_is_consumed_once_under_16_concurrent_consumers(
    s: Arc<dyn Datastore>,
) {
    let token = JoinToken {
        token: "c0ffee-join-token".into(),
        expires_at: 1_000,
    };
    s.create_join_token(&token).await.unwrap();
    let start = Arc::new(tokio::sync::Barrier::new(16));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let s = Arc::clone(&s);
            let start = Arc::clone(&start);
            tokio::spawn(async move {
                start.wait().await;
                s.consume_join_token("c0ffee-join-token", 500).await
            })
        })
        .collect();
    let mut winners = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(Some(got)) => {
                assert_eq!(got, token);
                winners += 1;
            }
            Ok(None) => {}
            Err(e) => panic!("consumer failed: {e}"),
        }
    }
    assert_eq!(winners, 1);
    assert_eq!(
        s.consume_join_token("c0ffee-join-token", 500)
            .await
            .unwrap(),
        None
    );
    // create + one consume: two revisions, whatever the losers did.
    assert_eq!(s.current_revision().await.unwrap(), 2);
}

pub(crate) async fn expired_and_unknown_join_tokens_are_refused(s: Arc<dyn Datastore>) {
    let t = |token: &str, expires_at| JoinToken {
        token: token.into(),
        expires_at,
    };
    s.create_join_token(&t("old", 100)).await.unwrap();
    s.create_join_token(&t("new", 200)).await.unwrap();
    assert!(matches!(
        s.create_join_token(&t("new", 300)).await,
        Err(StoreError::AlreadyExists { .. })
    ));
    assert_eq!(invalid_field(s.create_join_token(&t("", 1)).await), "token");
    assert_eq!(
        invalid_field(s.create_join_token(&t("a b", 1)).await),
        "token"
    );
    // Usable while now < expires_at.
    assert_eq!(s.consume_join_token("old", 100).await.unwrap(), None);
    assert_eq!(s.consume_join_token("old", 250).await.unwrap(), None);
    assert_eq!(s.consume_join_token("nope", 0).await.unwrap(), None);
    assert_eq!(s.consume_join_token("", 0).await.unwrap(), None);
    // Refusals change nothing.
    assert_eq!(s.current_revision().await.unwrap(), 2);
    assert_eq!(s.prune_join_tokens(150).await.unwrap(), 1);
    assert_eq!(
        s.consume_join_token("new", 199).await.unwrap(),
        Some(t("new", 200))
    );
    assert_eq!(s.prune_join_tokens(1_000).await.unwrap(), 0);
}

pub(crate) async fn agents_attest_renew_get_banned_and_evicted(s: Arc<dyn Datastore>) {
    let a = s.create_or_replace_agent(new_agent(1, "0a")).await.unwrap();
    assert_eq!(
        (a.created_revision, a.updated_revision, a.banned),
        (1, 1, false)
    );
    assert_eq!(a.serial, "0a");
    // Re-attestation replaces what we knew, keeps the creation revision.
    let mut re = new_agent(1, "0b");
    re.expires_at = 2_000;
    re.selectors
        .insert(Selector::parse("x509pop:subject:cn:n1").unwrap());
    let a2 = s.create_or_replace_agent(re.clone()).await.unwrap();
    assert_eq!((a2.created_revision, a2.updated_revision), (1, 2));
    assert_eq!((a2.serial.as_str(), a2.expires_at), ("0b", 2_000));
    assert_eq!(a2.selectors, re.selectors);
    assert_eq!(s.get_agent(&agent_id(1)).await.unwrap().unwrap(), a2);

    let renewed = s
        .update_agent_svid(&agent_id(1), "0b", "0c", 3_000)
        .await
        .unwrap();
    assert_eq!((renewed.serial.as_str(), renewed.expires_at), ("0c", 3_000));
    assert_eq!(renewed.updated_revision, 3);
    assert_eq!(
        invalid_field(s.update_agent_svid(&agent_id(1), "0c", "xyz", 1).await),
        "serial"
    );
    assert!(matches!(
        s.update_agent_svid(&agent_id(9), "00", "01", 1).await,
        Err(StoreError::NotFound { .. })
    ));
    // A renewal authenticated with an SVID that is no longer the agent's (renewed or
    // re-attested since) changes nothing.
    assert!(matches!(
        s.update_agent_svid(&agent_id(1), "0b", "0f", 9_000).await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(s.get_agent(&agent_id(1)).await.unwrap().unwrap(), renewed);

    s.create_or_replace_agent(new_agent(2, "02")).await.unwrap();
    let banned = s.set_agent_banned(&agent_id(1), true).await.unwrap();
    assert!(banned.banned);
    // A banned agent can neither renew nor attest again until evicted.
    assert!(matches!(
        s.update_agent_svid(&agent_id(1), "0c", "0d", 4_000).await,
        Err(StoreError::Banned { .. })
    ));
    assert!(matches!(
        s.create_or_replace_agent(new_agent(1, "0e")).await,
        Err(StoreError::Banned { .. })
    ));
    assert_eq!(s.get_agent(&agent_id(1)).await.unwrap().unwrap(), banned);

    let only_banned = s
        .list_agents(&AgentQuery {
            banned: Some(true),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(only_banned, vec![banned.clone()]);
    let all = s.list_agents(&AgentQuery::default()).await.unwrap();
    assert_eq!(all.len(), 2);
    let page = s
        .list_agents(&AgentQuery {
            after: Some(agent_id(1)),
            limit: Some(1),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].spiffe_id, agent_id(2));

    let unbanned = s.set_agent_banned(&agent_id(1), false).await.unwrap();
    assert!(!unbanned.banned);
    s.set_agent_banned(&agent_id(1), true).await.unwrap();
    let evicted = s.delete_agent(&agent_id(1)).await.unwrap();
    assert!(evicted.banned);
    assert_eq!(s.get_agent(&agent_id(1)).await.unwrap(), None);
    // After eviction it may attest again, as a new agent.
    let back = s.create_or_replace_agent(new_agent(1, "0f")).await.unwrap();
    assert!(!back.banned);
    assert_eq!(back.created_revision, back.updated_revision);
    assert!(matches!(
        s.set_agent_banned(&agent_id(9), true).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        s.delete_agent(&agent_id(9)).await,
        Err(StoreError::NotFound { .. })
    ));

    let mut bad = new_agent(3, "03");
    bad.attestation_type = "Join Token".into();
    assert_eq!(
        invalid_field(s.create_or_replace_agent(bad).await),
        "attestation_type"
    );
}

pub(crate) async fn bundles_are_stored_per_trust_domain(s: Arc<dyn Datastore>) {
    let ours = td("example.org");
    let partner = td("partner.org");
    let mut b = Bundle::new(ours.clone());
    let key = {
        use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
        let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).unwrap();
        pair.public_key().as_ref().to_vec()
    };
    b.add_jwt_authority(
        "k1",
        tessera_spiffe::JwtKey::Ec {
            curve: tessera_spiffe::bundle::EcCurve::P256,
            point: key,
        },
    )
    .unwrap();
    let json = b.to_json();
    let r1 = s.set_bundle(&ours, json.as_bytes()).await.unwrap();
    let r2 = s.set_bundle(&partner, br#"{"keys":[]}"#).await.unwrap();
    let got = s.get_bundle(&ours).await.unwrap().unwrap();
    assert_eq!(got.bundle_json, json.as_bytes());
    assert_eq!(got.updated_revision, r1);
    assert_eq!(Bundle::parse(ours.clone(), &got.bundle_json).unwrap(), b);

    // Upsert.
    let r3 = s
        .set_bundle(&partner, br#"{"keys":[],"spiffe_sequence":2}"#)
        .await
        .unwrap();
    assert!(r1 < r2 && r2 < r3);
    let list = s.list_bundles().await.unwrap();
    let tds: Vec<&str> = list.iter().map(|b| b.trust_domain.as_str()).collect();
    assert_eq!(tds, ["example.org", "partner.org"]);
    assert_eq!(list[1].updated_revision, r3);

    // Garbage is refused and changes nothing.
    assert_eq!(
        invalid_field(s.set_bundle(&ours, b"{not json").await),
        "bundle"
    );
    assert_eq!(
        invalid_field(
            s.set_bundle(&ours, br#"{"keys":[],"spiffe_sequence":-1}"#)
                .await
        ),
        "bundle"
    );
    assert_eq!(
        s.get_bundle(&ours).await.unwrap().unwrap().bundle_json,
        json.as_bytes()
    );

    s.delete_bundle(&partner).await.unwrap();
    assert_eq!(s.get_bundle(&partner).await.unwrap(), None);
    assert!(matches!(
        s.delete_bundle(&partner).await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(s.current_revision().await.unwrap(), 4);
}

pub(crate) async fn ca_journals_are_kept_per_server_outside_the_feed(s: Arc<dyn Datastore>) {
    assert_eq!(s.get_ca_journal("server-a").await.unwrap(), None);
    let bytes: Vec<u8> = (0..=255).collect();
    s.set_ca_journal("server-a", &bytes).await.unwrap();
    s.set_ca_journal("server-b", b"b").await.unwrap();
    s.set_ca_journal("server-a", b"a2").await.unwrap();
    assert_eq!(s.get_ca_journal("server-a").await.unwrap().unwrap(), b"a2");
    assert_eq!(s.get_ca_journal("server-b").await.unwrap().unwrap(), b"b");
    s.set_ca_journal("server-c", &bytes).await.unwrap();
    assert_eq!(s.get_ca_journal("server-c").await.unwrap().unwrap(), bytes);
    assert_eq!(invalid_field(s.set_ca_journal("", b"x").await), "server_id");
    assert_eq!(s.current_revision().await.unwrap(), 0);
}

pub(crate) async fn federation_relationships_and_policies_round_trip(s: Arc<dyn Datastore>) {
    let web = FederationRelationship {
        trust_domain: td("partner.org"),
        bundle_endpoint_url: "https://partner.org/bundle".into(),
        profile: "https_web".into(),
        endpoint_spiffe_id: None,
        ca_bundle_pem: Some(
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
        ),
    };
    let spiffe = FederationRelationship {
        trust_domain: td("other.org"),
        bundle_endpoint_url: "https://10.0.0.1:8443".into(),
        profile: "https_spiffe".into(),
        endpoint_spiffe_id: Some(id("spiffe://other.org/tessera/server")),
        ca_bundle_pem: None,
    };
    s.set_federation_relationship(&web).await.unwrap();
    s.set_federation_relationship(&spiffe).await.unwrap();
    assert_eq!(
        s.get_federation_relationship(&td("partner.org"))
            .await
            .unwrap(),
        Some(web.clone())
    );
    assert_eq!(
        s.list_federation_relationships().await.unwrap(),
        vec![spiffe.clone(), web.clone()]
    );
    // Fetch status: no revision, kept across an update of the relationship, gone with it.
    assert_eq!(
        s.get_federation_status(&td("partner.org")).await.unwrap(),
        Some(FederationStatus::default())
    );
    let before = s.current_revision().await.unwrap();
    let status = FederationStatus {
        last_attempt_at: Some(20),
        last_success_at: Some(10),
        last_error: Some(format!("bad {}", "é".repeat(5000))),
        last_error_at: Some(20),
        next_refresh_at: Some(30),
    };
    s.set_federation_status(&td("partner.org"), &status)
        .await
        .unwrap();
    assert_eq!(s.current_revision().await.unwrap(), before);
    let mut moved = web.clone();
    moved.bundle_endpoint_url = "https://bundles.partner.org/".into();
    s.set_federation_relationship(&moved).await.unwrap();
    let got = s
        .get_federation_status(&td("partner.org"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.last_success_at, Some(10));
    assert_eq!(got.next_refresh_at, Some(30));
    // Long errors are cut on a character boundary.
    let err = got.last_error.unwrap();
    assert!(err.len() <= tessera_store::model::MAX_FETCH_ERROR_LEN && err.starts_with("bad é"));
    assert!(matches!(
        s.set_federation_status(&td("nobody.org"), &status).await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(
        s.get_federation_status(&td("nobody.org")).await.unwrap(),
        None
    );
    assert_eq!(
        s.delete_federation_relationship(&td("partner.org"))
            .await
            .unwrap(),
        moved
    );
    assert!(matches!(
        s.delete_federation_relationship(&td("partner.org")).await,
        Err(StoreError::NotFound { .. })
    ));
    let mut bad = web;
    bad.profile = "https_spiffe".into();
    assert_eq!(
        invalid_field(s.set_federation_relationship(&bad).await),
        "ca_bundle_pem"
    );
    bad.ca_bundle_pem = None;
    assert_eq!(
        invalid_field(s.set_federation_relationship(&bad).await),
        "endpoint_spiffe_id"
    );

    let p = Policy {
        id: "allow-web".into(),
        document: r#"{"action":"ALLOW"}"#.into(),
    };
    s.set_policy(&p).await.unwrap();
    let mut p2 = p.clone();
    p2.document = r#"{"action":"DENY"}"#.into();
    s.set_policy(&p2).await.unwrap();
    assert_eq!(s.get_policy("allow-web").await.unwrap(), Some(p2.clone()));
    assert_eq!(s.list_policies().await.unwrap(), vec![p2.clone()]);
    let bad = Policy {
        id: "x".into(),
        document: "{".into(),
    };
    assert_eq!(invalid_field(s.set_policy(&bad).await), "document");
    let bad = Policy {
        id: "bad id".into(),
        document: "{}".into(),
    };
    assert_eq!(invalid_field(s.set_policy(&bad).await), "id");
    assert_eq!(s.delete_policy("allow-web").await.unwrap(), p2);
    assert_eq!(s.get_policy("allow-web").await.unwrap(), None);

    let kinds: Vec<EventKind> = kinds_after(&*s, 0).await.iter().map(|e| e.1).collect();
    assert_eq!(
        kinds,
        [
            EventKind::FederationUpdated,
            EventKind::FederationUpdated,
            EventKind::FederationUpdated,
            EventKind::FederationDeleted,
            EventKind::PolicyUpdated,
            EventKind::PolicyUpdated,
            EventKind::PolicyDeleted,
        ]
    );
}

/// Destinations: create, replace, list in id order, delete, the checks a store makes (a name,
/// JSON of at most 64 KiB), and one event per change.
pub(crate) async fn destinations_round_trip(s: Arc<dyn Datastore>) {
    let start = s.current_revision().await.unwrap();
    let d = Destination {
        id: "db".into(),
        document: r#"{"cidr":"198.18.0.2/32","spiffe_id":"spiffe://example.org/db"}"#.into(),
    };
    let r1 = s.set_destination(&d, false, &|_| Ok(())).await.unwrap();
    let mut d2 = d.clone();
    d2.document = r#"{"cidr":"198.18.0.3/32","spiffe_id":"spiffe://example.org/db"}"#.into();
    let r2 = s.set_destination(&d2, false, &|_| Ok(())).await.unwrap();
    assert!(r2 > r1);
    let web = Destination {
        id: "a/web".into(),
        document: r#"{"cidr":"198.18.0.4/32","spiffe_id":"spiffe://example.org/web"}"#.into(),
    };
    s.set_destination(&web, false, &|_| Ok(())).await.unwrap();
    assert_eq!(s.get_destination("db").await.unwrap(), Some(d2.clone()));
    assert_eq!(
        s.list_destinations().await.unwrap(),
        vec![web.clone(), d2.clone()]
    );
    // Policies and destinations are separate tables: one name may be both.
    assert_eq!(s.get_policy("db").await.unwrap(), None);
    for (bad, field) in [
        (
            Destination {
                id: "x".into(),
                document: "{".into(),
            },
            "document",
        ),
        (
            Destination {
                id: "bad id".into(),
                document: "{}".into(),
            },
            "id",
        ),
        (
            Destination {
                id: "big".into(),
                document: format!("\"{}\"", "a".repeat(64 * 1024)),
            },
            "document",
        ),
    ] {
        assert_eq!(
            invalid_field(s.set_destination(&bad, false, &|_| Ok(())).await),
            field
        );
    }
    assert_eq!(s.delete_destination("db").await.unwrap(), d2);
    assert_eq!(s.get_destination("db").await.unwrap(), None);
    assert!(matches!(
        s.delete_destination("db").await,
        Err(StoreError::NotFound { .. })
    ));
    let events = kinds_after(&*s, start).await;
    assert_eq!(
        events
            .iter()
            .map(|e| (e.1, e.2.as_str()))
            .collect::<Vec<_>>(),
        [
            (EventKind::DestinationUpdated, "db"),
            (EventKind::DestinationUpdated, "db"),
            (EventKind::DestinationUpdated, "a/web"),
            (EventKind::DestinationDeleted, "db"),
        ]
    );
}

/// Creates of one policy name at once (on PostgreSQL over several connections, as several
/// servers would): exactly one is stored, the others are told it exists.
pub(crate) async fn concurrent_creates_of_one_policy_store_one(s: Arc<dyn Datastore>) {
    let creates = (0..8).map(|i| {
        let s = s.clone();
        tokio::spawn(async move {
            let p = Policy {
                id: "only-one".into(),
                document: format!(
                    r#"{{"action":"ALLOW","rules":[{{"to":{{"ports":[{}]}}}}]}}"#,
                    8000 + i
                ),
            };
            s.create_policy(&p).await.map(|_| p)
        })
    });
    let mut stored = Vec::new();
    for c in creates {
        match c.await.unwrap() {
            Ok(p) => stored.push(p),
            Err(StoreError::AlreadyExists { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(s.list_policies().await.unwrap(), stored);
    // set_policy still replaces.
    let mut p = stored[0].clone();
    p.document = r#"{"action":"DENY"}"#.into();
    s.set_policy(&p).await.unwrap();
    assert_eq!(s.get_policy("only-one").await.unwrap(), Some(p));
}

/// A destination's admission (`admit`) and `create_only` are decided inside the write, against
/// what is stored once no other writer can come between: of two clashing destinations applied
/// at once (on PostgreSQL, over two connections), one is stored and the other refused, and a
/// refusal changes nothing.
pub(crate) async fn destination_admission_runs_inside_the_write(s: Arc<dyn Datastore>) {
    let at = |id: &str| Destination {
        id: id.into(),
        document: r#"{"cidr":"198.18.0.9/32","spiffe_id":"spiffe://example.org/x"}"#.into(),
    };
    // The test's rule: no two destinations with one document.
    fn no_twin(new: &Destination, others: &[Destination]) -> Result<(), String> {
        match others.iter().find(|o| o.document == new.document) {
            Some(o) => Err(format!("{} clashes with {}", new.id, o.id)),
            None => Ok(()),
        }
    }
    // Writes `d` from another task, its write held open for 400 ms by its admission
    // (`no_twin`); returns once that write has begun.
    async fn held_open(
        s: &Arc<dyn Datastore>,
        d: &Destination,
        create_only: bool,
    ) -> tokio::task::JoinHandle<Result<u64, StoreError>> {
        let (s, d) = (s.clone(), d.clone());
        let write = tokio::spawn(async move {
            s.set_destination(&d, create_only, &|o| {
                std::thread::sleep(std::time::Duration::from_millis(400));
                no_twin(&d, o)
            })
            .await
        });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        write
    }
    let a = at("a");
    s.set_destination(&a, true, &|o| no_twin(&a, o))
        .await
        .unwrap();
    let before = s.current_revision().await.unwrap();
    assert!(matches!(
        s.set_destination(&a, true, &|_| Ok(())).await,
        Err(StoreError::AlreadyExists { .. })
    ));
    let b = at("b");
    match s.set_destination(&b, false, &|o| no_twin(&b, o)).await {
        Err(StoreError::Conflict(why)) => assert_eq!(why, "b clashes with a"),
        other => panic!("{other:?}"),
    }
    // Replacing `a` itself is not a clash with itself.
    s.set_destination(&a, false, &|o| no_twin(&a, o))
        .await
        .unwrap();
    assert_eq!(s.list_destinations().await.unwrap(), vec![a.clone()]);
    assert_eq!(s.current_revision().await.unwrap(), before + 1);
    s.delete_destination("a").await.unwrap();

    // At once: c's admission holds its write open while d's starts; d must see c.
    let (c, d) = (at("c"), at("d"));
    let slow = held_open(&s, &c, false).await;
    let fast = s.set_destination(&d, false, &|o| no_twin(&d, o)).await;
    let slow = slow.await.unwrap();
    assert!(slow.is_ok(), "{slow:?}");
    assert!(
        matches!(&fast, Err(StoreError::Conflict(_))),
        "both clashing destinations were stored: {fast:?}"
    );
    assert_eq!(s.list_destinations().await.unwrap(), vec![c.clone()]);

    // create_only the same way: e's create holds its write open while another create of the
    // same name starts; that one must see e.
    let e = Destination {
        id: "e".into(),
        document: r#"{"cidr":"198.18.0.10/32","spiffe_id":"spiffe://example.org/e"}"#.into(),
    };
    let slow = held_open(&s, &e, true).await;
    let mut e2 = e.clone();
    e2.document = r#"{"cidr":"198.18.0.11/32","spiffe_id":"spiffe://example.org/e"}"#.into();
    let fast = s.set_destination(&e2, true, &|_| Ok(())).await;
    assert!(slow.await.unwrap().is_ok());
    assert!(
        matches!(&fast, Err(StoreError::AlreadyExists { .. })),
        "two creates of one name both succeeded: {fast:?}"
    );
    assert_eq!(s.list_destinations().await.unwrap(), vec![c, e]);
}

/// 8 writers × 50 writes while a reader follows the feed: every revision is assigned once, with
/// no gaps, and the reader, always resuming after the last revision it saw, sees each exactly
/// once — the property a late-committing writer would break with sequence-assigned revisions.
pub(crate) async fn concurrent_writers_get_contiguous_revisions_seen_once_by_a_resuming_reader(
    s: Arc<dyn Datastore>,
) {
    const WRITERS: usize = 8;
    const WRITES: usize = 50;
    const TOTAL: u64 = (WRITERS * WRITES) as u64;
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let s = Arc::clone(&s);
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut last = 0;
            loop {
                let finished = done.load(Ordering::Acquire);
                let page = s.events_after(last, 64).await.unwrap();
                for e in &page {
                    assert_eq!(e.revision, last + 1, "gap or repeat after {last}");
                    last = e.revision;
                    seen.push(e.revision);
                }
                if finished && page.is_empty() {
                    return seen;
                }
                if page.is_empty() {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let s = Arc::clone(&s);
            tokio::spawn(async move {
                let mut revs = Vec::new();
                for i in 0..WRITES {
                    let parent = agent_id(w);
                    // Mix creates, updates and agent writes.
                    let rev = match i % 5 {
                        4 => {
                            s.create_or_replace_agent(new_agent(w, &format!("{i:02x}")))
                                .await
                                .unwrap()
                                .updated_revision
                        }
                        3 => {
                            let (e, _) = s
                                .create_entry(entry(
                                    &format!("w{w}/e{i}"),
                                    &parent,
                                    &["unix:uid:1"],
                                ))
                                .await
                                .unwrap();
                            let mut n = e.to_new();
                            n.hint = "updated".into();
                            revs.push(e.created_revision);
                            s.update_entry(&e.id, n).await.unwrap().updated_revision
                        }
                        _ => {
                            s.create_entry(entry(&format!("w{w}/e{i}"), &parent, &["unix:uid:1"]))
                                .await
                                .unwrap()
                                .0
                                .created_revision
                        }
                    };
                    revs.push(rev);
                }
                revs
            })
        })
        .collect();
    let mut assigned = Vec::new();
    for w in writers {
        assigned.extend(w.await.unwrap());
    }
    done.store(true, Ordering::Release);
    let seen = reader.await.unwrap();

    let expected_total = TOTAL + (WRITERS * WRITES / 5) as u64;
    assigned.sort_unstable();
    assert_eq!(assigned, (1..=expected_total).collect::<Vec<_>>());
    assert_eq!(seen, (1..=expected_total).collect::<Vec<_>>());
    assert_eq!(s.current_revision().await.unwrap(), expected_total);
}
