//! Real peers on loopback for the alerting tests: an HTTP receiver standing
//! in for Slack, webhooks and the Telegram Bot API (scripted replies, can
//! go down and come back on the same port), and a small SMTP server that
//! keeps every message it is given (can go down too).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// One request the HTTP receiver got, and what it answered.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
    pub answered: u16,
    /// When it arrived.
    pub at: std::time::Instant,
}

impl Request {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(&name.to_ascii_lowercase()).map(String::as_str)
    }
}

/// A scripted answer; when the script is empty the receiver answers 200.
#[derive(Debug, Clone, Copy)]
pub enum Reply {
    Status(u16),
    /// 429 with `Retry-After: <seconds>`.
    RetryAfter(u64),
}

#[derive(Default)]
struct Shared {
    requests: Vec<Request>,
    /// Requests come in so far, answered or not yet.
    arrived: usize,
    /// While held, requests wait to be answered until released.
    held: Option<tokio::sync::watch::Receiver<bool>>,
    script: VecDeque<Reply>,
    delay: Duration,
    /// Requests whose body holds this text get this status, always.
    refuse: Option<(String, u16)>,
    /// Requests whose body holds this text are answered this much later.
    stall: Option<(String, Duration)>,
}

/// A receiver's accept loop: stopped on `down`, aborted when the receiver
/// is dropped.
struct Server(Option<JoinHandle<()>>);

impl Server {
    async fn stop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// An HTTP server on 127.0.0.1 that records everything.
pub struct HttpReceiver {
    pub addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    server: Server,
}

async fn handle(
    State(shared): State<Arc<Mutex<Shared>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let at = std::time::Instant::now();
    let (reply, delay) = {
        let mut s = shared.lock().unwrap();
        s.arrived += 1;
        let refused = s
            .refuse
            .as_ref()
            .filter(|(needle, _)| String::from_utf8_lossy(&body).contains(needle.as_str()))
            .map(|(_, status)| Reply::Status(*status));
        let stalled = s
            .stall
            .as_ref()
            .filter(|(needle, _)| String::from_utf8_lossy(&body).contains(needle.as_str()))
            .map(|(_, delay)| *delay);
        (refused.or_else(|| s.script.pop_front()), stalled.unwrap_or(s.delay))
    };
    let held = shared.lock().unwrap().held.clone();
    if let Some(mut held) = held {
        let _ = held.wait_for(|released| *released).await;
    }
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let (status, retry_after) = match reply {
        None => (200, None),
        Some(Reply::Status(code)) => (code, None),
        Some(Reply::RetryAfter(secs)) => (429, Some(secs)),
    };
    shared.lock().unwrap().requests.push(Request {
        method: method.to_string(),
        path: uri.path().to_string(),
        headers: headers
            .iter()
            .map(|(k, v)| (k.as_str().to_ascii_lowercase(), v.to_str().unwrap_or_default().to_string()))
            .collect(),
        body: body.to_vec(),
        answered: status,
        at,
    });
    let mut response = (StatusCode::from_u16(status).unwrap(), if status == 200 { "ok" } else { "no" }).into_response();
    // No keep-alive: once the receiver is down, nothing reaches it.
    response.headers_mut().insert("connection", "close".parse().unwrap());
    if let Some(secs) = retry_after {
        response.headers_mut().insert("retry-after", secs.to_string().parse().unwrap());
    }
    response
}

impl HttpReceiver {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let server = Server(Some(Self::serve(listener, shared.clone())));
        Self { addr, shared, server }
    }

