//! Kubernetes `LabelSelector` matching, as `k8s.io/apimachinery/pkg/apis/meta/v1` defines it.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Labels of an object.
pub type Labels = BTreeMap<String, String>;

/// A Kubernetes label selector (`matchLabels` ANDed with `matchExpressions`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
#[serde(rename_all = "camelCase")]
pub struct LabelSelectorRequirement {
    /// Label key.
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist`.
    pub operator: String,
    /// Values for `In` / `NotIn`; must be empty for `Exists` / `DoesNotExist`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
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
        operator: String,
    },
    /// `Exists`/`DoesNotExist` with values.
    #[error("matchExpressions key '{key}': operator {operator} takes no values")]
    UnexpectedValues {
        /// The key.
        key: String,
        /// The operator.
        operator: String,
    },
    /// Empty key.
    #[error("label selector has an empty key")]
    EmptyKey,
}

impl LabelSelector {
    /// A selector with no requirement: Kubernetes reads it as "everything".
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    /// Checks the selector the way the API server would.
    pub fn validate(&self) -> Result<(), SelectorError> {
        if self.match_labels.keys().any(String::is_empty) {
            return Err(SelectorError::EmptyKey);
        }
        for r in &self.match_expressions {
            if r.key.is_empty() {
                return Err(SelectorError::EmptyKey);
            }
            match r.operator.as_str() {
                "In" | "NotIn" if r.values.is_empty() => {
                    return Err(SelectorError::MissingValues {
                        key: r.key.clone(),
                        operator: r.operator.clone(),
                    })
                }
                "Exists" | "DoesNotExist" if !r.values.is_empty() => {
                    return Err(SelectorError::UnexpectedValues {
                        key: r.key.clone(),
                        operator: r.operator.clone(),
                    })
                }
                "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
                _ => {
                    return Err(SelectorError::UnknownOperator {
                        key: r.key.clone(),
                        operator: r.operator.clone(),
                    })
                }
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
            match r.operator.as_str() {
                "In" => got.is_some_and(|v| r.values.contains(v)),
                "NotIn" => got.is_none_or(|v| !r.values.contains(v)),
                "Exists" => got.is_some(),
                _ => got.is_none(), // DoesNotExist (validated above)
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
            parts.push(match r.operator.as_str() {
                "Exists" => r.key.clone(),
                "DoesNotExist" => format!("!{}", r.key),
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
