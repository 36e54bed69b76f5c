//! `make local`'s stand-in cluster, driven by the real `kubectl`: the
//! project's own manifests, the backend Deployment's pods as processes,
//! and the load balancer unchanged, watching EndpointSlices.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::testkit::{Http, PATIENCE, binary, poll, poll_async};
use fake_apiserver::{FakeApiServer, Local, LocalCluster};
use serde_json::{Value, json};

use crate::support::{LoadBalancer, start_load_balancer_with};

/// The cluster, its kubeconfig, and the load balancer watching it.
struct Cluster {
    kubeconfig: tempfile::NamedTempFile,
    lb: LoadBalancer,
    running: Option<LocalCluster>,
    _state: tempfile::TempDir,
    _api: FakeApiServer,
}

impl Cluster {
    /// `net` keeps this cluster's pod addresses (`127.0.<net>.11`, ...)
    /// apart from other tests'.
    async fn start(net: u8) -> Option<Cluster> {
        let manifests = std::process::Command::new("kubectl")
            .arg("kustomize")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../k8s"))
            .output();
        let Ok(manifests) = manifests else {
            eprintln!(
                "skipped: no kubectl installed (CI has one; https://kubernetes.io/docs/tasks/tools/)"
            );
            return None;
        };
        let api = FakeApiServer::start("lb-demo").await;
        let state = tempfile::tempdir().unwrap();
        let running = api
            .run_local(Local {
                manifests: String::from_utf8(manifests.stdout).unwrap(),
                backend: binary("backend"),
                state: state.path().to_owned(),
                first_ip: Ipv4Addr::new(127, 0, net, 11),
            })
            .unwrap();
        let kubeconfig = api.kubeconfig("lb-demo");
        let path = kubeconfig.path().to_str().unwrap().to_owned();
        let lb = start_load_balancer_with(json!({}), &[("KUBECONFIG", path.as_str())]);
        Some(Cluster {
            kubeconfig,
            lb,
            running: Some(running),
            _state: state,
            _api: api,
        })
    }