    fn serve(listener: TcpListener, shared: Arc<Mutex<Shared>>) -> JoinHandle<()> {
        let app = axum::Router::new().fallback(handle).with_state(shared);
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Answers the next requests with these, in order.
    pub fn script(&self, replies: &[Reply]) {
        self.shared.lock().unwrap().script.extend(replies.iter().copied());
    }

    /// Answers every request whose body contains `needle` with `status`.
    pub fn refuse_containing(&self, needle: &str, status: u16) {
        self.shared.lock().unwrap().refuse = Some((needle.to_string(), status));
    }

    /// Answers every request whose body contains `needle` only after
    /// `delay`.
    pub fn stall_containing(&self, needle: &str, delay: Duration) {
        self.shared.lock().unwrap().stall = Some((needle.to_string(), delay));
    }

    /// Takes this long over every answer.
    pub fn slow(&self, delay: Duration) {
        self.shared.lock().unwrap().delay = delay;
    }

    /// Holds every answer from now on until the returned sender sends
    /// `true` or is dropped.
    pub fn hold(&self) -> tokio::sync::watch::Sender<bool> {
        let (release, held) = tokio::sync::watch::channel(false);
        self.shared.lock().unwrap().held = Some(held);
        release
    }

    /// Requests come in so far, including those not answered yet.
    pub fn arrived(&self) -> usize {
        self.shared.lock().unwrap().arrived
    }

    pub fn requests(&self) -> Vec<Request> {
        self.shared.lock().unwrap().requests.clone()
    }

    /// Requests answered 2xx.
    pub fn accepted(&self) -> Vec<Request> {
        self.requests().into_iter().filter(|r| (200..300).contains(&r.answered)).collect()
    }

    /// Stops listening: connections are refused until [`Self::up`].
    pub async fn down(&mut self) {
        self.server.stop().await;
    }

    /// Listens again on the same port.
    pub async fn up(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.server = Server(Some(Self::serve(listener, self.shared.clone())));
    }
}

/// One email as the SMTP server received it.
#[derive(Debug, Clone)]
pub struct Mail {
    pub from: String,
    pub to: Vec<String>,
    /// Header names lowercased, folded lines joined.
    pub headers: HashMap<String, String>,
    /// Every text part, decoded (quoted-printable or base64).
    pub parts: Vec<(String, String)>,
}

impl Mail {
    pub fn subject(&self) -> &str {
        self.headers.get("subject").map(String::as_str).unwrap_or_default()
    }

    pub fn part(&self, content_type: &str) -> Option<&str> {
        self.parts.iter().find(|(t, _)| t.starts_with(content_type)).map(|(_, b)| b.as_str())
    }
}

/// A minimal SMTP server (EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT);
/// it refuses recipients whose address contains "refused".
pub struct SmtpServer {
    pub addr: SocketAddr,
    mails: Arc<Mutex<Vec<Mail>>>,
    server: Server,
}

impl SmtpServer {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mails = Arc::new(Mutex::new(Vec::new()));
        let server = Server(Some(Self::serve(listener, mails.clone())));
        Self { addr, mails, server }
    }

    fn serve(listener: TcpListener, mails: Arc<Mutex<Vec<Mail>>>) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut sessions = tokio::task::JoinSet::new();
            loop {
                let Ok((socket, _)) = listener.accept().await else { return };
                let mails = mails.clone();
                sessions.spawn(async move {
                    let _ = session(socket, mails).await;
                });
            }
        })
    }

    pub fn mails(&self) -> Vec<Mail> {
        self.mails.lock().unwrap().clone()
    }

    pub async fn down(&mut self) {
        self.server.stop().await;
    }

    pub async fn up(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.server = Server(Some(Self::serve(listener, self.mails.clone())));
    }
}

