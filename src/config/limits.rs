//! `[limits]`: request rate limits of the HTTP API (per key, and per client
//! address for failed authentication).

use serde::{Deserialize, Serialize};

use super::SettingsError;
use super::sections::{check_float, check_range};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    /// Enforce the limits below.
    pub enabled: bool,
    /// Requests per second one API key may make, sustained.
    pub rate_per_second: f64,
    /// Requests one key may make at once on top of that rate.
    pub burst: u32,
    /// Failed authentications (no key, unknown or revoked key) per second
    /// from one client address.
    pub failed_auth_per_second: f64,
    /// Failed authentications one address may make at once.
    pub failed_auth_burst: u32,
    /// Request header naming the client address when warden is behind a
    /// proxy (`x-forwarded-for`: its last entry; `x-real-ip`); empty: the
    /// connection's peer address.
    pub client_ip_header: String,
    /// Most keys, and most addresses, tracked at once by one replica.
    pub max_tracked: usize,
}

impl LimitSettings {
    pub(super) fn validate(&self) -> Result<(), SettingsError> {
        check_float("limits.rate_per_second", self.rate_per_second, 0.001, 1e9)?;
        check_range("limits.burst", self.burst, 1, 1_000_000_000)?;
        check_float("limits.failed_auth_per_second", self.failed_auth_per_second, 0.001, 1e9)?;
        check_range("limits.failed_auth_burst", self.failed_auth_burst, 1, 1_000_000_000)?;
        check_range("limits.max_tracked", self.max_tracked, 100, 100_000_000)?;
        let header = &self.client_ip_header;
        if !header.is_empty() && axum::http::HeaderName::from_bytes(header.as_bytes()).is_err() {
            return Err(SettingsError::new(
                "limits.client_ip_header",
                header,
                "an HTTP header name like x-forwarded-for or x-real-ip, or empty",
            ));
        }
        Ok(())
    }
}
