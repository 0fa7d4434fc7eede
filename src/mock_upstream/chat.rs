//! `POST /v1/chat/completions`: a minimal OpenAI-compatible answer, whole or as
//! server-sent events, with token `usage` so gatehouse has something to meter;
//! `GET /v1/models`: the model list.
//!
//! The reply is five short pieces ("This is a mock reply."), each one completion
//! token. `max_tokens` shapes it the way a real model's limit does: below 5 the reply
//! is cut (`finish_reason: "length"`); above 5 the reply is `max_tokens` pieces of
//! 1 KiB filler (`"length"` too), so a test can stream megabytes. A stream is produced
//! lazily into a small bounded channel: the mock never holds more than a few events
//! of it, and the producer stops as soon as the client goes away.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body::Frame;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{json_response, unix_now, Shared};
use crate::body::{self, Body};

/// The reply, one piece per streamed chunk; each piece counts as one completion token.
const REPLY: [&str; 5] = ["This", " is", " a", " mock", " reply."];
/// Bytes of content in each piece of a long (`max_tokens` > 5) reply.
pub const LONG_PIECE_BYTES: usize = 1024;
/// Events a stream may have queued ahead of the connection: backpressure, not buffering.
const STREAM_BUFFER: usize = 8;
/// The models `GET /v1/models` lists (chat products of the catalogue).
const MODELS: [(&str, &str); 6] = [
    ("gpt-4o", "openai"),
    ("gpt-4o-mini", "openai"),
    ("deepseek-chat", "deepseek"),
    ("moonshot-v1-8k", "moonshot"),
    ("qwen-plus", "qwen"),
    ("glm-4", "zhipu"),
];

/// What the model "generates" for one request.
#[derive(Debug, Clone, Copy)]
enum Reply {
    /// The first `n` (≤ 5) pieces of `REPLY`.
    Short(usize),
    /// `n` pieces of `LONG_PIECE_BYTES` filler each.
    Long(usize),
}

impl Reply {
    fn for_request(request: &Value) -> Reply {
        match request.get("max_tokens").and_then(Value::as_u64) {
            Some(n) if n > REPLY.len() as u64 => {
                Reply::Long(usize::try_from(n).unwrap_or(usize::MAX))
            }
            Some(n) => Reply::Short(n as usize),
            None => Reply::Short(REPLY.len()),
        }
    }

    fn len(self) -> usize {
        match self {
            Reply::Short(n) | Reply::Long(n) => n,
        }
    }

    fn finish_reason(self) -> &'static str {
        match self {
            Reply::Short(n) if n == REPLY.len() => "stop",
            _ => "length",
        }
    }

    fn piece(self, i: usize) -> String {
        match self {
            Reply::Short(_) => REPLY[i].to_string(),
            Reply::Long(_) => long_piece(i),
        }
    }
}

/// Piece `i` of a long reply: numbered, so a reader can check order, padded to 1 KiB.
fn long_piece(i: usize) -> String {
    const FILLER: &str = "lorem ipsum dolor sit amet ";
    let mut piece = format!("[{i}] ");
    while piece.len() < LONG_PIECE_BYTES {
        let room = LONG_PIECE_BYTES - piece.len();
        piece.push_str(&FILLER[..room.min(FILLER.len())]);
    }
    piece
}

pub(super) fn models() -> Response<Body> {
    let data: Vec<Value> = MODELS
        .iter()
        .map(|(id, owner)| json!({"id": id, "object": "model", "created": 1_715_367_049, "owned_by": owner}))
        .collect();
    json_response(
        StatusCode::OK,
        json!({"object": "list", "data": data})
            .to_string()
            .into_bytes(),
    )
}

pub(super) fn completion(shared: &Arc<Shared>, body: &[u8]) -> Response<Body> {
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
    let reply = Reply::for_request(&request);
    let prompt_tokens = prompt_tokens(&request);
    let completion_tokens = reply.len() as u64;
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    });
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let created = unix_now();

    if request.get("stream").and_then(Value::as_bool) != Some(true) {
        let content: String = (0..reply.len()).map(|i| reply.piece(i)).collect();
        let answer = json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": reply.finish_reason(),
            }],
            "usage": usage,
        });
        return json_response(StatusCode::OK, answer.to_string().into_bytes());
    }

    let include_usage = request
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true);
    let script = Script {
        id,
        created,
        model,
        reply,
        usage: include_usage.then_some(usage),
    };
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    tokio::spawn(produce(shared.clone(), script, tx));
    let mut response = Response::new(body::boxed(ChannelBody { rx }));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// One streamed answer, as events made on demand.
