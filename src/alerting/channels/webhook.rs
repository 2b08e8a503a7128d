//! Generic webhooks: the message as JSON, signed so receivers can check it
//! came from warden and reject replays:
//!
//! - `X-Warden-Timestamp`: Unix seconds when it was sent;
//! - `X-Warden-Signature`: `sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>`;
//! - `Idempotency-Key`: the same on every retry of one delivery.

use hmac::{KeyInit, Mac};

use super::{SendError, Sent, post};
use crate::alerting::message::Message;
use crate::config::Secret;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

#[derive(Debug)]
pub struct Webhook {
    http: reqwest::Client,
    url: Secret,
    secret: Secret,
}

impl Webhook {
    pub fn new(http: reqwest::Client, url: Secret, secret: Secret) -> Self {
        Self { http, url, secret }
    }

    pub async fn send(&self, message: &Message) -> Result<Sent, SendError> {
        let body = serde_json::to_vec(&message.to_json()).map_err(|e| SendError::new(e.to_string()))?;
        let timestamp = chrono::Utc::now().timestamp().to_string();
        let mut request = self
            .http
            .post(self.url.expose())
            .header("content-type", "application/json")
            .header("Idempotency-Key", &message.idempotency_key)
            .header("X-Warden-Delivery", message.delivery_id.to_string())
            .header("X-Warden-Timestamp", &timestamp);
        if !self.secret.is_empty() {
            request = request.header("X-Warden-Signature", signature(self.secret.expose(), &timestamp, &body));
        }
        post(request.body(body)).await
    }
}

/// `sha256=<hex>` of HMAC-SHA256(secret, timestamp + "." + body).
pub fn signature(secret: &str, timestamp: &str, body: &[u8]) -> String {
    // HMAC takes keys of any length, so this cannot fail.
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC accepts any key length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut hex = String::with_capacity(7 + digest.len() * 2);
    hex.push_str("sha256=");
    for b in digest.iter() {
        hex.push_str(&format!("{b:02x}"));
    }
    hex
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?",
        // split here into timestamp "what do ya want for nothing" + "." + body "?"
        // would not match, so sign the data as timestamp + "." + body exactly.
        let s = signature("Jefe", "what do ya want for nothing", b"?");
        assert!(s.starts_with("sha256=") && s.len() == 7 + 64, "{s}");
        let mut mac = HmacSha256::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        let rfc: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(rfc, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
        assert_ne!(s, format!("sha256={rfc}"), "the dot between timestamp and body is signed");
        let mut mac = HmacSha256::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing.?");
        let expected: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(s, format!("sha256={expected}"));
        assert_ne!(signature("Jefe", "1", b"{}"), signature("Jefe", "2", b"{}"), "the timestamp is signed");
    }
}
