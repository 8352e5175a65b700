//! Upstream HTTP/1.1 connections, kept alive and reused, one pool per serving thread.
//!
//! A connection is taken for one request and goes back to the pool when that response's body
//! has been read to its end (HTTP/1.1 runs one exchange at a time). A response dropped before
//! its end takes the connection with it. Pools never cross threads, so a request and its
//! upstream connection live on one thread. Idle connections are bounded per upstream and in
//! all, since each holds a file descriptor (see `listeners::fds`).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::RequestBody;

/// Idle connections kept per upstream.
const MAX_IDLE: usize = 256;

#[derive(Clone)]
pub struct Pool {
    idle: Arc<Mutex<Idle>>,
    /// Idle connections kept in all.
    max_idle: usize,
}

#[derive(Default)]
struct Idle {
    by_upstream: HashMap<String, Vec<SendRequest<RequestBody>>>,
    count: usize,
}

impl Default for Pool {
    fn default() -> Self {
        Pool::new(MAX_IDLE)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("cannot connect")]
    Connect(#[source] std::io::Error),
    #[error("connect timed out")]
    Timeout,
    #[error("HTTP handshake failed")]
    Handshake(#[source] hyper::Error),
    #[error("the upstream did not answer")]
    Send(#[source] hyper::Error),
}

impl Pool {
    /// A pool that keeps at most `max_idle` idle connections in all (at least one).
    pub fn new(max_idle: usize) -> Pool {
        Pool {
            idle: Arc::default(),
            max_idle: max_idle.max(1),
        }
    }

    fn take(&self, upstream: &str) -> Option<SendRequest<RequestBody>> {
        let mut idle = crate::lock_or_reset(&self.idle);
        let Idle { by_upstream, count } = &mut *idle;
        let list = by_upstream.get_mut(upstream)?;
        while let Some(s) = list.pop() {
            *count -= 1;
            if s.is_ready() {
                return Some(s);
            }
        }
        None
    }

    fn put(&self, upstream: &str, s: SendRequest<RequestBody>) {
        if s.is_closed() {
            return;
        }
        {
            let mut idle = crate::lock_or_reset(&self.idle);
            let Idle { by_upstream, count } = &mut *idle;
            if *count >= self.max_idle {
                // Connections the upstreams closed meanwhile hold no file; drop them first.
                for list in by_upstream.values_mut() {
                    list.retain(|s| !s.is_closed());
                }
                by_upstream.retain(|_, l| !l.is_empty());
                *count = by_upstream.values().map(Vec::len).sum();
            }
            let list = by_upstream.entry(upstream.to_string()).or_default();
            if *count < self.max_idle && list.len() < MAX_IDLE {
                list.push(s);
                *count += 1;
            }
        }
    }

    async fn connect(upstream: &str) -> Result<SendRequest<RequestBody>, PoolError> {
        let stream = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            TcpStream::connect(upstream),
        )
        .await
        .map_err(|_| PoolError::Timeout)?
        .map_err(PoolError::Connect)?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(PoolError::Handshake)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// Send `req` to `upstream` (`host:port`), on an idle connection when there is one.
    pub async fn send(
        &self,
        upstream: &str,
        req: Request<RequestBody>,
    ) -> Result<Response<PooledBody>, PoolError> {
        // A request without a body whose method is idempotent may be sent again when a reused
        // connection dies before any answer (the upstream closed it as the request went out),
        // as browsers and nginx do: nothing of it can have been acted on twice that the method
        // does not allow.
        let again = (req.method().is_idempotent() && req.body().is_end_stream()).then(|| {
            let mut b = Request::builder()
                .method(req.method().clone())
                .uri(req.uri().clone())
                .version(req.version());
            if let Some(h) = b.headers_mut() {
                *h = req.headers().clone();
            }
            b
        });
        let (sender, resp) = match self.take(upstream) {
            Some(mut s) => match s.try_send_request(req).await {
                Ok(r) => (s, r),
                // The upstream closed the idle connection just as it was taken: the request
                // was not written, so it goes once more on a new connection.
                Err(mut e) => match (e.take_message(), again) {
                    (Some(req), _) => {
                        let mut fresh = Self::connect(upstream).await?;
                        let r = fresh.send_request(req).await.map_err(PoolError::Send)?;
                        (fresh, r)
                    }
                    // Written, but the connection ended with no answer at all.
                    (None, Some(b)) if closed_unanswered(e.error()) => {
                        let req = b
                            .body(RequestBody::empty())
                            .map_err(|_| PoolError::Send(e.into_error()))?;
                        let mut fresh = Self::connect(upstream).await?;
                        let r = fresh.send_request(req).await.map_err(PoolError::Send)?;
                        (fresh, r)
                    }
                    (None, _) => return Err(PoolError::Send(e.into_error())),
                },
            },
            None => {
                let mut s = Self::connect(upstream).await?;
                let r = s.send_request(req).await.map_err(PoolError::Send)?;
                (s, r)
            }
        };
        let (parts, body) = resp.into_parts();
        let done = body.is_end_stream();
        let mut pooled = PooledBody {
            inner: body,
            home: Some((self.clone(), upstream.to_string(), sender)),
        };
        if done {
            pooled.release();
        }
        Ok(Response::from_parts(parts, pooled))
    }
}

/// Did the connection end (closed or reset) before any of an answer came?
fn closed_unanswered(e: &hyper::Error) -> bool {
    use std::error::Error as _;
    e.is_incomplete_message()
        || e.is_canceled()
        || e.source()
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .is_some_and(|io| {
                matches!(
                    io.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                )
            })
}

/// A response body that hands its connection back to the pool at its end.
pub struct PooledBody {
    inner: Incoming,
    home: Option<(Pool, String, SendRequest<RequestBody>)>,
}

impl PooledBody {
    fn release(&mut self) {
        if let Some((pool, upstream, sender)) = self.home.take() {
            pool.put(&upstream, sender);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.release(),
            Poll::Ready(Some(Err(_))) => self.home = None,
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
