//! Kubernetes discovery, end to end, without a cluster: the real
//! `loadbalancer` binary reaches a fake API server through an ordinary
//! kubeconfig (`KUBECONFIG`), exactly as it reaches a real one, and real
//! `backend` processes stand in for pods, each on its own loopback IP.

use std::collections::BTreeMap;
use std::os::unix::fs::OpenOptionsExt;

use crate::support::*;
use common::testkit::{Http, PATIENCE, poll};
use fake_apiserver::{FakeApiServer, meta};
use k8s_openapi::api::core::v1::{
    EndpointAddress, EndpointPort as CorePort, EndpointSubset, Endpoints, ObjectReference,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use serde_json::json;

const NAMESPACE: &str = "lb-test";

/// An API server, its kubeconfig, and a load balancer watching it.
struct Cluster {
    api: FakeApiServer,
    lb: LoadBalancer,
    _kubeconfig: tempfile::NamedTempFile,
}

async fn cluster(discovery: &str, port: u16, before_start: impl FnOnce(&FakeApiServer)) -> Cluster {
    let api = FakeApiServer::start(NAMESPACE).await;
    before_start(&api);
    let kubeconfig = api.kubeconfig("kubeconfig-namespace-not-used");
    let lb = start_load_balancer_with(
        json!({ "discovery": discovery, "backendServiceName": "backend", "backendPort": port }),
        &[
            ("KUBECONFIG", kubeconfig.path().to_str().unwrap()),
            ("POD_NAMESPACE", NAMESPACE),
        ],
    );
    Cluster {
        api,
        lb,
        _kubeconfig: kubeconfig,
    }
}

/// An endpoint's conditions: (ready, serving, terminating).
type Conditions = (Option<bool>, Option<bool>, Option<bool>);

/// An EndpointSlice of the `backend` Service listing `pods` with their conditions.
fn slice(name: &str, port: u16, pods: &[(&Backend, Conditions)]) -> EndpointSlice {
    EndpointSlice {
        metadata: meta(name, &[("kubernetes.io/service-name", "backend")]),
        address_type: "IPv4".into(),
        endpoints: Some(
            pods.iter()
                .map(|(pod, (ready, serving, terminating))| Endpoint {
                    addresses: vec![pod.addr.ip().to_string()],
                    conditions: Some(EndpointConditions {
                        ready: *ready,
                        serving: *serving,
                        terminating: *terminating,
                    }),
                    target_ref: Some(ObjectReference {
                        kind: Some("Pod".into()),
                        name: Some(pod.name.clone()),
                        ..Default::default()
                    }),
                    node_name: Some("kind-worker".into()),
                    ..Default::default()
                })
                .collect(),
        ),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(port.into()),
            ..Default::default()
        }]),
    }
}

const READY: Conditions = (Some(true), Some(true), Some(false));
const NOT_READY: Conditions = (Some(false), Some(false), Some(false));
const TERMINATING_SERVING: Conditions = (Some(false), Some(true), Some(true));

fn ready_slice(name: &str, port: u16, pods: &[&Backend]) -> EndpointSlice {
    let pods: Vec<_> = pods.iter().map(|p| (*p, READY)).collect();
    slice(name, port, &pods)
}