async fn session(socket: tokio::net::TcpStream, mails: Arc<Mutex<Vec<Mail>>>) -> std::io::Result<()> {
    let (read, mut write) = socket.into_split();
    let mut lines = BufReader::new(read);
    write.write_all(b"220 localhost test ESMTP\r\n").await?;
    let (mut from, mut to) = (String::new(), Vec::new());
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let command = line.trim_end().to_string();
        let upper = command.to_ascii_uppercase();
        if upper.starts_with("EHLO") {
            write.write_all(b"250-localhost\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n").await?;
        } else if upper.starts_with("HELO") || upper.starts_with("NOOP") {
            write.write_all(b"250 ok\r\n").await?;
        } else if upper.starts_with("RSET") {
            (from, to) = (String::new(), Vec::new());
            write.write_all(b"250 ok\r\n").await?;
        } else if upper.starts_with("MAIL FROM:") {
            from = address(&command[10..]);
            write.write_all(b"250 ok\r\n").await?;
        } else if upper.starts_with("RCPT TO:") {
            // An address with "refused" in it does not exist here.
            let rcpt = address(&command[8..]);
            if rcpt.contains("refused") {
                write.write_all(b"550 5.1.1 no such user\r\n").await?;
            } else {
                to.push(rcpt);
                write.write_all(b"250 ok\r\n").await?;
            }
        } else if upper == "DATA" {
            write.write_all(b"354 go ahead\r\n").await?;
            let mut data = String::new();
            loop {
                line.clear();
                if lines.read_line(&mut line).await? == 0 {
                    return Ok(());
                }
                if line == ".\r\n" || line == ".\n" {
                    break;
                }
                // Dot-stuffing.
                data.push_str(line.strip_prefix('.').unwrap_or(&line));
            }
            mails.lock().unwrap().push(parse(&from, &to, &data));
            write.write_all(b"250 queued\r\n").await?;
        } else if upper.starts_with("QUIT") {
            write.write_all(b"221 bye\r\n").await?;
            return Ok(());
        } else {
            write.write_all(b"502 not implemented\r\n").await?;
        }
    }
}

fn address(arg: &str) -> String {
    let arg = arg.trim();
    let arg = arg.split_whitespace().next().unwrap_or(arg);
    arg.trim_start_matches('<').trim_end_matches('>').to_string()
}

fn split_head(text: &str) -> (HashMap<String, String>, String) {
    let text = text.replace("\r\n", "\n");
    let (head, body) = text.split_once("\n\n").unwrap_or((text.as_str(), ""));
    let mut headers: HashMap<String, String> = HashMap::new();
    let mut last: Option<String> = None;
    for line in head.lines() {
        if line.starts_with([' ', '\t']) {
            if let Some(k) = &last {
                headers.get_mut(k).unwrap().push_str(line.trim_start_matches(['\t']));
            }
            continue;
        }
        if let Some((k, v)) = line.split_once(':') {
            let k = k.trim().to_ascii_lowercase();
            headers.insert(k.clone(), v.trim().to_string());
            last = Some(k);
        }
    }
    (headers, body.to_string())
}

fn parse(from: &str, to: &[String], data: &str) -> Mail {
    let (headers, body) = split_head(data);
    let mut parts = Vec::new();
    let content_type = headers.get("content-type").cloned().unwrap_or_default();
    if let Some(boundary) = content_type.split("boundary=").nth(1) {
        let boundary = boundary.trim_matches('"').split(';').next().unwrap_or_default().trim_matches('"');
        for chunk in body.split(&format!("--{boundary}")).skip(1) {
            if chunk.starts_with("--") {
                break;
            }
            let (h, b) = split_head(chunk.trim_start_matches('\n'));
            let ct = h.get("content-type").cloned().unwrap_or_default();
            parts.push((ct, decode(h.get("content-transfer-encoding").map(String::as_str), &b)));
        }
    } else {
        parts.push((content_type, decode(headers.get("content-transfer-encoding").map(String::as_str), &body)));
    }
    Mail { from: from.to_string(), to: to.to_vec(), headers, parts }
}

fn decode(encoding: Option<&str>, body: &str) -> String {
    match encoding.map(|e| e.to_ascii_lowercase()) {
        Some(e) if e == "quoted-printable" => quoted_printable(body),
        Some(e) if e == "base64" => base64(body),
        _ => body.to_string(),
    }
}

fn quoted_printable(text: &str) -> String {
    let mut out = Vec::new();
    let bytes = text.replace("=\n", "").into_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'='
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn base64(text: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes() {
        let Some(v) = ALPHABET.iter().position(|a| *a == c) else { continue };
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
