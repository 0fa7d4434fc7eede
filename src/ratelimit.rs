//! Rate limits: each caller's own limit, then one global limit over all callers.
//!
//! `RateLimitLayer` reads the `Principal` that the auth layer put into the request's
//! extensions and asks `RateLimiters::check` whether the request may go on. A request
//! over a limit is answered with `GatewayError::RateLimited` (429 + `Retry-After`) and
//! never reaches the inner layers. Requests without a `Principal` (health, metrics,
//! callbacks) pass through untouched. The layer puts nothing into extensions.
//!
//! Limits are GCRA (`governor`): `rate_per_second` cells are replenished per second
//! (fractional rates allowed), up to `burst` at once.
//! - every `[[keys]]` entry has its own limiter;
//! - JWT principals without a `[[keys]]` entry share one keyed limiter with the
//!   `[defaults]` policy, keyed by key id; idle entries are evicted by `evict_idle`;
//! - `upstream.rate_per_second` / `upstream.burst` is the global limit protecting the
//!   shared upstream token.
//!
//! The state is long-lived: a config reload calls `reconfigure`, which keeps the state of
//! every limiter whose settings did not change, so a reload is no way to reset a limit.

use crate::auth::Principal;
use crate::body::Body;
use crate::config::Config;
use crate::error::{GatewayError, RateLimitScope};
use arc_swap::ArcSwap;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{NotUntil, Quota, RateLimiter};
use http::{Request, Response};
use std::collections::HashMap;
use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

type DirectLimiter<C> =
    RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;
type KeyedLimiter<C> =
    RateLimiter<String, DefaultKeyedStateStore<String>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// The two numbers that define a limit; a limiter is rebuilt on reload only if they change.
#[derive(Debug, Clone, Copy, PartialEq)]
struct LimitSetting {
    rate_per_second: f64,
    burst: u32,
}

impl LimitSetting {
    fn new(rate_per_second: f64, burst: u32) -> LimitSetting {
        LimitSetting {
            rate_per_second,
            burst,
        }
    }

    fn quota(self) -> Quota {
        // Config validation guarantees 0 < rate <= 1e9 and burst >= 1; the clamps only
        // keep a hypothetical unvalidated value from panicking on the request path.
        let period = Duration::try_from_secs_f64(1.0 / self.rate_per_second)
            .unwrap_or(Duration::MAX)
            .max(Duration::from_nanos(1));
        Quota::with_period(period)
            .expect("period is at least 1ns")
            .allow_burst(NonZeroU32::new(self.burst).unwrap_or(NonZeroU32::MIN))
    }
}

/// One limiter with the setting it was built from.
struct Limited<L> {
    setting: LimitSetting,
    limiter: L,
}

/// All limiters of one configuration. Unchanged limiters are shared (by `Arc`) between the
/// sets of successive configurations, which is how their state survives a reload.
struct LimiterSet<C: Clock> {
    keys: HashMap<String, Arc<Limited<DirectLimiter<C>>>>,
    unlisted: Arc<Limited<KeyedLimiter<C>>>,
    global: Arc<Limited<DirectLimiter<C>>>,
    /// `[[routes]]` entries with their own `rate_per_second`/`burst`, by route name.
    routes: HashMap<String, Arc<Limited<DirectLimiter<C>>>>,
}

/// Long-lived limiter state shared by all requests; survives config reloads.
///
/// Generic over the clock so tests can drive time with `governor::clock::FakeRelativeClock`;
/// production uses `RateLimiters::new`, i.e. governor's default clock.
pub struct RateLimiters<C: Clock = DefaultClock> {
    clock: C,
    set: ArcSwap<LimiterSet<C>>,
    /// Serializes `reconfigure` calls so that two reloads cannot each build on the same old
    /// set and lose one another's limiters. `check` never takes it.
    reconfigure_lock: Mutex<()>,
}

impl RateLimiters<DefaultClock> {
    pub fn new(config: &Config) -> RateLimiters {
        RateLimiters::with_clock(config, DefaultClock::default())
    }
}

