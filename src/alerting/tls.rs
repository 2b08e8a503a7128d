//! TLS for outgoing HTTPS (Slack, webhooks, Telegram) and SMTP.
//!
//! reqwest and lettre use rustls with the `ring` crypto provider, which
//! builds with a C compiler alone (aws-lc-rs, rustls's default, needs a
//! much heavier native build). reqwest is compiled without a provider of
//! its own, so one must be installed for the process before any
//! `reqwest::Client` is built — building one without it panics. Call
//! [`install_crypto_provider`] (idempotent) first: `Application::build`,
//! the alert channels, the recovery engine and the typed client do.

use std::sync::Once;

/// Installs rustls's `ring` provider as the process default (idempotent).
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Err means another provider was installed first, which serves too.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
