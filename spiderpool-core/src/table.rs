//! Plain aligned tables, as `kubectl get` prints them.

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

/// `kubectl get spiderippool` as Spiderpool prints it:
/// `NAME VERSION SUBNET ALLOCATED-IP-COUNT TOTAL-IP-COUNT DEFAULT DISABLE`.
pub fn ippools(
    pools: &crate::model::PoolSet,
    allocated: &std::collections::BTreeMap<String, u64>,
) -> String {
    let mut rows = vec![[
        "NAME".to_string(),
        "VERSION".into(),
        "SUBNET".into(),
        "ALLOCATED-IP-COUNT".into(),
        "TOTAL-IP-COUNT".into(),
        "DEFAULT".into(),
        "DISABLE".into(),
    ]];
    for p in pools.pools.values() {
        rows.push([
            p.name.clone(),
            p.family.version().to_string(),
            p.subnet.to_string(),
            allocated.get(&p.name).copied().unwrap_or(0).to_string(),
            p.total().count_i64().to_string(),
            p.default.to_string(),
            p.disable.to_string(),
        ]);
    }
    render(&rows)
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
