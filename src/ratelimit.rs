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
