//! Email over SMTP with lettre: plain text and HTML alternatives, sent
//! through `[alerting.smtp]` in the clear (a local relay), with STARTTLS,
//! or over implicit TLS, authenticated when credentials are configured.
//! The Message-ID derives from the delivery's idempotency key, so a retried
//! send is recognisably the same message.

use std::time::Duration;

use lettre::address::Envelope;
use lettre::message::header::ContentType;
use lettre::message::{Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

use super::{Reply, SendError, Sent, merge};
use crate::alerting::message::{DETAILED, Message};
use crate::config::{SmtpSettings, SmtpTls};

pub struct Email {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    to: Vec<Mailbox>,
    /// SMTP sessions open at once, over every delivery to this channel: a
    /// relay limits connections per client, and each address is a session.
    sessions: tokio::sync::Semaphore,
}

/// See [`Email::sessions`].
const SESSIONS: usize = 4;

impl std::fmt::Debug for Email {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Email").field("from", &self.from).field("to", &self.to).finish_non_exhaustive()
    }
}

impl Email {
    pub fn new(smtp: &SmtpSettings, to: &[String], timeout: Duration) -> Result<Self, String> {
        let from: Mailbox = smtp.from.parse().map_err(|e| format!("alerting.smtp.from: {e}"))?;
        let to = to
            .iter()
            .map(|a| a.parse::<Mailbox>().map_err(|e| format!("recipient {a}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let builder = match smtp.tls {
            SmtpTls::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&smtp.host),
            SmtpTls::Starttls => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&smtp.host)
                .map_err(|e| format!("alerting.smtp: {e}"))?,
            SmtpTls::Tls => {
                AsyncSmtpTransport::<Tokio1Executor>::relay(&smtp.host).map_err(|e| format!("alerting.smtp: {e}"))?
            }
        };
        let mut builder = builder.port(smtp.port).timeout(Some(timeout));
        if !smtp.username.is_empty() {
            builder = builder
                .credentials(Credentials::new(smtp.username.expose().to_string(), smtp.password.expose().to_string()));
        }
        Ok(Self { transport: builder.build(), from, to, sessions: tokio::sync::Semaphore::new(SESSIONS) })
    }

    /// Sends to every address not in `reached`, one SMTP transaction each
    /// (the headers name them all), a few at once, each within `limit`:
    /// in one transaction, a server refusing one address (550, a typo)
    /// would refuse the message to everyone. An address refused for good
    /// (see [`refused_for_good`]) is not retried once another has the
    /// message (it is named in [`Sent::refused`]); any other failure is
    /// retried for the addresses not reached yet, which the error lists.
    pub async fn send(&self, message: &Message, reached: &[String], limit: Duration) -> Result<Sent, SendError> {
        let email = build(message, &self.from, &self.to).map_err(SendError::new)?;
        let raw = email.formatted();
        let pending: Vec<&Mailbox> = self.to.iter().filter(|to| !reached.contains(&to.email.to_string())).collect();
        let replies = futures_util::future::join_all(pending.iter().map(|to| {
            let envelope = Envelope::new(Some(self.from.email.clone()), vec![to.email.clone()]);
            let raw = &raw;
            let address = to.email.to_string();
            let send = async move {
                let local = |e: String| Reply::Refused { error: SendError::new(format!("SMTP: {e}")), for_good: false };
                let envelope = envelope.map_err(|e| local(e.to_string()))?;
                let _session = self.sessions.acquire().await.map_err(|e| local(e.to_string()))?;
                self.transport.send_raw(&envelope, raw).await.map_err(|e| {
                    let status = e.status().map(u16::from);
                    Reply::Refused {
                        error: SendError {
                            status,
                            ..SendError::new(format!("SMTP: {}: {}", to.email, one_line(&e.to_string())))
                        },
                        for_good: refused_for_good(status),
                    }
                })
            };
            async move {
                let reply = match tokio::time::timeout(limit, send).await {
                    Ok(Ok(response)) => Reply::Took(Some(u16::from(response.code()))),
                    Ok(Err(reply)) => reply,
                    Err(_) => Reply::Refused {
                        error: SendError::new(format!("SMTP: {address}: no answer in time")),
                        for_good: false,
                    },
                };
                (address, reply)
            }
        }))
        .await;
        merge(reached, replies)
    }
}

