//! gatehouse: a self-hosted API gateway in front of an AI aggregator upstream.
//!
//! The request path, outermost first (assembled in `server`):
//! observe → limits → route → auth → ratelimit → validate → quota → upstream.

pub mod admin;
pub mod auth;
pub mod body;
pub mod callbacks;
pub mod cli;
pub mod config;
pub mod context;
pub mod error;
pub mod limits;
pub mod metrics;
pub mod mock_upstream;
pub mod observe;
pub mod ops;
pub mod passthrough;
pub mod points;
pub mod quota;
pub mod ratelimit;
pub mod reconciler;
pub mod reload;
pub mod route;
pub mod server;
pub mod snapshot;
pub mod upstream;
pub mod validate;
