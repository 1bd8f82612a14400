//! The agent's API: request and response bodies shared by the `spiderpool` CNI plugin (client)
//! and `spiderpool-agent` (server), defined once.
//!
//! Transport: HTTP/1.1 with JSON bodies on the agent's unix socket, so an operator can
//! `curl --unix-socket /var/run/spidernet/spiderpool.sock http://agent/v1/status`.
//!
//! | method and path | body | answer |
//! |---|---|---|
//! | `POST /v1/add` | [`AddRequest`] | 200 [`Allocation`](crate::engine::Allocation) |
//! | `POST /v1/del` | [`DelRequest`] | 200 [`DelResponse`] |
//! | `POST /v1/check` | [`CheckRequest`] | 200 [`Allocation`](crate::engine::Allocation) |
//! | `POST /v1/conflict` | [`ConflictRequest`] | 200 [`Allocation`](crate::engine::Allocation): the address is recorded as in conflict and the ADD served again |
//! | `GET /v1/coordinator` | | 200 the `SpiderCoordinator` `default`'s `spec` (JSON), 404 when the cluster has none |
//! | `POST /v1/gc` | [`GcRequest`] | 200 [`DelResponse`] |
//! | `GET /v1/status` | | 200 [`Status`] when ADD can be served, else 503 [`ApiError`] |
//! | `GET /healthz`, `GET /readyz` | | 200 `ok` / 503 |
//! | `GET /v1/ippools` | | 200 [`Vec<PoolRow>`](PoolRow) |
//! | `GET /v1/subnets` | | 200 [`Vec<SubnetRow>`](SubnetRow) |
//! | `GET /v1/endpoints` | | 200 [`Vec<EndpointRow>`](EndpointRow) |
//!
//! Every failure is an [`ApiError`] with an HTTP status and a [`ErrorKind`], which the CNI plugin
//! maps to a CNI error code once.

use serde::{Deserialize, Serialize};

use crate::engine::Attachment;
use crate::select::CniDefaults;

/// Default path of the agent's socket (Spiderpool's `ipam_unix_socket_path` default).
pub const DEFAULT_SOCKET: &str = "/var/run/spidernet/spiderpool.sock";

/// The pod a CNI call is for, from `CNI_ARGS` (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`,
/// `K8S_POD_UID`). Absent for runtimes that are not Kubernetes (podman, plain containerd).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID (empty when the runtime did not pass one).
    #[serde(default)]
    pub uid: String,
}

/// CNI ADD.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AddRequest {
    /// Container (sandbox) and interface.
    pub attachment: Attachment,
    /// `CNI_NETNS`.
    #[serde(default)]
    pub netns: String,
    /// The pod, when the runtime is Kubernetes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
    /// The network config's `name` and its `ipam` defaults.
    #[serde(default)]
    pub cni: CniDefaults,
}

/// IP conflict detection found another host answering for `address` (at `mac`) before the
/// plugin answered ADD: the agent records the address as in conflict (never handed out) and
/// serves `add` again, with another address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConflictRequest {
    /// The ADD being served.
    pub add: AddRequest,
    /// The address in conflict.
    pub address: std::net::IpAddr,
    /// The hardware address that answered for it.
    pub mac: String,
}

/// CNI DEL: frees what the attachment holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DelRequest {
    /// Container (sandbox) and interface.
    pub attachment: Attachment,
    /// The network config's `name`.
    #[serde(default)]
    pub network: String,
    /// The pod, when the runtime names one (`CNI_ARGS`): frees the records imported from
    /// Spiderpool, which name the pod but no container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
}

/// What a DEL or GC freed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DelResponse {
    /// Addresses released, as text.
    pub released: Vec<String>,
}

/// CNI CHECK.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckRequest {
    /// Container (sandbox) and interface.
    pub attachment: Attachment,
    /// The pod, when the runtime names one (see [`DelRequest::pod`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
}

/// CNI GC (1.1.0): the attachments still valid for one network.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GcRequest {
    /// The network config's `name`.
    pub network: String,
    /// `cni.dev/valid-attachments`.
    pub valid: Vec<Attachment>,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// The node the agent serves.
    pub node: String,
    /// Store backend (`embedded`, `etcd`, `memory`).
    pub store: String,
    /// Pools in the cluster view.
    pub pools: usize,
    /// Where the cluster view comes from (`manifests: ...`, `kubernetes`).
    pub view: String,
    /// The agent's version (empty from agents older than the field).
    #[serde(default)]
    pub version: String,
}

/// One column of a `kubectl get`-style table, the one list both `spiderctl get` and the CRD's
/// printer columns are made from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column {
    /// The header (`ALLOCATED-IP-COUNT`).
    pub header: &'static str,
    /// The field of the row in `spiderctl get -o json` (`allocatedIPCount`).
    pub field: &'static str,
    /// The CRD printer column's jsonPath; empty for `NAME`, which `kubectl` prints itself.
    pub json_path: &'static str,
    /// The printer column's type (`string`, `integer`, `boolean`).
    pub kind: &'static str,
    /// The printer column's description (Spiderpool's).
    pub description: &'static str,
}

const fn col(
    header: &'static str,
    field: &'static str,
    json_path: &'static str,
    kind: &'static str,
    description: &'static str,
) -> Column {
    Column {
        header,
        field,
        json_path,
        kind,
        description,
    }
}

