//! Every registration entry and attested agent, in memory, kept current from the revision feed:
//! what lets a server keep signing while the datastore is unreachable (several servers share
//! one PostgreSQL; a database failover or restart must not stop SVID issuance), and an index of
//! entries by parent so an agent's entries are found without a query.
//!
//! Loaded once at start; then the follower re-reads each entry or agent an event names and
//! stores what it finds (or forgets it), in revision order, so memory converges on the
//! datastore. The agent API reads the datastore while it is reachable and memory only while it
//! is not. What memory cannot know is a change committed just before the database went away
//! and not yet read from the feed (a ban, say); bans and evictions cannot be made during the
//! outage (they are writes), so that window is the feed's propagation time.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use tessera_spiffe::SpiffeId;
use tessera_store::model::{Agent, Entry};

#[derive(Debug, Default)]
pub(crate) struct Memory {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    agents: HashMap<SpiffeId, Agent>,
    entries: HashMap<String, Entry>,
    /// Entry ids by parent ID.
    by_parent: HashMap<SpiffeId, BTreeSet<String>>,
}

impl Inner {
    fn remove_entry(&mut self, id: &str) {
        if let Some(old) = self.entries.remove(id)
            && let Some(ids) = self.by_parent.get_mut(&old.parent_id)
        {
            ids.remove(id);
            if ids.is_empty() {
                self.by_parent.remove(&old.parent_id);
            }
        }
    }

    fn put_entry(&mut self, entry: Entry) {
        self.remove_entry(&entry.id);
        self.by_parent
            .entry(entry.parent_id.clone())
            .or_default()
            .insert(entry.id.clone());
        self.entries.insert(entry.id.clone(), entry);
    }
}

impl Memory {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every mutation completes without panicking points in between: a poisoned lock is
        // still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces everything (at start, or after falling too far behind the feed).
    pub(crate) fn load(&self, entries: Vec<Entry>, agents: Vec<Agent>) {
        let mut inner = Inner::default();
        for e in entries {
            inner.put_entry(e);
        }
        for a in agents {
            inner.agents.insert(a.spiffe_id.clone(), a);
        }
        *self.lock() = inner;
    }

    pub(crate) fn set_agent(&self, id: &str, agent: Option<Agent>) {
        let mut inner = self.lock();
        inner.agents.retain(|k, _| k.as_str() != id);
        if let Some(a) = agent {
            inner.agents.insert(a.spiffe_id.clone(), a);
        }
    }

    pub(crate) fn agent(&self, id: &SpiffeId) -> Option<Agent> {
        self.lock().agents.get(id).cloned()
    }

    /// Stores (or forgets) entry `id`; true when it is or was an admin entry.
    pub(crate) fn set_entry(&self, id: &str, entry: Option<Entry>) -> bool {
        let mut inner = self.lock();
        let was_admin = inner.entries.get(id).is_some_and(|e| e.admin);
        let is_admin = entry.as_ref().is_some_and(|e| e.admin);
        match entry {
            Some(e) => inner.put_entry(e),
            None => inner.remove_entry(id),
        }
        was_admin || is_admin
    }

    /// SPIFFE IDs of the entries marked admin.
    pub(crate) fn admin_ids(&self) -> std::collections::HashSet<SpiffeId> {
        self.lock()
            .entries
            .values()
            .filter(|e| e.admin)
            .map(|e| e.spiffe_id.clone())
            .collect()
    }

    pub(crate) fn entry(&self, id: &str) -> Option<Entry> {
        self.lock().entries.get(id).cloned()
    }

    /// Entries whose parent is one of `parents`, ordered by id.
    pub(crate) fn entries_by_parents<'a>(
        &self,
        parents: impl IntoIterator<Item = &'a SpiffeId>,
    ) -> Vec<Entry> {
        let inner = self.lock();
        let mut ids = BTreeSet::new();
        for p in parents {
            if let Some(set) = inner.by_parent.get(p) {
                ids.extend(set.iter().cloned());
            }
        }
        ids.iter()
            .filter_map(|id| inner.entries.get(id).cloned())
            .collect()
    }

    pub(crate) fn len(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.entries.len(), inner.agents.len())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn entry(id: &str, parent: &str) -> Entry {
        Entry {
            id: id.to_owned(),
            spiffe_id: SpiffeId::parse(&format!("spiffe://example.org/{id}")).unwrap(),
            parent_id: SpiffeId::parse(&format!("spiffe://example.org/{parent}")).unwrap(),
            selectors: [tessera_spiffe::Selector::new("unix", "uid:1").unwrap()].into(),
            x509_ttl_secs: 3600,
            jwt_ttl_secs: 300,
            dns_names: Vec::new(),
            hint: String::new(),
            admin: false,
            downstream: false,
            federates_with: Default::default(),
            created_revision: 1,
            updated_revision: 1,
        }
    }

    #[test]
    fn the_parent_index_follows_moves_and_deletions() {
        let m = Memory::default();
        let p1 = SpiffeId::parse("spiffe://example.org/p1").unwrap();
        let p2 = SpiffeId::parse("spiffe://example.org/p2").unwrap();
        m.load(vec![entry("a", "p1"), entry("b", "p1")], Vec::new());
        assert_eq!(m.entries_by_parents([&p1]).len(), 2);
        // Moved to another parent.
        m.set_entry("b", Some(entry("b", "p2")));
        assert_eq!(m.entries_by_parents([&p1]).len(), 1);
        assert_eq!(m.entries_by_parents([&p2])[0].id, "b");
        // Deleted.
        m.set_entry("a", None);
        assert!(m.entries_by_parents([&p1]).is_empty());
        assert_eq!(m.entries_by_parents([&p1, &p2]).len(), 1);
        assert_eq!(m.len(), (1, 0));
    }
}
