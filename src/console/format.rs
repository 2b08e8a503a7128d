//! Pure helpers of the console's pages: times and durations in words,
//! numbers, URL pieces, and the geometry of the inline SVG charts. No I/O,
//! `now` is always an argument.

use chrono::{DateTime, Utc};

/// "just now", "12s ago", "5m ago", "3h ago", "2d ago"; a time more than
/// a minute ahead (a scheduled silence) "in 3d 4h", one less (clock skew
/// between database and server) "just now".
pub fn ago(now: DateTime<Utc>, then: DateTime<Utc>) -> String {
    let secs = (now - then).num_seconds();
    if secs < -60 {
        return format!("in {}", span(-secs));
    }
    if secs < 2 {
        return "just now".into();
    }
    format!("{} ago", span(secs))
}

/// The largest one or two units of a span of seconds: "45s", "12m",
/// "3h 5m", "2d 4h". Negative spans read as zero.
pub fn span(secs: i64) -> String {
    let secs = secs.max(0);
    let (d, h, m, s) = (secs / 86_400, secs % 86_400 / 3600, secs % 3600 / 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) if m < 10 && s > 0 => format!("{m}m {s}s"),
        (0, 0, _) => format!("{m}m"),
        (0, _, 0) => format!("{h}h"),
        (0, _, _) => format!("{h}h {m}m"),
        (_, 0, _) => format!("{d}d"),
        _ => format!("{d}d {h}h"),
    }
}

