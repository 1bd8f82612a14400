//! `spiderctl`'s subcommands: `validate` and `explain` need no daemon, `get` reads an agent or a
//! store; [`table`] prints what they find as `kubectl get` would.
//!
//! `validate` and `explain` read manifests (multi-document YAML, as `kubectl apply -f` takes them) and work on
//! `spiderpool-core` directly, so an operator can check pools and predict pool selection before
//! anything is applied to a cluster.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

pub mod check;
#[cfg(feature = "kube")]
pub mod migrate;
pub mod table;
#[cfg(feature = "kube")]
pub mod uninstall;

use serde::Serialize;
use spiderpool_core::api::{IPPOOL_COLUMNS, SUBNET_COLUMNS};
use spiderpool_core::select::{self, CniDefaults, NicPlan, SelectionInput};
use spiderpool_core::types::{Namespace, Node, Object, ObjectRef, Pod};
use spiderpool_core::Families;
use spiderpool_core::PoolSet;

/// What `validate` found.
#[derive(Debug, Default)]
pub struct ValidateReport {
    /// One line per problem: `FILE: Kind/name: field: message` (or a document-level error).
    pub errors: Vec<String>,
    /// One line per warning (allowed, but probably not meant), same shape.
    pub warnings: Vec<String>,
    /// Objects read, by kind.
    pub counts: BTreeMap<&'static str, usize>,
}

/// `spiderctl validate`: every object on its own and the whole set across files.
pub fn validate(paths: &[PathBuf]) -> ValidateReport {
    let loaded = crate::view::manifest::load(paths);
    let mut report = ValidateReport {
        errors: loaded.errors,
        ..Default::default()
    };
    let file_of: BTreeMap<ObjectRef, &Path> = loaded
        .objects
        .iter()
        .map(|(p, o)| (o.reference(), p.as_path()))
        .collect();
    for (_, o) in &loaded.objects {
        *report.counts.entry(o.kind()).or_default() += 1;
    }
    let located = |e: &spiderpool_core::ValidationError| {
        let file = file_of
            .get(&e.object)
            .map(|p| format!("{}: ", p.display()))
            .unwrap_or_default();
        format!("{file}{e}")
    };
    match PoolSet::build(loaded.objects.iter().map(|(_, o)| o)) {
        Ok(set) => report.warnings = set.warnings().iter().map(located).collect(),
        Err(errors) => report.errors.extend(errors.iter().map(located)),
    }
    report
}

/// Output format of `explain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// JSON document.
    Json,
    /// Aligned table.
    Table,
}

/// `explain`'s JSON shape.
#[derive(Debug, Serialize)]
pub struct Explanation {
    /// `namespace/name`.
    pub pod: String,
    /// Node name.
    pub node: String,
    /// Per NIC.
    pub nics: Vec<NicPlan>,
    /// The families asked of cluster default pools.
    #[serde(rename = "defaultFamilies")]
    pub default_families: DefaultFamilies,
}

impl Explanation {
    /// Whether every requested family of every NIC has a selected pool.
    pub fn complete(&self) -> bool {
        self.nics.iter().all(|n| {
            [&n.ipv4, &n.ipv6]
                .into_iter()
                .flatten()
                .all(|f| f.selected.is_some())
        })
    }

    /// Renders the explanation as a table.
    pub fn table(&self) -> String {
        let mut rows = vec![[
            "IFNAME".to_string(),
            "FAMILY".into(),
            "POOL".into(),
            "ELIGIBLE".into(),
            "REASON".into(),
        ]];
        for nic in &self.nics {
            for (fam, plan) in [("IPv4", &nic.ipv4), ("IPv6", &nic.ipv6)] {
                let Some(plan) = plan else { continue };
                if plan.candidates.is_empty() {
                    rows.push([
                        nic.ifname.clone(),
                        fam.into(),
                        "<none>".into(),
                        "no".into(),
                        "no candidate pool".into(),
                    ]);
                }
                for c in &plan.candidates {
                    let selected = plan.selected.as_deref() == Some(c.pool.as_str());
                    rows.push([
                        nic.ifname.clone(),
                        fam.into(),
                        c.pool.clone(),
                        if selected {
                            "yes (selected)".into()
                        } else if c.eligible {
                            "yes (backup)".into()
                        } else {
                            "no".into()
                        },
                        c.reason.clone().unwrap_or_default(),
                    ]);
                }
            }
        }
        let mut out = String::new();
        let _ = writeln!(out, "POD {}  NODE {}", self.pod, self.node);
        for nic in &self.nics {
            let _ = writeln!(
                out,
                "{}: source {}{}",
                nic.ifname,
                nic.source,
                if nic.clean_gateway {
                    ", cleangateway"
                } else {
                    ""
                }
            );
            if nic.source == select::Source::ClusterDefault {
                let _ = writeln!(
                    out,
                    "{}: families {} ({})",
                    nic.ifname,
                    self.default_families.label(),
                    self.default_families.from
                );
            }
        }
        out.push_str(&table::render(&rows));
        out
    }
}

