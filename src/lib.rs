//! gatehouse: a self-hosted API gateway in front of an AI aggregator upstream.
//!
//! The request path, outermost first (assembled in `server`):
//! observe → limits → route → auth → ratelimit → validate → upstream.

pub mod auth;
pub mod body;
pub mod config;
pub mod context;
pub mod error;
pub mod points;
pub mod quota;
pub mod ratelimit;
pub mod route;
pub mod snapshot;
pub mod validate;
