//! What warden's outgoing HTTP calls (alert channels, recovery actions)
//! share.

/// Reads at most `limit` bytes of a response's body; the rest is never
/// read, so whatever answers cannot make warden hold a body of any size.
/// A body cut short by an error or the timeout keeps what had arrived.
pub async fn read_body(mut response: reqwest::Response, limit: usize) -> (String, bool) {
    let mut kept = Vec::new();
    let mut truncated = false;
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = limit - kept.len();
        kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if chunk.len() > room {
            truncated = true;
            break;
        }
    }
    (String::from_utf8_lossy(&kept).into_owned(), truncated)
}
