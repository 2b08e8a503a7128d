//! Running one recovery action: a command (no shell, empty environment,
//! own process group, killed at its timeout, output captured up to a
//! limit) or an HTTP call.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

/// How an action ended, before verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// It did its part; the agent must now come back.
    Done,
    Failed,
    TimedOut,
    /// warden stopped while it ran and ended it: whether it took effect is
    /// verified, as after a takeover.
    Interrupted,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub ended: Ended,
    /// One line for humans.
    pub summary: String,
    /// Exit code, status, output excerpts, error.
    pub detail: Value,
}

impl Outcome {
    pub fn failed(summary: impl Into<String>, detail: Value) -> Self {
        Self { ended: Ended::Failed, summary: summary.into(), detail }
    }

    /// Ready to record: a command's output or an endpoint's answer may
    /// hold NUL bytes, which PostgreSQL's text and jsonb refuse.
    pub fn storable(self) -> Self {
        let summary = crate::db::storable(&self.summary).into_owned();
        Self { summary, detail: crate::db::storable_json(self.detail), ..self }
    }
}

/// Environment variables a command gets; nothing else of warden's
/// environment (which holds secrets) is passed on.
pub fn command_env(agent_id: &str, issue_type: Option<&str>, incident_id: Option<i64>) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    env.insert("PATH".into(), std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()));
    env.insert("WARDEN_AGENT_ID".into(), agent_id.into());
    env.insert("WARDEN_ISSUE_TYPE".into(), issue_type.unwrap_or("manual").into());
    if let Some(id) = incident_id {
        env.insert("WARDEN_INCIDENT_ID".into(), id.to_string());
    }
    env
}

/// One pipe's output as read so far. The reader fills it while the
/// command runs, and may go on after the action has ended: a process the
/// command started in the background can hold the pipe open.
#[derive(Default)]
struct Captured {
    kept: Vec<u8>,
    truncated: bool,
    /// The pipe reached its end: every writer closed it.
    ended: bool,
}

/// Reads at most `limit` bytes into `into`, then drains (and drops) the
/// rest so the child never blocks on a full pipe, and whatever it left
/// behind never meets a closed one (SIGPIPE) for as long as warden runs.
async fn read_limited<R: tokio::io::AsyncRead + Unpin>(mut reader: R, limit: usize, into: Arc<Mutex<Captured>>) {
    let mut buf = [0u8; 8192];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let mut c = into.lock().unwrap_or_else(|e| e.into_inner());
                let room = limit.saturating_sub(c.kept.len());
                c.kept.extend_from_slice(&buf[..n.min(room)]);
                c.truncated |= n > room;
            }
        }
    }
    into.lock().unwrap_or_else(|e| e.into_inner()).ended = true;
}

/// A pipe's reader, started, and what it has read.
type Pipe = (Option<tokio::task::JoinHandle<()>>, Arc<Mutex<Captured>>);

fn capture<R: tokio::io::AsyncRead + Unpin + Send + 'static>(pipe: Option<R>, limit: usize) -> Pipe {
    let into = Arc::new(Mutex::new(Captured::default()));
    (pipe.map(|p| tokio::spawn(read_limited(p, limit, into.clone()))), into)
}

