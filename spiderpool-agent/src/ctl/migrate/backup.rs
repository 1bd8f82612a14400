//! The migration's backup: what Spiderpool had, verbatim, before anything changed, in
//! ConfigMaps no CRD schema prunes. The API server prunes fields a structural schema does not
//! know, also when it reads objects stored under an older schema, so after our CRDs replace
//! Spiderpool's, a field only Spiderpool's schema has is gone from every read; the backup keeps
//! it, with Spiderpool's CRDs and its webhook configurations, for `migrate to-spiderpool`.
//!
//! Layout: `spiderpool-migration-backup-<i>` (chunks of the JSON snapshot) and
//! `spiderpool-migration` (the state: chunk count, checksum, phase), written last, so a backup
//! is complete exactly when the state names it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, PostParams};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The state ConfigMap's name.
pub const STATE: &str = "spiderpool-migration";
/// The label on every ConfigMap of the backup.
pub const LABEL: &str = "spiderpool-rs/migration";
/// Bytes of snapshot per ConfigMap (a ConfigMap holds at most 1 MiB).
const CHUNK: usize = 512 * 1024;

/// What Spiderpool had.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Spiderpool's CRDs of the kinds ours replace.
    pub crds: Vec<Value>,
    /// Objects of those kinds: kind -> objects.
    pub objects: BTreeMap<String, Vec<Value>>,
    /// Spiderpool's webhook configurations (with `kind`).
    pub webhooks: Vec<Value>,
}

/// The migration's state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    /// `backed-up`, `migrated`, `rolled-back`.
    pub phase: String,
    /// Chunks of the backup.
    pub chunks: usize,
    /// FNV-1a of the whole snapshot JSON.
    pub checksum: String,
}

fn api(client: &kube::Client, ns: &str) -> Api<ConfigMap> {
    Api::namespaced(client.clone(), ns)
}

fn chunk_name(i: usize) -> String {
    format!("{STATE}-backup-{i}")
}

fn checksum(bytes: &[u8]) -> String {
    format!("{:016x}", spiderpool_core::fnv1a(bytes.iter().copied()))
}

/// The state, when a complete backup exists.
pub async fn state(client: &kube::Client, ns: &str) -> Result<Option<State>, String> {
    let cm = api(client, ns)
        .get_opt(STATE)
        .await
        .map_err(|e| format!("reading ConfigMap {ns}/{STATE}: {e}"))?;
    Ok(cm.map(|c| {
        let d = c.data.unwrap_or_default();
        State {
            phase: d.get("phase").cloned().unwrap_or_default(),
            chunks: d.get("chunks").and_then(|n| n.parse().ok()).unwrap_or(0),
            checksum: d.get("checksum").cloned().unwrap_or_default(),
        }
    }))
}

/// Reads the backup the state names; refuses one whose checksum does not match.
pub async fn read(client: &kube::Client, ns: &str, st: &State) -> Result<Snapshot, String> {
    let mut json = String::new();
    for i in 0..st.chunks {
        let name = chunk_name(i);
        let cm = api(client, ns)
            .get_opt(&name)
            .await
            .map_err(|e| format!("reading ConfigMap {ns}/{name}: {e}"))?
            .ok_or_else(|| {
                format!("the migration backup is incomplete: ConfigMap {ns}/{name} is missing")
            })?;
        json.push_str(
            cm.data
                .unwrap_or_default()
                .get("snapshot")
                .map(String::as_str)
                .unwrap_or_default(),
        );
    }
    if checksum(json.as_bytes()) != st.checksum {
        return Err(format!(
            "the migration backup in {ns} does not match its checksum: it was edited or is incomplete"
        ));
    }
    serde_json::from_str(&json).map_err(|e| format!("the migration backup does not parse: {e}"))
}

async fn put(
    api: &Api<ConfigMap>,
    name: &str,
    data: BTreeMap<String, String>,
) -> Result<(), String> {
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(BTreeMap::from([(LABEL.to_string(), "backup".to_string())])),
            ..Default::default()
        },
        data: Some(data),
        ..Default::default()
    };
    match api.get_opt(name).await {
        Ok(Some(cur)) => {
            let mut next = cm;
            next.metadata.resource_version = cur.metadata.resource_version;
            api.replace(name, &PostParams::default(), &next)
                .await
                .map(|_| ())
        }
        Ok(None) => api.create(&PostParams::default(), &cm).await.map(|_| ()),
        Err(e) => Err(e),
    }
    .map_err(|e| format!("writing ConfigMap {name}: {e}"))
}

/// Writes `snap` (chunks first, the state last) and returns the state.
pub async fn write(client: &kube::Client, ns: &str, snap: &Snapshot) -> Result<State, String> {
    let json = serde_json::to_string(snap).map_err(|e| e.to_string())?;
    let api = api(client, ns);
    let mut chunks = 0;
    let mut rest = json.as_str();
    while !rest.is_empty() || chunks == 0 {
        let mut cut = rest.len().min(CHUNK);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (head, tail) = rest.split_at(cut);
        put(
            &api,
            &chunk_name(chunks),
            BTreeMap::from([("snapshot".into(), head.to_string())]),
        )
        .await?;
        chunks += 1;
        rest = tail;
    }
    let st = State {
        phase: "backed-up".into(),
        chunks,
        checksum: checksum(json.as_bytes()),
    };
    set_state(client, ns, &st).await?;
    Ok(st)
}

/// Writes the state.
pub async fn set_state(client: &kube::Client, ns: &str, st: &State) -> Result<(), String> {
    put(
        &api(client, ns),
        STATE,
        BTreeMap::from([
            ("phase".into(), st.phase.clone()),
            ("chunks".into(), st.chunks.to_string()),
            ("checksum".into(), st.checksum.clone()),
        ]),
    )
    .await
}
