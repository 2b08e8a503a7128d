//! What warden's outgoing HTTP calls (alert channels, recovery actions)
//! share.

/// The start of a response's body.
pub struct Excerpt {
    pub text: String,
    /// More followed than was read.
    pub truncated: bool,
    /// The body broke off (the timeout, a reset connection) before its
    /// end: what had arrived is in `text`.
    pub broken: Option<String>,
}

/// Reads at most `limit` bytes of a response's body; the rest is never
/// read, so whatever answers cannot make warden hold a body of any size.
/// A body cut short by an error or the timeout keeps what had arrived.
pub async fn read_body(mut response: reqwest::Response, limit: usize) -> Excerpt {
    let mut kept = Vec::new();
    let mut truncated = false;
    let mut broken = None;
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = limit - kept.len();
                kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
                if chunk.len() > room {
                    truncated = true;
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                let e = e.without_url();
                broken = Some(if e.is_timeout() { "timed out".to_string() } else { e.to_string() });
                break;
            }
        }
    }
    Excerpt { text: String::from_utf8_lossy(&kept).into_owned(), truncated, broken }
}