/// Runs `argv` and waits up to `timeout`.
pub async fn run_command(
    argv: &[String],
    env: &BTreeMap<String, String>,
    timeout: Duration,
    output_limit: usize,
) -> Outcome {
    let Some((program, args)) = argv.split_first() else {
        return Outcome::failed("no program to run", json!({}));
    };
    let started = Instant::now();
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .env_clear()
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // Its own process group, so a timeout kills everything it started.
    #[cfg(unix)]
    command.process_group(0);
    // Killed with warden, should warden itself be killed or crash: a
    // command left running would have no timeout, and could still be at
    // work when another replica takes the job over and runs the action
    // again. The kernel signals it when the thread that started it ends;
    // that is a runtime worker, which lives as long as warden. (What the
    // command started in turn is not reached this way; a supervisor that
    // kills the whole service, as systemd's KillMode=mixed does, is.)
    #[cfg(target_os = "linux")]
    {
        let warden = std::process::id() as libc::pid_t;
        // SAFETY: between fork and exec only async-signal-safe calls,
        // and no allocation.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                // warden ended before the line above: nobody would kill it.
                if libc::getppid() != warden {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            return Outcome::failed(format!("could not start {program}: {e}"), json!({"error": e.to_string()}));
        }
    };
    let stdout = capture(child.stdout.take(), output_limit);
    let stderr = capture(child.stderr.take(), output_limit);
    // Dropped unfinished (warden stopping mid-action), the whole group
    // goes, as on a timeout: kill_on_drop alone reaches the first process
    // only, and what it started would outlive warden.
    let mut group = GroupGuard(child.id());
    let waited = tokio::time::timeout(timeout, child.wait()).await;
    let timed_out = waited.is_err();
    let status = match waited {
        Ok(status) => status.ok(),
        Err(_) => {
            kill_group(child.id());
            // SIGKILL cannot be refused; the wait is bounded all the same,
            // since the lease does not wait.
            let _ = tokio::time::timeout(GRACE, child.kill()).await;
            None
        }
    };
    // A command that finished may leave processes behind on purpose (an
    // agent it started in the background).
    group.0 = None;
    // Output of a killed group ends with it; a grandchild that kept the
    // pipe open is not waited for beyond a moment (both pipes at once).
    // What was read by then is kept, and the pipe is said to be open.
    let collect = |(task, into): Pipe| async move {
        if let Some(task) = task {
            let _ = tokio::time::timeout(GRACE, task).await;
        }
        let c = into.lock().unwrap_or_else(|e| e.into_inner());
        (String::from_utf8_lossy(&c.kept).into_owned(), c.truncated, !c.ended)
    };
    let ((out, out_cut, out_open), (err, err_cut, err_open)) = tokio::join!(collect(stdout), collect(stderr));
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let mut detail = json!({
        "argv": argv,
        "stdout": out,
        "stderr": err,
        "stdout_truncated": out_cut,
        "stderr_truncated": err_cut,
        "duration_ms": elapsed_ms,
    });
    // Nothing more of it is recorded: say so, and why, rather than let a
    // short output read as all there was.
    if out_open || err_open {
        detail["output_left_open"] =
            json!([("stdout", out_open), ("stderr", err_open)].iter().filter(|p| p.1).map(|p| p.0).collect::<Vec<_>>());
    }
    match (timed_out, status) {
        (true, _) => {
            detail["timeout_ms"] = json!(timeout.as_millis() as u64);
            Outcome {
                ended: Ended::TimedOut,
                summary: format!("{program} did not finish within {}s and was killed", timeout.as_secs_f64()),
                detail,
            }
        }
        (false, Some(status)) if status.success() => {
            detail["exit_code"] = json!(0);
            Outcome { ended: Ended::Done, summary: format!("{program} exited 0"), detail }
        }
        (false, Some(status)) => {
            detail["exit_code"] = json!(status.code());
            #[cfg(unix)]
            {
                use std::os::unix::process::ExitStatusExt;
                detail["signal"] = json!(status.signal());
            }
            let code = status.code().map(|c| c.to_string()).unwrap_or_else(|| "by a signal".into());
            Outcome { ended: Ended::Failed, summary: format!("{program} exited {code}"), detail }
        }
        (false, None) => Outcome::failed(format!("could not wait for {program}"), detail),
    }
}

/// How long a killed command's end and its output are waited for.
const GRACE: Duration = Duration::from_secs(2);

/// The longest a timed-out command can keep its action from ending: its
/// end, then its output, each waited for up to `GRACE`.
pub const AFTER_TIMEOUT: Duration = GRACE.saturating_mul(2);

/// Kills the process group of the pid it holds when dropped.
struct GroupGuard(Option<u32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        kill_group(self.0);
    }
}

/// SIGKILL to the process group led by `pid` (the child's, created for it).
fn kill_group(pid: Option<u32>) {
    #[cfg(unix)]
    if let Some(pid) = pid {
        // SAFETY: kill(2) on the process group we created for this child.
        unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
    }
}

/// One filled-in HTTP action, ready to send.
pub struct HttpCall<'a> {
    pub method: &'a str,
    pub url: &'a str,
    pub headers: &'a BTreeMap<String, String>,
    pub body: Option<&'a Value>,
    /// Accepted statuses; empty means any 2xx.
    pub expect_status: &'a [u16],
    pub timeout: Duration,
    /// Bytes of the response body read and kept in the log.
    pub output_limit: usize,
}

/// The URL as recorded: outcomes are read with a read key and quoted in
/// alert messages, so credentials in the user-info part or the query
/// string (`?api_token=...`) are left out.
fn shown_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            let hidden = !u.username().is_empty() || u.password().is_some() || u.query().is_some();
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            u.set_fragment(None);
            if hidden { format!("{u}?[redacted]") } else { u.to_string() }
        }
        Err(_) => "[unparseable url]".to_string(),
    }
}

