//! Validation and rewrite of `POST /runway/pro/generate` (spec: `docs/upstream-api.md`).
//!
//! `ValidateLayer` acts only on requests whose `Route` (from the route layer) is
//! `RouteKind::RunwayGenerate`; every other request passes through untouched. For a generate
//! it:
//! 1. requires `Content-Type: application/json` (parameters allowed) → else 415;
//! 2. reads the body up to `server.max_body_bytes` → else 413;
//! 3. checks every field with [`validate_generate`] → else 400 naming the field;
//! 4. replaces the caller's `callback_url` with `{server.public_url}/callbacks/runway/{token}`,
//!    where `token` is 128 random bits (32 lowercase hex chars), so the upstream reports the
//!    task to the gateway and only someone who knows the token can report it;
//! 5. puts a [`GenerateTask`] (token, the caller's callback URL, model, seconds) into the
//!    request's extensions, for the quota layer to persist before forwarding;
//! 6. forwards the re-serialized JSON body with a matching `Content-Length`.

use crate::body::{self, Body};
use crate::config::{CallbacksConfig, UnknownFields, ValidationConfig};
use crate::error::GatewayError;
use crate::route::{Route, RouteKind};
use crate::snapshot::Snapshot;
use http::{header, HeaderMap, HeaderValue, Request, Response};
use serde_json::{Map, Value};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Top-level fields of a generate body, in the order they are checked.
const TOP_LEVEL_FIELDS: &[&str] = &[
    "callback_url",
    "image",
    "prompt",
    "model",
    "ratio",
    "style",
    "options",
];
const OPTIONS_FIELDS: &[&str] = &["seconds", "motion_vector", "image_as_end_frame"];
/// The camera-motion components; missing ones are sent as 0 so the upstream gets a full vector.
const MOTION_VECTOR_FIELDS: &[&str] = &["x", "y", "z", "r", "bg_x_pan", "bg_y_pan"];

const MODELS: &[&str] = &["gen2", "gen3"];
const RATIOS: &[&str] = &["16:9", "9:16", "1:1", "4:3", "21:9"];
const STYLES: &[&str] = &["cinematic"];
const SECONDS: &[u32] = &[5, 10];

const DEFAULT_MODEL: &str = "gen3";
const DEFAULT_RATIO: &str = "16:9";
const DEFAULT_STYLE: &str = "cinematic";
/// The upstream's video length when `options.seconds` (or all of `options`) is absent.
pub const DEFAULT_SECONDS: u32 = 10;

/// Longest caller callback URL accepted; it is stored with the task and called later.
pub const MAX_CALLBACK_URL_CHARS: usize = 2048;

/// How much of a caller's value an error message echoes: enough to recognise it, and a
/// megabyte-long field name cannot blow up the error envelope.
const PREVIEW_CHARS: usize = 80;

/// A generate body that passed validation, with documented defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidGenerate {
    /// The normalized body: defaults filled, optional `null`s removed, unknown fields removed
    /// (drop mode), missing motion-vector components set to 0. `callback_url` still holds
    /// the caller's URL; the layer swaps in the gateway's own.
    pub body: Map<String, Value>,
    /// The caller's `callback_url`, exactly as sent.
    pub caller_callback_url: String,
    /// `gen2` or `gen3`.
    pub model: String,
    /// Video length in seconds: 5 or 10.
    pub seconds: u32,
}

/// What the validate layer learned about a generate; inserted into request extensions for
/// the quota layer, which persists it (with the reservation) before the request is forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerateTask {
    /// 32 lowercase hex chars; the upstream calls `{public_url}/callbacks/runway/{token}`.
    pub callback_token: String,
    /// Where the caller wants the task's result delivered.
    pub caller_callback_url: String,
    pub model: String,
    pub seconds: u32,
}

