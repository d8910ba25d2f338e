//! The Tessera server's datastore: registration entries, attested agents, join tokens, trust
//! bundles (ours and federated), each server's CA journal, federation relationships and
//! policies, plus the revision feed that tells every server and agent what changed.
//!
//! Two backends behind one [`Datastore`] trait and one set of SQL: SQLite (embedded, the
//! default: one file, WAL) and PostgreSQL (shared by the servers of an HA deployment). sqlx
//! runtime queries only; migrations are embedded and applied by [`open`]. This crate decides
//! nothing about authorization: it stores, validates shapes, and reports changes.
//!
//! # Revisions
//!
//! Every change that others follow is one transaction that (a) increments the single counter
//! row (`UPDATE revision SET value = value + 1 RETURNING value`), (b) writes the change and
//! (c) inserts an [`Event`] with that revision, then commits. A batch of N entry creations
//! takes N consecutive revisions in one transaction. Entries and agents also carry the
//! revisions that created and last changed them.
//!
//! Why one locked counter and not a sequence: a sequence hands out numbers at statement time,
//! so transaction 8 can commit before transaction 7; a reader that saw 8 and resumes "after 8"
//! would never see 7. The counter row's lock is held until commit, so the next writer (on any
//! server sharing the database) gets its number only after the previous one is visible:
//! revisions are assigned in commit order, contiguous (a rolled-back transaction gives its
//! number back with the rollback), and a reader that resumes after the last revision it saw
//! misses nothing. The price is that writes are serialized, which is what a control plane's
//! write rate allows; reads never take the lock. On SQLite the database write lock (taken at
//! `BEGIN IMMEDIATE`) serializes writers the same way.
//!
//! Writes nobody follows take no revision: a server's own CA journal and the pruning of expired
//! join tokens and of old events. Pruned events are reported, never silently skipped: see
//! [`Datastore::events_after`].

mod backend;
mod datastore;
mod error;
mod listen;
pub mod model;
mod sql;

pub use backend::{PostgresOptions, open, open_postgres, open_postgres_with, open_sqlite};
pub use datastore::{
    AdmitDestination, AgentQuery, Datastore, EntryQuery, MergeBundle, RevisionListener,
};
pub use error::StoreError;
pub use model::{
    Agent, Destination, Entry, Event, EventKind, FederationRelationship, FederationStatus,
    JoinToken, NewAgent, NewEntry, Policy, StoredBundle,
};