impl<C> RateLimiters<C>
where
    C: Clock + Clone,
{
    /// Limiters for `config` that read time from `clock`.
    pub fn with_clock(config: &Config, clock: C) -> RateLimiters<C> {
        let set = build_set(config, &clock, None);
        RateLimiters {
            clock,
            set: ArcSwap::from_pointee(set),
            reconfigure_lock: Mutex::new(()),
        }
    }

    /// Applies a reloaded config. Limiters whose (rate_per_second, burst) are unchanged keep
    /// their state; changed ones start afresh (full burst); removed keys are dropped.
    /// Concurrent `check`s see either the old or the new set, never a mix.
    pub fn reconfigure(&self, config: &Config) {
        let _serialized = self
            .reconfigure_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let old = self.set.load_full();
        let new = build_set(config, &self.clock, Some(&old));
        self.set.store(Arc::new(new));
    }

    /// Takes one cell from the principal's own limit, then one from the global limit.
    ///
    /// The per-key limit goes first so that a caller over its own limit cannot use up the
    /// shared global budget. The converse (a cell taken from the key when the global limit
    /// then refuses) is accepted: governor cannot give a cell back.
    pub fn check(&self, principal: &Principal) -> Result<(), GatewayError> {
        self.check_route(principal, None)
    }

    /// As `check`, with the route's own limit (if it has one) between the key's and the
    /// global one.
    pub fn check_route(
        &self,
        principal: &Principal,
        route: Option<&str>,
    ) -> Result<(), GatewayError> {
        let set = self.set.load();
        let configured = if principal.metrics_label == principal.key_id {
            set.keys.get(&principal.key_id)
        } else {
            None
        };
        let own = match configured {
            Some(key) => key.limiter.check(),
            // Unlisted JWT principals share the `[defaults]` keyed limiter. A configured
            // key missing from the current set (authenticated against a snapshot that a
            // reload just replaced) is limited the same way rather than not at all.
            None => set.unlisted.limiter.check_key(&principal.key_id),
        };
        own.map_err(|not_until| self.rejected(RateLimitScope::Key, &not_until))?;
        if let Some(route) = route.and_then(|name| set.routes.get(name)) {
            route
                .limiter
                .check()
                .map_err(|not_until| self.rejected(RateLimitScope::Route, &not_until))?;
        }
        set.global
            .limiter
            .check()
            .map_err(|not_until| self.rejected(RateLimitScope::Global, &not_until))
    }

    /// Forgets unlisted JWT principals whose limit state is back to "full burst" (which is
    /// indistinguishable from never having been seen), and releases the memory. The server
    /// calls this periodically so that many distinct JWT subjects cannot grow memory forever.
    pub fn evict_idle(&self) {
        let set = self.set.load();
        set.unlisted.limiter.retain_recent();
        set.unlisted.limiter.shrink_to_fit();
    }

    /// How many unlisted JWT principals the shared `[defaults]` limiter currently tracks.
    pub fn tracked_keys(&self) -> usize {
        self.set.load().unlisted.limiter.len()
    }

    fn rejected(&self, scope: RateLimitScope, not_until: &NotUntil<C::Instant>) -> GatewayError {
        let wait = not_until.wait_time_from(self.clock.now());
        GatewayError::RateLimited {
            scope,
            retry_after_s: retry_after_seconds(wait),
        }
    }
}

/// `Retry-After` is whole seconds: round up so that a client that waits that long is
/// admitted, and never say 0 (which clients read as "retry immediately").
fn retry_after_seconds(wait: Duration) -> u64 {
    let whole = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    whole.max(1)
}