/// Inputs of `explain`.
#[derive(Debug, Clone)]
pub struct ExplainArgs {
    /// Manifest files.
    pub manifests: Vec<PathBuf>,
    /// Node name.
    pub node: String,
    /// `namespace/name`.
    pub pod: String,
    /// Interface.
    pub ifname: String,
    /// CNI network config file.
    pub cni_config: Option<PathBuf>,
    /// Families served by cluster default pools; `None`: every family that has a default pool
    /// (IPv4 when none has).
    pub families: Option<Families>,
}

/// Which families cluster default pools serve in an explanation, and where that came from.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DefaultFamilies {
    /// IPv4 served.
    pub ipv4: bool,
    /// IPv6 served.
    pub ipv6: bool,
    /// `--default-families`, `pools with spec.default: true`, or `none given (IPv4 assumed)`.
    pub from: String,
}

impl From<DefaultFamilies> for Families {
    fn from(d: DefaultFamilies) -> Self {
        Families {
            ipv4: d.ipv4,
            ipv6: d.ipv6,
        }
    }
}

impl DefaultFamilies {
    /// `IPv4`, `IPv6` or `IPv4+IPv6`.
    pub fn label(&self) -> &'static str {
        match (self.ipv4, self.ipv6) {
            (true, true) => "IPv4+IPv6",
            (false, true) => "IPv6",
            _ => "IPv4",
        }
    }
}

/// Why `explain` gave no explanation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExplainError {
    /// Unreadable or inconsistent input (files, node, pod, CNI config).
    #[error("{0}")]
    Input(String),
    /// Pool selection failed for the pod (bad annotation, no source of pools).
    #[error("{0}")]
    Selection(String),
}

/// The CNI network configuration's defaults, from a file.
fn read_cni_config(path: &Path) -> Result<CniDefaults, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
    CniDefaults::from_netconf(&v).map_err(|e| format!("{}: {e}", path.display()))
}

/// The families asked of cluster default pools, and why.
fn default_families(asked: Option<Families>, pools: &PoolSet) -> DefaultFamilies {
    match (asked, pools.default_families()) {
        (Some(f), _) => DefaultFamilies {
            ipv4: f.ipv4,
            ipv6: f.ipv6,
            from: "--default-families".into(),
        },
        (None, Some(f)) => DefaultFamilies {
            ipv4: f.ipv4,
            ipv6: f.ipv6,
            from: "pools with spec.default: true".into(),
        },
        (None, None) => DefaultFamilies {
            ipv4: true,
            ipv6: false,
            from: "no pool has spec.default: true; IPv4 assumed".into(),
        },
    }
}

/// `spiderctl explain`: the dry-run pool choice for one pod's NIC.
pub fn explain(args: &ExplainArgs) -> Result<Explanation, ExplainError> {
    explain_inner(args).map_err(ExplainError::Input)?
}

fn explain_inner(args: &ExplainArgs) -> Result<Result<Explanation, ExplainError>, String> {
    let loaded = crate::view::manifest::load(&args.manifests);
    if !loaded.errors.is_empty() {
        return Err(loaded.errors.join("\n"));
    }
    let pools = PoolSet::build(loaded.objects.iter().map(|(_, o)| o)).map_err(|errs| {
        let lines: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        format!(
            "manifests are not valid (fix them, or run spiderctl validate):\n{}",
            lines.join("\n")
        )
    })?;
    let (ns, name) = args
        .pod
        .split_once('/')
        .filter(|(a, b)| !a.is_empty() && !b.is_empty() && !b.contains('/'))
        .ok_or_else(|| format!("--pod '{}' must be NAMESPACE/NAME", args.pod))?;
    let mut node: Option<&Node> = None;
    let mut namespace: Option<&Namespace> = None;
    let mut pod: Option<&Pod> = None;
    for (_, o) in &loaded.objects {
        match o {
            Object::Node(n) if n.metadata.name == args.node => node = Some(n),
            Object::Namespace(n) if n.metadata.name == ns => namespace = Some(n),
            Object::Pod(p)
                if p.metadata.name == name
                    && p.metadata.namespace.as_deref().unwrap_or("default") == ns =>
            {
                pod = Some(p)
            }
            _ => {}
        }
    }
    let node = node.ok_or_else(|| {
        format!(
            "node {} is not in the manifests: add its Node object (kubectl get node {} -o yaml)",
            args.node, args.node
        )
    })?;
    let pod = pod.ok_or_else(|| {
        format!(
            "pod {} is not in the manifests: add its Pod object (kubectl get pod -n {ns} {name} -o yaml)",
            args.pod
        )
    })?;
    let cni = args
        .cni_config
        .as_deref()
        .map(read_cni_config)
        .transpose()?;
    let families = default_families(args.families, &pools);
    let owner = pod
        .metadata
        .owner_references
        .iter()
        .find(|o| o.controller == Some(true))
        .map(|o| o.name.as_str());
    let input = SelectionInput {
        pod_namespace: ns,
        pod_name: name,
        pod_labels: Some(&pod.metadata.labels),
        pod_annotations: Some(&pod.metadata.annotations),
        namespace_labels: namespace.map(|n| &n.metadata.labels),
        namespace_annotations: namespace.map(|n| &n.metadata.annotations),
        node_name: &args.node,
        node_labels: Some(&node.metadata.labels),
        owner_name: owner,
        cni: cni.as_ref(),
        default_families: families.clone().into(),
        auto_pools: None,
    };
    Ok(select::resolve(&pools, &input, &args.ifname)
        .map(|plan| Explanation {
            pod: args.pod.clone(),
            node: args.node.clone(),
            nics: plan.nics,
            default_families: families,
        })
        .map_err(|e| ExplainError::Selection(e.to_string())))
}

