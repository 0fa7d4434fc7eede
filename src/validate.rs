//! Validation and rewrite of `POST /runway/pro/generate`. STUB — being implemented.

use crate::config::ValidationConfig;
use crate::error::GatewayError;

/// A generate body that passed validation, with documented defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidGenerate {
    /// The normalized body; `callback_url` still holds the caller's URL.
    pub body: serde_json::Map<String, serde_json::Value>,
    pub caller_callback_url: String,
    pub model: String,
    pub seconds: u32,
}

pub fn validate_generate(
    _body: &[u8],
    _rules: &ValidationConfig,
) -> Result<ValidGenerate, GatewayError> {
    Err(GatewayError::Internal("validation not implemented".into()))
}

/// STUB pass-through layer.
#[derive(Clone, Default)]
pub struct ValidateLayer;

impl<S> tower::Layer<S> for ValidateLayer {
    type Service = S;
    fn layer(&self, inner: S) -> S {
        inner
    }
}