/// Builds the limiters for `config`, reusing from `old` every limiter whose setting is unchanged.
fn build_set<C: Clock + Clone>(
    config: &Config,
    clock: &C,
    old: Option<&LimiterSet<C>>,
) -> LimiterSet<C> {
    let direct =
        |setting: LimitSetting, previous: Option<&Arc<Limited<DirectLimiter<C>>>>| match previous {
            Some(previous) if previous.setting == setting => Arc::clone(previous),
            _ => Arc::new(Limited {
                setting,
                limiter: RateLimiter::direct_with_clock(setting.quota(), clock.clone()),
            }),
        };

    let keys = config
        .keys
        .iter()
        .map(|key| {
            let setting = LimitSetting::new(key.policy.rate_per_second, key.policy.burst);
            let previous = old.and_then(|old| old.keys.get(&key.id));
            (key.id.clone(), direct(setting, previous))
        })
        .collect();

    let upstream = &config.upstream;
    let global = direct(
        LimitSetting::new(upstream.rate_per_second, upstream.burst),
        old.map(|old| &old.global),
    );

    let defaults = LimitSetting::new(config.defaults.rate_per_second, config.defaults.burst);
    let unlisted = match old {
        Some(old) if old.unlisted.setting == defaults => Arc::clone(&old.unlisted),
        _ => Arc::new(Limited {
            setting: defaults,
            limiter: RateLimiter::new(
                defaults.quota(),
                DefaultKeyedStateStore::default(),
                clock.clone(),
            ),
        }),
    };

    let routes = config
        .routes
        .iter()
        .filter_map(|route| {
            let setting = LimitSetting::new(route.rate_per_second?, route.burst?);
            let previous = old.and_then(|old| old.routes.get(&route.name));
            Some((route.name.clone(), direct(setting, previous)))
        })
        .collect();

    LimiterSet {
        keys,
        unlisted,
        global,
        routes,
    }
}

/// Enforces the rate limits on requests that carry a `Principal`.
pub struct RateLimitLayer<C: Clock = DefaultClock> {
    pub limiters: Arc<RateLimiters<C>>,
}

impl<C: Clock> RateLimitLayer<C> {
    pub fn new(limiters: Arc<RateLimiters<C>>) -> RateLimitLayer<C> {
        RateLimitLayer { limiters }
    }
}

// Manual impl: `derive(Clone)` would require `C: Clone` for no reason.
impl<C: Clock> Clone for RateLimitLayer<C> {
    fn clone(&self) -> Self {
        RateLimitLayer {
            limiters: Arc::clone(&self.limiters),
        }
    }
}

impl<S, C: Clock> tower::Layer<S> for RateLimitLayer<C> {
    type Service = RateLimitService<S, C>;
    fn layer(&self, inner: S) -> RateLimitService<S, C> {
        RateLimitService {
            inner,
            limiters: Arc::clone(&self.limiters),
        }
    }
}

pub struct RateLimitService<S, C: Clock = DefaultClock> {
    inner: S,
    limiters: Arc<RateLimiters<C>>,
}

impl<S: Clone, C: Clock> Clone for RateLimitService<S, C> {
    fn clone(&self) -> Self {
        RateLimitService {
            inner: self.inner.clone(),
            limiters: Arc::clone(&self.limiters),
        }
    }
}

