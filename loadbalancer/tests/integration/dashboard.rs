//! The admin page in a real browser: Debian's Chromium, headless, loads it
//! while traffic flows, and what it renders is read back (`--dump-dom`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::support::*;
use common::testkit::{Http, PATIENCE, poll};
use fake_apiserver::{FakeApiServer, meta};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use serde_json::json;

/// The page's DOM after its script has run for a while, as Chromium renders it.
fn rendered(url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let output = common::testkit::tool("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            "--virtual-time-budget=3000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .output()
        .expect("chromium is installed (apt-get install chromium)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The request count the page shows for `address`.
fn shown_requests(dom: &str, address: &str) -> Option<u64> {
    let row = dom.split(&format!("data-address=\"{address}\"")).nth(1)?;
    let cell = row.split("class=\"num requests\">").nth(1)?;
    cell.split('<').next()?.parse().ok()
}

fn slice(port: u16, pods: &[&Backend]) -> EndpointSlice {
    EndpointSlice {
        metadata: meta("backend-abc", &[("kubernetes.io/service-name", "backend")]),
        address_type: "IPv4".into(),
        endpoints: Some(
            pods.iter()
                .map(|pod| Endpoint {
                    addresses: vec![pod.addr.ip().to_string()],
                    target_ref: Some(ObjectReference {
                        kind: Some("Pod".into()),
                        name: Some(pod.name.clone()),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
        ),
        ports: Some(vec![EndpointPort {
            port: Some(port.into()),
            ..Default::default()
        }]),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_page_shows_every_backend_with_rising_counts_and_the_changes() {
    let (pods, port) = start_pods(24, 3);
    let api = FakeApiServer::start("lb-test").await;
    api.apply_slice(slice(port, &[&pods[0], &pods[1], &pods[2]]));
    let kubeconfig = api.kubeconfig("lb-test");
    let mut lb = start_load_balancer_with(
        json!({ "discovery": "endpointslices", "backendServiceName": "backend", "backendPort": port }),
        &[
            ("KUBECONFIG", kubeconfig.path().to_str().unwrap()),
            ("POD_NAMESPACE", "lb-test"),
        ],
    );
    lb.process
        .wait_for_log("backends changed", |l| l["total"] == 3);

    // Traffic flows the whole time the page is looked at.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = tokio::spawn({
        let (stop, url) = (stop.clone(), lb.url("/"));
        async move {
            let http = Http::new();
            while !stop.load(Ordering::Relaxed) {
                let _ = http.try_get(&url).await;
            }
        }
    });
    let page = lb.admin_url("/");
    let first = tokio::task::spawn_blocking({
        let page = page.clone();
        move || rendered(&page)
    })
    .await
    .unwrap();
    for pod in &pods {
        assert!(
            first.contains(&pod.name),
            "{} is on the page:\n{first}",
            pod.name
        );
    }
    let second = tokio::task::spawn_blocking({
        let page = page.clone();
        move || rendered(&page)
    })
    .await
    .unwrap();
    for pod in &pods {
        let address = pod.addr.to_string();
        let (before, after) = (
            shown_requests(&first, &address).unwrap(),
            shown_requests(&second, &address).unwrap(),
        );
        assert!(after > before, "{address}: {before} then {after}");
    }

    api.apply_slice(slice(port, &[&pods[0], &pods[1]]));
    lb.process
        .wait_for_log("backends changed", |l| l["total"] == 2);
    let changed = poll(PATIENCE, || {
        let dom = rendered(&page);
        dom.contains(&format!("- {} ({}) left", pods[2].name, pods[2].addr))
            .then_some(dom)
    })
    .expect("the page lists the pod that left");
    assert!(shown_requests(&changed, &pods[2].addr.to_string()).is_none());
    assert!(changed.contains(&format!("+ {} ({}) joined", pods[0].name, pods[0].addr)));

    api.apply_slice(slice(port, &[]));
    lb.process
        .wait_for_log("backends changed", |l| l["total"] == 0);
    let empty = rendered(&page);
    assert!(empty.contains("No backends"), "{empty}");
    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
}
