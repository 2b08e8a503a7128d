//! A headless Chromium driven over the W3C WebDriver protocol: chromedriver
//! started on a free port, spoken to with reqwest (no WebDriver crate: the
//! dozen endpoints used here are plain JSON over HTTP).
//!
//! Debian's `chromium` and `chromium-driver` packages are needed; `.ci/run`
//! installs them. Without them these tests fail, naming the command.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{Semaphore, SemaphorePermit};

pub const INSTALL: &str =
    "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver";

/// One browser at a time: the machine has two cores, and the other tests
/// of the binary run alongside.
static ONE_AT_A_TIME: Semaphore = Semaphore::const_new(1);

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in names {
        for dir in std::env::split_paths(&path).chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/lib/chromium")]) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    None
}

/// Where screenshots go: test artifacts, never committed.
pub fn screenshot_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots")
}

pub struct Browser {
    http: reqwest::Client,
    base: String,
    session: Option<String>,
    driver: Child,
    _profile: tempfile::TempDir,
    _permit: SemaphorePermit<'static>,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium with a fresh profile.
    pub async fn start() -> Self {
        let (Some(driver_bin), Some(chromium)) =
            (find_program(&["chromedriver"]), find_program(&["chromium", "chromium-browser", "google-chrome"]))
        else {
            panic!(
                "the console's browser tests need Chromium and its WebDriver, which are not installed. \
                 Install them with: {INSTALL} (.ci/run does this on a fresh machine)"
            );
        };
        let permit = ONE_AT_A_TIME.acquire().await.expect("the semaphore is never closed");
        let port = crate::procs::free_port();
        let log = std::fs::create_dir_all(screenshot_dir())
            .ok()
            .and_then(|_| std::fs::File::create(screenshot_dir().join(format!("chromedriver-{port}.log"))).ok());
        let driver = Command::new(&driver_bin)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(log.as_ref().and_then(|f| f.try_clone().ok()).map(Stdio::from).unwrap_or_else(Stdio::null))
            .stderr(log.map(Stdio::from).unwrap_or_else(Stdio::null))
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {}: {e}; install with: {INSTALL}", driver_bin.display()));
        let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let profile = tempfile::tempdir().expect("a temporary profile directory");
        let mut browser = Self { http, base, session: None, driver, _profile: profile, _permit: permit };
        browser.wait_for_driver().await;
        browser.open_session(&chromium).await;
        browser
    }

