//! Which records garbage collection frees, decided without I/O (REFERENCE.md section 4).
//!
//! The agent reads the facts (the pod of each record, whether its node exists) and asks
//! [`judge`]; [`Suspects`] makes it free only what was judged dead in two rounds in a row
//! (Calico's observe-twice), so one stale read, a pod created between two reads, or a watch
//! that lags never costs a live pod its address.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::store::Lease;

/// What is known of a record's pod, read fresh from the API server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodFacts<'a> {
    /// No pod of that namespace and name.
    Gone,
    /// The pod.
    Present {
        /// Its UID.
        uid: &'a str,
        /// For a static pod's mirror pod, the `kubernetes.io/config.mirror` annotation: the
        /// kubelet's own UID of the static pod (the config hash), which the kubelet passes in
        /// `K8S_POD_UID` and the record holds, while `metadata.uid` is the mirror's.
        mirror_of: Option<&'a str>,
        /// `status.phase`.
        phase: Option<&'a str>,
        /// `metadata.deletionTimestamp` in seconds since the epoch: when the grace period ends.
        deletion: Option<u64>,
    },
}

/// The annotation a static pod's mirror pod carries: the static pod's UID as the kubelet knows it.
pub const ANNO_CONFIG_MIRROR: &str = "kubernetes.io/config.mirror";

/// Why a record is freed (the `reason` label of the GC metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// The pod no longer exists.
    PodGone,
    /// The pod ran to completion or failed: it holds no network any more.
    PodFinished,
    /// The pod was deleted and its grace period plus the margin is over.
    PodTerminating,
    /// A pod of the same name with another UID exists: the record is the old pod's.
    PodReplaced,
    /// The record's node no longer exists.
    NodeGone,
}

impl Reason {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::PodGone => "pod_gone",
            Reason::PodFinished => "pod_finished",
            Reason::PodTerminating => "pod_terminating",
            Reason::PodReplaced => "pod_replaced",
            Reason::NodeGone => "node_gone",
        }
    }
}

/// Whether `lease` should be freed given its pod, `now` and the `margin` (seconds) allowed past a
/// terminating pod's grace period. Records without a pod name (no Kubernetes identity at ADD)
/// are never freed here: CNI GC and DEL own them.
pub fn judge(lease: &Lease, pod: PodFacts<'_>, now: u64, margin: u64) -> Option<Reason> {
    if lease.owner.pod_namespace.is_empty() {
        return None;
    }
    match pod {
        PodFacts::Gone => Some(Reason::PodGone),
        PodFacts::Present {
            uid,
            mirror_of,
            phase,
            deletion,
        } => {
            let recorded = lease.owner.pod_uid.as_str();
            let same = uid == recorded || mirror_of == Some(recorded);
            if !recorded.is_empty() && !uid.is_empty() && !same {
                return Some(Reason::PodReplaced);
            }
            if matches!(phase, Some("Succeeded" | "Failed")) {
                return Some(Reason::PodFinished);
            }
            match deletion {
                Some(t) if now > t.saturating_add(margin) => Some(Reason::PodTerminating),
                _ => None,
            }
        }
    }
}

/// A StatefulSet pod's name split into the StatefulSet's name and the ordinal
/// (`web-2` -> `("web", 2)`); `None` for a name of another shape.
pub fn statefulset_ordinal(pod_name: &str) -> Option<(&str, i64)> {
    let (base, ordinal) = pod_name.rsplit_once('-')?;
    if base.is_empty() || ordinal.is_empty() || !ordinal.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((base, ordinal.parse().ok()?))
}

/// Whether a StatefulSet with `replicas` and first ordinal `start` (`spec.ordinals.start`,
/// default 0) wants the pod of `ordinal`: `start <= ordinal < start + replicas`.
pub fn statefulset_wants_ordinal(ordinal: i64, start: i64, replicas: i64) -> bool {
    ordinal >= start && ordinal < start.saturating_add(replicas.max(0))
}

/// Records judged dead in the previous round, by (address, container).
#[derive(Debug, Default)]
pub struct Suspects {
    seen: HashMap<(IpAddr, String), Reason>,
}

impl Suspects {
    /// Takes this round's verdicts; returns the records to free now: those judged dead in this
    /// round and in the previous one. Only this round's suspects are remembered.
    pub fn round(&mut self, verdicts: Vec<(Lease, Option<Reason>)>) -> Vec<(Lease, Reason)> {
        let mut next = HashMap::new();
        let mut free = Vec::new();
        for (lease, verdict) in verdicts {
            let Some(reason) = verdict else { continue };
            let key = (lease.ip, lease.owner.container_id.clone());
            if self.seen.contains_key(&key) {
                free.push((lease, reason));
            } else {
                next.insert(key, reason);
            }
        }
        self.seen = next;
        free
    }

    /// Records suspected now (waiting for a second look).
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether nothing is suspected.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Owner;

