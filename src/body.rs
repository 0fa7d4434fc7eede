//! The one body type every layer passes around, and small constructors for it.
//!
//! Requests and responses are boxed so that a layer can swap a streamed body
//! (hyper's `Incoming`) for a buffered one (a rewritten JSON body) without the
//! types of the whole stack changing.

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full};
use std::future::Future;

pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The body type of every request and response inside gatehouse.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A body that holds `bytes` in memory.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body with no bytes.
pub fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Boxes any body whose errors can be boxed (hyper's `Incoming`, a client response body, …).
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// Reads a whole body into memory, failing once more than `limit` bytes arrived.
///
/// Used where a layer must see the JSON (validation, settlement); everything else streams.
/// A frame loop rather than `Limited::collect()`: rustc cannot prove that combinator's
/// future `Send` inside a layer's boxed future (a higher-ranked `From<Box<dyn Error>>` bound).
pub async fn collect_limited(mut body: Body, limit: usize) -> Result<Bytes, CollectError> {
    let mut buffer = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|err| {
            // The limits layer wraps request bodies in `Limited` with the same limit.
            if err.is::<http_body_util::LengthLimitError>() {
                CollectError::TooLarge
            } else {
                CollectError::Read(err.to_string())
            }
        })?;
        if let Ok(data) = frame.into_data() {
            if buffer.len() + data.len() > limit {
                return Err(CollectError::TooLarge);
            }
            buffer.extend_from_slice(&data);
        }
    }
    Ok(buffer.freeze())
}

#[derive(Debug)]
pub enum CollectError {
    TooLarge,
    Read(String),
}

/// What `read_up_to` found: the whole body, or its first bytes and the rest still unread.
pub enum ReadUpTo {
    Whole(Bytes),
    Partial(Bytes, Body),
}

/// Reads a body into memory unless it is larger than `limit`; a larger one comes back as
/// the part read so far plus the rest, to be relayed without holding it (see `prefixed`).
pub async fn read_up_to(mut body: Body, limit: usize) -> Result<ReadUpTo, BoxError> {
    let mut buffer = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            buffer.extend_from_slice(&data);
            if buffer.len() > limit {
                return Ok(ReadUpTo::Partial(buffer.freeze(), body));
            }
        }
    }
    Ok(ReadUpTo::Whole(buffer.freeze()))
}

/// `first`, then everything `rest` still yields.
pub fn prefixed(first: Bytes, rest: Body) -> Body {
    Prefixed {
        first: Some(first),
        rest,
    }
    .boxed_unsync()
}

struct Prefixed {
    first: Option<Bytes>,
    rest: Body,
}

impl http_body::Body for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        if let Some(first) = self.first.take() {
            return std::task::Poll::Ready(Some(Ok(http_body::Frame::data(first))));
        }
        std::pin::Pin::new(&mut self.rest).poll_frame(cx)
    }
}

/// `body`, failing once `limit` has passed since this call: an answer that stalls after its
/// headers cannot hold a connection for ever.
pub fn with_deadline(body: Body, limit: std::time::Duration) -> Body {
    Deadline {
        inner: body,
        limit,
        sleep: Box::pin(tokio::time::sleep(limit)),
    }
    .boxed_unsync()
}

struct Deadline {
    inner: Body,
    limit: std::time::Duration,
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl http_body::Body for Deadline {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        if let std::task::Poll::Ready(frame) = std::pin::Pin::new(&mut self.inner).poll_frame(cx) {
            return std::task::Poll::Ready(frame);
        }
        match self.sleep.as_mut().poll(cx) {
            std::task::Poll::Ready(()) => std::task::Poll::Ready(Some(Err(format!(
                "the upstream's answer did not finish within {} ms (upstream.timeout_ms; set stream = true on streaming routes)",
                self.limit.as_millis()
            )
            .into()))),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}

/// Reads a request body a layer must see whole: 413 past `limit`, 400 when it breaks off.
pub async fn read_request(body: Body, limit: usize) -> Result<Bytes, crate::error::GatewayError> {
    use crate::error::GatewayError;
    collect_limited(body, limit).await.map_err(|err| match err {
        CollectError::TooLarge => GatewayError::PayloadTooLarge { limit },
        CollectError::Read(err) => {
            GatewayError::BadRequest(format!("could not read the request body: {err}"))
        }
    })
}

/// The future every layer of the stack returns. Boxed and `Send` so layers compose freely
/// (and so the compiler need not prove `Send` through generic associated types).
pub type ResponseFuture = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<http::Response<Body>, crate::error::GatewayError>>
            + Send
            + 'static,
    >,
>;
