//! `[[routes]]`: the table of upstream routes gatehouse forwards. Paths not in it answer 404.
//!
//! ```toml
//! [[routes]]
//! name = "chat_completions"          # metrics label: letters, digits, '_'
//! method = "POST"
//! path = "/v1/chat/completions"      # exact; "{id}" matches one segment; a trailing "/*" matches the rest
//! kind = "passthrough"               # or "runway_generate" / "runway_feed"
//! stream = true                      # relay the answer as it arrives (server-sent events)
//! model_pointer = "/model"           # JSON pointer of the model in the request body
//! allowed_models = ["gpt-4o"]        # optional, for this route
//! token_pricing = { estimate = 5, default = { prompt_per_1k = 1, completion_per_1k = 2 } }
//! ```

use super::{deserialize_at, Points};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteKindConfig {
    /// `POST /runway/pro/generate`: deep validation, callback rewrite, point ledger.
    RunwayGenerate,
    /// `POST /runway/feed`: owner-checked, settles terminal answers.
    RunwayFeed,
    /// Any other upstream route: forwarded with auth, limits, optional pricing and ownership.
    Passthrough,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    #[serde(default = "default_method")]
    pub method: String,
    pub path: String,
    pub kind: RouteKindConfig,
    /// The answer may keep flowing for longer than `upstream.timeout_ms` (server-sent events);
    /// any other answer must be complete within it. Bodies are relayed as they arrive either way.
    #[serde(default)]
    pub stream: bool,
    /// Points reserved at submit and charged when the upstream answers 2xx.
    pub points_per_request: Option<Points>,
    /// Points from the answer's token `usage` (chat).
    pub token_pricing: Option<TokenPricing>,
    /// JSON pointer of the model name in the request body (RFC 6901, e.g. "/model"). Needed
    /// for allow-lists, per-model token prices and per-model metrics.
    pub model_pointer: Option<String>,
    /// Models this route accepts (absent: any).
    pub allowed_models: Option<Vec<String>>,
    /// A limit for this route over all callers together (protects one upstream product).
    pub rate_per_second: Option<f64>,
    pub burst: Option<u32>,
    /// Async task products: how submits record task ids and fetches are owner-checked.
    pub task: Option<TaskRouteConfig>,
}

