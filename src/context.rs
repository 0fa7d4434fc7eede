//! `RequestContext`: what the layers learned about one request, for metrics and the access log.
//!
//! The outermost layer (`observe`) creates it and puts an `Arc` of it into the request's
//! extensions; inner layers fill in what they establish (the route, the principal, the
//! upstream's status). When the response or error comes back, `observe` reads it once.
//! It exists because an error travelling outward carries no request extensions.

use crate::auth::Principal;
use crate::points::Points;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug)]
pub struct RequestContext {
    pub request_id: String,
    facts: Mutex<RequestFacts>,
}

/// A copy of what is known so far.
#[derive(Debug, Clone, Default)]
pub struct RequestFacts {
    /// The route's name (a bounded label), e.g. `runway_generate`; `unknown` until routed.
    pub route: Option<Arc<str>>,
    /// The principal's key id (logs) and its metrics label (bounded).
    pub key_id: Option<String>,
    pub key_label: Option<String>,
    pub upstream_status: Option<u16>,
    pub upstream_duration: Option<Duration>,
    pub points_reserved: Option<Points>,
}

impl RequestContext {
    pub fn new(request_id: String) -> Arc<RequestContext> {
        Arc::new(RequestContext {
            request_id,
            facts: Mutex::new(RequestFacts::default()),
        })
    }

    pub fn facts(&self) -> RequestFacts {
        self.lock().clone()
    }

    pub fn set_route(&self, route: Arc<str>) {
        self.lock().route = Some(route);
    }

    pub fn set_principal(&self, principal: &Principal) {
        let mut facts = self.lock();
        facts.key_id = Some(principal.key_id.clone());
        facts.key_label = Some(principal.metrics_label.clone());
    }

    pub fn set_upstream(&self, status: u16, duration: Duration) {
        let mut facts = self.lock();
        facts.upstream_status = Some(status);
        facts.upstream_duration = Some(duration);
    }

    pub fn set_points_reserved(&self, points: Points) {
        self.lock().points_reserved = Some(points);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RequestFacts> {
        // A panic while holding this lock cannot leave the facts half-written in a way
        // that matters (they are plain values), so a poisoned lock is still used.
        self.facts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
