//! Active health checks: each backend's health path, probed on a timer.
//!
//! In Kubernetes the kubelet's readiness probe already takes a failing pod
//! out of the Service, but only as fast as its own period, the EndpointSlice
//! controller and our watch allow; and with `static` discovery nobody probes
//! at all. With `"healthCheck"` in the config, the load balancer probes each
//! backend itself: `unhealthyThreshold` failures in a row eject it (reason
//! `active_check`) until `healthyThreshold` passes bring it back, whatever
//! the traffic says (see [`super::health`]).
//!
//! A backend whose discovery gives a health URL (a `Server` resource's
//! `healthUrl`) is probed there instead of on its own address. Whoever needs
//! the verdicts (the `servers` source writes them to each Server's status)
//! can [`Checker::observe`] them: one [`Verdict`] per probe that confirms
//! the current verdict or changes it.
//!
//! One task per backend, started when it joins the set and ended when it
//! leaves. Each waits a random part of the interval before its first probe
//! and varies each interval by ±10%, so 30 backends are not probed in one
//! burst every interval.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Request, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::Backend;
use super::health::Reason;

/// The `"healthCheck"` section of the config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HealthCheck {
    /// The path probed with `GET`; a 2xx answer passes.
    pub path: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Failures in a row that eject the backend.
    pub unhealthy_threshold: u32,
    /// Passes in a row that bring it back.
    pub healthy_threshold: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            path: "/readyz".into(),
            interval_ms: 2_000,
            timeout_ms: 1_000,
            unhealthy_threshold: 2,
            healthy_threshold: 2,
        }
    }
}

/// Runs the probes; the config it reads can change while running.
#[derive(Debug)]
pub struct Checker {
    config: ArcSwapOption<HealthCheck>,
    client: Client<HttpConnector, Empty<Bytes>>,
    observer: OnceLock<mpsc::UnboundedSender<Verdict>>,
}

/// What the checks say of one backend after a probe.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub backend: Weak<Backend>,
    pub healthy: bool,
    /// What the probe found, such as `GET http://10.0.0.7:8080/readyz: 200 OK`.
    pub message: String,
    pub at: jiff::Timestamp,
}

impl Default for Checker {
    fn default() -> Self {
        Checker {
            config: ArcSwapOption::empty(),
            client: Client::builder(TokioExecutor::new()).build_http(),
            observer: OnceLock::new(),
        }
    }
}

impl Checker {
    /// Probes with `config` from the next probe on; `None` stops probing
    /// (and lets any backend the checks had ejected back in).
    pub fn configure(&self, config: Option<HealthCheck>) {
        self.config.store(config.map(Arc::new));
    }

    /// From now on, every probe that confirms or changes a backend's verdict
    /// is also sent to the returned receiver (one observer at most).
    pub fn observe(&self) -> Option<mpsc::UnboundedReceiver<Verdict>> {
        let (sender, receiver) = mpsc::unbounded_channel();
        self.observer.set(sender).ok()?;
        Some(receiver)
    }

    /// Starts probing `backend`, until it leaves the set. (Outside a
    /// runtime, as in unit tests of the balancer, nothing is started.)
    pub fn watch(self: &Arc<Self>, backend: &Arc<Backend>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (checker, backend) = (self.clone(), Arc::downgrade(backend));
        runtime.spawn(async move { checker.probe_until_gone(backend).await });
    }

    async fn probe_until_gone(&self, backend: Weak<Backend>) {
        let first = self.interval().mul_f64(fastrand::f64());
        tokio::time::sleep(first).await;
        loop {
            let Some(backend) = backend.upgrade().filter(|b| !b.left.load(Relaxed)) else {
                return;
            };
            match self.config.load_full() {
                Some(config) => self.probe(&backend, &config).await,
                None => {
                    backend.health.checked(true, 1, 1);
                }
            }
            drop(backend);
            // ±10%, so that the backends' probes drift apart.
            let jitter = 0.9 + fastrand::f64() * 0.2;
            tokio::time::sleep(self.interval().mul_f64(jitter)).await;
        }
    }

    /// The health path probed on a backend's own address.
    pub fn path(&self) -> String {
        self.config
            .load()
            .as_ref()
            .map_or_else(|| HealthCheck::default().path, |c| c.path.clone())
    }

    fn interval(&self) -> Duration {
        self.config
            .load()
            .as_ref()
            .map_or(Duration::from_secs(1), |c| {
                Duration::from_millis(c.interval_ms)
            })
    }

    async fn probe(&self, backend: &Arc<Backend>, config: &HealthCheck) {
        let url = match &backend.origin.health_url {
            Some(url) => url.clone(),
            None => format!("http://{}{}", backend.addr, config.path),
        };
        let timeout = Duration::from_millis(config.timeout_ms);
        let (passed, found) = self.get(&url, timeout).await;
        tracing::debug!(backend = %backend.addr, passed, found, "health check");
        match backend
            .health
            .checked(passed, config.unhealthy_threshold, config.healthy_threshold)
        {
            Some(true) => {
                backend.stats.ejected(Reason::ActiveCheck);
                tracing::warn!(backend = %backend.addr, url, found, "backend ejected: its health check failed {} times in a row", config.unhealthy_threshold);
            }
            Some(false) => {
                tracing::info!(backend = %backend.addr, "backend back in the rotation: its health check passed {} times in a row", config.healthy_threshold);
            }
            None => {}
        }
        let healthy = !backend.health.check_failed();
        if let Some(observer) = self.observer.get()
            && passed == healthy
        {
            let _ = observer.send(Verdict {
                backend: Arc::downgrade(backend),
                healthy,
                message: format!("GET {url}: {found}"),
                at: jiff::Timestamp::now(),
            });
        }
    }

    /// Whether `GET url` answers 2xx within `timeout`, and what it answered.
    async fn get(&self, url: &str, timeout: Duration) -> (bool, String) {
        let request = match url
            .parse::<Uri>()
            .map(|uri| Request::get(uri).body(Empty::new()))
        {
            Ok(Ok(request)) => request,
            _ => return (false, "not a valid URL".into()),
        };
        match tokio::time::timeout(timeout, self.client.request(request)).await {
            Ok(Ok(response)) => (
                response.status().is_success(),
                response.status().to_string(),
            ),
            Ok(Err(error)) => (false, common::errors::chain(&error)),
            Err(_) => (false, format!("no answer within {timeout:?}")),
        }
    }
}