/// "1 alert", "2 alerts": a count with its noun.
pub fn counted(n: i64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// An interval in milliseconds the way settings write it: "500ms", "30s",
/// "15m", "1h 30m".
pub fn interval(ms: i64) -> String {
    if ms < 1000 || ms % 1000 != 0 {
        return if ms < 1000 { format!("{ms}ms") } else { format!("{:.1}s", ms as f64 / 1000.0) };
    }
    span(ms / 1000)
}

/// A UTC timestamp for titles and tables: "2025-03-01 14:02:07 UTC".
pub fn utc(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// A score as a whole number, rounded down, or an em dash when there is
/// none. A tier starts at its lower bound (`health.tiers`), decided on
/// the exact value: 79.6 shown as 80 beside the tier below 80 would
/// contradict it.
pub fn score(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{}", v.floor() as i64),
        _ => "—".into(),
    }
}

/// A percentage for uptime: two decimals, rounded down so that 99.999 is
/// never shown as a perfect 100.
pub fn uptime(pct: f64) -> String {
    if !pct.is_finite() {
        return "—".into();
    }
    let floored = (pct.clamp(0.0, 100.0) * 100.0).floor() / 100.0;
    if floored >= 100.0 { "100%".into() } else { format!("{floored:.2}%") }
}

/// A figure from a formula's inputs: whole numbers without decimals, others
/// with up to four significant decimals, no trailing zeros.
pub fn figure(v: f64) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    if v.fract() == 0.0 && v.abs() < 1e15 {
        return format!("{}", v as i64);
    }
    let text = format!("{v:.4}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// A count with thousands separators: 12,345.
pub fn count(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if n < 0 {
        out.push('-');
    }
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Snake-case words as a phrase: "heartbeat_consistency" → "Heartbeat consistency".
pub fn words(snake: &str) -> String {
    capitalized(&snake.replace('_', " "))
}

/// `text` cut to at most `max` characters, an ellipsis marking the cut.
pub fn at_most(text: &str, max: usize) -> String {
    match text.char_indices().nth(max.saturating_sub(1)) {
        Some((end, _)) if text.chars().count() > max => format!("{}…", &text[..end]),
        _ => text.to_string(),
    }
}

/// The text with its first letter capital, to begin a sentence.
pub fn capitalized(text: &str) -> String {
    let mut out = text.to_string();
    if let Some(first) = out.get(..1) {
        let upper = first.to_ascii_uppercase();
        out.replace_range(..1, &upper);
    }
    out
}

/// Percent-encodes a query value (RFC 3986 unreserved characters stay).
pub fn url_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A query string from pairs, leaving out empty values: `?a=1&b=x%20y`.
pub fn query(pairs: &[(&str, &str)]) -> String {
    let parts: Vec<String> =
        pairs.iter().filter(|(_, v)| !v.is_empty()).map(|(k, v)| format!("{k}={}", url_encode(v))).collect();
    if parts.is_empty() { String::new() } else { format!("?{}", parts.join("&")) }
}

/// `next` after logging in, or where a form goes back to: only a path on
/// this server (`/...`, not `//host` or `/\host`), nothing that could leave it.
pub fn local_path(next: &str) -> Option<&str> {
    let ok = next.starts_with('/')
        && !next.starts_with("//")
        && !next.starts_with("/\\")
        && next.len() <= 2048
        && next.bytes().all(|b| b.is_ascii_graphic());
    ok.then_some(next)
}

/// A user's search text as an ILIKE pattern that matches it literally
/// anywhere: `%`, `_` and `\` are escaped.
pub fn like_pattern(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('%');
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('%');
    out
}

/// One bar of a bar chart, in the chart's own coordinates (y grows down).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bar {
    pub x: f64,
    pub y: f64,
    pub w: f64,
    pub h: f64,
}

/// The scale of a chart of `values`: their maximum, but at least `floor`
/// (so one heartbeat in an otherwise empty hour is not drawn full height,
/// and the expected rate always fits), and never zero.
pub fn scale_max(values: &[f64], floor: f64) -> f64 {
    let top = values.iter().copied().filter(|v| v.is_finite()).fold(0.0_f64, f64::max);
    let top = top.max(if floor.is_finite() { floor } else { 0.0 });
    if top > 0.0 { top } else { 1.0 }
}

/// Bars for `values` across `width` × `height`, one slot each with a gap
/// of a fifth of the slot, scaled to [`scale_max`]. A non-zero value is at
/// least one unit tall so it stays visible; zero is no bar at all.
pub fn bars(values: &[f64], width: f64, height: f64, floor: f64) -> Vec<Bar> {
    if values.is_empty() {
        return Vec::new();
    }
    let max = scale_max(values, floor);
    let slot = width / values.len() as f64;
    let w = slot * 0.8;
    values
        .iter()
        .enumerate()
        .filter(|(_, v)| v.is_finite() && **v > 0.0)
        .map(|(i, v)| {
            let h = (v / max * height).clamp(1.0, height);
            Bar { x: i as f64 * slot + (slot - w) / 2.0, y: height - h, w, h }
        })
        .collect()
}

/// The y coordinate of `value` on a chart of `height` scaled to `max`.
pub fn level_y(value: f64, max: f64, height: f64) -> f64 {
    if max <= 0.0 || !value.is_finite() {
        return height;
    }
    (height - value / max * height).clamp(0.0, height)
}

/// Two decimals at most, for SVG coordinates.
pub fn coord(v: f64) -> String {
    figure((v * 100.0).round() / 100.0)
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + secs, 0).unwrap()
    }

    #[test]
    fn times_read_as_words() {
        assert_eq!(ago(at(0), at(0)), "just now");
        assert_eq!(ago(at(0), at(5)), "just now", "skew: the near future is now");
        assert_eq!(ago(at(0), at(3 * 86_400 + 4 * 3600)), "in 3d 4h", "a scheduled time");
        assert_eq!(ago(at(12), at(0)), "12s ago");
        assert_eq!(ago(at(65), at(0)), "1m 5s ago");
        assert_eq!(ago(at(600), at(0)), "10m ago");
        assert_eq!(ago(at(3 * 3600 + 300), at(0)), "3h 5m ago");
        assert_eq!(ago(at(2 * 86_400), at(0)), "2d ago");
        assert_eq!(span(86_400 + 4 * 3600 + 59), "1d 4h");
        assert_eq!(span(7200), "2h");
        assert_eq!(span(-5), "0s");
    }

    #[test]
    fn counts_take_the_singular_for_one() {
        assert_eq!(counted(0, "alert", "alerts"), "0 alerts");
        assert_eq!(counted(1, "alert", "alerts"), "1 alert");
        assert_eq!(counted(2, "message", "messages"), "2 messages");
    }

    #[test]
    fn intervals_read_like_settings() {
        assert_eq!(interval(100), "100ms");
        assert_eq!(interval(1500), "1.5s");
        assert_eq!(interval(30_000), "30s");
        assert_eq!(interval(900_000), "15m");
        assert_eq!(interval(5_400_000), "1h 30m");
    }

    #[test]
    fn numbers_are_formatted_for_people() {
        assert_eq!(score(Some(87.49)), "87");
        assert_eq!(score(Some(79.6)), "79", "below 80, as its tier says");
        assert_eq!(score(Some(100.0)), "100");
        assert_eq!(score(None), "—");
        assert_eq!(score(Some(f64::NAN)), "—");
        assert_eq!(uptime(100.0), "100%");
        assert_eq!(uptime(99.999), "99.99%", "never rounded up to 100");
        assert_eq!(uptime(50.0), "50.00%");
        assert_eq!(uptime(f64::NAN), "—");
        assert_eq!(figure(3.0), "3");
        assert_eq!(figure(0.12345), "0.1235");
        assert_eq!(figure(0.5), "0.5");
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1000), "1,000");
        assert_eq!(count(-1_234_567), "-1,234,567");
        assert_eq!(words("heartbeat_consistency"), "Heartbeat consistency");
        assert_eq!(words(""), "");
    }

    #[test]
    fn urls_are_encoded_and_next_stays_local() {
        assert_eq!(url_encode("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
        assert_eq!(query(&[("sort", "score"), ("q", ""), ("label", "role:x y")]), "?sort=score&label=role%3Ax%20y");
        assert_eq!(query(&[("q", "")]), "");
        assert_eq!(local_path("/agents/a1?x=1"), Some("/agents/a1?x=1"));
        for bad in ["//evil.example/", "/\\evil.example", "https://evil.example/", "", "/a b", "/a\nb"] {
            assert_eq!(local_path(bad), None, "{bad:?}");
        }
        assert_eq!(like_pattern("50%_a\\b"), "%50\\%\\_a\\\\b%");
    }

    #[test]
    fn sparkline_bars_scale_to_the_larger_of_data_and_floor() {
        let b = bars(&[0.0, 1.0, 2.0, 4.0], 40.0, 20.0, 2.0);
        assert_eq!(b.len(), 3, "zero draws no bar");
        // Slot 10 wide, bar 8 wide, centred.
        assert_eq!(b[0], Bar { x: 11.0, y: 15.0, w: 8.0, h: 5.0 });
        assert_eq!(b[2], Bar { x: 31.0, y: 0.0, w: 8.0, h: 20.0 }, "the maximum is full height");
        // The floor wins over small data: one beat in a minute expecting 2.
        let b = bars(&[1.0], 10.0, 20.0, 2.0);
        assert_eq!(b[0].h, 10.0);
        // Tiny values stay visible.
        let b = bars(&[0.001, 100.0], 20.0, 20.0, 0.0);
        assert_eq!(b[0].h, 1.0);
        assert!(bars(&[], 10.0, 10.0, 1.0).is_empty());
        assert_eq!(scale_max(&[0.0, 0.0], 0.0), 1.0, "never divides by zero");
        assert_eq!(scale_max(&[f64::NAN, 3.0], 0.0), 3.0);
    }

    #[test]
    fn reference_lines_sit_at_their_level() {
        assert_eq!(level_y(2.0, 4.0, 20.0), 10.0);
        assert_eq!(level_y(8.0, 4.0, 20.0), 0.0, "clamped to the top");
        assert_eq!(level_y(1.0, 0.0, 20.0), 20.0);
        assert_eq!(coord(1.23456), "1.23");
        assert_eq!(coord(12.0), "12");
    }
}
