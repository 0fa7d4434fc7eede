//! Token usage in chat answers: read from a JSON body, or tapped from a server-sent-event
//! stream as it passes through, without holding more than the current line.

use crate::body::{Body, BoxError};
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use std::pin::Pin;
use std::task::{Context, Poll};

/// `usage.prompt_tokens` / `usage.completion_tokens` of an OpenAI-compatible answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl TokenUsage {
    /// The `usage` object of a chat completion, embedding or final stream chunk.
    pub fn from_json(value: &serde_json::Value) -> Option<TokenUsage> {
        let usage = value.get("usage")?.as_object()?;
        let count = |name: &str| usage.get(name).and_then(serde_json::Value::as_u64);
        let prompt_tokens = count("prompt_tokens")?;
        Some(TokenUsage {
            prompt_tokens,
            completion_tokens: count("completion_tokens").unwrap_or(0),
        })
    }
}

/// Lines longer than this are not usage chunks (those are small): skipped, not buffered.
const MAX_LINE: usize = 64 * 1024;

/// Called once when the stream ends: the last usage seen, and whether the stream finished
/// (`false`: the client went away or the upstream broke off).
pub type OnStreamEnd = Box<dyn FnOnce(Option<TokenUsage>, bool) + Send>;

/// Passes an SSE body through unchanged, frame by frame, watching `data:` lines for a
/// `usage` object (sent in the final chunk when `stream_options.include_usage` is set).
pub struct UsageTap {
    inner: Body,
    line: Vec<u8>,
    skipping_long_line: bool,
    usage: Option<TokenUsage>,
    on_end: Option<OnStreamEnd>,
}

impl UsageTap {
    pub fn new(inner: Body, on_end: OnStreamEnd) -> UsageTap {
        UsageTap {
            inner,
            line: Vec::new(),
            skipping_long_line: false,
            usage: None,
            on_end: Some(on_end),
        }
    }

    fn scan(&mut self, data: &[u8]) {
        for &byte in data {
            if byte == b'\n' {
                if !self.skipping_long_line {
                    self.finish_line();
                }
                self.line.clear();
                self.skipping_long_line = false;
            } else if !self.skipping_long_line {
                if self.line.len() >= MAX_LINE {
                    self.skipping_long_line = true;
                    self.line.clear();
                } else {
                    self.line.push(byte);
                }
            }
        }
    }

    fn finish_line(&mut self) {
        let line = String::from_utf8_lossy(&self.line);
        let Some(data) = line.trim_end_matches('\r').strip_prefix("data:") else {
            return;
        };
        let data = data.trim();
        if data == "[DONE]" || !data.contains("\"usage\"") {
            return;
        }
        if let Some(usage) = serde_json::from_str::<serde_json::Value>(data)
            .ok()
            .as_ref()
            .and_then(TokenUsage::from_json)
        {
            self.usage = Some(usage);
        }
    }

    fn end(&mut self, complete: bool) {
        if let Some(on_end) = self.on_end.take() {
            on_end(self.usage, complete);
        }
    }
}

impl HttpBody for UsageTap {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let data = data.clone();
                    self.scan(&data);
                }
            }
            Poll::Ready(Some(Err(_))) => self.end(false),
            Poll::Ready(None) => {
                // A last line without a trailing newline still counts.
                if !self.line.is_empty() && !self.skipping_long_line {
                    self.finish_line();
                }
                self.end(true);
            }
            Poll::Pending => {}
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

impl Drop for UsageTap {
    fn drop(&mut self) {
        // Dropped before the end: the client disconnected (which also closes the upstream
        // request, since its body is dropped with this one).
        self.end(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::{Arc, Mutex};

    /// A body that yields the given chunks one frame each.
    struct Chunks(std::collections::VecDeque<Bytes>);

    impl HttpBody for Chunks {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.pop_front().map(|chunk| Ok(Frame::data(chunk))))
        }
    }

    type Seen = Arc<Mutex<Option<(Option<TokenUsage>, bool)>>>;

    fn tapped(chunks: Vec<&'static str>) -> (UsageTap, Seen) {
        let seen = Arc::new(Mutex::new(None));
        let sink = seen.clone();
        let body = Chunks(
            chunks
                .into_iter()
                .map(|c: &'static str| Bytes::from_static(c.as_bytes()))
                .collect(),
        )
        .boxed_unsync();
        let tap = UsageTap::new(
            body,
            Box::new(move |usage, complete| *sink.lock().unwrap() = Some((usage, complete))),
        );
        (tap, seen)
    }

    #[tokio::test]
    async fn usage_in_the_final_chunk_split_across_frames_is_found() {
        let (tap, seen) = tapped(vec![
            "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,",
            "\"completion_tokens\":34,\"total_tokens\":46}}\n\ndata: [DONE]\n\n",
        ]);
        let bytes = tap.collect().await.unwrap().to_bytes();
        assert!(
            bytes.ends_with(b"data: [DONE]\n\n"),
            "passed through unchanged"
        );
        assert_eq!(
            *seen.lock().unwrap(),
            Some((
                Some(TokenUsage {
                    prompt_tokens: 12,
                    completion_tokens: 34
                }),
                true
            ))
        );
    }

    #[tokio::test]
    async fn a_dropped_stream_reports_incomplete() {
        let (tap, seen) = tapped(vec!["data: {\"choices\":[]}\n\n"]);
        drop(tap);
        assert_eq!(*seen.lock().unwrap(), Some((None, false)));
    }
}