/// Checks a generate body against the upstream's documented rules and fills its defaults.
///
/// Fields are checked in a fixed order (unknown fields of a level first, then
/// `callback_url`, `image`, `prompt`, `model`, `ratio`, `style`, `options`), and the first
/// problem is reported, so the same body always gets the same message.
/// `null` for an optional field means absent; `null` for a required field means missing.
pub fn validate_generate(
    body: &[u8],
    rules: &ValidationConfig,
) -> Result<ValidGenerate, GatewayError> {
    let text = std::str::from_utf8(body).map_err(|err| {
        bad(format!(
            "request body is not valid UTF-8 (invalid byte at offset {})",
            err.valid_up_to()
        ))
    })?;
    let value: Value = serde_json::from_str(text)
        .map_err(|err| bad(format!("request body is not valid JSON: {err}")))?;
    let mut input = match value {
        Value::Object(map) => map,
        other => {
            return Err(bad(format!(
                "request body must be a JSON object, got {}",
                json_type(&other)
            )))
        }
    };
    check_unknown_fields(&input, TOP_LEVEL_FIELDS, "", rules.unknown_fields)?;

    // The output is built from the checked fields only, so in drop mode unknown fields are
    // simply never copied.
    let mut out = Map::new();

    let caller_callback_url = match take_present(&mut input, "callback_url") {
        None => {
            return Err(bad(
                "callback_url is required: an absolute http or https URL where the task's result is delivered",
            ))
        }
        Some(Value::String(url)) => url,
        Some(other) => return Err(wrong_type("callback_url", "a string (an http or https URL)", &other)),
    };
    check_http_url("callback_url", &caller_callback_url)?;
    if caller_callback_url.chars().count() > MAX_CALLBACK_URL_CHARS {
        return Err(bad(format!(
            "callback_url must be at most {MAX_CALLBACK_URL_CHARS} characters, got {}",
            caller_callback_url.chars().count()
        )));
    }
    out.insert(
        "callback_url".into(),
        Value::String(caller_callback_url.clone()),
    );

    // `image` selects the image-to-video form, which is the one form allowed to omit `prompt`.
    let image = match take_present(&mut input, "image") {
        None => None,
        Some(Value::String(url)) => {
            check_http_url("image", &url)?;
            Some(url)
        }
        Some(other) => {
            return Err(wrong_type(
                "image",
                "a string (an http or https URL)",
                &other,
            ))
        }
    };

    match take_present(&mut input, "prompt") {
        None if image.is_none() => {
            return Err(bad(
                "prompt is required: a non-empty string describing the video (only the image-to-video form, with \"image\", may omit it)",
            ))
        }
        None => {}
        Some(Value::String(prompt)) => {
            check_prompt(&prompt, rules.max_prompt_chars)?;
            out.insert("prompt".into(), Value::String(prompt));
        }
        Some(other) => return Err(wrong_type("prompt", "a string", &other)),
    }
    if let Some(image) = image {
        out.insert("image".into(), Value::String(image));
    }

    // The spec marks `model` required but documents a default; the default wins, so an
    // absent model is filled rather than refused.
    let model = one_of(&mut input, "model", MODELS, DEFAULT_MODEL)?;
    out.insert("model".into(), Value::String(model.clone()));
    let ratio = one_of(&mut input, "ratio", RATIOS, DEFAULT_RATIO)?;
    out.insert("ratio".into(), Value::String(ratio));
    let style = one_of(&mut input, "style", STYLES, DEFAULT_STYLE)?;
    out.insert("style".into(), Value::String(style));

    // When `options` is absent it stays absent: filling `{"seconds": 10}` would create an
    // `options` without the `motion_vector` that `options` requires. The upstream then makes
    // a video of its default length, so `seconds` reports that default (10) for pricing.
    let seconds = match take_present(&mut input, "options") {
        None => DEFAULT_SECONDS,
        Some(Value::Object(options)) => {
            let (options, seconds) = validate_options(options, rules.unknown_fields)?;
            out.insert("options".into(), Value::Object(options));
            seconds
        }
        Some(other) => return Err(wrong_type("options", "an object", &other)),
    };

    Ok(ValidGenerate {
        body: out,
        caller_callback_url,
        model,
        seconds,
    })
}

fn validate_options(
    mut input: Map<String, Value>,
    unknown: UnknownFields,
) -> Result<(Map<String, Value>, u32), GatewayError> {
    check_unknown_fields(&input, OPTIONS_FIELDS, "options.", unknown)?;
    let mut out = Map::new();

    let seconds = match take_present(&mut input, "seconds") {
        None => DEFAULT_SECONDS,
        // Only JSON integers: `10.0` and `"10"` are refused rather than guessed at.
        Some(Value::Number(n)) => match n.as_u64() {
            Some(s) if SECONDS.iter().any(|&allowed| u64::from(allowed) == s) => s as u32,
            _ => {
                return Err(bad(format!(
                    "options.seconds must be one of {}, got {n}",
                    list(SECONDS.iter().map(u32::to_string))
                )))
            }
        },
        Some(other) => {
            return Err(bad(format!(
                "options.seconds must be a number (one of {}), got {}",
                list(SECONDS.iter().map(u32::to_string)),
                describe(&other)
            )))
        }
    };
    out.insert("seconds".into(), Value::from(seconds));

    let motion_vector = match take_present(&mut input, "motion_vector") {
        None => {
            return Err(bad(format!(
            "options.motion_vector is required when options is present: an object with numbers {}",
            MOTION_VECTOR_FIELDS.join(", ")
        )))
        }
        Some(Value::Object(vector)) => validate_motion_vector(vector, unknown)?,
        Some(other) => return Err(wrong_type("options.motion_vector", "an object", &other)),
    };
    out.insert("motion_vector".into(), Value::Object(motion_vector));

    match take_present(&mut input, "image_as_end_frame") {
        None => {}
        Some(Value::Bool(flag)) => {
            out.insert("image_as_end_frame".into(), Value::Bool(flag));
        }
        Some(other) => {
            return Err(wrong_type(
                "options.image_as_end_frame",
                "a boolean (true or false)",
                &other,
            ))
        }
    }
    Ok((out, seconds))
}

