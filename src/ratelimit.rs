//! Rate limits. STUB — being implemented (governor; per key + global).

use crate::auth::Principal;
use crate::config::Config;
use crate::error::GatewayError;

/// Long-lived limiter state; survives config reloads.
pub struct RateLimiters {
    _private: (),
}

impl RateLimiters {
    pub fn new(_config: &Config) -> RateLimiters {
        RateLimiters { _private: () }
    }

    pub fn reconfigure(&self, _config: &Config) {}

    pub fn check(&self, _principal: &Principal) -> Result<(), GatewayError> {
        Ok(())
    }

    pub fn evict_idle(&self) {}
}

/// STUB pass-through layer.
#[derive(Clone)]
pub struct RateLimitLayer;

impl RateLimitLayer {
    pub fn new(_limiters: std::sync::Arc<RateLimiters>) -> RateLimitLayer {
        RateLimitLayer
    }
}

impl<S> tower::Layer<S> for RateLimitLayer {
    type Service = S;
    fn layer(&self, inner: S) -> S {
        inner
    }
}

impl RateLimiters {
    pub fn tracked_keys(&self) -> usize {
        0
    }
}
