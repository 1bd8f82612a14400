//! Spiderpool's objects (`spiderpool.spidernet.io/v2beta1`) and the few Kubernetes objects the
//! selection rules read (Node, Namespace, Pod), with the exact JSON field names users write.
//!
//! Addresses and CIDRs stay strings here so that a bad value reaches [`crate::validate`] and gets a
//! message naming the field, instead of failing deserialisation of the whole document.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::range::IpFamily;
use crate::selector::{LabelSelector, Labels};

/// The API group and version of Spiderpool's objects.
pub const API_VERSION: &str = "spiderpool.spidernet.io/v2beta1";

/// The subset of Kubernetes `ObjectMeta` that IPAM reads.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    /// Name.
    #[serde(default)]
    pub name: String,
    /// Namespace (empty for cluster-scoped objects).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// UID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// Labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// When the API server created the object (RFC 3339; orders objects that conflict).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
    /// Set when the object is being deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_timestamp: Option<String>,
    /// Optimistic-concurrency token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    /// Owner references (used for StatefulSet detection and auto-pool naming).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub owner_references: Vec<OwnerReference>,
}

/// A Kubernetes owner reference.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OwnerReference {
    /// Owner's apiVersion.
    #[serde(default)]
    pub api_version: String,
    /// Owner's kind.
    #[serde(default)]
    pub kind: String,
    /// Owner's name.
    #[serde(default)]
    pub name: String,
    /// Owner's uid.
    #[serde(default)]
    pub uid: String,
    /// Whether it is the managing controller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller: Option<bool>,
}

/// A static route of a pool or subnet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Route {
    /// Destination CIDR.
    pub dst: String,
    /// Next hop.
    pub gw: String,
}

/// `SpiderIPPool.spec`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct IpPoolSpec {
    /// 4 or 6; inferred from `subnet` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_version: Option<IpFamily>,
    /// Canonical CIDR.
    #[serde(default)]
    pub subnet: String,
    /// Addresses the pool may hand out (single IPs or `start-end`).
    #[serde(default, rename = "ips", skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
    /// Addresses never handed out.
    #[serde(default, rename = "excludeIPs", skip_serializing_if = "Vec::is_empty")]
    pub exclude_ips: Vec<String>,
    /// Gateway returned with each address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// VLAN id (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<i64>,
    /// Static routes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    /// Pods this pool serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_affinity: Option<LabelSelector>,
    /// Namespaces this pool serves (by label).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_affinity: Option<LabelSelector>,
    /// Namespaces this pool serves (by name); wins over `namespaceAffinity` when non-empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespace_name: Vec<String>,
    /// Nodes this pool serves (by label).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_affinity: Option<LabelSelector>,
    /// Nodes this pool serves (by name); wins over `nodeAffinity` when non-empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_name: Vec<String>,
    /// Multus networks (`ns/name` or `name`) this pool serves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub multus_name: Vec<String>,
    /// Cluster default pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<bool>,
    /// Disabled pools hand out nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disable: Option<bool>,
}

/// `SpiderIPPool.status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct IpPoolStatus {
    /// JSON string: bare IP -> `{"interface":"eth0","pod":"ns/name","podUid":"..."}`.
    #[serde(
        default,
        rename = "allocatedIPs",
        skip_serializing_if = "Option::is_none"
    )]
    pub allocated_ips: Option<String>,
    /// Number of allocated addresses.
    #[serde(
        default,
        rename = "allocatedIPCount",
        skip_serializing_if = "Option::is_none"
    )]
    pub allocated_ip_count: Option<i64>,
    /// ips minus excludeIPs, saturating at i64::MAX.
    #[serde(
        default,
        rename = "totalIPCount",
        skip_serializing_if = "Option::is_none"
    )]
    pub total_ip_count: Option<i64>,
    /// The store revision the counts reflect (written by the Kubernetes store, which replaces
    /// the status only with a newer one; not in Spiderpool's schema).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated_revision: Option<i64>,
    /// `Valid`, `Exhausted` (written by the controller; not in Spiderpool's schema).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A status condition, as `metav1.Condition`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Valid`, `Exhausted`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// One CamelCase word.
    #[serde(default)]
    pub reason: String,
    /// What a person reads.
    #[serde(default)]
    pub message: String,
    /// When `status` last changed (RFC 3339).
    #[serde(default)]
    pub last_transition_time: String,
}

/// A SpiderIPPool.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpiderIpPool {
    /// `spiderpool.spidernet.io/v2beta1`.
    #[serde(default = "api_version")]
    pub api_version: String,
    /// `SpiderIPPool`.
    #[serde(default = "kind_ippool")]
    pub kind: String,
    /// Metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: IpPoolSpec,
    /// Status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<IpPoolStatus>,
}

