//! Kubernetes `LabelSelector` matching, as `k8s.io/apimachinery/pkg/apis/meta/v1` defines it.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Labels of an object.
pub type Labels = BTreeMap<String, String>;

/// A Kubernetes label selector (`matchLabels` ANDed with `matchExpressions`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    /// `key: value` pairs that must all be present.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    /// Expressions that must all hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct LabelSelectorRequirement {
    /// Label key.
    pub key: String,
    /// How the key's value is tested.
    pub operator: Operator,
    /// Values for `In` / `NotIn`; must be empty for `Exists` / `DoesNotExist`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// A `matchExpressions` operator. The closed set of Kubernetes' four, plus the text of anything
/// else, so that one bad operator is one validation error naming it instead of a document that
/// fails to decode.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum Operator {
    /// The label is present with one of the values.
    #[default]
    In,
    /// The label is absent, or present with none of the values.
    NotIn,
    /// The label is present.
    Exists,
    /// The label is absent.
    DoesNotExist,
    /// Not an operator Kubernetes knows (refused by [`LabelSelector::validate`]).
    Unknown(String),
}

#[cfg(feature = "schema")]
impl schemars::JsonSchema for Operator {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Operator".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        // Any string: an unknown operator is refused by validation with a message naming it.
        schemars::json_schema!({"type": "string"})
    }
}

impl Operator {
    /// The operator as written in YAML.
    pub fn as_str(&self) -> &str {
        match self {
            Operator::In => "In",
            Operator::NotIn => "NotIn",
            Operator::Exists => "Exists",
            Operator::DoesNotExist => "DoesNotExist",
            Operator::Unknown(s) => s,
        }
    }

    /// Whether the operator takes values (`In`, `NotIn`).
    pub fn takes_values(&self) -> bool {
        matches!(self, Operator::In | Operator::NotIn)
    }
}

impl From<String> for Operator {
    fn from(s: String) -> Self {
        match s.as_str() {
            "In" => Operator::In,
            "NotIn" => Operator::NotIn,
            "Exists" => Operator::Exists,
            "DoesNotExist" => Operator::DoesNotExist,
            _ => Operator::Unknown(s),
        }
    }
}

impl From<&str> for Operator {
    fn from(s: &str) -> Self {
        Operator::from(s.to_string())
    }
}

impl From<Operator> for String {
    fn from(o: Operator) -> Self {
        o.as_str().to_string()
    }
}

impl fmt::Display for Operator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A selector that Kubernetes would refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// Operator not one of the four.
    #[error("matchExpressions key '{key}': unknown operator '{operator}' (want In, NotIn, Exists or DoesNotExist)")]
    UnknownOperator {
        /// The key.
        key: String,
        /// The operator given.
        operator: String,
    },
    /// `In`/`NotIn` without values.
    #[error("matchExpressions key '{key}': operator {operator} needs at least one value")]
    MissingValues {
        /// The key.
        key: String,
        /// The operator.
        operator: Operator,
    },
    /// `Exists`/`DoesNotExist` with values.
    #[error("matchExpressions key '{key}': operator {operator} takes no values")]
    UnexpectedValues {
        /// The key.
        key: String,
        /// The operator.
        operator: Operator,
    },
    /// Empty key.
    #[error("label selector has an empty key")]
    EmptyKey,
    /// A key Kubernetes refuses.
    #[error("invalid label key '{key}': {reason}")]
    InvalidKey {
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A value Kubernetes refuses.
    #[error("invalid label value '{value}' for key '{key}': {reason}")]
    InvalidValue {
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// What is wrong.
        reason: String,
    },
}

/// The name part of a label key, and a label value: at most 63 characters, alphanumeric at both
/// ends, `-`, `_`, `.` inside. (Values may also be empty; the caller decides.)
fn check_label_name(s: &str) -> Result<(), String> {
    if s.len() > 63 {
        return Err(format!("must be at most 63 characters (has {})", s.len()));
    }
    let ok_end = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !ok_end(s.chars().next()) || !ok_end(s.chars().last()) {
        return Err("must begin and end with a letter or digit".into());
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "'{c}' is not allowed (letters, digits, '-', '_' and '.' only)"
        ));
    }
    Ok(())
}

