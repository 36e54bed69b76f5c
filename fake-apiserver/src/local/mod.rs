//! A local stand-in cluster: this API server, plus what a cluster's
//! controllers and kubelet do for the backend Deployment.
//!
//! The manifests are the project's own (`kubectl kustomize k8s/`, the files
//! kind applies); they go into the store as given, so `kubectl get` shows
//! them. For the Deployment named `backend` this module then plays:
//! - the Deployment and ReplicaSet controllers: `spec.replicas` pods, made
//!   or removed as it changes (`kubectl scale`), a replacement for a pod
//!   that is deleted (`kubectl delete pod`);
//! - the kubelet ([`kubelet`]): each pod is a `backend` process on a
//!   loopback address of its own, with the Downward API's variables and the
//!   ConfigMap written as the mounted file (a changed ConfigMap is swapped
//!   in through the `..data` symlink, as the kubelet does); it is ready when
//!   its readiness probe passes, restarted when it dies (`restartPolicy:
//!   Always`), and on deletion (its object marked `Terminating`, as the API
//!   server marks a pod with a grace period) waits out `preStop`, gets
//!   SIGTERM, is killed after the grace period, and its object goes once
//!   its process has; its output is `kubectl logs`;
//! - the EndpointSlice controller: one slice for the `backend` Service,
//!   rewritten when a pod turns ready, starts terminating or goes.
//!
//! What a real cluster does and this does not: scheduling, images, other
//! Deployments (their objects are stored, nothing runs them), `exec`,
//! `port-forward`, `apply` (see `merge_patch`). It reconciles by looking
//! every 200 ms, which is simple and, for a handful of pods, cheap.

mod kubelet;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

use super::{FakeApiServer, Kind};
use kubelet::{Kubelet, Template};

/// What the local cluster runs, and where it keeps its files.
#[derive(Debug, Clone)]
pub struct Local {
    /// The manifests, as `kubectl kustomize k8s/` prints them.
    pub manifests: String,
    /// The `backend` binary that pods run.
    pub backend: PathBuf,
    /// Pods' config files and logs go under here.
    pub state: PathBuf,
    /// The first pod's address; the next pods take the next ones, up to
    /// `.250` (`127.0.0.11` for `make local`).
    pub first_ip: std::net::Ipv4Addr,
}

/// The running controllers and kubelet; [`LocalCluster::stop`] stops every
/// pod process they started.
#[derive(Debug)]
pub struct LocalCluster {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl LocalCluster {
    /// Stops the pods (SIGTERM, then SIGKILL after 5 s) and waits for them.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

impl FakeApiServer {
    /// Stores the manifests and starts playing the controllers and the
    /// kubelet for the `backend` Deployment, until stopped.
    pub fn run_local(&self, local: Local) -> Result<LocalCluster, String> {
        let objects = parse(&local.manifests)?;
        let mut stored = 0;
        for object in &objects {
            if let Some(kind) = Kind::of(object) {
                self.change(kind, object.clone());
                stored += 1;
            }
        }
        let template = Template::of(self.object(Kind::Deployments, "backend").as_ref())?;
        *self.shared.logs.lock().unwrap() = Some(local.state.join("pods"));
        let graceful = &self.shared.graceful_pods;
        graceful.store(true, std::sync::atomic::Ordering::Relaxed);
        let namespace = self.shared.namespace.clone();
        let kubelet = Kubelet::new(
            local.backend,
            local.state,
            local.first_ip,
            namespace,
            template,
        );
        let runtime = self.runtime.as_ref().ok_or("the server has stopped")?;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = runtime.spawn(reconcile_until(self.handle(), kubelet, stopped));
        println!(
            "fake-apiserver: stored {stored} of {} objects from the manifests",
            objects.len()
        );
        Ok(LocalCluster { stop, task })
    }
}

/// The documents of a multi-document YAML stream, as JSON values.
fn parse(manifests: &str) -> Result<Vec<Value>, String> {
    manifests
        .split("\n---\n")
        .filter(|doc| !doc.trim().is_empty())
        .map(|doc| {
            serde_saphyr::from_str::<Value>(doc).map_err(|e| format!("reading the manifests: {e}"))
        })
        .collect()
}

async fn reconcile_until(
    api: super::Handle,
    mut kubelet: Kubelet,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = tick.tick() => reconcile(&api, &mut kubelet).await,
            _ = &mut stopped => break,
        }
    }
    kubelet.stop_all().await;
}

/// One look: the pods the Deployment wants against those that run, then
/// what the API shows of them.
async fn reconcile(api: &super::Handle, kubelet: &mut Kubelet) {
    let deployment = api.object(Kind::Deployments, "backend");
    let desired = deployment
        .as_ref()
        .and_then(|d| d["spec"]["replicas"].as_u64())
        .unwrap_or(0) as usize;
    let config = api
        .object(Kind::ConfigMaps, kubelet.template.config_map.as_str())
        .map(|c| c["data"].clone())
        .unwrap_or(Value::Null);
    kubelet.configure(&config);
    // A pod marked for deletion (kubectl delete pod), or gone, terminates.
    let deleted = |name: &String| {
        api.object(Kind::Pods, name)
            .is_none_or(|pod| pod["metadata"]["deletionTimestamp"].is_string())
    };
    kubelet.terminate_deleted(deleted);
    kubelet.scale(desired, |name| api.begin_deletion(name));
    for gone in kubelet.tend().await {
        api.remove(Kind::Pods, &gone);
    }
    for pod in kubelet.pod_objects() {
        // A terminating pod whose object is gone is not written back.
        let name = pod["metadata"]["name"].as_str().unwrap_or_default();
        if kubelet.is_live(name) || api.object(Kind::Pods, name).is_some() {
            api.put_if_changed(Kind::Pods, pod);
        }
    }
    api.put_if_changed(Kind::Slices, endpoint_slice(kubelet, api.namespace()));
    if let Some(mut deployment) = deployment {
        let (replicas, ready) = kubelet.counts();
        // What `kubectl rollout status` reads: every live pod is of the
        // current template, and the ready ones are available.
        deployment["status"] = json!({
            "replicas": replicas,
            "updatedReplicas": replicas,
            "readyReplicas": ready,
            "availableReplicas": ready,
        });
        api.put_if_changed(Kind::Deployments, deployment);
    }
}

/// The `backend` Service's EndpointSlice, as the controller writes it.
fn endpoint_slice(kubelet: &Kubelet, namespace: &str) -> Value {
    let endpoints: Vec<Value> = kubelet
        .endpoints()
        .into_iter()
        .map(|e| {
            json!({
                "addresses": [e.ip.to_string()],
                "conditions": { "ready": e.ready && !e.terminating, "serving": e.ready, "terminating": e.terminating },
                "targetRef": { "kind": "Pod", "name": e.pod, "namespace": namespace },
                "nodeName": "local",
            })
        })
        .collect();
    let labels = BTreeMap::from([
        ("kubernetes.io/service-name", "backend"),
        (
            "endpointslice.kubernetes.io/managed-by",
            "endpointslice-controller.k8s.io",
        ),
    ]);
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": { "name": "backend-local", "labels": labels },
        "addressType": "IPv4",
        "ports": [{ "name": "http", "port": kubelet.template.port, "protocol": "TCP" }],
        "endpoints": endpoints,
    })
}