    async fn wait_for_driver(&mut self) {
        let until = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = self.http.get(format!("{}/status", self.base)).send().await
                && let Ok(v) = r.json::<Value>().await
                && v["value"]["ready"] == true
            {
                return;
            }
            if let Ok(Some(status)) = self.driver.try_wait() {
                panic!("chromedriver exited at start ({status}); is it installed? {INSTALL}");
            }
            assert!(tokio::time::Instant::now() < until, "chromedriver did not become ready within 30s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn open_session(&mut self, chromium: &Path) {
        let profile = self._profile.path().display().to_string();
        let args = vec![
            "--headless".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-dev-shm-usage".into(),
            "--window-size=1280,900".into(),
            format!("--user-data-dir={profile}"),
        ];
        let body = json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": { "binary": chromium.display().to_string(), "args": args },
            }}
        });
        let response = self.http.post(format!("{}/session", self.base)).json(&body).send().await;
        let value: Value = match response {
            Ok(r) => r.json().await.unwrap_or(Value::Null),
            Err(e) => panic!("chromedriver did not answer: {e}"),
        };
        let Some(id) = value["value"]["sessionId"].as_str() else {
            panic!("chromedriver could not start Chromium: {value}");
        };
        self.session = Some(id.to_string());
    }

    fn url(&self, path: &str) -> String {
        format!("{}/session/{}{path}", self.base, self.session.as_deref().expect("a session"))
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut request = self.http.request(method.clone(), self.url(path));
        if let Some(body) = body {
            request = request.json(&body);
        } else if method == reqwest::Method::POST {
            request = request.json(&json!({}));
        }
        let response = request.send().await.unwrap_or_else(|e| panic!("WebDriver {path}: {e}"));
        let value: Value = response.json().await.unwrap_or(Value::Null);
        if let Some(error) = value["value"]["error"].as_str() {
            panic!("WebDriver {path}: {error}: {}", value["value"]["message"]);
        }
        value["value"].clone()
    }

    pub async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({ "url": url }))).await;
    }

    pub async fn set_size(&self, width: u32, height: u32) {
        self.call(reqwest::Method::POST, "/window/rect", Some(json!({ "width": width, "height": height }))).await;
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page.
    pub async fn eval(&self, script: &str, args: Value) -> Value {
        self.call(reqwest::Method::POST, "/execute/sync", Some(json!({ "script": script, "args": args }))).await
    }

    async fn element(&self, css: &str) -> String {
        let v =
            self.call(reqwest::Method::POST, "/element", Some(json!({ "using": "css selector", "value": css }))).await;
        v[ELEMENT].as_str().unwrap_or_else(|| panic!("no element {css}")).to_string()
    }

    /// Clicks the element as a user would (scrolled into view, real events).
    pub async fn click(&self, css: &str) {
        let id = self.element(css).await;
        self.call(reqwest::Method::POST, &format!("/element/{id}/click"), None).await;
    }

    /// Types into the element as a user would.
    pub async fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css).await;
        self.call(reqwest::Method::POST, &format!("/element/{id}/value"), Some(json!({ "text": text }))).await;
    }

    /// Presses Tab, as the keyboard does.
    pub async fn press_tab(&self) {
        let tab = "\u{E004}";
        let actions = json!({ "actions": [{ "type": "key", "id": "keyboard", "actions": [
            { "type": "keyDown", "value": tab }, { "type": "keyUp", "value": tab }
        ]}]});
        self.call(reqwest::Method::POST, "/actions", Some(actions)).await;
    }

    /// Polls `condition` (a JS expression) until it is truthy.
    pub async fn wait_until(&self, what: &str, deadline: Duration, condition: &str) -> Duration {
        let started = tokio::time::Instant::now();
        let script = format!("try {{ return !!({condition}); }} catch (e) {{ return false; }}");
        loop {
            if self.eval(&script, json!([])).await == Value::Bool(true) {
                return started.elapsed();
            }
            if started.elapsed() > deadline {
                let body = self.eval("return document.body ? document.body.innerText : ''", json!([])).await;
                panic!(
                    "timed out after {deadline:?} waiting for {what}; the page says:\n{}",
                    body.as_str().unwrap_or("")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn text(&self, css: &str) -> String {
        let v = self
            .eval("var e = document.querySelector(arguments[0]); return e ? e.innerText : null;", json!([css]))
            .await;
        v.as_str().unwrap_or_else(|| panic!("no element {css}")).to_string()
    }

    /// Saves a PNG of the viewport as a test artifact.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let data = self.call(reqwest::Method::GET, "/screenshot", None).await;
        let png = base64_decode(data.as_str().expect("a base64 screenshot"));
        let path = screenshot_dir().join(format!("{name}.png"));
        std::fs::create_dir_all(screenshot_dir()).unwrap();
        std::fs::write(&path, png).unwrap();
        path
    }

    /// Saves a PNG of the whole page (the window grown to fit it, then
    /// put back to `width` × 900).
    pub async fn screenshot_page(&self, name: &str, width: u32) -> PathBuf {
        let height = self.eval("return document.documentElement.scrollHeight", json!([])).await;
        let height = height.as_u64().unwrap_or(900).clamp(600, 6000) as u32;
        self.set_size(width, height + 140).await;
        let path = self.screenshot(name).await;
        self.set_size(width, 900).await;
        path
    }

    /// Ends the session (Chromium exits) and chromedriver.
    pub async fn close(mut self) {
        if let Some(id) = self.session.take() {
            let _ = self.http.delete(format!("{}/session/{id}", self.base)).send().await;
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // After a failed assertion: end the session so Chromium exits too,
        // from a thread of its own (the test's runtime may be unwinding).
        if let Some(id) = self.session.take() {
            let url = format!("{}/session/{id}", self.base);
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async {
                    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
                    let _ = client.delete(url).send().await;
                });
            })
            .join();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Standard base64 (with padding), as WebDriver sends screenshots.
pub fn base64_decode(text: &str) -> Vec<u8> {
    fn value(c: u8) -> Option<u32> {
        match c {
            b'A'..=b'Z' => Some(u32::from(c - b'A')),
            b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
            b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    }
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes().filter_map(value) {
        acc = (acc << 6) | c;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

#[test]
fn base64_decodes_with_and_without_padding() {
    assert_eq!(base64_decode("aGVsbG8="), b"hello");
    assert_eq!(base64_decode("aGVsbG8gd29ybGQ="), b"hello world");
    assert_eq!(base64_decode("YQ=="), b"a");
    assert_eq!(base64_decode(""), b"");
}