fn validate_motion_vector(
    mut input: Map<String, Value>,
    unknown: UnknownFields,
) -> Result<Map<String, Value>, GatewayError> {
    check_unknown_fields(
        &input,
        MOTION_VECTOR_FIELDS,
        "options.motion_vector.",
        unknown,
    )?;
    let mut out = Map::new();
    for &name in MOTION_VECTOR_FIELDS {
        let component = match take_present(&mut input, name) {
            None => Value::from(0),
            // serde_json never parses NaN/Infinity, but an out-of-range float must not reach
            // the upstream as something else either.
            Some(Value::Number(n)) if n.as_f64().is_some_and(f64::is_finite) => Value::Number(n),
            Some(Value::Number(n)) => {
                return Err(bad(format!(
                    "options.motion_vector.{name} must be a finite number, got {n}"
                )))
            }
            Some(other) => {
                return Err(wrong_type(
                    &format!("options.motion_vector.{name}"),
                    "a number",
                    &other,
                ))
            }
        };
        out.insert(name.into(), component);
    }
    Ok(out)
}

/// Refuses (reject mode) or ignores (drop mode) fields that are not in `allowed`.
/// All unknown names of one level are listed, sorted, so the message is stable.
fn check_unknown_fields(
    input: &Map<String, Value>,
    allowed: &[&str],
    prefix: &str,
    mode: UnknownFields,
) -> Result<(), GatewayError> {
    if mode == UnknownFields::Drop {
        return Ok(());
    }
    let mut unknown: Vec<&String> = input
        .keys()
        .filter(|key| !allowed.contains(&key.as_str()))
        .collect();
    if unknown.is_empty() {
        return Ok(());
    }
    unknown.sort();
    const LISTED: usize = 5;
    let mut names = list(
        unknown
            .iter()
            .take(LISTED)
            .map(|key| format!("{:?}", format!("{prefix}{}", preview(key)))),
    );
    if unknown.len() > LISTED {
        names.push_str(&format!(" and {} more", unknown.len() - LISTED));
    }
    Err(bad(format!(
        "unknown field{} {names}; allowed: {}",
        if unknown.len() == 1 { "" } else { "s" },
        list(allowed.iter().map(|name| format!("{prefix}{name}")))
    )))
}

/// A string field with a fixed set of values and a default for absent/`null`.
fn one_of(
    input: &mut Map<String, Value>,
    name: &str,
    allowed: &[&str],
    default: &str,
) -> Result<String, GatewayError> {
    let quoted = || list(allowed.iter().map(|value| format!("{value:?}")));
    match take_present(input, name) {
        None => Ok(default.to_string()),
        Some(Value::String(value)) if allowed.contains(&value.as_str()) => Ok(value),
        Some(Value::String(value)) => Err(bad(format!(
            "{name} must be one of {}, got {:?}",
            quoted(),
            preview(&value)
        ))),
        Some(other) => Err(wrong_type(
            name,
            &format!("a string (one of {})", quoted()),
            &other,
        )),
    }
}

fn check_prompt(prompt: &str, max_chars: usize) -> Result<(), GatewayError> {
    if prompt.trim().is_empty() {
        return Err(bad(
            "prompt must not be empty or only whitespace (omit it only in the image-to-video form)",
        ));
    }
    // Characters, not bytes: a Chinese character is 3 bytes of UTF-8 but one character.
    let chars = prompt.chars().count();
    if chars > max_chars {
        return Err(bad(format!(
            "prompt must be at most {max_chars} characters, got {chars}"
        )));
    }
    Ok(())
}

/// An absolute http(s) URL with a host. Whitespace and control characters are refused
/// (rather than silently stripped, as URL parsers do) so the stored URL is exactly the one
/// that was checked.
fn check_http_url(name: &str, value: &str) -> Result<(), GatewayError> {
    let expected = format!("{name} must be an absolute http or https URL");
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad(format!(
            "{expected} without spaces or control characters, got {:?}",
            preview(value)
        )));
    }
    match url::Url::parse(value) {
        Ok(url) if !matches!(url.scheme(), "http" | "https") => Err(bad(format!(
            "{expected}, got scheme {:?} in {:?}",
            url.scheme(),
            preview(value)
        ))),
        Ok(url) if url.host().is_none() => Err(bad(format!(
            "{expected} with a host, got {:?}",
            preview(value)
        ))),
        Ok(_) => Ok(()),
        Err(err) => Err(bad(format!("{expected}, got {:?} ({err})", preview(value)))),
    }
}

/// Removes `name` from `input`; `null` counts as absent.
fn take_present(input: &mut Map<String, Value>, name: &str) -> Option<Value> {
    input.remove(name).filter(|value| !value.is_null())
}