    /// `kubectl ARGS`, which must succeed; its output.
    fn kubectl(&self, args: &[&str]) -> String {
        let output = std::process::Command::new("kubectl")
            .args(args)
            .env("KUBECONFIG", self.kubeconfig.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "kubectl {args:?}: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        text
    }

    /// The pods `n` requests through the load balancer reached; `None`
    /// if any was not answered 200.
    async fn spread(&self, n: usize) -> Option<BTreeSet<String>> {
        let http = Http::new();
        let mut pods = BTreeSet::new();
        for _ in 0..n {
            let reply = http.get(&self.lb.url("/")).await;
            if reply.status != 200 {
                return None;
            }
            pods.insert(reply.json()["podName"].as_str()?.to_owned());
        }
        Some(pods)
    }

    /// Polls until `4 × count` requests reach exactly `count` pods, all
    /// answered; those pods.
    async fn wait_for_spread(&self, count: usize) -> BTreeSet<String> {
        let reached = poll_async(PATIENCE, || async {
            let pods = self.spread(count * 4).await?;
            (pods.len() == count).then_some(pods)
        })
        .await;
        let logs = || self.pod_logs();
        reached.unwrap_or_else(|| {
            panic!(
                "the rotation never reached {count} pods; the pods said:\n{}",
                logs()
            )
        })
    }

    /// Every pod's log, for a failure message.
    fn pod_logs(&self) -> String {
        let pods = std::fs::read_dir(self._state.path().join("pods"));
        let logs = pods.into_iter().flatten().flatten().map(|pod| {
            let log = std::fs::read_to_string(pod.path().join("log")).unwrap_or_default();
            format!("{}:\n{log}", pod.file_name().to_string_lossy())
        });
        logs.collect::<Vec<_>>().join("\n")
    }

    /// The backend Service's endpoints: `(pod, ready, terminating)`.
    fn endpoints(&self) -> Vec<(String, bool, bool)> {
        let slice: Value = serde_json::from_str(&self.kubectl(&[
            "get",
            "endpointslice",
            "backend-local",
            "-o",
            "json",
        ]))
        .unwrap();
        let endpoints = slice["endpoints"].as_array().cloned().unwrap_or_default();
        endpoints
            .iter()
            .map(|e| {
                let pod = e["targetRef"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let condition = |name: &str| e["conditions"][name].as_bool().unwrap_or(false);
                (pod, condition("ready"), condition("terminating"))
            })
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Every pod process is stopped (by PID) before the test ends.
        // (On a thread of its own: this may run inside the test's runtime.)
        if let Some(running) = self.running.take() {
            let stopping = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                runtime.map(|runtime| runtime.block_on(running.stop()))
            });
            let _ = stopping.join();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_scale_3_to_5_to_2_and_the_rotation_follows() {
    let Some(cluster) = Cluster::start(60).await else {
        return;
    };
    cluster.wait_for_spread(3).await;
    cluster.kubectl(&["scale", "deployment/backend", "--replicas=5"]);
    cluster.wait_for_spread(5).await;
    cluster.kubectl(&["scale", "deployment/backend", "--replicas=2"]);
    let two = cluster.wait_for_spread(2).await;
    // The pods scaled away are Terminating for their grace, then gone.
    let listed = poll(PATIENCE, || {
        let pods = cluster.kubectl(&["get", "pods", "-o", "jsonpath={.items[*].metadata.name}"]);
        let listed: BTreeSet<String> = pods.split_whitespace().map(str::to_owned).collect();
        (listed == two).then_some(listed)
    });
    assert!(
        listed.is_some(),
        "kubectl get pods comes to list the pods that serve, {two:?}"
    );
    // The columns a cluster prints (the server's Table), two pods ready.
    let table = cluster.kubectl(&["get", "pods"]);
    assert!(
        table.starts_with("NAME") && table.contains("READY") && table.contains("RESTARTS"),
        "{table}"
    );
    let running = table
        .lines()
        .filter(|l| l.contains("1/1") && l.contains("Running"));
    assert_eq!(running.count(), 2, "{table}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_pod_terminates_without_a_failed_request_and_a_killed_one_comes_back() {
    let Some(cluster) = Cluster::start(61).await else {
        return;
    };
    let pods = cluster.wait_for_spread(3).await;
    let deleted = pods.iter().next().unwrap().clone();
    let traffic = {
        let url = cluster.lb.url("/");
        tokio::spawn(async move {
            let http = Http::new();
            let mut failed = 0;
            for _ in 0..400 {
                if http.get(&url).await.status != 200 {
                    failed += 1;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            failed
        })
    };
    cluster.kubectl(&["delete", "pod", &deleted, "--wait=false"]);
    let shown = cluster.kubectl(&["get", "pod", &deleted]);
    assert!(
        shown.contains("Terminating"),
        "kubectl shows it Terminating: {shown}"
    );
    let terminating = poll(PATIENCE, || {
        cluster
            .endpoints()
            .iter()
            .find(|(pod, ..)| *pod == deleted)
            .filter(|e| e.2)
            .cloned()
    });
    assert!(terminating.is_some(), "{deleted}'s endpoint is terminating");
    let gone = poll(PATIENCE, || {
        (!cluster.endpoints().iter().any(|(pod, ..)| *pod == deleted)).then_some(())
    });
    assert!(gone.is_some(), "{deleted}'s endpoint goes after its grace");
    assert_eq!(traffic.await.unwrap(), 0, "no request failed meanwhile");
    cluster.wait_for_spread(3).await;

    // A process that dies is restarted, and its pod serves again.
    let pod = cluster.kubectl(&["get", "pods", "-o", "jsonpath={.items[0].metadata.name}"]);
    let ip = cluster.kubectl(&["get", "pod", &pod, "-o", "jsonpath={.status.podIP}"]);
    let pid = pid_listening_on(&ip).expect("the pod's process");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let restarted = poll(PATIENCE, || {
        let count = cluster.kubectl(&[
            "get",
            "pod",
            &pod,
            "-o",
            "jsonpath={.status.containerStatuses[0].restartCount}",
        ]);
        (count == "1").then_some(())
    });
    assert!(restarted.is_some(), "restartCount 1");
    assert!(
        cluster.wait_for_spread(3).await.contains(&pod),
        "the restarted pod serves again"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_configmap_patch_reaches_the_pods_and_kubectl_logs_shows_their_requests() {
    let Some(cluster) = Cluster::start(62).await else {
        return;
    };
    let pods = cluster.wait_for_spread(3).await;
    let patch = r#"{"data":{"config.json":"{\"port\": 8080, \"serviceName\": \"catalog\"}"}}"#;
    cluster.kubectl(&[
        "patch",
        "configmap",
        "backend-config",
        "--type",
        "merge",
        "-p",
        patch,
    ]);
    let http = Http::new();
    let renamed = poll_async(PATIENCE, || async {
        let reply = http.get(&cluster.lb.url("/")).await;
        (reply.json()["serviceName"] == "catalog").then_some(())
    })
    .await;
    assert!(renamed.is_some(), "serviceName catalog, without a restart");
    let pod = pods.iter().next().unwrap();
    let logs = cluster.kubectl(&["logs", pod]);
    assert!(
        logs.contains(r#"request method=GET path="/" status=200"#),
        "{logs}"
    );
}

/// The process whose command line says `--host <ip>`, from `/proc`.
fn pid_listening_on(ip: &str) -> Option<i32> {
    let wanted = format!("--host\0{ip}\0");
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline =
                std::fs::read(PathBuf::from("/proc").join(pid.to_string()).join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmdline)
                .contains(&wanted)
                .then_some(pid)
        })
}