struct Script {
    id: String,
    created: u64,
    model: String,
    reply: Reply,
    /// The final usage chunk's `usage`, when `stream_options.include_usage` asked for it.
    usage: Option<Value>,
}

impl Script {
    fn chunk(&self, choices: Value, usage: Option<&Value>) -> Bytes {
        let mut chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if let Some(usage) = usage {
            chunk["usage"] = usage.clone();
        }
        Bytes::from(format!("data: {chunk}\n\n"))
    }

    fn delta(&self, delta: Value, finish_reason: Value) -> Bytes {
        self.chunk(
            json!([{"index": 0, "delta": delta, "finish_reason": finish_reason}]),
            None,
        )
    }

    /// Role chunk, one chunk per piece, the finish chunk, the usage chunk if asked, `[DONE]`.
    fn events(&self) -> impl Iterator<Item = Bytes> + '_ {
        let head = std::iter::once_with(|| {
            self.delta(json!({"role": "assistant", "content": ""}), Value::Null)
        });
        let pieces = (0..self.reply.len())
            .map(|i| self.delta(json!({ "content": self.reply.piece(i) }), Value::Null));
        let finish =
            std::iter::once_with(|| self.delta(json!({}), json!(self.reply.finish_reason())));
        let usage = self
            .usage
            .iter()
            .map(|usage| self.chunk(json!([]), Some(usage)));
        let done = std::iter::once(Bytes::from_static(b"data: [DONE]\n\n"));
        head.chain(pieces).chain(finish).chain(usage).chain(done)
    }
}

/// Feeds `script`'s events into the body channel: after `stream_chunk_delay`, and past
/// the first event only while streams are not paused. Stops when the client is gone.
async fn produce(shared: Arc<Shared>, script: Script, tx: mpsc::Sender<Bytes>) {
    shared.streams.started.fetch_add(1, Ordering::AcqRel);
    shared.notify();
    let delay = shared.config.stream_chunk_delay;
    let mut gate = shared.stream_gate.subscribe();
    for (i, event) in script.events().enumerate() {
        let ready = async {
            if i > 0 {
                // A closed gate sender cannot happen while `shared` is held here.
                let _ = gate.wait_for(|paused| !*paused).await;
            }
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
        };
        let sent = tokio::select! {
            _ = ready => tx.send(event).await.is_ok(),
            _ = tx.closed() => false,
        };
        if !sent {
            // The client went away: the connection dropped the body.
            shared.streams.abandoned.fetch_add(1, Ordering::AcqRel);
            shared.notify();
            return;
        }
        shared.streams.events_sent.fetch_add(1, Ordering::AcqRel);
        shared.notify();
    }
    shared.streams.completed.fetch_add(1, Ordering::AcqRel);
    shared.notify();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_pieces_are_one_kib_and_numbered() {
        for i in [0, 7, 12_345] {
            let piece = long_piece(i);
            assert_eq!(piece.len(), LONG_PIECE_BYTES);
            assert!(piece.starts_with(&format!("[{i}] lorem")));
        }
    }

    #[test]
    fn max_tokens_shapes_the_reply() {
        let reply = |max: Value| Reply::for_request(&json!({ "max_tokens": max }));
        assert!(matches!(reply(json!(null)), Reply::Short(5)));
        assert_eq!(reply(json!(null)).finish_reason(), "stop");
        assert!(matches!(reply(json!(5)), Reply::Short(5)));
        assert!(matches!(reply(json!(2)), Reply::Short(2)));
        assert_eq!(reply(json!(2)).finish_reason(), "length");
        assert!(matches!(reply(json!(6)), Reply::Long(6)));
        assert_eq!(reply(json!(6)).finish_reason(), "length");
    }
}