/// Whether an SMTP reply refuses the address itself, for good: no such
/// mailbox (550), not local (551), a mailbox name not allowed (553).
/// Other 5xx replies (authentication, a policy on the whole message, an
/// overloaded relay's 554) say nothing about one address, and are retried.
fn refused_for_good(status: Option<u16>) -> bool {
    matches!(status, Some(550 | 551 | 553))
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The email: subject is the headline; text and HTML alternatives.
pub fn build(m: &Message, from: &Mailbox, to: &[Mailbox]) -> Result<lettre::Message, String> {
    let mut builder = lettre::Message::builder()
        .from(from.clone())
        .subject(m.headline())
        .message_id(Some(format!("<{}@warden>", m.idempotency_key)));
    for recipient in to {
        builder = builder.to(recipient.clone());
    }
    builder
        .multipart(
            MultiPart::alternative()
                .singlepart(SinglePart::builder().header(ContentType::TEXT_PLAIN).body(m.text()))
                .singlepart(SinglePart::builder().header(ContentType::TEXT_HTML).body(html(m))),
        )
        .map_err(|e| format!("could not build the email: {e}"))
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The HTML alternative: the same content, one block per alert.
pub fn html(m: &Message) -> String {
    let color = match m.severity() {
        "emergency" | "critical" => "#b00020",
        "warning" => "#b26a00",
        _ => "#2e7d32",
    };
    let mut out = format!(
        "<!DOCTYPE html><html><body style=\"font-family:sans-serif\">\
         <h2 style=\"color:{color}\">{}</h2>",
        escape(&m.headline())
    );
    if let Some(n) = m.auto_recovered() {
        out.push_str(&format!("<p>Automated recovery fixed it on attempt {n}; nobody needs to act.</p>"));
    }
    if m.recovery_failed() {
        out.push_str("<p><strong>Automated recovery gave up</strong>; a person needs to look.</p>");
    }
    for alert in m.alerts.iter().take(DETAILED) {
        let lines = m.detail_lines(alert);
        out.push_str("<div style=\"margin:1em 0;padding:.5em;border-left:4px solid #ccc\">");
        for (i, line) in lines.iter().enumerate() {
            if i == 0 {
                out.push_str(&format!("<strong>{}</strong><br>", escape(line)));
            } else {
                out.push_str(&format!("{}<br>", escape(line)));
            }
        }
        out.push_str("</div>");
    }
    if m.alerts.len() > DETAILED {
        out.push_str(&format!("<p>… and {} more alerts</p>", m.alerts.len() - DETAILED));
    }
    if let Some(hint) = m.ack_hint() {
        out.push_str(&format!("<p><em>{}</em></p>", escape(&hint)));
    }
    out.push_str("</body></html>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerting::message::tests::{message, view};

    #[test]
    fn only_a_refusal_of_the_address_itself_is_final() {
        assert!(refused_for_good(Some(550)) && refused_for_good(Some(551)) && refused_for_good(Some(553)));
        for retried in [Some(421), Some(450), Some(530), Some(535), Some(552), Some(554), None] {
            assert!(!refused_for_good(retried), "{retried:?}");
        }
    }

    #[test]
    fn the_email_has_subject_text_and_html() {
        let m = message(vec![view(12, "w1")]);
        let from: Mailbox = "warden@example.com".parse().unwrap();
        let to: Mailbox = "oncall@example.com".parse().unwrap();
        let email = build(&m, &from, &[to]).unwrap();
        let raw = String::from_utf8(email.formatted()).unwrap();
        assert!(raw.contains("Subject: [FIRING CRITICAL] w1 is offline"), "{raw}");
        assert!(raw.contains("Message-ID: <k-7@warden>"), "{raw}");
        assert!(raw.contains("multipart/alternative"));
        assert!(raw.contains("text/html"));
        assert!(html(&m).contains("<strong>Alert #12"));
    }
}