    fn lease(ip: &str, uid: &str) -> Lease {
        Lease {
            ip: ip.parse().expect("ip"),
            pool: "p".into(),
            owner: Owner {
                pod_namespace: "ns".into(),
                pod_name: "a".into(),
                pod_uid: uid.into(),
                container_id: format!("c-{ip}"),
                ifname: "eth0".into(),
                node: "n".into(),
                network: String::new(),
                created: 0,
            },
            clean_gateway: false,
            revision: 1,
        }
    }

    #[test]
    fn verdicts() {
        let l = lease("10.0.0.1", "u1");
        let live = PodFacts::Present {
            uid: "u1",
            mirror_of: None,
            phase: Some("Running"),
            deletion: None,
        };
        assert_eq!(judge(&l, live, 100, 30), None);
        // A static pod: the record holds the kubelet's UID (the config hash), the mirror pod
        // another metadata.uid and the hash in its annotation: the same pod, kept.
        let mirror = PodFacts::Present {
            uid: "mirror-uid",
            mirror_of: Some("u1"),
            phase: Some("Running"),
            deletion: None,
        };
        assert_eq!(judge(&l, mirror, 100, 30), None);
        let other_mirror = PodFacts::Present {
            uid: "mirror-uid",
            mirror_of: Some("another-hash"),
            phase: Some("Running"),
            deletion: None,
        };
        assert_eq!(judge(&l, other_mirror, 100, 30), Some(Reason::PodReplaced));
        assert_eq!(judge(&l, PodFacts::Gone, 100, 30), Some(Reason::PodGone));
        let replaced = PodFacts::Present {
            uid: "u2",
            mirror_of: None,
            phase: Some("Running"),
            deletion: None,
        };
        assert_eq!(judge(&l, replaced, 100, 30), Some(Reason::PodReplaced));
        for phase in ["Succeeded", "Failed"] {
            let done = PodFacts::Present {
                uid: "u1",
                mirror_of: None,
                phase: Some(phase),
                deletion: None,
            };
            assert_eq!(judge(&l, done, 100, 30), Some(Reason::PodFinished));
        }
        let terminating = |deletion| PodFacts::Present {
            uid: "u1",
            mirror_of: None,
            phase: Some("Running"),
            deletion: Some(deletion),
        };
        // Within grace + margin: kept; past it: freed.
        assert_eq!(judge(&l, terminating(90), 100, 30), None);
        assert_eq!(
            judge(&l, terminating(60), 100, 30),
            Some(Reason::PodTerminating)
        );
        // No Kubernetes identity: never freed here.
        let mut anon = lease("10.0.0.2", "");
        anon.owner.pod_namespace.clear();
        assert_eq!(judge(&anon, PodFacts::Gone, 100, 30), None);
        // No UID recorded: a recreated pod is not told apart (it is live).
        let no_uid = lease("10.0.0.3", "");
        assert_eq!(judge(&no_uid, replaced, 100, 30), None);
    }

    #[test]
    fn statefulset_ordinals_start_where_the_statefulset_says() {
        assert!(statefulset_wants_ordinal(0, 0, 3));
        assert!(statefulset_wants_ordinal(2, 0, 3));
        assert!(!statefulset_wants_ordinal(3, 0, 3));
        // spec.ordinals.start: 5 with 3 replicas serves web-5, web-6, web-7.
        assert!(!statefulset_wants_ordinal(2, 5, 3));
        assert!(statefulset_wants_ordinal(5, 5, 3));
        assert!(statefulset_wants_ordinal(7, 5, 3));
        assert!(!statefulset_wants_ordinal(8, 5, 3));
        assert!(!statefulset_wants_ordinal(0, 0, 0));
    }

    #[test]
    fn statefulset_ordinals() {
        assert_eq!(statefulset_ordinal("web-2"), Some(("web", 2)));
        assert_eq!(statefulset_ordinal("my-db-10"), Some(("my-db", 10)));
        assert_eq!(statefulset_ordinal("web-5d9"), None);
        assert_eq!(statefulset_ordinal("web"), None);
        assert_eq!(statefulset_ordinal("-1"), None);
    }

    #[test]
    fn frees_only_what_was_dead_twice_in_a_row() {
        let a = lease("10.0.0.1", "u");
        let b = lease("10.0.0.2", "u");
        let mut s = Suspects::default();
        let first = s.round(vec![(a.clone(), Some(Reason::PodGone)), (b.clone(), None)]);
        assert!(first.is_empty(), "one sighting frees nothing");
        assert_eq!(s.len(), 1);
        // a came back to life in between: forgotten, and the next sighting starts over.
        let second = s.round(vec![(a.clone(), None), (b.clone(), Some(Reason::PodGone))]);
        assert!(second.is_empty());
        let third = s.round(vec![
            (a.clone(), Some(Reason::PodGone)),
            (b.clone(), Some(Reason::PodGone)),
        ]);
        assert_eq!(third.len(), 1);
        assert_eq!(third[0].0.ip, b.ip);
        let fourth = s.round(vec![(a.clone(), Some(Reason::PodGone))]);
        assert_eq!(fourth.len(), 1);
        assert_eq!(fourth[0].0.ip, a.ip);
        assert!(s.is_empty());
    }
}