fn default_method() -> String {
    "POST".to_string()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskRole {
    /// The answer carries a new task id (at `id_pointer`); it is recorded with its owner.
    Submit,
    /// The request names a task id (`id_param` in the path or query, or `id_pointer` in the
    /// JSON body); only its owner may fetch it.
    Fetch,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskRouteConfig {
    pub role: TaskRole,
    /// Groups a submit route with its fetch routes ("suno", "mj", …): task ids are only
    /// unique within one product.
    pub product: String,
    /// Submit: JSON pointer of the task id in the answer. Fetch: in the request body.
    pub id_pointer: Option<String>,
    /// Fetch: the `{name}` path segment or `?name=` query parameter holding the task id.
    pub id_param: Option<String>,
    /// Fetch: JSON pointer of the task's status in the answer, and the values that mean the
    /// task finished. A finished task is charged its submit price; a failed one costs nothing.
    pub status_pointer: Option<String>,
    #[serde(default)]
    pub success_values: Vec<String>,
    #[serde(default)]
    pub failure_values: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenPricing {
    /// Reserved per request before the answer says how many tokens it used.
    pub estimate: Points,
    pub default: TokenRates,
    #[serde(default)]
    pub models: BTreeMap<String, TokenRates>,
}

impl TokenPricing {
    pub fn rates(&self, model: Option<&str>) -> &TokenRates {
        model
            .and_then(|model| self.models.get(model))
            .unwrap_or(&self.default)
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRates {
    pub prompt_per_1k: f64,
    pub completion_per_1k: f64,
}

impl TokenRates {
    /// Points for a `usage` object, rounded to a milli-point.
    pub fn cost(&self, prompt_tokens: u64, completion_tokens: u64) -> Points {
        let points = prompt_tokens as f64 * self.prompt_per_1k / 1000.0
            + completion_tokens as f64 * self.completion_per_1k / 1000.0;
        Points::from_f64(points).unwrap_or(Points::ZERO)
    }
}

/// The Runway routes: the table when the file has no `[[routes]]`.
pub fn runway_routes() -> Vec<RouteConfig> {
    let route = |name: &str, path: &str, kind| RouteConfig {
        name: name.to_string(),
        method: default_method(),
        path: path.to_string(),
        kind,
        stream: false,
        points_per_request: None,
        token_pricing: None,
        model_pointer: None,
        allowed_models: None,
        rate_per_second: None,
        burst: None,
        task: None,
    };
    vec![
        route(
            "runway_generate",
            "/runway/pro/generate",
            RouteKindConfig::RunwayGenerate,
        ),
        route("runway_feed", "/runway/feed", RouteKindConfig::RunwayFeed),
    ]
}

/// Reads and checks `[[routes]]`; every problem names `routes[i].setting`.
pub(super) fn from_tree(
    value: Option<&toml::Value>,
    problems: &mut Vec<String>,
) -> Vec<RouteConfig> {
    let Some(value) = value else {
        return runway_routes();
    };
    let Some(items) = value.as_array() else {
        problems.push("routes: expected an array of tables ([[routes]])".to_string());
        return Vec::new();
    };
    let routes: Vec<(usize, RouteConfig)> = items
        .iter()
        .enumerate()
        .filter_map(|(i, item)| {
            deserialize_at::<RouteConfig>(item, &format!("routes[{i}]"), problems).map(|r| (i, r))
        })
        .collect();
    let mut names = BTreeSet::new();
    let mut submit_products = BTreeSet::new();
    for (i, route) in &routes {
        let at = format!("routes[{i}]");
        if route.name.is_empty()
            || !route
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            problems.push(format!(
                "{at}.name: expected lowercase letters, digits and '_', got {:?}",
                route.name
            ));
        }
        if !names.insert(route.name.clone()) {
            problems.push(format!("{at}.name: duplicate route name {:?}", route.name));
        }
        if http::Method::from_bytes(route.method.as_bytes()).is_err()
            || route.method != route.method.to_ascii_uppercase()
        {
            problems.push(format!(
                "{at}.method: expected an HTTP method such as \"POST\" or \"GET\", got {:?}",
                route.method
            ));
        }
        check_path(&at, &route.path, problems);
        if route.points_per_request.is_some() && route.token_pricing.is_some() {
            problems.push(format!(
                "{at}: set points_per_request or token_pricing, not both"
            ));
        }
        if route.kind != RouteKindConfig::Passthrough {
            for (set, setting) in [
                (route.stream, "stream"),
                (route.points_per_request.is_some(), "points_per_request"),
                (route.token_pricing.is_some(), "token_pricing"),
                (route.model_pointer.is_some(), "model_pointer"),
                (route.task.is_some(), "task"),
            ] {
                if set {
                    problems.push(format!(
                        "{at}.{setting}: only for kind = \"passthrough\" (Runway routes are priced by [prices.runway_generate])"
                    ));
                }
            }
        }
        for pointer in [&route.model_pointer]
            .into_iter()
            .flatten()
            .map(|p| ("model_pointer", p))
            .chain(
                route
                    .task
                    .iter()
                    .flat_map(|t| {
                        [
                            ("task.id_pointer", &t.id_pointer),
                            ("task.status_pointer", &t.status_pointer),
                        ]
                    })
                    .filter_map(|(name, p)| p.as_ref().map(|p| (name, p))),
            )
        {
            if !pointer.1.is_empty() && !pointer.1.starts_with('/') {
                problems.push(format!(
                    "{at}.{}: a JSON pointer starts with '/', e.g. \"/model\", got {:?}",
                    pointer.0, pointer.1
                ));
            }
        }
        if (route.allowed_models.is_some()
            || route
                .token_pricing
                .as_ref()
                .is_some_and(|t| !t.models.is_empty()))
            && route.model_pointer.is_none()
        {
            problems.push(format!(
                "{at}.model_pointer: required with allowed_models or per-model token prices (where is the model in the body?)"
            ));
        }
        match (route.rate_per_second, route.burst) {
            (None, None) => {}
            (Some(rate), Some(burst)) => super::check_rate(&at, rate, burst, problems),
            _ => problems.push(format!(
                "{at}: set both rate_per_second and burst, or neither"
            )),
        }
        if let Some(task) = &route.task {
            check_task(&at, route, task, problems);
            if task.role == TaskRole::Submit {
                submit_products.insert(task.product.clone());
            }
        }
    }
    for (i, route) in &routes {
        if let Some(task) = route.task.as_ref().filter(|t| t.role == TaskRole::Fetch) {
            if !submit_products.contains(&task.product) {
                problems.push(format!(
                    "routes[{i}].task.product: no submit route has product {:?}, so no task could ever be fetched",
                    task.product
                ));
            }
        }
    }
    for kind in [RouteKindConfig::RunwayGenerate, RouteKindConfig::RunwayFeed] {
        if routes.iter().filter(|(_, r)| r.kind == kind).count() > 1 {
            problems.push(format!(
                "routes: at most one route of kind {kind:?} (the ledger ties Runway tasks to it)"
            ));
        }
    }
    routes.into_iter().map(|(_, route)| route).collect()
}

fn check_path(at: &str, path: &str, problems: &mut Vec<String>) {
    let valid = path.starts_with('/')
        && !path.contains("//")
        && !path.contains("..")
        && path.split('/').enumerate().all(|(i, segment)| {
            let last = i == path.split('/').count() - 1;
            (segment == "*" && last)
                || (segment.starts_with('{') && segment.ends_with('}') && segment.len() > 2)
                || segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
        });
    if !valid {
        problems.push(format!(
            "{at}.path: expected an absolute path like \"/v1/chat/completions\", \"/suno/fetch/{{id}}\" or \"/mj/submit/*\", got {path:?}"
        ));
    }
}

fn check_task(at: &str, route: &RouteConfig, task: &TaskRouteConfig, problems: &mut Vec<String>) {
    if task.product.is_empty() {
        problems.push(format!(
            "{at}.task.product: must name the product, e.g. \"suno\""
        ));
    }
    match task.role {
        TaskRole::Submit => {
            if task.id_pointer.is_none() {
                problems.push(format!(
                    "{at}.task.id_pointer: required for a submit (where is the task id in the answer?)"
                ));
            }
            if route.stream {
                problems.push(format!(
                    "{at}.stream: a submit's answer is read for its task id and cannot be streamed"
                ));
            }
        }
        TaskRole::Fetch => {
            if task.id_pointer.is_none() == task.id_param.is_none() {
                problems.push(format!(
                    "{at}.task: a fetch needs exactly one of id_param (path or query) and id_pointer (JSON body)"
                ));
            }
            if let Some(param) = &task.id_param {
                let in_path = route.path.contains(&format!("{{{param}}}"));
                if !in_path && route.method != "GET" {
                    problems.push(format!(
                        "{at}.task.id_param: {{{param}}} is not in the path (query parameters are read on GET routes only)"
                    ));
                }
            }
            if task.status_pointer.is_some()
                && task.success_values.is_empty()
                && task.failure_values.is_empty()
            {
                problems.push(format!(
                    "{at}.task: status_pointer needs success_values and/or failure_values"
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::Config;

    fn with_routes(routes: &str) -> Result<Config, Vec<String>> {
        let text =
            format!("[upstream]\nbase_url = \"http://127.0.0.1:9\"\ntoken = \"t\"\n{routes}");
        Config::from_toml(&text, &|_: &str| None).map_err(|e| e.problems)
    }

    #[test]
    fn no_routes_means_the_runway_routes() {
        let config = with_routes("").unwrap();
        let names: Vec<_> = config.routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["runway_generate", "runway_feed"]);
    }

    #[test]
    fn route_problems_name_the_setting() {
        let problems = with_routes(
            r#"
[[routes]]
name = "Chat"
method = "post"
path = "v1/chat"
kind = "passthrough"
points_per_request = 1
token_pricing = { estimate = 1, default = { prompt_per_1k = 1, completion_per_1k = 1 }, models = { "gpt-4o" = { prompt_per_1k = 1, completion_per_1k = 1 } } }

[[routes]]
name = "fetch"
method = "GET"
path = "/suno/fetch/{id}"
kind = "passthrough"
task = { role = "fetch", product = "suno", id_param = "task" }

[[routes]]
name = "feed"
path = "/runway/feed"
kind = "runway_feed"
stream = true
"#,
        )
        .unwrap_err()
        .join("\n");
        for expected in [
            "routes[0].name",
            "routes[0].method",
            "routes[0].path",
            "routes[0]: set points_per_request or token_pricing, not both",
            "routes[0].model_pointer: required",
            "routes[1].task.product: no submit route",
            "routes[2].stream: only for kind = \"passthrough\"",
        ] {
            assert!(
                problems.contains(expected),
                "missing {expected:?} in:\n{problems}"
            );
        }
    }

    #[test]
    fn the_shipped_catalogue_is_valid() {
        let lookup = |name: &str| Some(format!("value-of-{name}"));
        let config = Config::from_toml(super::super::EMBEDDED_CONFIG, &lookup).unwrap();
        assert!(
            config.routes.len() > 10,
            "the example ships the whole catalogue"
        );
    }
}
