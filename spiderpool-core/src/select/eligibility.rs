//! Whether a pool may serve a pod's NIC and family (`podAffinity`, `nodeAffinity`/`nodeName`,
//! `namespaceAffinity`/`namespaceName`, `multusName`, disabled or terminating pools), and why not.

use serde::Deserialize;

use super::annotations::{ANNO_MULTUS_DEFAULT, ANNO_MULTUS_NETWORKS};
use super::{Candidate, SelectionInput};
use crate::model::Pool;
use crate::range::IpFamily;
use crate::selector::{format_labels, Labels};

/// Whether one pool may serve this pod's NIC and family, and if not, why.
pub fn check(pool: &Pool, input: &SelectionInput<'_>, ifname: &str, family: IpFamily) -> Candidate {
    let reason = ineligibility(pool, input, ifname, family);
    Candidate {
        pool: pool.name.clone(),
        eligible: reason.is_none(),
        reason,
    }
}

fn ineligibility(
    pool: &Pool,
    input: &SelectionInput<'_>,
    ifname: &str,
    family: IpFamily,
) -> Option<String> {
    let empty = Labels::new();
    if pool.terminating {
        return Some("pool is terminating".into());
    }
    if pool.disable {
        return Some("pool is disabled".into());
    }
    if pool.family != family {
        return Some(format!("pool is {}, wanted {family}", pool.family));
    }
    if let Some(r) = names_or_selector(
        (&pool.node_name, "nodeName"),
        (pool.node_affinity.as_ref(), "nodeAffinity"),
        input.node_labels.unwrap_or(&empty),
        ("node", input.node_name),
    ) {
        return Some(r);
    }
    if let Some(r) = names_or_selector(
        (&pool.namespace_name, "namespaceName"),
        (pool.namespace_affinity.as_ref(), "namespaceAffinity"),
        input.namespace_labels.unwrap_or(&empty),
        ("namespace", input.pod_namespace),
    ) {
        return Some(r);
    }
    if let Some(sel) = &pool.pod_affinity {
        let labels = input.pod_labels.unwrap_or(&empty);
        let who = format!("{}/{}", input.pod_namespace, input.pod_name);
        if let Some(r) = selector_mismatch(sel, labels, "podAffinity", "pod", &who) {
            return Some(r);
        }
    }
    if !pool.multus_name.is_empty() {
        match multus_network(input, ifname) {
            Some(net) => {
                if !pool
                    .multus_name
                    .iter()
                    .any(|m| multus_matches(m, &net, input.pod_namespace))
                {
                    return Some(format!(
                        "multusName [{}] does not include network {net} of {ifname}",
                        pool.multus_name.join(" ")
                    ));
                }
            }
            None => {
                return Some(format!(
                    "multusName [{}] set, but {ifname} of the pod names no Multus network",
                    pool.multus_name.join(" ")
                ))
            }
        }
    }
    None
}

/// The `nodeName`/`nodeAffinity` (and namespace) rule: a non-empty name list wins over the
/// selector. Returns why the object does not match, if it does not.
fn names_or_selector(
    (names, names_field): (&[String], &str),
    (selector, selector_field): (Option<&crate::selector::LabelSelector>, &str),
    labels: &Labels,
    (what, who): (&str, &str),
) -> Option<String> {
    if !names.is_empty() {
        return (!names.iter().any(|n| n == who)).then(|| {
            format!(
                "{names_field} [{}] does not include {what} {who}",
                names.join(" ")
            )
        });
    }
    selector.and_then(|sel| selector_mismatch(sel, labels, selector_field, what, who))
}

fn selector_mismatch(
    sel: &crate::selector::LabelSelector,
    labels: &Labels,
    field: &str,
    what: &str,
    who: &str,
) -> Option<String> {
    match sel.matches(labels) {
        Ok(true) => None,
        Ok(false) => Some(format!(
            "{field} {sel} does not match {what} {who} labels {}",
            format_labels(labels)
        )),
        Err(e) => Some(format!("{field} is invalid: {e}")),
    }
}

/// The Multus network (`ns/name` or `name`) that serves `ifname` of the pod.
pub fn multus_network(input: &SelectionInput<'_>, ifname: &str) -> Option<String> {
    let annos = input.pod_annotations;
    if ifname == "eth0" {
        return annos
            .and_then(|a| a.get(ANNO_MULTUS_DEFAULT))
            .map(|s| s.trim().to_string())
            .or_else(|| input.cni.and_then(|c| c.network_name.clone()));
    }
    let v = annos?.get(ANNO_MULTUS_NETWORKS)?.trim();
    #[derive(Deserialize)]
    struct Sel {
        name: String,
        #[serde(default)]
        namespace: Option<String>,
        #[serde(default)]
        interface: Option<String>,
    }
    let list: Vec<(String, Option<String>)> = if v.starts_with('[') {
        serde_json::from_str::<Vec<Sel>>(v)
            .ok()?
            .into_iter()
            .map(|s| {
                let full = match s.namespace {
                    Some(ns) => format!("{ns}/{}", s.name),
                    None => s.name,
                };
                (full, s.interface)
            })
            .collect()
    } else {
        v.split(',')
            .map(|e| {
                let e = e.trim();
                match e.split_once('@') {
                    Some((n, i)) => (n.to_string(), Some(i.to_string())),
                    None => (e.to_string(), None),
                }
            })
            .collect()
    };
    if let Some((n, _)) = list.iter().find(|(_, i)| i.as_deref() == Some(ifname)) {
        return Some(n.clone());
    }
    // Positional: net1 is the first network, net2 the second, ...
    let idx: usize = ifname.strip_prefix("net")?.parse().ok()?;
    list.get(idx.checked_sub(1)?).map(|(n, _)| n.clone())
}

pub(super) fn multus_matches(entry: &str, network: &str, pod_ns: &str) -> bool {
    let full = |s: &str| {
        if s.contains('/') {
            s.to_string()
        } else {
            format!("{pod_ns}/{s}")
        }
    };
    if entry.contains('/') {
        full(network) == entry
    } else {
        network.rsplit('/').next() == Some(entry)
    }
}