impl<S, C> tower::Service<Request<Body>> for RateLimitService<S, C>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = GatewayError>,
    S::Future: Send + 'static,
    C: Clock + Clone,
{
    type Response = Response<Body>;
    type Error = GatewayError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, GatewayError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        // Only proxied routes have a principal; everything else is not ours to limit.
        if let Some(principal) = request.extensions().get::<Principal>() {
            let route = request.extensions().get::<crate::route::Route>();
            if let Err(err) = self
                .limiters
                .check_route(principal, route.map(|route| &*route.name))
            {
                return Box::pin(async move { Err(err) });
            }
        }
        Box::pin(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{CredentialKind, UNLISTED_JWT_LABEL};
    use governor::clock::FakeRelativeClock;
    use tower::{Layer, ServiceExt};

    const BASE: &str = r#"
        [upstream]
        base_url = "http://127.0.0.1:9"
        token = "upstream-token"
        rate_per_second = 1000
        burst = 1000

        [defaults]
        rate_per_second = 1
        burst = 2
    "#;

    fn config(extra: &str) -> Config {
        Config::from_toml(&format!("{BASE}\n{extra}"), &|_: &str| None).unwrap()
    }

    fn config_with_upstream(rate: f64, burst: u32, extra: &str) -> Config {
        let text = format!(
            r#"
            [upstream]
            base_url = "http://127.0.0.1:9"
            token = "upstream-token"
            rate_per_second = {rate}
            burst = {burst}
            {extra}
            "#
        );
        Config::from_toml(&text, &|_: &str| None).unwrap()
    }

    fn key(config: &Config, id: &str) -> Principal {
        Principal {
            key_id: id.to_string(),
            metrics_label: id.to_string(),
            policy: Arc::new(config.key(id).expect("key is configured").policy.clone()),
            credential: CredentialKind::ApiKey,
        }
    }

    fn unlisted_jwt(config: &Config, id: &str) -> Principal {
        Principal {
            key_id: id.to_string(),
            metrics_label: UNLISTED_JWT_LABEL.to_string(),
            policy: Arc::new(config.defaults.clone()),
            credential: CredentialKind::Jwt,
        }
    }

    fn limiters(config: &Config) -> (RateLimiters<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        (RateLimiters::with_clock(config, clock.clone()), clock)
    }

    /// The scope and retry-after of a rejection; panics if the check passed.
    fn rejection(result: Result<(), GatewayError>) -> (RateLimitScope, u64) {
        match result {
            Err(GatewayError::RateLimited {
                scope,
                retry_after_s,
            }) => (scope, retry_after_s),
            other => panic!("expected RateLimited, got {other:?}"),
        }
    }

    const KEYS_AB: &str = r#"
        [[keys]]
        id = "a"
        rate_per_second = 1
        burst = 3

        [[keys]]
        id = "b"
        rate_per_second = 1
        burst = 3
    "#;

    #[test]
    fn burst_exceeded_is_rejected_per_key_and_other_keys_are_unaffected() {
        let config = config(KEYS_AB);
        let (limiters, clock) = limiters(&config);
        let a = key(&config, "a");
        let b = key(&config, "b");
        for i in 0..3 {
            limiters
                .check(&a)
                .unwrap_or_else(|e| panic!("request {i} within burst: {e:?}"));
        }
        let (scope, retry_after) = rejection(limiters.check(&a));
        assert_eq!(scope, RateLimitScope::Key);
        assert_eq!(retry_after, 1);

        for _ in 0..3 {
            limiters.check(&b).expect("b has its own budget");
        }
        rejection(limiters.check(&b));

        // Half a cell later: still refused, and Retry-After is rounded up, never 0.
        clock.advance(Duration::from_millis(500));
        assert_eq!(rejection(limiters.check(&a)), (RateLimitScope::Key, 1));
        clock.advance(Duration::from_millis(500));
        limiters.check(&a).expect("one cell replenished after 1s");
        rejection(limiters.check(&a));
    }

    #[test]
    fn global_limit_applies_across_keys() {
        let config = config_with_upstream(1.0, 2, KEYS_AB);
        let (limiters, clock) = limiters(&config);
        let a = key(&config, "a");
        let b = key(&config, "b");
        limiters.check(&a).unwrap();
        limiters.check(&b).unwrap();
        let (scope, retry_after) = rejection(limiters.check(&b));
        assert_eq!(scope, RateLimitScope::Global);
        assert_eq!(retry_after, 1);
        clock.advance(Duration::from_secs(1));
        limiters.check(&a).expect("global cell replenished");
    }

    #[test]
    fn fractional_rate_spaces_cells_and_rounds_retry_after_up() {
        let config = config(
            r#"
            [[keys]]
            id = "slow"
            rate_per_second = 0.5
            burst = 1

            [[keys]]
            id = "slower"
            rate_per_second = 0.4
            burst = 1
            "#,
        );
        let (limiters, clock) = limiters(&config);
        let slow = key(&config, "slow");
        let slower = key(&config, "slower");
        limiters.check(&slow).unwrap();
        assert_eq!(rejection(limiters.check(&slow)), (RateLimitScope::Key, 2));
        limiters.check(&slower).unwrap();
        // One cell per 2.5 s: Retry-After is 3, not 2.
        assert_eq!(rejection(limiters.check(&slower)), (RateLimitScope::Key, 3));

        clock.advance(Duration::from_secs(1));
        assert_eq!(rejection(limiters.check(&slow)), (RateLimitScope::Key, 1));
        clock.advance(Duration::from_secs(1));
        limiters.check(&slow).expect("one cell per 2 s");
        rejection(limiters.check(&slow));
    }

    #[test]
    fn reconfigure_keeps_unchanged_keys_and_resets_changed_ones() {
        let before = config(KEYS_AB);
        let (limiters, _clock) = limiters(&before);
        let a = key(&before, "a");
        let b = key(&before, "b");
        for _ in 0..3 {
            limiters.check(&a).unwrap();
            limiters.check(&b).unwrap();
        }
        rejection(limiters.check(&a));
        rejection(limiters.check(&b));

        let after = config(
            r#"
            [[keys]]
            id = "a"
            rate_per_second = 1
            burst = 3

            [[keys]]
            id = "b"
            rate_per_second = 1
            burst = 5
            "#,
        );
        limiters.reconfigure(&after);
        let (scope, _) = rejection(limiters.check(&a));
        assert_eq!(scope, RateLimitScope::Key, "a's state survives the reload");
        for i in 0..5 {
            limiters
                .check(&b)
                .unwrap_or_else(|e| panic!("b's new limiter allows burst 5, request {i}: {e:?}"));
        }
        rejection(limiters.check(&b));
    }

    #[test]
    fn reconfigure_drops_removed_keys() {
        let before = config(KEYS_AB);
        let (limiters, _clock) = limiters(&before);
        let b = key(&before, "b");
        for _ in 0..3 {
            limiters.check(&b).unwrap();
        }
        limiters.reconfigure(&config(
            r#"
            [[keys]]
            id = "a"
            rate_per_second = 1
            burst = 3
            "#,
        ));
        assert!(!limiters.set.load().keys.contains_key("b"));
        assert!(limiters.set.load().keys.contains_key("a"));

        // A request authenticated against the old snapshot is limited by `[defaults]`
        // (burst 2, fresh state), not let through unlimited.
        assert_eq!(limiters.tracked_keys(), 0);
        limiters.check(&b).unwrap();
        limiters.check(&b).unwrap();
        assert_eq!(rejection(limiters.check(&b)).0, RateLimitScope::Key);
        assert_eq!(limiters.tracked_keys(), 1);
    }

    #[test]
    fn reconfigure_replaces_the_global_limiter_only_when_it_changed() {
        let before = config_with_upstream(1.0, 1, KEYS_AB);
        let (limiters, _clock) = limiters(&before);
        let a = key(&before, "a");
        limiters.check(&a).unwrap();
        assert_eq!(rejection(limiters.check(&a)).0, RateLimitScope::Global);

        limiters.reconfigure(&config_with_upstream(1.0, 1, KEYS_AB));
        assert_eq!(rejection(limiters.check(&a)).0, RateLimitScope::Global);

        limiters.reconfigure(&config_with_upstream(1.0, 2, KEYS_AB));
        // Checked with `b`: `a` paid a key cell for each globally refused request.
        let b = key(&before, "b");
        limiters
            .check(&b)
            .expect("new global limiter starts with a full burst");
        limiters.check(&b).unwrap();
        assert_eq!(rejection(limiters.check(&b)).0, RateLimitScope::Global);
    }

    #[test]
    fn unlisted_jwt_principals_share_the_defaults_limiter_and_are_evicted_when_idle() {
        // A global limit high enough that only the per-key limits matter.
        let config =
            config_with_upstream(1e6, 100_000, "[defaults]\nburst = 2\nrate_per_second = 1");
        let (limiters, clock) = limiters(&config);
        let first = unlisted_jwt(&config, "user-0");
        limiters.check(&first).unwrap();
        limiters.check(&first).unwrap();
        assert_eq!(rejection(limiters.check(&first)).0, RateLimitScope::Key);

        for i in 1..10_000 {
            limiters
                .check(&unlisted_jwt(&config, &format!("user-{i}")))
                .expect("each JWT subject has its own [defaults] budget");
        }
        assert_eq!(limiters.tracked_keys(), 10_000);

        // Not yet idle: every state still differs from a fresh one.
        limiters.evict_idle();
        assert_eq!(limiters.tracked_keys(), 10_000);

        // Burst 2 at 1/s is fully replenished after 2 s (+ the 1 cell user-0 is overdrawn).
        clock.advance(Duration::from_secs(4));
        limiters.evict_idle();
        assert_eq!(limiters.tracked_keys(), 0);
        limiters.check(&first).expect("an evicted key starts fresh");
    }

    #[test]
    fn unlisted_limiter_survives_reload_unless_defaults_change() {
        let before = config("");
        let (limiters, _clock) = limiters(&before);
        let jwt = unlisted_jwt(&before, "user");
        limiters.check(&jwt).unwrap();
        limiters.check(&jwt).unwrap();
        rejection(limiters.check(&jwt));

        limiters.reconfigure(&config(KEYS_AB));
        rejection(limiters.check(&jwt));
        assert_eq!(limiters.tracked_keys(), 1);

        let changed = config_with_upstream(1000.0, 1000, "[defaults]\nrate_per_second = 2\n");
        limiters.reconfigure(&changed);
        limiters.check(&jwt).expect("new [defaults] limiter");
    }

    #[test]
    fn check_and_reconfigure_run_concurrently() {
        let config_a = config(KEYS_AB);
        let config_b = config(
            r#"
            [[keys]]
            id = "a"
            rate_per_second = 2
            burst = 3
            "#,
        );
        let (limiters, _clock) = limiters(&config_a);
        let a = key(&config_a, "a");
        std::thread::scope(|scope| {
            let checker = scope.spawn(|| {
                let mut outcomes = 0;
                for _ in 0..2_000 {
                    match limiters.check(&a) {
                        Ok(()) | Err(GatewayError::RateLimited { .. }) => outcomes += 1,
                        Err(other) => panic!("unexpected error {other:?}"),
                    }
                }
                outcomes
            });
            for i in 0..200 {
                limiters.reconfigure(if i % 2 == 0 { &config_b } else { &config_a });
            }
            assert_eq!(checker.join().unwrap(), 2_000);
        });
    }

    #[test]
    fn production_constructor_uses_the_default_clock_and_is_shareable() {
        fn shareable<T: Send + Sync + 'static>(_: &T) {}
        let config = config(KEYS_AB);
        let limiters: Arc<RateLimiters> = Arc::new(RateLimiters::new(&config));
        shareable(&limiters);
        let layer = RateLimitLayer {
            limiters: Arc::clone(&limiters),
        };
        shareable(&layer.layer(()));
        let a = key(&config, "a");
        for _ in 0..3 {
            limiters.check(&a).unwrap();
        }
        assert_eq!(rejection(limiters.check(&a)).0, RateLimitScope::Key);
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up() {
        assert_eq!(retry_after_seconds(Duration::ZERO), 1);
        assert_eq!(retry_after_seconds(Duration::from_nanos(1)), 1);
        assert_eq!(retry_after_seconds(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_seconds(Duration::from_secs(7)), 7);
    }

    #[tokio::test]
    async fn layer_limits_requests_with_a_principal_and_passes_the_rest() {
        let config = config(KEYS_AB);
        let (limiters, _clock) = limiters(&config);
        let layer = RateLimitLayer::new(Arc::new(limiters));
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let inner = tower::service_fn(move |_request: Request<Body>| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { Ok::<_, GatewayError>(Response::new(crate::body::empty())) }
        });
        let service = layer.layer(inner);

        let with_principal = || {
            let mut request = Request::new(crate::body::empty());
            request.extensions_mut().insert(key(&config, "a"));
            request
        };
        for _ in 0..3 {
            service.clone().oneshot(with_principal()).await.unwrap();
        }
        let err = service.clone().oneshot(with_principal()).await.unwrap_err();
        assert!(
            matches!(
                err,
                GatewayError::RateLimited {
                    scope: RateLimitScope::Key,
                    retry_after_s: 1
                }
            ),
            "{err:?}"
        );
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3);

        // No principal (health, metrics, callbacks): never limited.
        for _ in 0..10 {
            service
                .clone()
                .oneshot(Request::new(crate::body::empty()))
                .await
                .unwrap();
        }
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 13);
    }
}
