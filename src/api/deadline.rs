//! What `server.request_timeout` answers: 408 when the request body was
//! still arriving (a slow or stalled client), 503 when warden itself was
//! slow. Either way the connection is closed, so a trickling client holds
//! neither it nor anything else past the timeout.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::header::CONNECTION;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use super::ApiError;

/// Whether a request's body has been read from, and to its end.
#[derive(Clone)]
pub struct BodyProgress {
    started: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
}

impl BodyProgress {
    pub fn complete(&self) -> bool {
        self.done.load(Ordering::Relaxed)
    }

    /// Whether warden has begun reading the body. Handlers check the key
    /// first: one still waiting for the database then has not.
    pub fn started(&self) -> bool {
        self.started.load(Ordering::Relaxed)
    }
}

/// Wraps the request's body so its reading can be observed.
pub fn track(request: Request) -> (Request, BodyProgress) {
    let (parts, body) = request.into_parts();
    let done = Arc::new(AtomicBool::new(body.is_end_stream()));
    let started = Arc::new(AtomicBool::new(false));
    let progress = BodyProgress { started: started.clone(), done: done.clone() };
    (Request::from_parts(parts, Body::new(Tracked { inner: body, started, done })), progress)
}

/// The answer when the request outlived the timeout: 408 only when warden
/// was reading the body and the client had not sent it all; when warden
/// had not got as far as reading it (a key check waiting for the
/// database), the slowness was warden's. `written`: heartbeats of the
/// request were in a transaction that may still commit.
pub fn expired(progress: &BodyProgress, written: bool) -> Response {
    let error = if written || progress.complete() || !progress.started() {
        abandoned(written)
    } else {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            "the request body did not arrive in time (server.request_timeout); nothing was done",
        )
    };
    let mut response = error.into_response();
    response.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
    response
}

/// What warden says of work it gave up on for time: `written`, heartbeats
/// of it were in a transaction that may still commit.
pub fn abandoned(written: bool) -> ApiError {
    if written {
        ApiError::unavailable(
            "the database did not confirm the write in time: it may still be stored, so a retry may record it twice",
        )
    } else {
        ApiError::unavailable("the request took too long and was abandoned")
    }
}

/// When a handler that answers inside its body (JSON-RPC on /mcp) must
/// stop waiting, to answer before `server.request_timeout` cuts it off
/// with an HTTP 503 its clients would take for a broken connection. Set on
/// every request by the timeout's middleware.
#[derive(Debug, Clone, Copy)]
pub struct AnswerBy(pub tokio::time::Instant);

impl AnswerBy {
    /// `limit` from now, less the time to write the answer: a quarter of
    /// it, at most a second.
    pub fn within(limit: std::time::Duration) -> Self {
        let margin = (limit / 4).min(std::time::Duration::from_secs(1));
        Self(tokio::time::Instant::now() + (limit - margin))
    }
}

struct Tracked {
    inner: Body,
    started: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        self.started.store(true, Ordering::Relaxed);
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.done.store(true, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
