//! Channels: where messages go. Each renders a [`Message`] its own way and
//! sends it once; retries, backoff and bookkeeping are the dispatcher's.
//!
//! Errors never carry a secret: HTTP errors are stripped of their URL (a
//! Slack webhook URL or a Telegram bot token is a credential) and SMTP
//! errors never include credentials.

pub mod email;
pub mod log;
pub mod slack;
pub mod telegram;
pub mod webhook;

use std::collections::BTreeMap;
use std::time::Duration;

use super::message::Message;
use crate::config::{AlertingSettings, ChannelKind};

/// A send that the receiver accepted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sent {
    /// HTTP status or SMTP reply code, when there is one.
    pub status: Option<u16>,
    /// Recipients refused for good (an SMTP 5xx: no such user), one line
    /// each: the message went to the others and is not retried for these.
    pub refused: Vec<String>,
}

impl Sent {
    pub fn status(status: u16) -> Self {
        Self { status: Some(status), refused: Vec::new() }
    }
}

/// A send that failed; the dispatcher retries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendError {
    pub status: Option<u16>,
    /// The receiver asked to wait this long (Retry-After, as on a 429 or
    /// 503, whatever the status).
    pub retry_after: Option<Duration>,
    /// One line, without secrets.
    pub error: String,
    /// Recipients of a channel with several (Telegram chats, email
    /// addresses) that did get the message before the failure; a retry
    /// skips them.
    pub reached: Vec<String>,
}

impl SendError {
    pub fn new(error: impl Into<String>) -> Self {
        Self { status: None, retry_after: None, error: error.into(), reached: Vec::new() }
    }
}

/// One recipient's outcome in a send to several (email addresses,
/// Telegram chats).
pub(crate) enum Reply {
    Took(Option<u16>),
    /// Refused (the error names the recipient), `for_good` when the
    /// refusal is about the recipient itself (no such mailbox, a chat the
    /// bot was removed from).
    Refused {
        error: SendError,
        for_good: bool,
    },
}

/// Folds a send to several recipients into one outcome. Sent when every
/// recipient took it or refused it for good, provided one has it (a
/// recipient refused for good is named in [`Sent::refused`] and not tried
/// again); otherwise an error carrying the recipients reached so far, for
/// the retry to skip. The error reported is the first, unless a later one
/// asks to wait longer (Retry-After), which the retry must honour.
pub(crate) fn merge(reached: &[String], replies: Vec<(String, Reply)>) -> Result<Sent, SendError> {
    let mut sent = Sent::default();
    let mut now_reached: Vec<String> = reached.to_vec();
    let mut retry: Option<SendError> = None;
    let mut refused: Option<SendError> = None;
    for (recipient, reply) in replies {
        match reply {
            Reply::Took(status) => {
                sent.status = status.or(sent.status);
                now_reached.push(recipient);
            }
            Reply::Refused { error, for_good } => {
                if for_good {
                    sent.refused.push(error.error.clone());
                }
                let slot = if for_good { &mut refused } else { &mut retry };
                if slot.as_ref().is_none_or(|f| error.retry_after > f.retry_after) {
                    *slot = Some(error);
                }
            }
        }
    }
    // Refused for good is final only once someone has the message: refused
    // everywhere, the channel is failing and retries say so.
    match retry.or(if now_reached.is_empty() { refused } else { None }) {
        None => Ok(sent),
        Some(mut e) => {
            e.reached = now_reached;
            Err(e)
        }
    }
}

/// A configured channel.
#[derive(Debug)]
pub enum Channel {
    Slack(slack::Slack),
    Email(Box<email::Email>),
    Webhook(webhook::Webhook),
    Telegram(telegram::Telegram),
    Log(log::Log),
}

impl Channel {
    pub fn kind(&self) -> ChannelKind {
        match self {
            Self::Slack(_) => ChannelKind::Slack,
            Self::Email(_) => ChannelKind::Email,
            Self::Webhook(_) => ChannelKind::Webhook,
            Self::Telegram(_) => ChannelKind::Telegram,
            Self::Log(_) => ChannelKind::Log,
        }
    }

    /// Sends `message` once; `reached` lists recipients an earlier attempt
    /// of the same delivery already reached (see [`SendError::reached`]).
    /// `limit` bounds each recipient of a channel with several; the caller
    /// bounds the whole send.
    pub async fn send(&self, message: &Message, reached: &[String], limit: Duration) -> Result<Sent, SendError> {
        match self {
            Self::Slack(c) => c.send(message).await,
            Self::Email(c) => c.send(message, reached, limit).await,
            Self::Webhook(c) => c.send(message).await,
            Self::Telegram(c) => c.send(message, reached, limit).await,
            Self::Log(c) => c.send(message),
        }
    }
}

