//! `Snapshot`: one validated config plus everything derived from it (key table, JWT keys,
//! route table, upstream client). The gateway holds the live one in an `ArcSwap` and
//! replaces it whole on reload, so a request sees one consistent configuration throughout.

use crate::auth::Authenticator;
use crate::config::{Config, ConfigError};
use crate::error::GatewayError;
use crate::route::RouteTable;
use crate::upstream::UpstreamClient;
use std::sync::Arc;

pub struct Snapshot {
    pub config: Config,
    pub authenticator: Authenticator,
    pub routes: RouteTable,
    pub upstream: UpstreamClient,
}

impl Snapshot {
    /// Builds the derived state; fails with every problem found (unreadable key files, …).
    pub fn build(config: Config) -> Result<Snapshot, ConfigError> {
        let authenticator =
            Authenticator::from_config(&config).map_err(|problems| ConfigError { problems })?;
        let routes = RouteTable::from_config(&config);
        let upstream = UpstreamClient::new(&config.upstream);
        Ok(Snapshot {
            config,
            authenticator,
            routes,
            upstream,
        })
    }
}

impl Snapshot {
    /// The snapshot the observe layer put into this request's extensions.
    pub fn of<B>(request: &http::Request<B>) -> Result<Arc<Snapshot>, GatewayError> {
        request
            .extensions()
            .get::<Arc<Snapshot>>()
            .cloned()
            .ok_or_else(|| {
                GatewayError::Internal(
                    "no config snapshot in the request (the observe layer must run first)".into(),
                )
            })
    }
}

/// The live snapshot. Requests `load_full()` it once, at the outermost layer.
pub type LiveSnapshot = arc_swap::ArcSwap<Snapshot>;