/// Calls an HTTP endpoint and checks the status.
pub async fn run_http(client: &reqwest::Client, call: HttpCall<'_>) -> Outcome {
    let HttpCall { method, url: target, headers, body, expect_status, timeout, output_limit } = call;
    let url = shown_url(target);
    let started = Instant::now();
    let method = match reqwest::Method::from_bytes(method.as_bytes()) {
        Ok(m) => m,
        Err(_) => return Outcome::failed(format!("bad method {method}"), json!({})),
    };
    let mut request = client.request(method.clone(), target).timeout(timeout);
    for (name, value) in headers {
        request = request.header(name, value);
    }
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) if e.is_timeout() => {
            return Outcome {
                ended: Ended::TimedOut,
                summary: format!("{method} {url} got no answer within {}s", timeout.as_secs_f64()),
                detail: json!({"url": url, "error": e.without_url().to_string(), "timeout_ms": timeout.as_millis() as u64}),
            };
        }
        Err(e) => {
            let e = e.without_url();
            return Outcome::failed(format!("{method} {url} failed: {e}"), json!({"url": url, "error": e.to_string()}));
        }
    };
    let status = response.status().as_u16();
    let body = crate::http::read_body(response, output_limit).await;
    let mut detail = json!({
        "url": url,
        "method": method.as_str(),
        "status": status,
        "body": body.text,
        "body_truncated": body.truncated || body.broken.is_some(),
        "duration_ms": started.elapsed().as_millis() as u64,
    });
    // The status is the answer; a body that then broke off does not undo
    // it, but the record must not pass it off as whole.
    let cut = match &body.broken {
        Some(why) => {
            detail["body_error"] = json!(why);
            format!(" (its body broke off: {why})")
        }
        None => String::new(),
    };
    let accepted =
        if expect_status.is_empty() { (200..300).contains(&status) } else { expect_status.contains(&status) };
    if accepted {
        Outcome { ended: Ended::Done, summary: format!("{method} {url} answered {status}{cut}"), detail }
    } else {
        Outcome::failed(format!("{method} {url} answered {status}, expected {expect_status:?}{cut}"), detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> BTreeMap<String, String> {
        command_env("a1", Some("agent_unresponsive"), Some(7))
    }

    #[test]
    fn recorded_urls_leave_out_credentials_and_the_query() {
        assert_eq!(shown_url("http://10.0.0.1:8080/restart/a1"), "http://10.0.0.1:8080/restart/a1");
        assert_eq!(
            shown_url("https://ops:hunter2@orch.example/restart/a1?api_token=T0K3N#x"),
            "https://orch.example/restart/a1?[redacted]"
        );
        assert_eq!(shown_url("not a url"), "[unparseable url]");
    }

    #[tokio::test]
    async fn a_successful_command_reports_exit_0_and_its_output() {
        let argv = ["/bin/sh", "-c", "echo out; echo err >&2"].map(String::from);
        let o = run_command(&argv, &env(), Duration::from_secs(10), 100).await;
        assert_eq!(o.ended, Ended::Done);
        assert_eq!(o.detail["exit_code"], 0);
        assert_eq!(o.detail["stdout"], "out\n");
        assert_eq!(o.detail["stderr"], "err\n");
    }

    #[tokio::test]
    async fn a_failing_command_reports_its_exit_code() {
        let argv = ["/bin/sh", "-c", "exit 3"].map(String::from);
        let o = run_command(&argv, &env(), Duration::from_secs(10), 100).await;
        assert_eq!(o.ended, Ended::Failed);
        assert_eq!(o.detail["exit_code"], 3);
        assert!(o.summary.contains("exited 3"));
    }

    #[tokio::test]
    async fn a_slow_command_is_killed_at_its_timeout() {
        let argv = ["/bin/sleep", "30"].map(String::from);
        let started = Instant::now();
        let o = run_command(&argv, &env(), Duration::from_millis(200), 100).await;
        assert_eq!(o.ended, Ended::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(20), "killed, not waited for");
    }

    fn alive(pid: i32) -> bool {
        // SAFETY: signal 0 only checks that the process exists.
        unsafe { libc::kill(pid, 0) == 0 }
    }

    #[tokio::test]
    async fn a_command_dropped_unfinished_takes_what_it_started_with_it() {
        let dir = std::env::temp_dir().join(format!("warden-exec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pidfile = dir.join("bg.pid");
        let script = format!("sleep 300 & echo $! > {}; sleep 300", pidfile.display());
        let argv = ["/bin/sh".to_string(), "-c".to_string(), script];
        let running = tokio::spawn(async move { run_command(&argv, &env(), Duration::from_secs(600), 100).await });
        let until = Instant::now() + Duration::from_secs(60);
        let pid = loop {
            if let Some(pid) = std::fs::read_to_string(&pidfile).ok().and_then(|p| p.trim().parse::<i32>().ok()) {
                break pid;
            }
            assert!(Instant::now() < until, "the command never started its background process");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(alive(pid));
        // As when warden stops mid-action: the future is dropped.
        running.abort();
        let _ = running.await;
        let until = Instant::now() + Duration::from_secs(60);
        while alive(pid) {
            assert!(Instant::now() < until, "the background process {pid} outlived the action");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_command_that_finished_keeps_what_it_started_in_the_background() {
        let argv = ["/bin/sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"].map(String::from);
        let o = run_command(&argv, &env(), Duration::from_secs(10), 100).await;
        assert_eq!(o.ended, Ended::Done);
        let pid: i32 = o.detail["stdout"].as_str().unwrap().trim().parse().unwrap();
        assert!(alive(pid), "an agent a restart started stays up");
        // SAFETY: the test's own background sleep.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }

    #[tokio::test]
    async fn output_held_open_by_a_background_process_is_kept_and_said_to_be_open() {
        // The background sleep inherits stdout and keeps it open.
        let argv = ["/bin/sh", "-c", "echo starting; echo oops >&2; sleep 300 & echo $! >&2"].map(String::from);
        let o = run_command(&argv, &env(), Duration::from_secs(10), 100).await;
        assert_eq!(o.ended, Ended::Done);
        assert_eq!(o.detail["stdout"], "starting\n", "what came before is kept: {}", o.detail);
        assert_eq!(o.detail["output_left_open"], json!(["stdout", "stderr"]), "{}", o.detail);
        let pid: i32 = o.detail["stderr"].as_str().unwrap().lines().nth(1).unwrap().parse().unwrap();
        // SAFETY: the test's own background sleep.
        unsafe { libc::kill(pid, libc::SIGKILL) };

        let quiet = ["/bin/sh", "-c", "echo done"].map(String::from);
        let o = run_command(&quiet, &env(), Duration::from_secs(10), 100).await;
        assert!(o.detail.get("output_left_open").is_none(), "{}", o.detail);
    }

    #[tokio::test]
    async fn output_is_kept_up_to_the_limit() {
        let argv = ["/bin/sh", "-c", "head -c 100000 /dev/zero | tr '\\\\0' x"].map(String::from);
        let o = run_command(&argv, &env(), Duration::from_secs(10), 64).await;
        assert_eq!(o.detail["stdout"].as_str().unwrap().len(), 64);
        assert_eq!(o.detail["stdout_truncated"], true);
    }

    #[tokio::test]
    async fn commands_see_only_their_own_environment() {
        // warden's environment holds secrets; a command gets none of it.
        let argv = ["/usr/bin/env"].map(String::from);
        let o = run_command(&argv, &env(), Duration::from_secs(10), 4096).await;
        let mut names: Vec<&str> =
            o.detail["stdout"].as_str().unwrap().lines().filter_map(|l| l.split('=').next()).collect();
        names.sort();
        assert_eq!(names, ["PATH", "WARDEN_AGENT_ID", "WARDEN_INCIDENT_ID", "WARDEN_ISSUE_TYPE"]);
    }

    #[tokio::test]
    async fn a_huge_response_body_is_read_only_up_to_the_limit() {
        use tokio::io::AsyncWriteExt;
        crate::alerting::tls::install_crypto_provider();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/restart", listener.local_addr().unwrap());
        // 8 MB of a body that promises a gigabyte, then nothing more: a
        // reader after the whole body would wait for the timeout.
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            // The request first: an answer before it is not one to it.
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while !request.ends_with(b"\r\n\r\n") && socket.read(&mut byte).await.is_ok_and(|n| n == 1) {
                request.push(byte[0]);
            }
            let head = "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 1000000000\r\n\r\n";
            if socket.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let chunk = vec![b'x'; 1 << 16];
            for _ in 0..128 {
                if socket.write_all(&chunk).await.is_err() {
                    return;
                }
            }
            let mut rest = [0u8; 1024];
            while matches!(socket.read(&mut rest).await, Ok(n) if n > 0) {}
        });
        let started = Instant::now();
        let call = HttpCall {
            method: "POST",
            url: &url,
            headers: &BTreeMap::new(),
            body: None,
            expect_status: &[],
            timeout: Duration::from_secs(10),
            output_limit: 4096,
        };
        let o = run_http(&reqwest::Client::new(), call).await;
        assert_eq!(o.ended, Ended::Done, "{}", o.summary);
        assert_eq!(o.detail["body"].as_str().unwrap().len(), 4096);
        assert_eq!(o.detail["body_truncated"], true);
        assert!(started.elapsed() < Duration::from_secs(5), "the rest was not waited for: {:?}", started.elapsed());
    }

    #[tokio::test]
    async fn a_missing_program_fails_clearly() {
        let argv = ["/nonexistent/restart".to_string()];
        let o = run_command(&argv, &env(), Duration::from_secs(1), 64).await;
        assert_eq!(o.ended, Ended::Failed);
        assert!(o.summary.contains("could not start"), "{}", o.summary);
    }
}