/// `SpiderSubnet.spec`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct SubnetSpec {
    /// 4 or 6.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_version: Option<IpFamily>,
    /// Canonical CIDR.
    #[serde(default)]
    pub subnet: String,
    /// Addresses.
    #[serde(default, rename = "ips", skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
    /// Excluded addresses.
    #[serde(default, rename = "excludeIPs", skip_serializing_if = "Vec::is_empty")]
    pub exclude_ips: Vec<String>,
    /// Gateway inherited by pools of the same subnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// VLAN id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<i64>,
    /// Routes inherited by pools of the same subnet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
}

/// `SpiderSubnet.status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct SubnetStatus {
    /// JSON string: pool name -> `{ips, application}`.
    #[serde(
        default,
        rename = "controlledIPPools",
        skip_serializing_if = "Option::is_none"
    )]
    pub controlled_ip_pools: Option<String>,
    /// Total addresses.
    #[serde(
        default,
        rename = "totalIPCount",
        skip_serializing_if = "Option::is_none"
    )]
    pub total_ip_count: Option<i64>,
    /// Addresses given to pools.
    #[serde(
        default,
        rename = "allocatedIPCount",
        skip_serializing_if = "Option::is_none"
    )]
    pub allocated_ip_count: Option<i64>,
    /// `Valid` (written by the controller; not in Spiderpool's schema).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A SpiderSubnet.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpiderSubnet {
    /// apiVersion.
    #[serde(default = "api_version")]
    pub api_version: String,
    /// `SpiderSubnet`.
    #[serde(default = "kind_subnet")]
    pub kind: String,
    /// Metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: SubnetSpec,
    /// Status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<SubnetStatus>,
}

/// `SpiderReservedIP.spec`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct ReservedIpSpec {
    /// 4 or 6.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_version: Option<IpFamily>,
    /// Addresses no pool may hand out.
    #[serde(default, rename = "ips")]
    pub ips: Vec<String>,
}

/// A SpiderReservedIP.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpiderReservedIp {
    /// apiVersion.
    #[serde(default = "api_version")]
    pub api_version: String,
    /// `SpiderReservedIP`.
    #[serde(default = "kind_reserved")]
    pub kind: String,
    /// Metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: ReservedIpSpec,
}

/// One NIC's addresses in a SpiderEndpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct EndpointIp {
    /// Interface name.
    pub interface: String,
    /// IPv4 address with prefix length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<String>,
    /// IPv6 address with prefix length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<String>,
    /// Pool of the IPv4 address.
    #[serde(default, rename = "ipv4Pool", skip_serializing_if = "Option::is_none")]
    pub ipv4_pool: Option<String>,
    /// Pool of the IPv6 address.
    #[serde(default, rename = "ipv6Pool", skip_serializing_if = "Option::is_none")]
    pub ipv6_pool: Option<String>,
    /// IPv4 gateway.
    #[serde(
        default,
        rename = "ipv4Gateway",
        skip_serializing_if = "Option::is_none"
    )]
    pub ipv4_gateway: Option<String>,
    /// IPv6 gateway.
    #[serde(
        default,
        rename = "ipv6Gateway",
        skip_serializing_if = "Option::is_none"
    )]
    pub ipv6_gateway: Option<String>,
    /// Whether the default route is suppressed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clean_gateway: Option<bool>,
    /// Routes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    /// VLAN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<i64>,
}

/// `SpiderEndpoint.status.current`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct EndpointCurrent {
    /// Pod UID.
    pub uid: String,
    /// Node.
    pub node: String,
    /// Addresses per NIC.
    #[serde(default)]
    pub ips: Vec<EndpointIp>,
}

/// `SpiderEndpoint.status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct EndpointStatus {
    /// Current allocation.
    pub current: EndpointCurrent,
    /// Owner controller kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_controller_type: Option<String>,
    /// Owner controller name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_controller_name: Option<String>,
}

/// A SpiderEndpoint (one per pod).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpiderEndpoint {
    /// apiVersion.
    #[serde(default = "api_version")]
    pub api_version: String,
    /// `SpiderEndpoint`.
    #[serde(default = "kind_endpoint")]
    pub kind: String,
    /// Metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<EndpointStatus>,
}

/// A Kubernetes Node, as far as IPAM cares.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// Metadata (labels drive `nodeAffinity`).
    #[serde(default)]
    pub metadata: ObjectMeta,
}

/// A Kubernetes Namespace, as far as IPAM cares.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Namespace {
    /// Metadata (labels drive `namespaceAffinity`, annotations give default pools).
    #[serde(default)]
    pub metadata: ObjectMeta,
}

/// `Pod.spec`, as far as IPAM cares.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    /// Node the pod is scheduled to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
}

/// `Pod.status`, as far as IPAM cares.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    /// Pending, Running, Succeeded, Failed, Unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
}

/// A Kubernetes Pod, as far as IPAM cares.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Pod {
    /// Metadata (labels drive `podAffinity`, annotations choose pools).
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: PodSpec,
    /// Status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<PodStatus>,
}

fn api_version() -> String {
    API_VERSION.to_string()
}
fn kind_ippool() -> String {
    "SpiderIPPool".to_string()
}
fn kind_subnet() -> String {
    "SpiderSubnet".to_string()
}
fn kind_reserved() -> String {
    "SpiderReservedIP".to_string()
}
fn kind_endpoint() -> String {
    "SpiderEndpoint".to_string()
}