fn wrong_type(name: &str, expected: &str, got: &Value) -> GatewayError {
    bad(format!("{name} must be {expected}, got {}", json_type(got)))
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The type, plus the value itself for short scalars (`a string "10"`).
fn describe(value: &Value) -> String {
    match value {
        Value::String(s) => format!("a string {:?}", preview(s)),
        Value::Bool(b) => format!("a boolean {b}"),
        other => json_type(other).to_string(),
    }
}

fn preview(text: &str) -> String {
    if text.chars().count() <= PREVIEW_CHARS {
        text.to_string()
    } else {
        let mut cut: String = text.chars().take(PREVIEW_CHARS).collect();
        cut.push('…');
        cut
    }
}

fn list(items: impl Iterator<Item = String>) -> String {
    items.collect::<Vec<_>>().join(", ")
}

fn bad(message: impl Into<String>) -> GatewayError {
    GatewayError::BadRequest(message.into())
}

/// A fresh callback token: 128 random bits as 32 lowercase hex characters.
pub fn new_callback_token() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// The URL the upstream calls for the task with `token`. `public_url` has no trailing slash
/// (config validation trims it).
pub fn gateway_callback_url(public_url: &str, token: &str) -> String {
    format!("{public_url}/callbacks/runway/{token}")
}

/// `application/json`, with any parameters (`; charset=utf-8`), in any letter case.
fn check_content_type(headers: &HeaderMap) -> Result<(), GatewayError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Err(GatewayError::UnsupportedMediaType(
            "Content-Type must be application/json, got none".to_string(),
        ));
    };
    let text = String::from_utf8_lossy(value.as_bytes());
    let essence = text.split(';').next().unwrap_or_default().trim();
    if essence.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(GatewayError::UnsupportedMediaType(format!(
            "Content-Type must be application/json, got {:?}",
            preview(&text)
        )))
    }
}

/// `[callbacks] allowed_hosts`: the caller's callback URL must point to an allowed host, so
/// the gateway cannot be used to POST task records to arbitrary places.
fn check_callback_host(url: &str, callbacks: &CallbacksConfig) -> Result<(), GatewayError> {
    let host = url::Url::parse(url)
        .ok()
        .and_then(|url| url.host_str().map(str::to_string))
        .unwrap_or_default();
    if callbacks.host_allowed(&host) {
        Ok(())
    } else {
        // The list itself is not shown: it describes the company's internal hosts.
        Err(GatewayError::BadRequest(format!(
            "callback_url host {host:?} is not allowed by this gateway ([callbacks] allowed_hosts)"
        )))
    }
}

/// Validates and rewrites one generate request (steps 1–6 of the module doc).
async fn rewrite_generate(request: Request<Body>) -> Result<Request<Body>, GatewayError> {
    let snapshot = Snapshot::of(&request)?;
    check_content_type(request.headers())?;
    // A declared length over the limit was refused by the limits layer already.
    let limit = snapshot.config.server.max_body_bytes;

    let (mut parts, incoming) = request.into_parts();
    let bytes = body::read_request(incoming, limit).await?;
    let valid = validate_generate(&bytes, &snapshot.config.validation)?;
    check_callback_host(&valid.caller_callback_url, &snapshot.config.callbacks)?;

    let token = new_callback_token();
    let mut forwarded = valid.body;
    forwarded.insert(
        "callback_url".into(),
        Value::String(gateway_callback_url(
            &snapshot.config.server.public_url,
            &token,
        )),
    );
    let bytes = serde_json::to_vec(&Value::Object(forwarded))
        .map_err(|err| GatewayError::Internal(format!("re-serializing generate body: {err}")))?;

    parts.extensions.insert(GenerateTask {
        callback_token: token,
        caller_callback_url: valid.caller_callback_url,
        model: valid.model,
        seconds: valid.seconds,
    });
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    parts.headers.remove(header::TRANSFER_ENCODING);
    // The forwarded body is gatehouse's own UTF-8 JSON, whatever parameters the caller sent.
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(Request::from_parts(parts, body::full(bytes)))
}

/// Validates and rewrites `RunwayGenerate` requests; see the module doc.
#[derive(Clone, Default)]
pub struct ValidateLayer;

impl<S> tower::Layer<S> for ValidateLayer {
    type Service = ValidateService<S>;
    fn layer(&self, inner: S) -> ValidateService<S> {
        ValidateService { inner }
    }
}

#[derive(Clone)]
pub struct ValidateService<S> {
    inner: S,
}