/// Every channel in effect, by name (`log` included).
#[derive(Debug)]
pub struct Channels {
    by_name: BTreeMap<String, Channel>,
}

impl Channels {
    /// Builds every channel of the settings (already validated).
    pub fn from_settings(settings: &AlertingSettings) -> Result<Self, String> {
        super::tls::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(settings.delivery_timeout.get())
            .connect_timeout(settings.delivery_timeout.get())
            .user_agent(concat!("warden/", env!("CARGO_PKG_VERSION")))
            // A redirect is a failed send, not an invitation: followed, the
            // signed body and any credential header would go wherever it
            // points (reqwest keeps custom headers across hosts).
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("could not build the HTTP client for alert channels: {e}"))?;
        let mut by_name = BTreeMap::new();
        for (name, c) in settings.effective_channels() {
            let channel = match c.kind {
                ChannelKind::Slack => Channel::Slack(slack::Slack::new(http.clone(), c.webhook_url.clone())),
                ChannelKind::Webhook => {
                    Channel::Webhook(webhook::Webhook::new(http.clone(), c.url.clone(), c.secret.clone()))
                }
                ChannelKind::Telegram => Channel::Telegram(telegram::Telegram::new(
                    http.clone(),
                    c.telegram_api_base().to_string(),
                    c.bot_token.clone(),
                    c.chat_ids.clone(),
                )),
                ChannelKind::Email => Channel::Email(Box::new(
                    email::Email::new(&settings.smtp, &c.to, settings.delivery_timeout.get())
                        .map_err(|e| format!("alerting.channels.{name}: {e}"))?,
                )),
                ChannelKind::Log => Channel::Log(log::Log::new(name.clone())),
            };
            by_name.insert(name, channel);
        }
        Ok(Self { by_name })
    }

    pub fn get(&self, name: &str) -> Option<&Channel> {
        self.by_name.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }
}

/// POSTs a body and sorts the answer into sent or failed. Never lets the
/// URL (a secret for Slack and Telegram) into the error.
pub(crate) async fn post(request: reqwest::RequestBuilder) -> Result<Sent, SendError> {
    let response = request.send().await.map_err(|e| SendError::new(describe(&e)))?;
    let status = response.status();
    if status.is_success() {
        return Ok(Sent::status(status.as_u16()));
    }
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    // A refusal's first 200 characters say why; the rest is never read.
    let body = crate::http::read_body(response, 200 * 4).await.text;
    let body: String = body.chars().filter(|c| !c.is_control()).take(200).collect();
    Err(SendError {
        status: Some(status.as_u16()),
        retry_after,
        error: format!("HTTP {}{}", status.as_u16(), if body.is_empty() { String::new() } else { format!(": {body}") }),
        reached: Vec::new(),
    })
}

/// One line about a transport error, without the URL.
fn describe(e: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut text = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "could not connect".to_string()
    } else {
        "request failed".to_string()
    };
    // The innermost cause says what happened (connection refused, DNS, TLS).
    let mut source = e.source();
    let mut last = None;
    while let Some(s) = source {
        last = Some(s.to_string());
        source = s.source();
    }
    if let Some(cause) = last {
        text.push_str(": ");
        text.push_str(&cause);
    }
    text
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A receiver that refuses with a body that never ends: the refusal
    /// is told by its first 200 characters, and reading stops there.
    #[tokio::test]
    async fn a_refusal_is_told_by_the_start_of_its_body_however_long() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 4096];
            let _ = socket.read(&mut request).await;
            let head =
                "HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n";
            socket.write_all(head.as_bytes()).await.unwrap();
            let chunk = format!("{:x}\r\n{}\r\n", 1024, "é".repeat(512));
            while socket.write_all(chunk.as_bytes()).await.is_ok() {}
        });
        crate::alerting::tls::install_crypto_provider();
        let client = reqwest::Client::new();
        let request = client.post(url).timeout(std::time::Duration::from_secs(60)).body("{}");
        let refused = super::post(request).await.unwrap_err();
        assert_eq!(refused.status, Some(500));
        assert_eq!(refused.error, format!("HTTP 500: {}", "é".repeat(200)));
    }
}