/// A DNS-1123 subdomain: the optional prefix of a label key.
fn check_dns_subdomain(s: &str) -> Result<(), String> {
    if s.len() > 253 {
        return Err(format!(
            "prefix must be at most 253 characters (has {})",
            s.len()
        ));
    }
    for part in s.split('.') {
        let ok_end =
            |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if !ok_end(part.chars().next()) || !ok_end(part.chars().last()) {
            return Err(format!(
                "prefix '{s}' must be a DNS subdomain (lower-case letters, digits, '-' and '.', each part beginning and ending with a letter or digit)"
            ));
        }
        if part
            .chars()
            .any(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'))
        {
            return Err(format!(
                "prefix '{s}' must be a DNS subdomain (lower-case letters, digits, '-' and '.')"
            ));
        }
    }
    Ok(())
}

/// Checks a label key as the API server does: `[prefix/]name`.
pub fn validate_label_key(key: &str) -> Result<(), SelectorError> {
    if key.is_empty() {
        return Err(SelectorError::EmptyKey);
    }
    let invalid = |reason: String| SelectorError::InvalidKey {
        key: key.to_string(),
        reason,
    };
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        check_dns_subdomain(p).map_err(invalid)?;
    }
    check_label_name(name).map_err(|r| invalid(format!("name part {r}")))
}

/// Checks a label value as the API server does (empty is allowed).
pub fn validate_label_value(key: &str, value: &str) -> Result<(), SelectorError> {
    if value.is_empty() {
        return Ok(());
    }
    check_label_name(value).map_err(|reason| SelectorError::InvalidValue {
        key: key.to_string(),
        value: value.to_string(),
        reason,
    })
}

impl LabelSelector {
    /// A selector with no requirement: Kubernetes reads it as "everything".
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    /// Checks the selector the way the API server would: keys, values and operators.
    pub fn validate(&self) -> Result<(), SelectorError> {
        for (k, v) in &self.match_labels {
            validate_label_key(k)?;
            validate_label_value(k, v)?;
        }
        for r in &self.match_expressions {
            validate_label_key(&r.key)?;
            match &r.operator {
                Operator::Unknown(op) => {
                    return Err(SelectorError::UnknownOperator {
                        key: r.key.clone(),
                        operator: op.clone(),
                    })
                }
                op if op.takes_values() && r.values.is_empty() => {
                    return Err(SelectorError::MissingValues {
                        key: r.key.clone(),
                        operator: op.clone(),
                    })
                }
                op if !op.takes_values() && !r.values.is_empty() => {
                    return Err(SelectorError::UnexpectedValues {
                        key: r.key.clone(),
                        operator: op.clone(),
                    })
                }
                _ => {}
            }
            for v in &r.values {
                validate_label_value(&r.key, v)?;
            }
        }
        Ok(())
    }

    /// Whether `labels` satisfy every requirement. An invalid selector matches nothing and says why.
    pub fn matches(&self, labels: &Labels) -> Result<bool, SelectorError> {
        self.validate()?;
        let labels_ok = self
            .match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v));
        let exprs_ok = self.match_expressions.iter().all(|r| {
            let got = labels.get(&r.key);
            match r.operator {
                Operator::In => got.is_some_and(|v| r.values.contains(v)),
                Operator::NotIn => got.is_none_or(|v| !r.values.contains(v)),
                Operator::Exists => got.is_some(),
                Operator::DoesNotExist => got.is_none(),
                Operator::Unknown(_) => false, // refused by validate above
            }
        });
        Ok(labels_ok && exprs_ok)
    }
}

impl fmt::Display for LabelSelector {
    /// Prints the selector the way `kubectl` shows one: `a=b,key In [x y],!gone`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = self
            .match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for r in &self.match_expressions {
            parts.push(match &r.operator {
                Operator::Exists => r.key.clone(),
                Operator::DoesNotExist => format!("!{}", r.key),
                op => format!("{} {} [{}]", r.key, op, r.values.join(" ")),
            });
        }
        if parts.is_empty() {
            f.write_str("<everything>")
        } else {
            f.write_str(&parts.join(","))
        }
    }
}