impl<S> tower::Service<Request<Body>> for ValidateService<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = GatewayError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = GatewayError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, GatewayError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let is_generate = matches!(
            request.extensions().get::<Route>(),
            Some(Route {
                kind: RouteKind::RunwayGenerate,
                ..
            })
        );
        if !is_generate {
            return Box::pin(self.inner.call(request));
        }
        // The inner service was made ready by `poll_ready`; that ready one goes into the future.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let request = rewrite_generate(request).await?;
            // Boxed before it is awaited: holding the bare `S::Future` across the await makes
            // rustc demand `Send` for every lifetime of the body's `dyn Error` (a known
            // higher-ranked-lifetime limitation); boxed, the bound `S::Future: Send` suffices.
            let call: Self::Future = Box::pin(inner.call(request));
            call.await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use http::{Method, StatusCode};
    use http_body_util::BodyExt;
    use serde_json::json;
    use std::sync::Arc;
    use std::sync::Mutex;
    use tower::{Layer, Service, ServiceExt};

    fn rules(unknown_fields: UnknownFields, max_prompt_chars: usize) -> ValidationConfig {
        ValidationConfig {
            unknown_fields,
            max_prompt_chars,
        }
    }

    /// A valid text-to-video body.
    fn base() -> Value {
        json!({
            "callback_url": "http://example.com/hook",
            "prompt": "a cat",
            "model": "gen3",
            "options": {"seconds": 5, "motion_vector": {"x": 0, "y": 0.4}}
        })
    }

    /// `base()` with `edit` applied, serialized.
    fn with(edit: impl FnOnce(&mut Map<String, Value>)) -> Vec<u8> {
        let mut value = base();
        edit(value.as_object_mut().unwrap());
        serde_json::to_vec(&value).unwrap()
    }

    fn options(map: &mut Map<String, Value>) -> &mut Map<String, Value> {
        map.get_mut("options").unwrap().as_object_mut().unwrap()
    }

    fn motion(map: &mut Map<String, Value>) -> &mut Map<String, Value> {
        options(map)
            .get_mut("motion_vector")
            .unwrap()
            .as_object_mut()
            .unwrap()
    }

    fn error_message(body: &[u8], rules: &ValidationConfig) -> String {
        match validate_generate(body, rules) {
            Err(GatewayError::BadRequest(message)) => message,
            other => panic!("expected BadRequest, got {other:?}"),
        }
    }

    #[test]
    fn bad_bodies_are_refused_with_a_message_naming_the_field() {
        let table: Vec<(&str, Vec<u8>, &str)> = vec![
            ("not JSON", b"{callback_url:".to_vec(), "not valid JSON: key must be a string at line 1 column 2"),
            ("empty body", Vec::new(), "not valid JSON"),
            ("trailing garbage", b"{} x".to_vec(), "not valid JSON: trailing characters at line 1 column 4"),
            ("invalid UTF-8", b"{\"prompt\":\"\xff\"}".to_vec(), "request body is not valid UTF-8"),
            ("array", b"[1,2]".to_vec(), "request body must be a JSON object, got an array"),
            ("string", b"\"hello\"".to_vec(), "request body must be a JSON object, got a string"),
            ("null", b"null".to_vec(), "request body must be a JSON object, got null"),
            ("missing callback_url", with(|m| { m.remove("callback_url"); }), "callback_url is required"),
            ("null callback_url", with(|m| { m.insert("callback_url".into(), Value::Null); }), "callback_url is required"),
            ("callback_url number", with(|m| { m.insert("callback_url".into(), json!(5)); }), "callback_url must be a string"),
            ("callback_url not a URL", with(|m| { m.insert("callback_url".into(), json!("not a url")); }), "callback_url must be an absolute http or https URL"),
            ("callback_url relative", with(|m| { m.insert("callback_url".into(), json!("/hook")); }), "callback_url must be an absolute http or https URL, got \"/hook\""),
            ("callback_url ftp", with(|m| { m.insert("callback_url".into(), json!("ftp://example.com/x")); }), "callback_url must be an absolute http or https URL, got scheme \"ftp\""),
            ("callback_url no host", with(|m| { m.insert("callback_url".into(), json!("http://")); }), "callback_url must be an absolute http or https URL"),
            ("callback_url empty", with(|m| { m.insert("callback_url".into(), json!("")); }), "callback_url must be an absolute http or https URL"),
            ("callback_url too long", with(|m| { m.insert("callback_url".into(), json!(format!("http://example.com/{}", "a".repeat(2048)))); }), "callback_url must be at most 2048 characters, got 2067"),
            ("missing prompt", with(|m| { m.remove("prompt"); }), "prompt is required"),
            ("null prompt", with(|m| { m.insert("prompt".into(), Value::Null); }), "prompt is required"),
            ("empty prompt", with(|m| { m.insert("prompt".into(), json!("")); }), "prompt must not be empty"),
            ("whitespace prompt", with(|m| { m.insert("prompt".into(), json!(" \n\t　")); }), "prompt must not be empty"),
            ("prompt number", with(|m| { m.insert("prompt".into(), json!(1)); }), "prompt must be a string, got a number"),
            // 11 characters but 33 bytes: the limit of 10 counts characters.
            ("too-long Chinese prompt", with(|m| { m.insert("prompt".into(), json!("一只小猫在草地上奔跑吧")); }), "prompt must be at most 10 characters, got 11"),
            ("model wrong type", with(|m| { m.insert("model".into(), json!(3)); }), "model must be a string (one of \"gen2\", \"gen3\"), got a number"),
            ("model unknown", with(|m| { m.insert("model".into(), json!("gen4")); }), "model must be one of \"gen2\", \"gen3\", got \"gen4\""),
            ("ratio bad", with(|m| { m.insert("ratio".into(), json!("2:1")); }), "ratio must be one of \"16:9\", \"9:16\", \"1:1\", \"4:3\", \"21:9\", got \"2:1\""),
            ("ratio wrong type", with(|m| { m.insert("ratio".into(), json!([16, 9])); }), "ratio must be a string"),
            ("style bad", with(|m| { m.insert("style".into(), json!("anime")); }), "style must be one of \"cinematic\", got \"anime\""),
            ("options not object", with(|m| { m.insert("options".into(), json!([5])); }), "options must be an object, got an array"),
            ("options without motion_vector", with(|m| { options(m).remove("motion_vector"); }), "options.motion_vector is required when options is present"),
            ("empty options", with(|m| { m.insert("options".into(), json!({})); }), "options.motion_vector is required"),
            ("seconds 7", with(|m| { options(m).insert("seconds".into(), json!(7)); }), "options.seconds must be one of 5, 10, got 7"),
            ("seconds string", with(|m| { options(m).insert("seconds".into(), json!("10")); }), "options.seconds must be a number (one of 5, 10), got a string \"10\""),
            ("seconds 10.5", with(|m| { options(m).insert("seconds".into(), json!(10.5)); }), "options.seconds must be one of 5, 10, got 10.5"),
            ("seconds 10.0", b"{\"callback_url\":\"http://example.com/hook\",\"prompt\":\"a\",\"options\":{\"seconds\":10.0,\"motion_vector\":{}}}".to_vec(), "options.seconds must be one of 5, 10, got 10.0"),
            ("seconds negative", with(|m| { options(m).insert("seconds".into(), json!(-5)); }), "options.seconds must be one of 5, 10, got -5"),
            ("motion_vector.x string", with(|m| { motion(m).insert("x".into(), json!("0")); }), "options.motion_vector.x must be a number, got a string"),
            ("motion_vector.bg_y_pan bool", with(|m| { motion(m).insert("bg_y_pan".into(), json!(true)); }), "options.motion_vector.bg_y_pan must be a number, got a boolean"),
            ("motion_vector not object", with(|m| { options(m).insert("motion_vector".into(), json!([0, 0])); }), "options.motion_vector must be an object, got an array"),
            ("unknown top-level field", with(|m| { m.insert("foo".into(), json!(1)); }), "unknown field \"foo\"; allowed: callback_url, image, prompt, model, ratio, style, options"),
            ("two unknown fields", with(|m| { m.insert("zeta".into(), json!(1)); m.insert("alpha".into(), json!(1)); }), "unknown fields \"alpha\", \"zeta\""),
            ("unknown beats missing", with(|m| { m.remove("prompt"); m.insert("promt".into(), json!("x")); }), "unknown field \"promt\""),
            ("unknown options field", with(|m| { options(m).insert("fps".into(), json!(24)); }), "unknown field \"options.fps\"; allowed: options.seconds, options.motion_vector, options.image_as_end_frame"),
            ("unknown motion_vector field", with(|m| { motion(m).insert("w".into(), json!(1)); }), "unknown field \"options.motion_vector.w\""),
            ("image not URL", with(|m| { m.insert("image".into(), json!("cat.png")); }), "image must be an absolute http or https URL"),
            ("image wrong type", with(|m| { m.insert("image".into(), json!({"url": "http://x"})); }), "image must be a string"),
            ("image_as_end_frame not bool", with(|m| { options(m).insert("image_as_end_frame".into(), json!("yes")); }), "options.image_as_end_frame must be a boolean (true or false), got a string"),
            ("callback_url with space", with(|m| { m.insert("callback_url".into(), json!(" http://example.com/hook")); }), "callback_url must be an absolute http or https URL without spaces"),
        ];
        assert!(table.len() >= 25);
        let rules = rules(UnknownFields::Reject, 10);
        for (name, body, expected) in table {
            let message = error_message(&body, &rules);
            assert!(
                message.contains(expected),
                "{name}: expected a message containing {expected:?}, got {message:?}"
            );
        }
    }

    #[test]
    fn first_problem_is_reported_in_a_fixed_order() {
        // Bad callback_url, prompt, model and seconds at once: callback_url comes first.
        let body = json!({"callback_url": 1, "prompt": 2, "model": 3, "options": {"seconds": 7}});
        let rules = rules(UnknownFields::Reject, 10);
        let message = error_message(&serde_json::to_vec(&body).unwrap(), &rules);
        assert!(message.starts_with("callback_url"), "{message}");
        let body = json!({"callback_url": "http://a.example", "prompt": "", "model": 3});
        let message = error_message(&serde_json::to_vec(&body).unwrap(), &rules);
        assert!(message.starts_with("prompt"), "{message}");
    }

    #[test]
    fn defaults_are_filled() {
        let body =
            json!({"callback_url": "https://example.com/hook", "prompt": "a cat", "ratio": null});
        let valid = validate_generate(
            &serde_json::to_vec(&body).unwrap(),
            &rules(UnknownFields::Reject, 2000),
        )
        .unwrap();
        assert_eq!(
            Value::Object(valid.body),
            json!({"callback_url": "https://example.com/hook", "prompt": "a cat",
                   "model": "gen3", "ratio": "16:9", "style": "cinematic"})
        );
        assert_eq!(valid.model, "gen3");
        assert_eq!(valid.seconds, 10, "no options: the upstream default length");
        assert_eq!(valid.caller_callback_url, "https://example.com/hook");

        // With options: seconds defaults to 10, missing motion components become 0.
        let body = json!({"callback_url": "https://example.com/hook", "prompt": "a cat", "model": "gen2",
                          "options": {"motion_vector": {"z": -1.5}, "image_as_end_frame": null}});
        let valid = validate_generate(
            &serde_json::to_vec(&body).unwrap(),
            &rules(UnknownFields::Reject, 2000),
        )
        .unwrap();
        assert_eq!(valid.model, "gen2");
        assert_eq!(valid.seconds, 10);
        assert_eq!(
            valid.body["options"],
            json!({"seconds": 10, "motion_vector": {"x": 0, "y": 0, "z": -1.5, "r": 0, "bg_x_pan": 0, "bg_y_pan": 0}})
        );
    }

    #[test]
    fn chinese_example_from_the_spec_passes_unchanged() {
        let example = r#"{"callback_url":"http://example.com/hook","ratio":"16:9","prompt":"一只小猫","style":"cinematic","model":"gen3",
 "options":{"seconds":10,"motion_vector":{"x":0,"y":0.4,"z":0,"r":-6,"bg_x_pan":0,"bg_y_pan":0}}}"#;
        // Four characters, twelve bytes: a limit of 4 characters accepts it.
        let valid =
            validate_generate(example.as_bytes(), &rules(UnknownFields::Reject, 4)).unwrap();
        let original: Value = serde_json::from_str(example).unwrap();
        assert_eq!(Value::Object(valid.body), original);
        assert_eq!(valid.seconds, 10);
        assert_eq!(valid.model, "gen3");
    }

    #[test]
    fn image_to_video_may_omit_the_prompt() {
        let body = json!({"callback_url": "http://example.com/hook", "image": "https://cdn.example/cat.png",
                          "options": {"seconds": 5, "motion_vector": {}, "image_as_end_frame": true}});
        let valid = validate_generate(
            &serde_json::to_vec(&body).unwrap(),
            &rules(UnknownFields::Reject, 10),
        )
        .unwrap();
        assert_eq!(valid.seconds, 5);
        assert_eq!(valid.body["image"], "https://cdn.example/cat.png");
        assert_eq!(valid.body["options"]["image_as_end_frame"], true);
        assert!(!valid.body.contains_key("prompt"));

        // A prompt given with an image is still checked.
        let body = json!({"callback_url": "http://example.com/hook", "image": "https://cdn.example/cat.png",
                          "prompt": "x".repeat(11)});
        let message = error_message(
            &serde_json::to_vec(&body).unwrap(),
            &rules(UnknownFields::Reject, 10),
        );
        assert!(message.contains("prompt must be at most 10"), "{message}");
    }

    #[test]
    fn drop_mode_removes_unknown_fields_at_every_level() {
        let body = json!({"callback_url": "http://example.com/hook", "prompt": "a cat", "foo": 1,
                          "options": {"seconds": 5, "fps": 24, "motion_vector": {"x": 1, "w": 2}}});
        let bytes = serde_json::to_vec(&body).unwrap();
        let message = error_message(&bytes, &rules(UnknownFields::Reject, 10));
        assert!(message.contains("\"foo\""), "{message}");
        let valid = validate_generate(&bytes, &rules(UnknownFields::Drop, 10)).unwrap();
        assert!(!valid.body.contains_key("foo"));
        assert!(!valid.body["options"]
            .as_object()
            .unwrap()
            .contains_key("fps"));
        let vector = valid.body["options"]["motion_vector"].as_object().unwrap();
        assert!(!vector.contains_key("w"));
        assert_eq!(vector["x"], 1);
    }

    // ---- the layer ----

    fn snapshot(max_body_bytes: usize, unknown_fields: &str) -> Arc<Snapshot> {
        let text = format!(
            r#"
            [server]
            public_url = "https://gw.example.com/"
            max_body_bytes = {max_body_bytes}
            [upstream]
            base_url = "http://127.0.0.1:9"
            token = "t"
            [validation]
            unknown_fields = "{unknown_fields}"
            "#
        );
        let config = Config::from_toml(&text, &|_: &str| None).unwrap();
        Arc::new(Snapshot::build(config).unwrap())
    }

    /// What the inner service saw.
    #[derive(Default)]
    struct Seen {
        body: Option<Vec<u8>>,
        headers: Option<HeaderMap>,
        task: Option<GenerateTask>,
    }

    /// A validate service around an inner `service_fn` that records the request it got.
    fn service(
        seen: Arc<Mutex<Seen>>,
    ) -> impl Service<Request<Body>, Response = Response<Body>, Error = GatewayError> {
        ValidateLayer.layer(tower::service_fn(move |request: Request<Body>| {
            let seen = seen.clone();
            async move {
                let (parts, body) = request.into_parts();
                let bytes = body.collect().await.unwrap().to_bytes().to_vec();
                let mut seen = seen.lock().unwrap();
                seen.body = Some(bytes);
                seen.headers = Some(parts.headers);
                seen.task = parts.extensions.get::<GenerateTask>().cloned();
                Ok::<_, GatewayError>(Response::new(body::empty()))
            }
        }))
    }

    fn request(
        route: Option<RouteKind>,
        content_type: Option<&str>,
        body_bytes: Vec<u8>,
        snapshot: Arc<Snapshot>,
    ) -> Request<Body> {
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri("/runway/pro/generate")
            .header(header::TRANSFER_ENCODING, "chunked");
        if let Some(content_type) = content_type {
            builder = builder.header(header::CONTENT_TYPE, content_type);
        }
        let mut request = builder.body(body::full(body_bytes)).unwrap();
        request.extensions_mut().insert(snapshot);
        if let Some(kind) = route {
            request.extensions_mut().insert(Route::new("test", kind));
        }
        request
    }

    #[tokio::test]
    async fn layer_rewrites_the_callback_and_records_the_task() {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let body = json!({"callback_url": "http://caller.example/hook?id=1", "prompt": "一只小猫", "extra": true,
                          "options": {"seconds": 5, "motion_vector": {"y": 0.4}}});
        let response = service(seen.clone())
            .oneshot(request(
                Some(RouteKind::RunwayGenerate),
                Some("Application/JSON; charset=UTF-8"),
                serde_json::to_vec(&body).unwrap(),
                snapshot(4096, "drop"),
            ))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);

        let seen = seen.lock().unwrap();
        let task = seen.task.clone().expect("GenerateTask in extensions");
        assert_eq!(task.callback_token.len(), 32);
        assert!(task
            .callback_token
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)));
        assert_eq!(task.caller_callback_url, "http://caller.example/hook?id=1");
        assert_eq!(task.model, "gen3");
        assert_eq!(task.seconds, 5);

        let forwarded = seen.body.clone().unwrap();
        let json: Value = serde_json::from_slice(&forwarded).unwrap();
        assert_eq!(
            json,
            json!({"callback_url": format!("https://gw.example.com/callbacks/runway/{}", task.callback_token),
                   "prompt": "一只小猫", "model": "gen3", "ratio": "16:9", "style": "cinematic",
                   "options": {"seconds": 5, "motion_vector": {"x": 0, "y": 0.4, "z": 0, "r": 0, "bg_x_pan": 0, "bg_y_pan": 0}}})
        );
        let headers = seen.headers.clone().unwrap();
        assert_eq!(
            headers[header::CONTENT_LENGTH],
            forwarded.len().to_string().as_str()
        );
        assert!(!headers.contains_key(header::TRANSFER_ENCODING));
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
    }

    #[tokio::test]
    async fn each_generate_gets_its_own_token() {
        let mut tokens = Vec::new();
        for _ in 0..2 {
            let seen = Arc::new(Mutex::new(Seen::default()));
            service(seen.clone())
                .oneshot(request(
                    Some(RouteKind::RunwayGenerate),
                    Some("application/json"),
                    serde_json::to_vec(&base()).unwrap(),
                    snapshot(4096, "reject"),
                ))
                .await
                .unwrap();
            let token = seen.lock().unwrap().task.clone().unwrap().callback_token;
            tokens.push(token);
        }
        assert_ne!(tokens[0], tokens[1]);
    }

    #[tokio::test]
    async fn layer_refuses_wrong_content_type_large_and_invalid_bodies() {
        let valid = serde_json::to_vec(&base()).unwrap();
        // (Content-Type, body, server.max_body_bytes, expected status, expected message part)
        type Case = (
            Option<&'static str>,
            Vec<u8>,
            usize,
            StatusCode,
            &'static str,
        );
        let cases: Vec<Case> = vec![
            (
                None,
                valid.clone(),
                4096,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Content-Type must be application/json, got none",
            ),
            (
                Some("text/plain"),
                valid.clone(),
                4096,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Content-Type must be application/json, got \"text/plain\"",
            ),
            (
                Some("application/jsonx"),
                valid.clone(),
                4096,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "got \"application/jsonx\"",
            ),
            (
                Some("application/json"),
                valid.clone(),
                16,
                StatusCode::PAYLOAD_TOO_LARGE,
                "limit of 16 bytes",
            ),
            (
                Some("application/json"),
                b"[]".to_vec(),
                4096,
                StatusCode::BAD_REQUEST,
                "must be a JSON object",
            ),
        ];
        for (content_type, bytes, limit, status, expected) in cases {
            let seen = Arc::new(Mutex::new(Seen::default()));
            let err = service(seen.clone())
                .oneshot(request(
                    Some(RouteKind::RunwayGenerate),
                    content_type,
                    bytes,
                    snapshot(limit, "reject"),
                ))
                .await
                .unwrap_err();
            assert_eq!(err.status(), status, "{err:?}");
            assert!(err.message().contains(expected), "{err:?}");
            assert!(seen.lock().unwrap().body.is_none(), "not forwarded");
        }
    }

    #[tokio::test]
    async fn other_routes_pass_through_untouched() {
        for route in [Some(RouteKind::RunwayFeed), None] {
            let seen = Arc::new(Mutex::new(Seen::default()));
            // Neither JSON nor application/json: a generate would be refused.
            service(seen.clone())
                .oneshot(request(
                    route,
                    Some("text/plain"),
                    b"not json".to_vec(),
                    snapshot(4096, "reject"),
                ))
                .await
                .unwrap();
            let seen = seen.lock().unwrap();
            assert_eq!(seen.body.as_deref(), Some(&b"not json"[..]));
            let headers = seen.headers.as_ref().unwrap();
            assert_eq!(headers[header::TRANSFER_ENCODING], "chunked");
            assert_eq!(headers[header::CONTENT_TYPE], "text/plain");
            assert!(seen.task.is_none());
        }
    }
}