/// Sends `n` requests and counts the answers by pod name.
async fn spread(lb: &LoadBalancer, n: usize) -> BTreeMap<String, usize> {
    let http = Http::new();
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        let reply = http.get(&lb.url("/")).await;
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        *counts
            .entry(reply.json()["podName"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    counts
}

fn evenly(pods: &[&Backend], each: usize) -> BTreeMap<String, usize> {
    pods.iter().map(|p| (p.name.clone(), each)).collect()
}

fn wait_for_backends(lb: &mut LoadBalancer, since: usize, total: usize) {
    lb.process
        .wait_for_log_since(since, "backends changed", |l| l["total"] == total);
}

#[tokio::test]
async fn discovered_backends_share_the_traffic_evenly() {
    let (pods, port) = start_pods(10, 3);
    let all: Vec<&Backend> = pods.iter().collect();
    let mut c = cluster("endpointslices", port, |api| {
        api.apply_slice(ready_slice("backend-abc", port, &all))
    })
    .await;
    wait_for_backends(&mut c.lb, 0, 3);
    assert_eq!(
        Http::new().get(&c.lb.admin_url("/readyz")).await.status,
        200
    );
    assert_eq!(spread(&c.lb, 90).await, evenly(&all, 30));
}

#[tokio::test]
async fn backends_are_named_by_their_pods_and_leave_the_metrics_when_they_go() {
    let (pods, port) = start_pods(23, 3);
    let all: Vec<&Backend> = pods.iter().collect();
    let mut c = cluster("endpointslices", port, |api| {
        api.apply_slice(ready_slice("backend-abc", port, &all))
    })
    .await;
    wait_for_backends(&mut c.lb, 0, 3);
    spread(&c.lb, 9).await;
    let http = Http::new();
    let listed = http.get(&c.lb.admin_url("/backends")).await.json();
    let named: Vec<(&str, &str)> = listed["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["pod"].as_str().unwrap(), b["node"].as_str().unwrap()))
        .collect();
    assert_eq!(
        named,
        pods.iter()
            .map(|p| (p.name.as_str(), "kind-worker"))
            .collect::<Vec<_>>()
    );
    assert_eq!(listed["discovery"]["source"], "endpointslices");
    assert_eq!(listed["discovery"]["state"], "synced");
    let series = |text: &str, addr: std::net::SocketAddr| {
        text.lines()
            .filter(|l| l.contains(&format!("backend=\"{addr}\"")))
            .count()
    };
    let before =
        String::from_utf8(http.get(&c.lb.admin_url("/metrics")).await.body.to_vec()).unwrap();
    assert!(series(&before, pods[2].addr) > 0, "{before}");

    let mark = c.lb.process.mark();
    c.api
        .apply_slice(ready_slice("backend-abc", port, &[&pods[0], &pods[1]]));
    wait_for_backends(&mut c.lb, mark, 2);
    let after =
        String::from_utf8(http.get(&c.lb.admin_url("/metrics")).await.body.to_vec()).unwrap();
    assert_eq!(series(&after, pods[2].addr), 0, "{after}");
    assert!(series(&after, pods[0].addr) > 0);
    let listed = http.get(&c.lb.admin_url("/backends")).await.json();
    assert_eq!(
        listed["changes"][0]["left"][0]["pod"],
        pods[2].name.as_str()
    );
    assert_eq!(listed["generation"], 2);
}

#[tokio::test]
async fn scaling_up_and_down_changes_the_rotation() {
    let (pods, port) = start_pods(11, 5);
    let pick = |idx: &[usize]| idx.iter().map(|&i| &pods[i]).collect::<Vec<_>>();
    let mut c = cluster("endpointslices", port, |api| {
        api.apply_slice(ready_slice("backend-abc", port, &pick(&[0, 1, 2])))
    })
    .await;
    wait_for_backends(&mut c.lb, 0, 3);
    assert_eq!(spread(&c.lb, 30).await, evenly(&pick(&[0, 1, 2]), 10));

    let mark = c.lb.process.mark();
    c.api
        .apply_slice(ready_slice("backend-abc", port, &pick(&[0, 1, 2, 3, 4])));
    let change =
        c.lb.process
            .wait_for_log_since(mark, "backends changed", |l| l["total"] == 5);
    assert_eq!(change["added"], 2);
    assert_eq!(
        spread(&c.lb, 50).await,
        evenly(&pick(&[0, 1, 2, 3, 4]), 10),
        "new pods receive traffic"
    );

    let mark = c.lb.process.mark();
    c.api
        .apply_slice(ready_slice("backend-abc", port, &pick(&[1, 3])));
    let change =
        c.lb.process
            .wait_for_log_since(mark, "backends changed", |l| l["total"] == 2);
    assert_eq!(change["removed"], 3);
    assert_eq!(
        spread(&c.lb, 20).await,
        evenly(&pick(&[1, 3]), 10),
        "removed pods receive none"
    );
}

#[tokio::test]
async fn a_pod_that_turns_not_ready_is_skipped() {
    let (pods, port) = start_pods(12, 3);
    let mut c = cluster("endpointslices", port, |api| {
        api.apply_slice(ready_slice(
            "backend-abc",
            port,
            &[&pods[0], &pods[1], &pods[2]],
        ))
    })
    .await;
    wait_for_backends(&mut c.lb, 0, 3);
    let mark = c.lb.process.mark();
    c.api.apply_slice(slice(
        "backend-abc",
        port,
        &[(&pods[0], READY), (&pods[1], NOT_READY), (&pods[2], READY)],
    ));
    wait_for_backends(&mut c.lb, mark, 2);
    assert_eq!(spread(&c.lb, 20).await, evenly(&[&pods[0], &pods[2]], 10));
}

#[tokio::test]
async fn when_no_pod_is_ready_terminating_but_serving_pods_are_used() {
    let (pods, port) = start_pods(13, 3);
    let mut c = cluster("endpointslices", port, |api| {
        api.apply_slice(slice(
            "backend-abc",
            port,
            &[
                (&pods[0], TERMINATING_SERVING),
                (&pods[1], TERMINATING_SERVING),
                (&pods[2], NOT_READY),
            ],
        ))
    })
    .await;
    wait_for_backends(&mut c.lb, 0, 2);
    assert_eq!(spread(&c.lb, 20).await, evenly(&[&pods[0], &pods[1]], 10));
}

#[tokio::test]
async fn slices_of_one_service_are_merged_and_others_ignored() {
    let (pods, port) = start_pods(14, 4);
    let mut c = cluster("endpointslices", port, |api| {
        api.apply_slice(ready_slice("backend-abc", port, &[&pods[0], &pods[1]]));
        api.apply_slice(ready_slice("backend-def", port, &[&pods[1], &pods[2]]));
        let mut other = ready_slice("frontend-xyz", port, &[&pods[3]]);
        other.metadata = meta(
            "frontend-xyz",
            &[("kubernetes.io/service-name", "frontend")],
        );
        api.apply_slice(other);
    })
    .await;
    wait_for_backends(&mut c.lb, 0, 3);
    assert_eq!(
        spread(&c.lb, 30).await,
        evenly(&[&pods[0], &pods[1], &pods[2]], 10)
    );
}

#[tokio::test]
async fn traffic_keeps_flowing_while_the_api_server_is_away_and_changes_arrive_after() {
    let (pods, port) = start_pods(15, 3);
    let mut c = cluster("endpointslices", port, |api| {
        api.apply_slice(ready_slice("backend-abc", port, &[&pods[0], &pods[1]]))
    })
    .await;
    wait_for_backends(&mut c.lb, 0, 2);

    c.api.stop();
    c.lb.process.wait_for_log("cannot watch", |_| true);
    let http = Http::new();
    let listed = http.get(&c.lb.admin_url("/backends")).await.json();
    assert_eq!(listed["discovery"]["state"], "retrying", "{listed}");
    assert!(
        listed["discovery"]["lastError"]
            .as_str()
            .unwrap()
            .starts_with("cannot watch"),
        "{listed}"
    );
    let metrics =
        String::from_utf8(http.get(&c.lb.admin_url("/metrics")).await.body.to_vec()).unwrap();
    assert!(
        metrics.contains("loadbalancer_discovery_synced 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("loadbalancer_discovery_errors_total{reason=\"unreachable\"}"),
        "{metrics}"
    );
    assert_eq!(
        spread(&c.lb, 20).await,
        evenly(&[&pods[0], &pods[1]], 10),
        "last known backends serve"
    );
    assert_eq!(
        Http::new().get(&c.lb.admin_url("/readyz")).await.status,
        200,
        "still ready"
    );

    // Scaled up while the load balancer could not see it.
    c.api.apply_slice(ready_slice(
        "backend-abc",
        port,
        &[&pods[0], &pods[1], &pods[2]],
    ));
    c.api.restart().await;
    wait_for_backends(&mut c.lb, 0, 3);
    assert_eq!(
        spread(&c.lb, 30).await,
        evenly(&[&pods[0], &pods[1], &pods[2]], 10)
    );
}

/// An API server restart, as seen from a real cluster: connections refused
/// for a while, then a 403 before its RBAC cache is warm, then 410 Gone for
/// the old watch. The change made meanwhile must arrive within 5 s of the
/// API server answering again: the backoff is capped and reset on progress
/// (kube-rs's default, growing to 30 s, took 10 s or more here).
#[tokio::test(flavor = "multi_thread")]
async fn after_an_api_server_outage_a_change_arrives_within_5_s_of_its_return() {
    let (pods, port) = start_pods(22, 3);
    let mut c = cluster("endpointslices", port, |api| {
        api.apply_slice(ready_slice("backend-abc", port, &[&pods[0], &pods[1]]))
    })
    .await;
    wait_for_backends(&mut c.lb, 0, 2);

    c.api.stop();
    c.lb.process.wait_for_log("cannot watch", |_| true);
    // The outage itself: long enough for an exponential backoff to grow.
    std::thread::sleep(std::time::Duration::from_secs(5));
    c.api.apply_slice_unseen(ready_slice(
        "backend-abc",
        port,
        &[&pods[0], &pods[1], &pods[2]],
    ));
    c.api.forbid_next(1);
    let mark = c.lb.process.mark();
    c.api.restart().await;
    let back = std::time::Instant::now();

    let seen = poll(std::time::Duration::from_secs(5), || {
        c.lb.process.logs().into_iter().skip(mark).find(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("backends changed"))
                && l["total"] == 3
        })
    });
    assert!(
        seen.is_some(),
        "the change was not picked up within 5 s of the API server's return ({:?} so far); logs:\n{:#?}",
        back.elapsed(),
        c.lb.process
            .logs()
            .into_iter()
            .skip(mark)
            .collect::<Vec<_>>()
    );
    assert_eq!(
        spread(&c.lb, 30).await,
        evenly(&[&pods[0], &pods[1], &pods[2]], 10)
    );
}

#[tokio::test]
async fn an_expired_watch_410_gone_lists_again() {
    let (pods, port) = start_pods(16, 3);
    let mut c = cluster("endpointslices", port, |api| {
        api.apply_slice(ready_slice("backend-abc", port, &[&pods[0], &pods[1]]))
    })
    .await;
    wait_for_backends(&mut c.lb, 0, 2);
    let lists = c.api.lists();

    // A change the watch never sees, history compacted past it, and the
    // watch cut: resuming from the old version must get 410, then relist.
    c.api.apply_slice_unseen(ready_slice(
        "backend-abc",
        port,
        &[&pods[0], &pods[1], &pods[2]],
    ));
    c.api.drop_watches();
    c.lb.process.wait_for_log("watch of endpointslices.discovery.k8s.io (kubernetes.io/service-name=backend) expired (410 Gone)", |_| true);
    wait_for_backends(&mut c.lb, 0, 3);
    assert!(c.api.lists() > lists, "listed again");
}

#[tokio::test]
async fn bookmarks_and_dropped_watches_change_nothing() {
    let (pods, port) = start_pods(17, 2);
    let mut c = cluster("endpointslices", port, |api| {
        api.apply_slice(ready_slice("backend-abc", port, &[&pods[0], &pods[1]]))
    })
    .await;
    wait_for_backends(&mut c.lb, 0, 2);
    c.api.bookmark();
    c.api.drop_watches();
    // A change after the reconnect still arrives...
    let mark = c.lb.process.mark();
    c.api
        .apply_slice(ready_slice("backend-abc", port, &[&pods[1]]));
    wait_for_backends(&mut c.lb, mark, 1);
    // ...and nothing in between was reported as a change.
    let changes =
        c.lb.process
            .logs()
            .iter()
            .filter(|l| {
                l["message"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("backends changed")
            })
            .count();
    assert_eq!(changes, 2);
}

#[tokio::test]
async fn forbidden_logs_one_clear_line_until_rbac_is_fixed() {
    let (pods, port) = start_pods(18, 2);
    let mut c = cluster("endpointslices", port, |api| {
        api.apply_slice(ready_slice("backend-abc", port, &[&pods[0], &pods[1]]));
        api.set_forbidden(true);
    })
    .await;
    let line = c.lb.process.wait_for_log("forbidden:", |_| true);
    assert_eq!(line["level"], "ERROR");
    let message = line["message"].as_str().unwrap();
    for part in [
        "may not list endpointslices.discovery.k8s.io",
        "in namespace lb-test",
        "k8s/base/loadbalancer-rbac.yaml",
    ] {
        assert!(message.contains(part), "{part:?} missing from: {message}");
    }
    let readyz = Http::new().get(&c.lb.admin_url("/readyz")).await;
    assert_eq!(readyz.status, 503);
    assert_eq!(
        readyz.json()["status"],
        "waiting for the first list of backends"
    );
    assert_eq!(Http::new().get(&c.lb.url("/")).await.status, 503);

    // Retries go on, but the line is not repeated.
    poll(PATIENCE, || (c.api.lists() >= 3).then_some(())).expect("retries");
    let forbidden =
        c.lb.process
            .logs()
            .iter()
            .filter(|l| l["message"].as_str().unwrap_or("").starts_with("forbidden"))
            .count();
    assert_eq!(forbidden, 1);

    c.api.set_forbidden(false);
    wait_for_backends(&mut c.lb, 0, 2);
    assert_eq!(
        Http::new().get(&c.lb.admin_url("/readyz")).await.status,
        200
    );
}

#[tokio::test]
async fn deleting_the_slices_gives_503_until_they_return() {
    let (pods, port) = start_pods(19, 2);
    let mut c = cluster("endpointslices", port, |api| {
        api.apply_slice(ready_slice("backend-abc", port, &[&pods[0], &pods[1]]))
    })
    .await;
    wait_for_backends(&mut c.lb, 0, 2);
    let mark = c.lb.process.mark();
    c.api.delete_slice("backend-abc");
    wait_for_backends(&mut c.lb, mark, 0);
    let reply = Http::new().get(&c.lb.url("/")).await;
    assert_eq!(reply.status, 503);
    assert!(
        reply.json()["error"]
            .as_str()
            .unwrap()
            .starts_with("no backend is available")
    );

    let mark = c.lb.process.mark();
    c.api
        .apply_slice(ready_slice("backend-abc", port, &[&pods[0], &pods[1]]));
    wait_for_backends(&mut c.lb, mark, 2);
    assert_eq!(spread(&c.lb, 10).await, evenly(&[&pods[0], &pods[1]], 5));
}

fn endpoints_object(port: u16, ready: &[&Backend], not_ready: &[&Backend]) -> Endpoints {
    let addresses = |pods: &[&Backend]| {
        Some(
            pods.iter()
                .map(|p| EndpointAddress {
                    ip: p.addr.ip().to_string(),
                    ..Default::default()
                })
                .collect(),
        )
    };
    Endpoints {
        metadata: meta("backend", &[]),
        subsets: Some(vec![EndpointSubset {
            addresses: addresses(ready),
            not_ready_addresses: addresses(not_ready),
            ports: Some(vec![CorePort {
                name: Some("http".into()),
                port: port.into(),
                ..Default::default()
            }]),
        }]),
    }
}

#[tokio::test]
async fn the_v1_endpoints_source_follows_ready_addresses() {
    let (pods, port) = start_pods(20, 3);
    let mut c = cluster("endpoints", port, |api| {
        api.apply_endpoints(endpoints_object(port, &[&pods[0], &pods[1]], &[&pods[2]]));
        // Another Service's Endpoints must be ignored.
        let mut other = endpoints_object(port, &[&pods[2]], &[]);
        other.metadata = meta("frontend", &[]);
        api.apply_endpoints(other);
    })
    .await;
    wait_for_backends(&mut c.lb, 0, 2);
    assert_eq!(
        spread(&c.lb, 20).await,
        evenly(&[&pods[0], &pods[1]], 10),
        "not-ready excluded"
    );

    let mark = c.lb.process.mark();
    c.api
        .apply_endpoints(endpoints_object(port, &[&pods[0], &pods[1], &pods[2]], &[]));
    wait_for_backends(&mut c.lb, mark, 3);
    assert_eq!(
        spread(&c.lb, 30).await,
        evenly(&[&pods[0], &pods[1], &pods[2]], 10)
    );

    let mark = c.lb.process.mark();
    c.api
        .apply_endpoints(endpoints_object(port, &[&pods[2]], &[&pods[0], &pods[1]]));
    wait_for_backends(&mut c.lb, mark, 1);
    assert_eq!(spread(&c.lb, 5).await, evenly(&[&pods[2]], 5));
}

/// The `unreachable` count of discovery errors, from `/metrics`.
async fn unreachable_errors(lb: &LoadBalancer) -> u64 {
    let metrics = Http::new().get(&lb.admin_url("/metrics")).await.body;
    let metrics = String::from_utf8(metrics.to_vec()).unwrap();
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("loadbalancer_discovery_errors_total{reason=\"unreachable\"} ")
        })
        .map_or(0, |n| n.parse().unwrap())
}

/// While the API server refuses connections, the attempts space out (250
/// ms doubling to 1 s, each plus up to as much again), the status says since
/// when it has failed and that no event came, and it is logged once.
#[tokio::test]
async fn while_the_api_server_is_away_retries_back_off_and_say_so_once() {
    let (pods, port) = start_pods(23, 2);
    let mut c = cluster("endpointslices", port, |api| {
        api.apply_slice(ready_slice("backend-abc", port, &[&pods[0], &pods[1]]))
    })
    .await;
    wait_for_backends(&mut c.lb, 0, 2);
    let http = Http::new();
    let synced = http.get(&c.lb.admin_url("/backends")).await.json()["discovery"].clone();

    let mark = c.lb.process.mark();
    c.api.stop();
    // A change made meanwhile, for the watch to see when it is back.
    c.api
        .apply_slice_unseen(ready_slice("backend-abc", port, &[&pods[0]]));
    // When each attempt failed, polled every 20 ms, until seven did.
    let mut failed_at = Vec::new();
    let mut seen = unreachable_errors(&c.lb).await;
    let started = std::time::Instant::now();
    while failed_at.len() < 7 && started.elapsed() < PATIENCE {
        let now = unreachable_errors(&c.lb).await;
        if now > seen {
            failed_at.push(std::time::Instant::now());
            seen = now;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(failed_at.len(), 7, "attempts seen within {PATIENCE:?}");
    let gaps: Vec<u128> = failed_at
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis())
        .collect();
    // The first gaps may be short (250 ms at least, doubling); the last
    // ones are at the cap: 1 s, plus jitter up to as much again.
    assert!(gaps.iter().all(|&g| (200..=2_300).contains(&g)), "{gaps:?}");
    assert!(gaps[3..].iter().all(|&g| g >= 900), "never grew: {gaps:?}");

    let status = http.get(&c.lb.admin_url("/backends")).await.json()["discovery"].clone();
    assert_eq!(status["state"], "retrying", "{status}");
    assert_eq!(
        status["lastEvent"], synced["lastEvent"],
        "no event came: {status}"
    );
    let since: jiff::Timestamp = status["since"].as_str().unwrap().parse().unwrap();
    assert!(
        jiff::Timestamp::now().duration_since(since) > jiff::SignedDuration::from_secs(4),
        "`since` must say when the failing began: {status}"
    );
    let lines: Vec<_> = c.lb.process.logs().into_iter().skip(mark).collect();
    let warnings = lines.iter().filter(|l| l["level"] == "WARN").count();
    let errors = lines.iter().filter(|l| l["level"] == "ERROR").count();
    assert_eq!(
        (warnings, errors),
        (1, 0),
        "one line for the outage: {lines:#?}"
    );

    c.api.restart().await;
    c.lb.process
        .wait_for_log_since(mark, "watch restored", |l| l["level"] == "INFO");
}

/// A SIGHUP that arrives while the load balancer is still starting (here:
/// reading its kubeconfig, which is a pipe that nobody writes yet) must not
/// kill it: the config watcher that answers SIGHUP is not running yet.
#[tokio::test]
async fn a_sighup_during_startup_does_not_kill_the_process() {
    use std::io::Write;
    let api = FakeApiServer::start(NAMESPACE).await;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("kubeconfig");
    let made = common::testkit::tool("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo (coreutils)");
    assert!(made.success());
    let config = write_config(&json!({
        "port": 0, "adminPort": 0, "discovery": "endpointslices",
        "backendServiceName": "backend", "backendPort": 8080,
    }));
    let mut command = std::process::Command::new(common::testkit::binary("loadbalancer"));
    command
        .args(["--host", "127.0.0.1", "--config"])
        .arg(config.path())
        .env("KUBECONFIG", &fifo)
        .env("POD_NAMESPACE", NAMESPACE);
    // Not `LoadBalancer::start`: that waits for the ports, and this one is
    // held up until the kubeconfig comes.
    let mut lb = common::testkit::Process::start("loadbalancer", command);
    // Opening the pipe without waiting works once the reader has it open.
    let writer = poll(PATIENCE, || {
        std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(&fifo)
            .ok()
    });
    let mut writer = writer.expect("the load balancer never opened its kubeconfig");
    lb.signal(nix::sys::signal::Signal::SIGHUP);
    // kube reads the kubeconfig more than once: later reads find a file.
    let kubeconfig = api.kubeconfig_yaml(NAMESPACE);
    let file = dir.path().join("kubeconfig.yaml");
    std::fs::write(&file, &kubeconfig).unwrap();
    std::fs::rename(&file, &fifo).unwrap();
    writer.write_all(kubeconfig.as_bytes()).unwrap();
    drop(writer);
    lb.wait_for_log("listening", |_| true);
    assert!(lb.is_running(), "killed by a SIGHUP during startup");
}
