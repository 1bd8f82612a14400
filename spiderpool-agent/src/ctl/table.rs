//! Plain aligned tables, as `kubectl get` prints them (presentation: `spiderctl` and the
//! examples).

use spiderpool_core::api::{Column, PoolRow, IPPOOL_COLUMNS};

/// Renders rows (the first is the header) with columns padded to their widest cell and separated
/// by three spaces; trailing spaces are trimmed.
pub fn render<const N: usize>(rows: &[[String; N]]) -> String {
    render_rows(rows)
}

/// As [`render`], for rows whose width is known only at run time (rows may be shorter).
pub fn render_rows<R: AsRef<[String]>>(rows: &[R]) -> String {
    let n = rows.iter().map(|r| r.as_ref().len()).max().unwrap_or(0);
    let mut widths = vec![0usize; n];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row.as_ref()) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let row = row.as_ref();
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if i + 1 < row.len() {
                let pad = widths[i] - cell.chars().count() + 3;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Rows of JSON objects as a table of `columns` (header, field).
pub fn of_columns(columns: &[(&str, &str)], rows: &serde_json::Value) -> String {
    let cell = |v: &serde_json::Value, k: &str| match &v[k] {
        serde_json::Value::String(x) if k == "pod" && x.is_empty() => {
            format!("(container {})", v["containerId"].as_str().unwrap_or(""))
        }
        serde_json::Value::String(x) => x.clone(),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    };
    let mut table = vec![columns
        .iter()
        .map(|(h, _)| h.to_string())
        .collect::<Vec<_>>()];
    for r in rows.as_array().into_iter().flatten() {
        table.push(columns.iter().map(|(_, k)| cell(r, k)).collect());
    }
    render_rows(&table)
}

/// `(header, field)` of a column list.
pub fn headers(columns: &[Column]) -> Vec<(&'static str, &'static str)> {
    columns.iter().map(|c| (c.header, c.field)).collect()
}

/// `kubectl get spiderippool` as Spiderpool prints it:
/// `NAME VERSION SUBNET ALLOCATED-IP-COUNT TOTAL-IP-COUNT DEFAULT DISABLE`.
pub fn ippools(rows: &[PoolRow]) -> String {
    of_columns(
        &headers(IPPOOL_COLUMNS),
        &serde_json::to_value(rows).unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn pads_like_kubectl() {
        let rows = [
            ["NAME".to_string(), "VERSION".to_string()],
            ["test-ippool-6".to_string(), "4".to_string()],
        ];
        assert_eq!(
            super::render(&rows),
            "NAME            VERSION\ntest-ippool-6   4\n"
        );
    }
}
