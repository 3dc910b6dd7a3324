//! The request timeout: 504 past the limit, and each answer recorded in
//! the per-route request metrics.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::metrics;

/// Answers 504 `{"detail": "request timed out"}` when the inner service
/// takes longer than the limit, and records each answer (timeouts
/// included) in the per-route request metrics when given a table. A plain
/// future wrapper: no boxing, no extra task.
#[derive(Debug, Clone, Copy)]
pub struct RequestTimeoutLayer {
    limit: Duration,
    metrics: Option<&'static metrics::HttpMetrics>,
}

impl RequestTimeoutLayer {
    /// Requests past `limit` answer 504.
    #[must_use]
    pub fn new(limit: Duration) -> Self {
        Self {
            limit,
            metrics: None,
        }
    }

    /// Also records every answer in `metrics` (`None`: not recorded).
    #[must_use]
    pub fn recording(mut self, metrics: Option<&'static metrics::HttpMetrics>) -> Self {
        self.metrics = metrics;
        self
    }
}

impl<S> tower::Layer<S> for RequestTimeoutLayer {
    type Service = RequestTimeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestTimeout {
            inner,
            limit: self.limit,
            metrics: self.metrics,
        }
    }
}

/// The service made by [`RequestTimeoutLayer`].
#[derive(Debug, Clone)]
pub struct RequestTimeout<S> {
    inner: S,
    limit: Duration,
    metrics: Option<&'static metrics::HttpMetrics>,
}

impl<S, B> tower::Service<axum::http::Request<B>> for RequestTimeout<S>
where
    S: tower::Service<axum::http::Request<B>, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = TimeoutFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: axum::http::Request<B>) -> Self::Future {
        let recording = self
            .metrics
            .map(|m| (m, m.slot(&req), std::time::Instant::now()));
        TimeoutFuture {
            inner: self.inner.call(req),
            sleep: tokio::time::sleep(self.limit),
            recording,
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`RequestTimeout`].
    #[derive(Debug)]
    pub struct TimeoutFuture<F> {
        #[pin]
        inner: F,
        #[pin]
        sleep: tokio::time::Sleep,
        recording: Option<(&'static metrics::HttpMetrics, metrics::Slot, std::time::Instant)>,
    }
}

impl<F: Future<Output = Result<Response, Infallible>>> Future for TimeoutFuture<F> {
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let r = match this.inner.poll(cx) {
            Poll::Ready(Ok(r)) => r,
            Poll::Pending => match this.sleep.poll(cx) {
                Poll::Ready(()) => {
                    tracing::warn!("request timed out");
                    ApiError::Timeout.into_response()
                }
                Poll::Pending => return Poll::Pending,
            },
        };
        if let Some((m, slot, started)) = this.recording.take() {
            m.answered(slot, &r, started);
        }
        Poll::Ready(Ok(r))
    }
}
