//! The backend's Prometheus metrics, on `GET /metrics`.
//!
//! - `backend_requests_total{route, code}`: answered requests;
//! - `backend_request_duration_seconds{route}`: how long they took.
//!
//! `route` is the route's template (`/status/{code}`), never the raw path,
//! so a client cannot grow the number of series by asking for new paths;
//! requests that match no route are `unmatched`. The backend is a teaching
//! tool, not the hot path we benchmark, so it uses prometheus-client's
//! ready-made labelled families (a small lock per update) instead of the
//! load balancer's per-backend atomics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteCode {
    route: String,
    code: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Route {
    route: String,
}

type Durations = Family<Route, Histogram, fn() -> Histogram>;

/// The registry and the two families in it.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RouteCode, Counter>,
    durations: Durations,
}

impl Default for Metrics {
    fn default() -> Self {
        let requests = Family::<RouteCode, Counter>::default();
        let durations: Durations = Family::new_with_constructor(|| {
            Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0,
            ])
        });
        let mut registry = Registry::default();
        registry.register(
            "backend_requests",
            "Answered requests, by route template and status code",
            requests.clone(),
        );
        registry.register(
            "backend_request_duration_seconds",
            "Time to answer, by route template",
            durations.clone(),
        );
        Metrics {
            registry,
            requests,
            durations,
        }
    }
}

impl Metrics {
    /// One answered request on `route` with `code`, after `seconds`.
    pub fn record(&self, route: &str, code: u16, seconds: f64) {
        let route = route.to_owned();
        self.durations
            .get_or_create(&Route {
                route: route.clone(),
            })
            .observe(seconds);
        self.requests
            .get_or_create(&RouteCode { route, code })
            .inc();
    }

    /// The exposition, in OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}
