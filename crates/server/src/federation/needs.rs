//! Which federated bundles one agent needs: those its entries federate with. Pure; the sync
//! stream keeps one per agent and sends a federated bundle when the first entry needing it
//! arrives and removes it when the last one goes, so an agent holds exactly the foreign trust
//! its workloads were granted (Workload API §4.6: federated bundles go only to workloads whose
//! entries federate with that trust domain).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use tessera_spiffe::TrustDomain;
use tessera_store::Entry;

#[derive(Debug, Default)]
pub(crate) struct Needs {
    by_entry: HashMap<String, BTreeSet<TrustDomain>>,
    count: BTreeMap<TrustDomain, usize>,
}

impl Needs {
    pub(crate) fn from_entries(entries: &[Entry]) -> Self {
        let mut n = Self::default();
        for e in entries {
            n.upsert(&e.id, &e.federates_with);
        }
        n
    }

    /// Records entry `id` federating with `feds`; returns the trust domains that became needed
    /// and those that no longer are.
    pub(crate) fn upsert(
        &mut self,
        id: &str,
        feds: &BTreeSet<TrustDomain>,
    ) -> (Vec<TrustDomain>, Vec<TrustDomain>) {
        let old = self.by_entry.remove(id).unwrap_or_default();
        let mut added = Vec::new();
        for td in feds.difference(&old) {
            let c = self.count.entry(td.clone()).or_insert(0);
            *c += 1;
            if *c == 1 {
                added.push(td.clone());
            }
        }
        let removed = self.release(old.difference(feds));
        if !feds.is_empty() {
            self.by_entry.insert(id.to_owned(), feds.clone());
        }
        (added, removed)
    }

    /// Forgets entry `id`; returns the trust domains no longer needed.
    pub(crate) fn remove(&mut self, id: &str) -> Vec<TrustDomain> {
        let old = self.by_entry.remove(id).unwrap_or_default();
        self.release(old.iter())
    }

    fn release<'a>(&mut self, tds: impl Iterator<Item = &'a TrustDomain>) -> Vec<TrustDomain> {
        let mut removed = Vec::new();
        for td in tds {
            if let Some(c) = self.count.get_mut(td) {
                *c -= 1;
                if *c == 0 {
                    self.count.remove(td);
                    removed.push(td.clone());
                }
            }
        }
        removed
    }

    pub(crate) fn contains(&self, td: &TrustDomain) -> bool {
        self.count.contains_key(td)
    }

    pub(crate) fn all(&self) -> impl Iterator<Item = &TrustDomain> {
        self.count.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tds(names: &[&str]) -> BTreeSet<TrustDomain> {
        names.iter().map(|n| TrustDomain::new(n).unwrap()).collect()
    }

    fn names(v: Vec<TrustDomain>) -> Vec<String> {
        v.into_iter().map(|t| t.to_string()).collect()
    }

    #[test]
    fn a_bundle_is_needed_from_the_first_entry_to_the_last() {
        let mut n = Needs::default();
        let (a, r) = n.upsert("e1", &tds(&["b.test"]));
        assert_eq!((names(a), names(r)), (vec!["b.test".to_owned()], vec![]));
        let (a, r) = n.upsert("e2", &tds(&["b.test", "c.test"]));
        assert_eq!((names(a), names(r)), (vec!["c.test".to_owned()], vec![]));
        // e2 drops b.test: e1 still needs it; the same entry sent twice changes nothing.
        let (a, r) = n.upsert("e2", &tds(&["c.test"]));
        assert!(a.is_empty() && r.is_empty());
        let (a, r) = n.upsert("e2", &tds(&["c.test"]));
        assert!(a.is_empty() && r.is_empty());
        assert_eq!(names(n.remove("e1")), ["b.test"]);
        assert!(!n.contains(&TrustDomain::new("b.test").unwrap()));
        let (a, r) = n.upsert("e2", &tds(&[]));
        assert_eq!((names(a), names(r)), (vec![], vec!["c.test".to_owned()]));
        assert!(n.remove("unknown").is_empty());
        assert_eq!(n.all().count(), 0);
    }
}
