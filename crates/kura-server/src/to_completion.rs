//! Writes that outlive their request: [`ToCompletion`].

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// A future that is finished on a task of its own if it is dropped before
/// it completes.
///
/// A request is dropped mid-way when it times out or its client goes; a
/// write must not stop with it. Once its statement is sent it may commit,
/// and the cache step after it must still happen, or the old value stays
/// cached for its whole TTL. (Reads need no such care: the library runs
/// each load as a task of its own.)
///
/// A write pays one allocation; the spawn only happens on a drop.
pub struct ToCompletion<F: Future + Send + 'static>(Option<Pin<Box<F>>>)
where
    F::Output: Send + 'static;

impl<F: Future + Send + 'static> ToCompletion<F>
where
    F::Output: Send + 'static,
{
    /// Wraps `fut`.
    pub fn new(fut: F) -> Self {
        Self(Some(Box::pin(fut)))
    }
}

impl<F: Future + Send + 'static> Future for ToCompletion<F>
where
    F::Output: Send + 'static,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        let Some(fut) = this.0.as_mut() else {
            return Poll::Pending;
        };
        let out = fut.as_mut().poll(cx);
        if out.is_ready() {
            this.0 = None;
        }
        out
    }
}

impl<F: Future + Send + 'static> Drop for ToCompletion<F>
where
    F::Output: Send + 'static,
{
    fn drop(&mut self) {
        if let (Some(fut), Ok(rt)) = (self.0.take(), tokio::runtime::Handle::try_current()) {
            rt.spawn(async move {
                let _ = fut.await;
            });
        }
    }
}