/// Which object a message is about: its kind (`SpiderIPPool`, ...) and name (`namespace/name`
/// for namespaced objects). Displays as `Kind/name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    /// The object's kind.
    pub kind: &'static str,
    /// Its name (`namespace/name` for namespaced objects).
    pub name: String,
}

impl ObjectRef {
    /// A SpiderIPPool.
    pub fn pool(name: impl Into<String>) -> Self {
        ObjectRef {
            kind: "SpiderIPPool",
            name: name.into(),
        }
    }

    /// A SpiderSubnet.
    pub fn subnet(name: impl Into<String>) -> Self {
        ObjectRef {
            kind: "SpiderSubnet",
            name: name.into(),
        }
    }

    /// A SpiderReservedIP.
    pub fn reserved_ip(name: impl Into<String>) -> Self {
        ObjectRef {
            kind: "SpiderReservedIP",
            name: name.into(),
        }
    }
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

/// One object of a manifest, by `kind`. (Variants differ in size; manifests hold few objects, so
/// boxing would only add indirection.)
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum Object {
    /// SpiderIPPool.
    IpPool(SpiderIpPool),
    /// SpiderSubnet.
    Subnet(SpiderSubnet),
    /// SpiderReservedIP.
    ReservedIp(SpiderReservedIp),
    /// SpiderEndpoint.
    Endpoint(SpiderEndpoint),
    /// Node.
    Node(Node),
    /// Namespace.
    Namespace(Namespace),
    /// Pod.
    Pod(Pod),
}

/// Why a manifest document could not be read as an object.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// No `kind`.
    #[error("document has no 'kind'")]
    NoKind,
    /// A kind this tool does not read.
    #[error("unsupported kind '{0}' (want SpiderIPPool, SpiderSubnet, SpiderReservedIP, SpiderEndpoint, Node, Namespace or Pod)")]
    UnsupportedKind(String),
    /// Field-level decoding error.
    #[error("{kind} '{name}': {source}")]
    Decode {
        /// Kind.
        kind: String,
        /// metadata.name, if readable.
        name: String,
        /// serde's message (names the field).
        #[source]
        source: serde_json::Error,
    },
}

impl Object {
    /// Reads one decoded document (e.g. from YAML or JSON) as an object.
    pub fn from_value(v: serde_json::Value) -> Result<Self, ObjectError> {
        let kind = v
            .get("kind")
            .and_then(|k| k.as_str())
            .ok_or(ObjectError::NoKind)?
            .to_string();
        let name = v
            .pointer("/metadata/name")
            .and_then(|n| n.as_str())
            .unwrap_or("<unnamed>")
            .to_string();
        let wrap = |source| ObjectError::Decode {
            kind: kind.clone(),
            name: name.clone(),
            source,
        };
        Ok(match kind.as_str() {
            "SpiderIPPool" => Object::IpPool(serde_json::from_value(v).map_err(wrap)?),
            "SpiderSubnet" => Object::Subnet(serde_json::from_value(v).map_err(wrap)?),
            "SpiderReservedIP" => Object::ReservedIp(serde_json::from_value(v).map_err(wrap)?),
            "SpiderEndpoint" => Object::Endpoint(serde_json::from_value(v).map_err(wrap)?),
            "Node" => Object::Node(serde_json::from_value(v).map_err(wrap)?),
            "Namespace" => Object::Namespace(serde_json::from_value(v).map_err(wrap)?),
            "Pod" => Object::Pod(serde_json::from_value(v).map_err(wrap)?),
            other => return Err(ObjectError::UnsupportedKind(other.to_string())),
        })
    }

    /// The object's kind and name.
    pub fn reference(&self) -> ObjectRef {
        let kind = match self {
            Object::IpPool(_) => "SpiderIPPool",
            Object::Subnet(_) => "SpiderSubnet",
            Object::ReservedIp(_) => "SpiderReservedIP",
            Object::Endpoint(_) => "SpiderEndpoint",
            Object::Node(_) => "Node",
            Object::Namespace(_) => "Namespace",
            Object::Pod(_) => "Pod",
        };
        let meta = self.metadata();
        let name = match &meta.namespace {
            Some(ns) => format!("{ns}/{}", meta.name),
            None => meta.name.clone(),
        };
        ObjectRef { kind, name }
    }

    /// The object's metadata.
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::IpPool(o) => &o.metadata,
            Object::Subnet(o) => &o.metadata,
            Object::ReservedIp(o) => &o.metadata,
            Object::Endpoint(o) => &o.metadata,
            Object::Node(o) => &o.metadata,
            Object::Namespace(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
        }
    }

    /// The object's kind (`SpiderIPPool`, `Pod`, ...).
    pub fn kind(&self) -> &'static str {
        self.reference().kind
    }

    /// `Kind/name` for messages.
    pub fn describe(&self) -> String {
        self.reference().to_string()
    }
}
