//! `POST /v1/chat/completions`: a minimal OpenAI-compatible answer, whole or as
//! server-sent events, with token `usage` so gatehouse has something to meter.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body::Frame;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{json_response, unix_now};
use crate::body::{self, Body};

/// The reply, one piece per streamed chunk; each piece counts as one completion token.
const REPLY: [&str; 5] = ["This", " is", " a", " mock", " reply."];

pub(super) fn completion(body: &[u8], chunk_delay: Duration) -> Response<Body> {
    let request: Value = match serde_json::from_slice(body) {
        Ok(value) => value,
        Err(_) => {
            return json_response(
                StatusCode::BAD_REQUEST,
                super::task::error_envelope(400, "invalid json body"),
            )
        }
    };
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("gpt-4o-mini")
        .to_string();
    let prompt_tokens = prompt_tokens(&request);
    let completion_tokens = REPLY.len() as u64;
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    });
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let created = unix_now();

    if request.get("stream").and_then(Value::as_bool) != Some(true) {
        let answer = json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": REPLY.concat()},
                "finish_reason": "stop",
            }],
            "usage": usage,
        });
        return json_response(StatusCode::OK, answer.to_string().into_bytes());
    }

    let include_usage = request
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true);
    let chunk = |delta: Value, finish_reason: Value| {
        let chunk = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        });
        Bytes::from(format!("data: {chunk}\n\n"))
    };
    let mut events = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    events.extend(
        REPLY
            .iter()
            .map(|piece| chunk(json!({ "content": piece }), Value::Null)),
    );
    events.push(chunk(json!({}), json!("stop")));
    if include_usage {
        let usage_chunk = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [],
            "usage": usage,
        });
        events.push(Bytes::from(format!("data: {usage_chunk}\n\n")));
    }
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));

    let (tx, rx) = mpsc::channel(events.len());
    if chunk_delay.is_zero() {
        for event in events {
            // Capacity is events.len(): this cannot fail.
            let _ = tx.try_send(event);
        }
    } else {
        // Spaced chunks let a test tell a streaming gateway from a buffering one.
        tokio::spawn(async move {
            for event in events {
                tokio::time::sleep(chunk_delay).await;
                if tx.send(event).await.is_err() {
                    return; // the client went away
                }
            }
        });
    }
    let mut response = Response::new(body::boxed(ChannelBody { rx }));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// A rough count: a token per four characters of message content, at least one.
fn prompt_tokens(request: &Value) -> u64 {
    let chars: usize = request
        .get("messages")
        .and_then(Value::as_array)
        .map(|messages| {
            messages
                .iter()
                .filter_map(|m| m.get("content").and_then(Value::as_str))
                .map(|content| content.chars().count())
                .sum()
        })
        .unwrap_or(0);
    (chars as u64).div_ceil(4).max(1)
}

/// A body whose frames arrive through a channel, one SSE event per frame.
struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx
            .poll_recv(cx)
            .map(|event| event.map(|bytes| Ok(Frame::data(bytes))))
    }
}