/// `kubectl get spiderippool` as Spiderpool prints it (and `spiderctl get ippools`).
pub const IPPOOL_COLUMNS: &[Column] = &[
    col("NAME", "name", "", "string", "name"),
    col(
        "VERSION",
        "version",
        ".spec.ipVersion",
        "string",
        "ipVersion",
    ),
    col("SUBNET", "subnet", ".spec.subnet", "string", "subnet"),
    col(
        "ALLOCATED-IP-COUNT",
        "allocatedIPCount",
        ".status.allocatedIPCount",
        "integer",
        "allocatedIPCount",
    ),
    col(
        "TOTAL-IP-COUNT",
        "totalIPCount",
        ".status.totalIPCount",
        "integer",
        "totalIPCount",
    ),
    col("DEFAULT", "default", ".spec.default", "boolean", "default"),
    col("DISABLE", "disable", ".spec.disable", "boolean", "disable"),
];

/// `kubectl get spidersubnet` as Spiderpool prints it (and `spiderctl get subnets`): the pool
/// table's first five columns.
pub const SUBNET_COLUMNS: &[Column] = IPPOOL_COLUMNS.split_at(5).0;

/// One row of `spiderctl get ippools` (the seed's columns).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolRow {
    /// Name.
    pub name: String,
    /// 4 or 6.
    pub version: u8,
    /// CIDR.
    pub subnet: String,
    /// Allocated addresses (`allocatedIPCount`, the name `kubectl get -o json` shows; the older
    /// `allocatedIpCount` is read too).
    #[serde(rename = "allocatedIPCount", alias = "allocatedIpCount")]
    pub allocated_ip_count: u64,
    /// `ips` minus `excludeIPs` (`totalIPCount`).
    #[serde(rename = "totalIPCount", alias = "totalIpCount")]
    pub total_ip_count: i64,
    /// `spec.default`.
    pub default: bool,
    /// `spec.disable`.
    pub disable: bool,
}

/// One row of `spiderctl get subnets` (Spiderpool's SpiderSubnet columns).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SubnetRow {
    /// Name.
    pub name: String,
    /// 4 or 6.
    pub version: u8,
    /// CIDR.
    pub subnet: String,
    /// Allocated addresses in the pools of this subnet (`allocatedIPCount`).
    #[serde(rename = "allocatedIPCount", alias = "allocatedIpCount")]
    pub allocated_ip_count: u64,
    /// `ips` minus `excludeIPs` (`totalIPCount`).
    #[serde(rename = "totalIPCount", alias = "totalIpCount")]
    pub total_ip_count: i64,
}

/// One row of `spiderctl get endpoints`: one allocated address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointRow {
    /// `namespace/name` of the pod (empty for a non-Kubernetes container).
    pub pod: String,
    /// Container (sandbox).
    pub container_id: String,
    /// Node.
    pub node: String,
    /// Interface.
    pub interface: String,
    /// Address.
    pub address: String,
    /// Pool.
    pub pool: String,
    /// Network (CNI config `name`).
    pub network: String,
}

/// What went wrong, in the words the CNI plugin maps to error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ErrorKind {
    /// The request itself is malformed (a plugin/agent mismatch).
    BadRequest,
    /// The CNI config or the pod's annotations are invalid.
    InvalidConfig,
    /// No candidate pool may serve the pod (every one ineligible, or none configured).
    NoPool,
    /// Candidates exist but are full.
    Exhausted,
    /// CHECK: nothing is recorded for the attachment.
    NotFound,
    /// The store (or the agent) cannot serve now; retry later.
    Unavailable,
    /// A bug or an unexpected store failure.
    Internal,
}

impl ErrorKind {
    /// The HTTP status the agent answers with.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorKind::BadRequest => 400,
            ErrorKind::InvalidConfig => 422,
            ErrorKind::NoPool | ErrorKind::Exhausted => 409,
            ErrorKind::NotFound => 404,
            ErrorKind::Unavailable => 503,
            ErrorKind::Internal => 500,
        }
    }
}

/// The body of every failed answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "camelCase")]
#[error("{message}")]
pub struct ApiError {
    /// Category.
    pub kind: ErrorKind,
    /// One line a person can act on.
    pub message: String,
    /// More: every candidate pool and why it was skipped, the store's cause, ...
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl ApiError {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            message: message.into(),
            details: String::new(),
        }
    }

    /// With details.
    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }
}

impl From<&crate::engine::EngineError> for ApiError {
    fn from(e: &crate::engine::EngineError) -> Self {
        use crate::engine::EngineError as E;
        match e {
            E::Selection(s @ crate::select::SelectionError::NoSource { .. }) => {
                ApiError::new(ErrorKind::NoPool, s.to_string())
            }
            E::Selection(s) => ApiError::new(ErrorKind::InvalidConfig, s.to_string()),
            E::NoAvailablePool {
                exhausted,
                detail,
                pod,
                ifname,
                family,
            } => {
                let kind = if *exhausted {
                    ErrorKind::Exhausted
                } else {
                    ErrorKind::NoPool
                };
                // The candidates and their reasons once, in `details`: runtimes print
                // "msg; details" (libcni), so repeating them in `msg` showed each reason twice.
                let why = if *exhausted {
                    "the candidate pools are exhausted"
                } else {
                    "no candidate pool is eligible"
                };
                ApiError::new(
                    kind,
                    format!("no IPPool available for {ifname} {family} of pod {pod}: {why}"),
                )
                .with_details(detail.clone())
            }
            E::NotFound { .. } => ApiError::new(ErrorKind::NotFound, e.to_string()),
            E::TooManyConflicts { .. } => ApiError::new(ErrorKind::Unavailable, e.to_string()),
            E::UnroutableRoute { .. } => ApiError::new(ErrorKind::InvalidConfig, e.to_string()),
            E::Store(s) if s.is_retryable() => ApiError::new(ErrorKind::Unavailable, e.to_string()),
            E::Store(_) => ApiError::new(ErrorKind::Internal, e.to_string()),
        }
    }
}
