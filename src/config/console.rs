//! `[console]`: the web console at `/` and the public status page at
//! `/status` (see docs/console.md).
//!
//! Everything on the status page comes from here or from group-level
//! figures, so the settings that reach HTML or CSS are checked strictly:
//! colours are hex only (they are written into a stylesheet), the logo is
//! an https:// address or a path on this server.

use serde::{Deserialize, Serialize};

use super::sections::{check_max, check_min, check_range};
use super::{Duration, SettingsError};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleSettings {
    /// Serve the console at `/` (login with an API key).
    pub enabled: bool,
    /// How long a console login lasts.
    pub session_ttl: Duration,
    /// Mark the session cookie `Secure` (HTTPS only), with the `__Host-` prefix.
    pub secure_cookie: bool,
    /// Serve the public status page at `/status`, without a key.
    pub public_status: bool,
    /// Agent label whose values are the status page's groups.
    pub status_group_label: String,
    /// Group name for agents without that label; empty leaves them out.
    pub status_ungrouped: String,
    /// The groups the page may show; empty shows every value agents give.
    pub status_groups: Vec<String>,
    /// Heading of the status page.
    pub status_title: String,
    /// Logo shown on the status page: an https:// address or a /path; empty for none.
    pub status_logo: String,
    /// Colours of the status page (`#rgb` or `#rrggbb`).
    pub status_accent: String,
    pub status_up: String,
    pub status_degraded: String,
    pub status_down: String,
    /// Days of history behind the uptime figures and bars.
    pub status_uptime_days: u32,
    /// How long a computed status page is reused (it is public, so it is cached).
    pub status_cache: Duration,
}

/// Whether `text` is a CSS hex colour: `#rgb` or `#rrggbb`.
pub fn is_hex_colour(text: &str) -> bool {
    text.strip_prefix('#').is_some_and(|hex| matches!(hex.len(), 3 | 6) && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Whether `text` may be used as the logo's address: https://host/..., or a
/// path on this server. No quotes, spaces or angle brackets either way.
pub fn is_logo_address(text: &str) -> bool {
    let clean = !text.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control() || b"\"'<>\\`".contains(&b));
    let https = text.strip_prefix("https://").is_some_and(|rest| logo_origin_host(rest).is_some());
    let path = text.starts_with('/') && !text.starts_with("//");
    clean && (https || path)
}

/// The `host[:port]` an https:// logo address starts with, if it is plain
/// (letters, digits, dots, dashes, an optional port): it goes into the
/// status page's Content-Security-Policy.
fn logo_origin_host(rest: &str) -> Option<&str> {
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    let (name, port) = host.split_once(':').unwrap_or((host, ""));
    let name_ok = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    let port_ok =
        port.bytes().all(|b| b.is_ascii_digit()) && port.len() <= 5 && (port.is_empty() != host.contains(':'));
    (name_ok && port_ok).then_some(host)
}

impl ConsoleSettings {
    /// Whether the status page may show the group `name`: any when
    /// `status_groups` is empty, else only those listed and the catch-all.
    pub fn status_group_shown(&self, name: &str) -> bool {
        self.status_groups.is_empty()
            || name == self.status_ungrouped.trim()
            || self.status_groups.iter().any(|g| g.trim() == name)
    }

    /// The origin (`https://host[:port]`) of an https:// logo, for the
    /// status page's `img-src`; `None` for no logo or a local path.
    pub fn status_logo_origin(&self) -> Option<String> {
        let rest = self.status_logo.strip_prefix("https://")?;
        logo_origin_host(rest).map(|host| format!("https://{host}"))
    }

    pub(super) fn validate(&self) -> Result<(), SettingsError> {
        check_min("console.session_ttl", self.session_ttl, Duration::from_secs(60))?;
        check_max("console.session_ttl", self.session_ttl, Duration::from_secs(30 * 86_400))?;
        let label = self.status_group_label.trim();
        if label.is_empty() || label.len() > 128 {
            return Err(SettingsError::new("console.status_group_label", label, "a label name of 1-128 characters"));
        }
        if self.status_ungrouped.chars().count() > 128 {
            return Err(SettingsError::new(
                "console.status_ungrouped",
                &self.status_ungrouped,
                "at most 128 characters",
            ));
        }
        for (i, group) in self.status_groups.iter().enumerate() {
            let n = group.trim().chars().count();
            if n == 0 || n > 128 || group.chars().any(char::is_control) {
                return Err(SettingsError::new(
                    &format!("console.status_groups[{i}]"),
                    group,
                    "a group name of 1-128 characters",
                ));
            }
        }
        let title = self.status_title.trim();
        if title.is_empty() || title.chars().count() > 200 {
            return Err(SettingsError::new("console.status_title", title, "a title of 1-200 characters"));
        }
        if !self.status_logo.is_empty() && !is_logo_address(&self.status_logo) {
            return Err(SettingsError::new(
                "console.status_logo",
                &self.status_logo,
                "empty, an https:// address, or a path on this server starting with /",
            ));
        }
        for (key, value) in [
            ("console.status_accent", &self.status_accent),
            ("console.status_up", &self.status_up),
            ("console.status_degraded", &self.status_degraded),
            ("console.status_down", &self.status_down),
        ] {
            if !is_hex_colour(value) {
                return Err(SettingsError::new(key, value, "a hex colour like #1a7f37 or #c00"));
            }
        }
        check_range("console.status_uptime_days", self.status_uptime_days, 1, 366)?;
        check_max("console.status_cache", self.status_cache, Duration::from_secs(3600))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_are_hex_only() {
        for good in ["#fff", "#1A7f37", "#000000"] {
            assert!(is_hex_colour(good), "{good}");
        }
        for bad in ["fff", "#ffff", "red", "#12345g", "#fff;}body{", ""] {
            assert!(!is_hex_colour(bad), "{bad}");
        }
    }

    #[test]
    fn logos_are_https_or_local_paths() {
        for good in ["https://example.com/logo.svg", "/static/logo.png"] {
            assert!(is_logo_address(good), "{good}");
        }
        for bad in [
            "http://example.com/logo.png",
            "javascript:alert(1)",
            "//evil.example/x.png",
            "https://",
            "https://user@host/x",
            "/a\"onload=\"x",
            "/a b",
            "data:image/png;base64,AAAA",
            "https://a;script-src *",
            "https://host:/x",
            "https://a;b/x",
        ] {
            assert!(!is_logo_address(bad), "{bad}");
        }
    }

    #[test]
    fn the_logo_origin_is_its_scheme_host_and_port() {
        let mut c: ConsoleSettings = crate::config::Settings::defaults().console;
        assert_eq!(c.status_logo_origin(), None);
        c.status_logo = "https://cdn.example.com:8443/img/logo.svg?v=2".into();
        assert_eq!(c.status_logo_origin().as_deref(), Some("https://cdn.example.com:8443"));
        c.status_logo = "/logo.svg".into();
        assert_eq!(c.status_logo_origin(), None);
    }
}
