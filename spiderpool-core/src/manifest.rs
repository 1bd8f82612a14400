//! Multi-document YAML (or JSON) manifests, as `kubectl apply -f` reads them, into [`Object`]s.
//! Pure string parsing: callers read the files.

use serde::Deserialize;

use crate::model::PoolSet;
use crate::types::{Object, ObjectError};

/// One document of a manifest.
#[derive(Debug)]
pub struct Document {
    /// 1-based position in the stream (after `kind: List` expansion).
    pub index: usize,
    /// The object, or why it could not be read.
    pub object: Result<Object, ObjectError>,
}

/// The text is not YAML at all.
#[derive(Debug, thiserror::Error)]
#[error("document {index}: not valid YAML: {source}")]
pub struct ManifestError {
    /// 1-based document index.
    pub index: usize,
    /// Parser error (with line and column).
    #[source]
    pub source: serde_yaml_ng::Error,
}

/// Splits a YAML stream into objects. Empty documents are skipped; `kind: List` is expanded.
pub fn parse_documents(text: &str) -> Result<Vec<Document>, ManifestError> {
    let mut out = Vec::new();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = serde_json::Value::deserialize(de).map_err(|source| ManifestError {
            index: i + 1,
            source,
        })?;
        push_value(value, &mut out);
    }
    Ok(out)
}

/// Reads a manifest and checks it as a whole: the [`PoolSet`] of its pools, subnets and reserved
/// IPs, or every problem found (YAML, decoding, validation), one line each.
pub fn pool_set(text: &str) -> Result<PoolSet, Vec<String>> {
    let docs = parse_documents(text).map_err(|e| vec![e.to_string()])?;
    let mut objects = Vec::with_capacity(docs.len());
    let mut problems = Vec::new();
    for d in docs {
        match d.object {
            Ok(o) => objects.push(o),
            Err(e) => problems.push(format!("document {}: {e}", d.index)),
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    PoolSet::build(&objects).map_err(|errs| errs.iter().map(|e| e.to_string()).collect())
}

fn push_value(value: serde_json::Value, out: &mut Vec<Document>) {
    match value {
        serde_json::Value::Null => {}
        serde_json::Value::Object(ref m)
            if m.get("kind").and_then(|k| k.as_str()) == Some("List")
                || m.get("kind")
                    .and_then(|k| k.as_str())
                    .is_some_and(|k| k.ends_with("List") && m.contains_key("items")) =>
        {
            if let Some(serde_json::Value::Array(items)) = m.get("items") {
                for item in items.clone() {
                    push_value(item, out);
                }
            }
        }
        v => out.push(Document {
            index: out.len() + 1,
            object: Object::from_value(v),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_seed_pools_and_lists() {
        let text = r#"
apiVersion: spiderpool.spidernet.io/v2beta1
kind: SpiderIPPool
metadata:
  name: test-ippool-6
spec:
  subnet: 10.6.0.0/16
  ips:
    - 10.6.168.60-10.6.168.69
  gateway: 10.6.0.1
  nodeAffinity:
    matchExpressions:
    - {key: node-subnet, operator: In, values: [subnet-6]}
---
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Node
  metadata: {name: n1, labels: {node-subnet: subnet-6}}
"#;
        let docs = parse_documents(text).expect("yaml");
        assert_eq!(docs.len(), 2);
        match &docs[0].object {
            Ok(Object::IpPool(p)) => {
                assert_eq!(p.spec.ips, vec!["10.6.168.60-10.6.168.69"]);
                let na = p.spec.node_affinity.as_ref().expect("affinity");
                assert_eq!(na.match_expressions[0].values, vec!["subnet-6"]);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(docs[1].object, Ok(Object::Node(_))));
    }

    #[test]
    fn field_errors_name_the_object() {
        let docs = parse_documents("kind: SpiderIPPool\nmetadata: {name: p}\nspec: {ips: 5}\n")
            .expect("yaml");
        let err = docs[0].object.as_ref().expect_err("bad ips").to_string();
        assert!(err.starts_with("SpiderIPPool 'p':"), "{err}");
        assert!(parse_documents("a: [").is_err());
        let docs = parse_documents("kind: Deployment\n").expect("yaml");
        assert!(docs[0].object.is_err());
        let problems =
            pool_set("kind: SpiderIPPool\nmetadata: {name: p}\nspec: {subnet: 10.6.0.1/16}\n")
                .expect_err("unformatted subnet");
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].contains("please change it to 10.6.0.0/16"),
            "{problems:?}"
        );
    }
}
