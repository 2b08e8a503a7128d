//! Aligned plain-text tables for terminal output.

/// Renders rows (the first is the header) with columns padded to width and
/// a rule under the header.
pub fn render<R: AsRef<[String]>>(rows: &[R]) -> String {
    let Some(header) = rows.first() else { return String::new() };
    let columns = header.as_ref().len();
    let mut widths = vec![0; columns];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row.as_ref()) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[String]| {
        let text: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(text.join("  ").trim_end());
        out.push('\n');
    };
    line(header.as_ref());
    line(&widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>());
    for row in &rows[1..] {
        line(row.as_ref());
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn columns_line_up() {
        let rows = vec![vec!["a".to_string(), "bb".into()], vec!["ccc".into(), "d".into()]];
        assert_eq!(super::render(&rows), "a    bb\n---  --\nccc  d\n");
    }
}
