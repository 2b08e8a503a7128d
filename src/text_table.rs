//! Aligned plain-text tables for terminal output.

/// Renders rows (the first is the header) with columns padded to width and
/// a rule under the header. Cells are shown [`for_terminal`].
pub fn render<R: AsRef<[String]>>(rows: &[R]) -> String {
    let rows: Vec<Vec<std::borrow::Cow<'_, str>>> =
        rows.iter().map(|row| row.as_ref().iter().map(|cell| for_terminal(cell)).collect()).collect();
    let Some(header) = rows.first() else { return String::new() };
    let mut widths = vec![0; header.len()];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let text: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(text.join("  ").trim_end());
        out.push('\n');
    };
    line(header.iter().map(|c| c.as_ref()).collect());
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    line(rule.iter().map(String::as_str).collect());
    for row in &rows[1..] {
        line(row.iter().map(|c| c.as_ref()).collect());
    }
    out
}

/// `text` with what a terminal would act on rather than show escaped as
/// Rust does (`\n`, `\u{1b}`): control characters (a line break would
/// break the table; an escape sequence, from a recovery command's output
/// or an agent's event, could rewrite the screen), and the direction
/// embeddings, overrides and isolates and line separators that could make
/// an agent's name turn the words after it around.
pub fn for_terminal(text: &str) -> std::borrow::Cow<'_, str> {
    let hidden = |c: char| c.is_control() || crate::alerting::message::reorders(c);
    if !text.chars().any(hidden) {
        return text.into();
    }
    text.chars()
        .map(|c| if hidden(c) { c.escape_debug().to_string() } else { c.to_string() })
        .collect::<String>()
        .into()
}

#[cfg(test)]
mod tests {
    #[test]
    fn columns_line_up() {
        let rows = vec![vec!["a".to_string(), "bb".into()], vec!["ccc".into(), "d".into()]];
        assert_eq!(super::render(&rows), "a    bb\n---  --\nccc  d\n");
    }

    #[test]
    fn what_a_terminal_would_act_on_is_shown_escaped() {
        let rows =
            vec![vec!["agent".to_string(), "outcome".into()], vec!["db\u{202E}1".into(), "a\nb\u{1b}[2J".into()]];
        assert_eq!(
            super::render(&rows),
            "agent        outcome\n-----------  -------------\ndb\\u{202e}1  a\\nb\\u{1b}[2J\n"
        );
        assert!(matches!(super::for_terminal("plain ü שלום"), std::borrow::Cow::Borrowed(_)));
    }
}
