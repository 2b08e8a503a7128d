//! Slack incoming webhooks: a Block Kit message (header, one section per
//! alert, the acknowledgement instructions) with the plain-text rendering
//! as the `text` fallback that notifications and old clients show.

use serde_json::{Value, json};

use super::{SendError, Sent, post};
use crate::alerting::message::{DETAILED, Message};
use crate::config::Secret;

#[derive(Debug)]
pub struct Slack {
    http: reqwest::Client,
    webhook_url: Secret,
}

impl Slack {
    pub fn new(http: reqwest::Client, webhook_url: Secret) -> Self {
        Self { http, webhook_url }
    }

    pub async fn send(&self, message: &Message) -> Result<Sent, SendError> {
        let request = self
            .http
            .post(self.webhook_url.expose())
            .header("Idempotency-Key", &message.idempotency_key)
            .json(&payload(message));
        post(request).await
    }
}

/// Slack's mrkdwn needs only these three escaped. Every mrkdwn object is
/// also `verbatim`: Slack would otherwise turn a URL or a channel name in
/// an agent's name into a link, and parse some mentions in it.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The webhook body.
pub fn payload(m: &Message) -> Value {
    let mut headline = m.headline();
    if headline.chars().count() > 150 {
        headline = headline.chars().take(149).collect::<String>() + "…";
    }
    let mut blocks = vec![json!({"type": "header", "text": {"type": "plain_text", "text": headline}})];
    if let Some(n) = m.auto_recovered() {
        blocks.push(json!({"type": "section", "text": {"type": "mrkdwn", "verbatim": true,
            "text": format!("Automated recovery fixed it on attempt {n}; nobody needs to act.")}}));
    }
    if m.recovery_failed() {
        blocks.push(json!({"type": "section", "text": {"type": "mrkdwn", "verbatim": true,
            "text": "*Automated recovery gave up*; a person needs to look."}}));
    }
    for alert in m.alerts.iter().take(DETAILED) {
        let lines = m.detail_lines(alert);
        let mut text = String::new();
        for (i, line) in lines.iter().enumerate() {
            if i == 0 {
                text.push_str(&format!("*{}*", escape(line)));
            } else {
                text.push('\n');
                text.push_str(&escape(line));
            }
        }
        let text: String = text.chars().take(2900).collect();
        blocks.push(json!({"type": "section", "text": {"type": "mrkdwn", "verbatim": true, "text": text}}));
    }
    if m.alerts.len() > DETAILED {
        blocks.push(json!({"type": "context", "elements": [{"type": "mrkdwn", "verbatim": true,
            "text": format!("… and {} more alerts", m.alerts.len() - DETAILED)}]}));
    }
    if let Some(hint) = m.ack_hint() {
        blocks.push(
            json!({"type": "context", "elements": [{"type": "mrkdwn", "verbatim": true, "text": escape(&hint)}]}),
        );
    }
    // Slack reads the top-level text as mrkdwn too (it is what
    // notifications show): an agent's name must not become <!channel> or a
    // disguised link there either.
    json!({"text": escape(&m.text()), "blocks": blocks})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerting::message::tests::{message, view};

    #[test]
    fn the_payload_is_block_kit_with_a_text_fallback() {
        let p = payload(&message(vec![view(12, "w1")]));
        assert!(p["text"].as_str().unwrap().contains("warden alerts ack 12"));
        let blocks = p["blocks"].as_array().unwrap();
        assert_eq!(blocks[0]["type"], "header");
        assert!(blocks[0]["text"]["text"].as_str().unwrap().starts_with("[FIRING CRITICAL] w1"));
        assert!(blocks[1]["text"]["text"].as_str().unwrap().contains("*Alert #12 · w1"));
        assert_eq!(blocks.last().unwrap()["type"], "context");
    }

    #[test]
    fn mrkdwn_control_characters_are_escaped() {
        assert_eq!(escape("a<b>&c"), "a&lt;b&gt;&amp;c");
    }

    #[test]
    fn every_mrkdwn_object_is_verbatim() {
        let mut many: Vec<_> = (1..=8).map(|i| view(i, &format!("w{i}"))).collect();
        many[0].agent_name = Some("https://evil.example #general".into());
        let p = payload(&message(many));
        fn walk(v: &Value, found: &mut usize) {
            match v {
                Value::Object(o) => {
                    if o.get("type") == Some(&Value::from("mrkdwn")) {
                        assert_eq!(o.get("verbatim"), Some(&Value::Bool(true)), "{v}");
                        *found += 1;
                    }
                    o.values().for_each(|v| walk(v, found));
                }
                Value::Array(a) => a.iter().for_each(|v| walk(v, found)),
                _ => {}
            }
        }
        let mut found = 0;
        walk(&p["blocks"], &mut found);
        assert!(found >= 3, "{p}");
    }

    #[test]
    fn an_agent_name_cannot_mention_the_channel_or_disguise_a_link_in_the_fallback() {
        let mut v = view(12, "w1");
        v.agent_name = Some("<!channel> <https://evil.example/|ack>".into());
        let p = payload(&message(vec![v]));
        let text = p["text"].as_str().unwrap();
        assert!(!text.contains('<') && !text.contains('>'), "{text}");
        assert!(text.contains("&lt;!channel&gt;"), "{text}");
    }
}
