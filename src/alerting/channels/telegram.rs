//! Telegram: the Bot API's `sendMessage` to each configured chat, in
//! (legacy) Markdown. The base address is configurable so tests can point
//! it at a loopback server; the bot token is part of the path and so never
//! appears in errors.

use std::time::Duration;

use serde_json::json;

use super::{Reply, SendError, Sent, merge, post};
use crate::alerting::message::{DETAILED, Message};
use crate::config::Secret;

#[derive(Debug)]
pub struct Telegram {
    http: reqwest::Client,
    api_base: String,
    bot_token: Secret,
    chat_ids: Vec<String>,
}

impl Telegram {
    pub fn new(http: reqwest::Client, api_base: String, bot_token: Secret, chat_ids: Vec<String>) -> Self {
        Self { http, api_base, bot_token, chat_ids }
    }

    /// Sends to every chat not in `reached`, all at once (so a send takes
    /// one request's time, however many chats), each given up after
    /// `limit`. When some fail, the error lists the chats reached so far,
    /// which the retry then skips: a chat that keeps failing, or hangs,
    /// does not repeat the message to the others.
    pub async fn send(&self, message: &Message, reached: &[String], limit: Duration) -> Result<Sent, SendError> {
        let url = format!("{}/bot{}/sendMessage", self.api_base, self.bot_token.expose());
        let text = markdown(message);
        let chats: Vec<&String> = self.chat_ids.iter().filter(|c| !reached.contains(c)).collect();
        let results = futures_util::future::join_all(chats.iter().map(|chat| {
            let body = json!({
                "chat_id": chat,
                "text": text,
                "parse_mode": "Markdown",
                "disable_web_page_preview": true,
            });
            let request = post(self.http.post(&url).json(&body));
            async move {
                tokio::time::timeout(limit, request).await.unwrap_or_else(|_| Err(SendError::new("no answer in time")))
            }
        }))
        .await;
        let replies = chats
            .into_iter()
            .zip(results)
            .map(|(chat, result)| {
                let reply = match result {
                    Ok(sent) => Reply::Took(sent.status),
                    // The bot was blocked or removed from the chat (403),
                    // or the chat does not exist (400): about this chat
                    // alone. (A message the API cannot parse fails every
                    // chat alike, and so is retried.)
                    Err(error) => {
                        let for_good = matches!(error.status, Some(400 | 403));
                        let error = SendError { error: format!("chat {chat}: {}", error.error), ..error };
                        Reply::Refused { error, for_good }
                    }
                };
                (chat.clone(), reply)
            })
            .collect();
        merge(reached, replies)
    }
}

/// Escapes the characters legacy Markdown gives meaning to.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '_' | '*' | '`' | '[') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// `text` in bold. Inside an entity legacy Markdown takes every character
/// as it is, backslashes included, up to the closing `*`: nothing is
/// escaped there, and an asterisk of the text (a channel's error quoted in
/// a headline) is shown as a look-alike, since a bare one would end the
/// bold early and the Bot API would refuse the whole message.
fn bold(text: &str) -> String {
    format!("*{}*", text.replace('*', "\u{2217}"))
}

/// The message in Telegram's Markdown: bold headline, details, ack hint.
pub fn markdown(m: &Message) -> String {
    let mut out = vec![bold(&m.headline())];
    for alert in m.alerts.iter().take(DETAILED) {
        out.push(String::new());
        out.extend(m.detail_lines(alert).iter().map(|l| escape(l)));
    }
    if m.alerts.len() > DETAILED {
        out.push(format!("… and {} more alerts", m.alerts.len() - DETAILED));
    }
    if let Some(hint) = m.ack_hint() {
        out.push(String::new());
        out.push(escape(&hint.replace('`', "")));
    }
    let text = out.join("\n");
    // The Bot API refuses messages over 4096 characters.
    if text.chars().count() > 4000 { text.chars().take(4000).collect::<String>() + "…" } else { text }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerting::message::tests::{message, view};

    #[test]
    fn markdown_escapes_and_bolds_the_headline() {
        assert_eq!(escape("agent_unresponsive *x*"), "agent\\_unresponsive \\*x\\*");
        let md = markdown(&message(vec![view(4, "w_4")]));
        assert!(md.starts_with("*[FIRING CRITICAL] w_4 is offline"), "{md}");
        assert!(md.contains("warden alerts ack 4"));
        // An asterisk in the headline cannot close the bold.
        assert_eq!(bold("failing: *x* 500"), "*failing: \u{2217}x\u{2217} 500*");
    }
}