/// What `spiderctl get` lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GetWhat {
    /// SpiderIPPools with their counts.
    IpPools,
    /// SpiderSubnets with their counts.
    Subnets,
    /// One line per allocated address.
    Endpoints,
}

/// Where `spiderctl get` reads from.
#[derive(Debug, Clone)]
pub enum GetSource {
    /// A running agent's socket.
    Socket(String),
    /// A store opened directly (the agent must not hold an embedded store open) and manifests.
    Store {
        /// Store spec (`embedded:PATH`, `etcd:URL`, ...).
        spec: String,
        /// Manifests with the pools.
        manifests: Vec<PathBuf>,
    },
}

/// The rows of `spiderctl get`, as JSON values (rendered by [`render_get`]).
pub fn get(what: GetWhat, source: &GetSource) -> Result<serde_json::Value, String> {
    use spiderpool_core::api::{EndpointRow, PoolRow, SubnetRow};
    match source {
        GetSource::Socket(socket) => {
            let path = match what {
                GetWhat::IpPools => "/v1/ippools",
                GetWhat::Subnets => "/v1/subnets",
                GetWhat::Endpoints => "/v1/endpoints",
            };
            spiderpool_cni::client::call::<(), serde_json::Value>(
                socket,
                "GET",
                path,
                None,
                std::time::Duration::from_secs(30),
            )
            .map_err(|e| e.to_string())
        }
        GetSource::Store { spec, manifests } => {
            let loaded = crate::view::manifest::load(manifests);
            if !loaded.errors.is_empty() {
                return Err(loaded.errors.join("\n"));
            }
            let pools = PoolSet::build(loaded.objects.iter().map(|(_, o)| o)).map_err(|e| {
                e.iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            })?;
            let cfg = spiderpool_store::StoreConfig::parse(spec)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let store = spiderpool_store::AnyStore::open(&cfg)
                    .await
                    .map_err(|e| format!("opening {spec}: {e}"))?;
                let v = match what {
                    GetWhat::IpPools => {
                        let rows: Vec<PoolRow> = spiderpool_core::usage::pool_rows(&pools, &store)
                            .await
                            .map_err(|e| e.to_string())?;
                        serde_json::to_value(rows)
                    }
                    GetWhat::Subnets => {
                        let rows = spiderpool_core::usage::pool_rows(&pools, &store)
                            .await
                            .map_err(|e| e.to_string())?;
                        let subnets: Vec<SubnetRow> =
                            spiderpool_core::usage::subnet_rows(&pools, &rows);
                        serde_json::to_value(subnets)
                    }
                    GetWhat::Endpoints => {
                        let rows: Vec<EndpointRow> = spiderpool_core::usage::endpoint_rows(&store)
                            .await
                            .map_err(|e| e.to_string())?;
                        serde_json::to_value(rows)
                    }
                };
                v.map_err(|e| e.to_string())
            })
        }
    }
}

/// Renders `get`'s rows as a `kubectl`-style table.
pub fn render_get(what: GetWhat, rows: &serde_json::Value) -> String {
    let columns = match what {
        GetWhat::IpPools => table::headers(IPPOOL_COLUMNS),
        GetWhat::Subnets => table::headers(SUBNET_COLUMNS),
        GetWhat::Endpoints => vec![
            ("POD", "pod"),
            ("NODE", "node"),
            ("INTERFACE", "interface"),
            ("IP", "address"),
            ("POOL", "pool"),
            ("NETWORK", "network"),
        ],
    };
    table::of_columns(&columns, rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_tables_have_the_seed_columns() {
        let rows = serde_json::json!([{"name": "test-ippool-6", "version": 4, "subnet": "10.6.0.0/16",
            "allocatedIPCount": 1, "totalIPCount": 10, "default": false, "disable": false}]);
        assert_eq!(
            render_get(GetWhat::IpPools, &rows),
            "NAME            VERSION   SUBNET        ALLOCATED-IP-COUNT   TOTAL-IP-COUNT   DEFAULT   DISABLE\n\
             test-ippool-6   4         10.6.0.0/16   1                    10               false     false\n"
        );
        let eps = serde_json::json!([{"pod": "", "containerId": "c1", "node": "n", "interface": "eth0",
            "address": "10.6.0.5", "pool": "p", "network": "net"}]);
        let t = render_get(GetWhat::Endpoints, &eps);
        assert!(
            t.starts_with("POD              NODE   INTERFACE   IP         POOL   NETWORK\n"),
            "{t}"
        );
        assert!(
            t.contains("(container c1)   n      eth0        10.6.0.5   p      net"),
            "{t}"
        );
    }
}