/// Prints labels as `{a=b,c=d}` for error messages.
pub fn format_labels(labels: &Labels) -> String {
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{{{}}}", inner.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }

    fn sel(exprs: Vec<LabelSelectorRequirement>) -> LabelSelector {
        LabelSelector {
            match_labels: BTreeMap::new(),
            match_expressions: exprs,
        }
    }

    #[test]
    fn empty_selector_matches_everything() {
        assert_eq!(LabelSelector::default().matches(&labels(&[])), Ok(true));
        assert_eq!(
            LabelSelector::default().matches(&labels(&[("a", "b")])),
            Ok(true)
        );
    }

    #[test]
    fn operators_follow_kubernetes() {
        let l = labels(&[("node-subnet", "subnet-6"), ("rack", "r1")]);
        let cases = [
            (expr("node-subnet", "In", &["subnet-6"]), true),
            (expr("node-subnet", "In", &["subnet-7"]), false),
            (expr("missing", "In", &["x"]), false),
            (expr("node-subnet", "NotIn", &["subnet-7"]), true),
            (expr("node-subnet", "NotIn", &["subnet-6"]), false),
            // NotIn matches objects that lack the label, as in Kubernetes.
            (expr("missing", "NotIn", &["x"]), true),
            (expr("rack", "Exists", &[]), true),
            (expr("missing", "Exists", &[]), false),
            (expr("missing", "DoesNotExist", &[]), true),
            (expr("rack", "DoesNotExist", &[]), false),
        ];
        for (e, want) in cases {
            let s = sel(vec![e.clone()]);
            assert_eq!(s.matches(&l), Ok(want), "{e:?}");
        }
    }

    #[test]
    fn match_labels_and_expressions_are_anded() {
        let mut s = sel(vec![expr("rack", "Exists", &[])]);
        s.match_labels
            .insert("node-subnet".into(), "subnet-6".into());
        assert_eq!(
            s.matches(&labels(&[("node-subnet", "subnet-6"), ("rack", "1")])),
            Ok(true)
        );
        assert_eq!(
            s.matches(&labels(&[("node-subnet", "subnet-6")])),
            Ok(false)
        );
        assert_eq!(s.matches(&labels(&[("rack", "1")])), Ok(false));
    }

    #[test]
    fn invalid_selectors_are_errors() {
        assert!(matches!(
            sel(vec![expr("a", "In", &[])]).matches(&labels(&[])),
            Err(SelectorError::MissingValues { .. })
        ));
        assert!(matches!(
            sel(vec![expr("a", "Exists", &["x"])]).matches(&labels(&[])),
            Err(SelectorError::UnexpectedValues { .. })
        ));
        assert!(matches!(
            sel(vec![expr("a", "Gt", &["1"])]).matches(&labels(&[])),
            Err(SelectorError::UnknownOperator { .. })
        ));
    }

    #[test]
    fn keys_and_values_are_checked_as_kubernetes_does() {
        let bad_values = [".starts.with.dot", "ends-", "has space", &"v".repeat(64)];
        for v in bad_values {
            let mut s = sel(vec![]);
            s.match_labels.insert("k".into(), v.to_string());
            assert!(
                matches!(s.validate(), Err(SelectorError::InvalidValue { .. })),
                "matchLabels value {v:?} accepted"
            );
            let s = sel(vec![expr("k", "In", &["ok", v])]);
            assert!(
                matches!(s.validate(), Err(SelectorError::InvalidValue { .. })),
                "In value {v:?} accepted"
            );
        }
        let bad_keys = [
            "-k",
            "k_",
            "Example.com/k",
            "a/b/c",
            "/k",
            "example.com/",
            &"k".repeat(64),
        ];
        for k in bad_keys {
            let s = sel(vec![expr(k, "Exists", &[])]);
            assert!(
                matches!(
                    s.validate(),
                    Err(SelectorError::InvalidKey { .. } | SelectorError::EmptyKey)
                ),
                "key {k:?} accepted"
            );
        }
        let mut good = sel(vec![
            expr("topology.kubernetes.io/zone", "In", &["zone-a", "a.b_c"]),
            expr("kubernetes.io/hostname", "Exists", &[]),
        ]);
        good.match_labels
            .insert("node-subnet".into(), "subnet-6".into());
        good.match_labels
            .insert("empty-value".into(), String::new());
        good.match_labels
            .insert(format!("x/{}", "k".repeat(63)), "v".repeat(63));
        assert_eq!(good.validate(), Ok(()));
        let e = sel(vec![expr("k", "In", &[".starts.with.dot"])])
            .validate()
            .expect_err("refused");
        assert_eq!(
            e.to_string(),
            "invalid label value '.starts.with.dot' for key 'k': must begin and end with a letter or digit"
        );
    }

    #[test]
    fn operators_round_trip_through_yaml_and_unknown_ones_keep_their_text() {
        let r: LabelSelectorRequirement =
            serde_yaml_ng::from_str("{key: a, operator: Gt, values: ['1']}").expect("decodes");
        assert_eq!(r.operator, Operator::Unknown("Gt".into()));
        let r: LabelSelectorRequirement =
            serde_yaml_ng::from_str("{key: a, operator: NotIn, values: [x]}").expect("decodes");
        assert_eq!(r.operator, Operator::NotIn);
        assert_eq!(
            serde_json::to_string(&r).expect("json"),
            r#"{"key":"a","operator":"NotIn","values":["x"]}"#
        );
    }

    #[test]
    fn displays_like_kubectl() {
        let mut s = sel(vec![
            expr("node-subnet", "In", &["subnet-6", "subnet-7"]),
            expr("gone", "DoesNotExist", &[]),
        ]);
        s.match_labels.insert("a".into(), "b".into());
        assert_eq!(
            s.to_string(),
            "a=b,node-subnet In [subnet-6 subnet-7],!gone"
        );
    }
}
