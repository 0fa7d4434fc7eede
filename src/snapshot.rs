//! `Snapshot`: one validated config plus everything derived from it (key table, JWT keys,
//! route table). The gateway holds the live one in an `ArcSwap` and replaces it whole on
//! reload, so a request sees one consistent configuration from start to end.

use crate::auth::Authenticator;
use crate::config::{Config, ConfigError};
use crate::route::RouteTable;

pub struct Snapshot {
    pub config: Config,
    pub authenticator: Authenticator,
    pub routes: RouteTable,
}

impl Snapshot {
    /// Builds the derived state; fails with every problem found (unreadable key files, …).
    pub fn build(config: Config) -> Result<Snapshot, ConfigError> {
        let authenticator =
            Authenticator::from_config(&config).map_err(|problems| ConfigError { problems })?;
        let routes = RouteTable::from_config(&config);
        Ok(Snapshot {
            config,
            authenticator,
            routes,
        })
    }
}
