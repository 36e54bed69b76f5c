//! A fake Kubernetes API server: just enough of the real wire protocol for
//! the load balancer's discovery to run against it unchanged, through an
//! ordinary kubeconfig. The tests drive it from Rust; `make demo` runs it as
//! a process (`fake-apiserver`, see `main.rs`) and plays the EndpointSlice
//! controller with `curl -X PUT`. On a real cluster, the API server and the
//! controllers do what this does.
//!
//! It serves, on `127.0.0.1`, EndpointSlices
//! (`/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices`), v1
//! Endpoints (`/api/v1/namespaces/{ns}/endpoints`), Pods
//! (`/api/v1/namespaces/{ns}/pods`) and the custom resource `Server`
//! (`/apis/lb.example.com/v1alpha1/namespaces/{ns}/servers`), whose status
//! subresource takes JSON merge patches (`.../servers/{name}/status`), and,
//! stored as given for `kubectl` to read and change, Deployments (with the
//! `scale` subresource that `kubectl scale` uses, in `scale.rs`),
//! ConfigMaps and Services (the collections are in `kind.rs`):
//! - a list answers every matching object and the current
//!   `metadata.resourceVersion`;
//! - a watch (`?watch=true&resourceVersion=N`) replays the changes after N,
//!   then streams new ones as newline-delimited `WatchEvent` JSON; a version
//!   older than the kept history gets an ERROR event with a 410 Status, as a
//!   real API server does after compaction; a watch with no version starts
//!   with an ADDED event per object, as `kubectl get -w` shows;
//! - `labelSelector` (`k=v,...`) and `fieldSelector` (`metadata.name=...`)
//!   are honoured;
//! - `GET .../{name}` reads one object, `PUT .../{name}` creates or
//!   replaces it, `PATCH .../{name}` applies a JSON merge patch
//!   (`kubectl patch --type merge`; other patch types are refused, naming
//!   what to use), `DELETE .../{name}` deletes it;
//! - the discovery documents (`/version`, `/api`, `/apis`, `/api/v1`,
//!   `/apis/{group}/{version}`, in `discovery.rs`) and the namespace itself, so
//!   that the real `kubectl` finds these resources:
//!   `kubectl get endpointslices -w` works against it; lists and watches
//!   come as server-side Tables when kubectl asks, so `kubectl get pods`
//!   prints READY, STATUS and RESTARTS as on a cluster (`table.rs`).
//!
//! The test drives it: change objects, drop every watch, forget history
//! (forcing 410s), answer 403 (for good, or for the next few requests), or
//! go down entirely and come back on the same port, refuse status patches.
//! Objects go in as typed values (k8s-openapi types, the load balancer's
//! `Server`) and are kept as the JSON the real server would send.
#![expect(
    clippy::unwrap_used,
    reason = "a test fixture: a broken invariant here should fail loudly, at once"
)]

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

mod discovery;
mod kind;
mod local;
mod scale;
mod table;

pub use local::{Local, LocalCluster};

use kind::Kind;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, put};
use axum::{Json, Router};
use futures_util::StreamExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Endpoints, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Status, WatchEvent};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

/// A change, as kept in history and sent to watchers.
#[derive(Debug, Clone)]
struct Change {
    kind: Kind,
    resource_version: u64,
    name: String,
    labels: BTreeMap<String, String>,
    /// The `WatchEvent` JSON line.
    line: String,
}

#[derive(Debug, Clone)]
enum Broadcast {
    Change(Change),
    /// A bookmark at this version: taken when sent, not when a watch
    /// passes it on, or a change made since could be skipped.
    Bookmark(u64),
    /// Every open watch ends.
    CloseWatches,
}

#[derive(Debug, Default)]
struct World {
    resource_version: u64,
    /// Each collection's objects by name, as JSON.
    objects: BTreeMap<Kind, BTreeMap<String, Value>>,
    history: Vec<Change>,
    /// Watches from a version older than this get 410 Gone.
    oldest_kept: u64,
    forbidden: bool,
    /// This many more requests are answered 403, as by an API server that
    /// has just restarted and has not loaded its RBAC rules yet.
    forbid_next: usize,
    lists: usize,
    /// Status patches answered 403 from now on.
    status_forbidden: bool,
    /// Status patches received (refused ones included).
    status_patches: usize,
}

#[derive(Debug)]
struct Shared {
    namespace: String,
    world: Mutex<World>,
    broadcast: broadcast::Sender<Broadcast>,
    /// Where pods' logs are, in a local cluster (`pods/{name}/log`).
    logs: Mutex<Option<std::path::PathBuf>>,
    /// In a local cluster, deleting a pod marks it (`deletionTimestamp`,
    /// `Terminating`) and its kubelet removes it once its process is gone.
    graceful_pods: std::sync::atomic::AtomicBool,
}

/// The store, as the local cluster's controllers use it.
#[derive(Debug, Clone)]
struct Handle(Arc<Shared>);

impl Handle {
    fn namespace(&self) -> &str {
        &self.0.namespace
    }

    fn object(&self, kind: Kind, name: &str) -> Option<Value> {
        self.0
            .world
            .lock()
            .unwrap()
            .objects
            .get(&kind)?
            .get(name)
            .cloned()
    }

    fn remove(&self, kind: Kind, name: &str) {
        delete(&self.0, kind, name);
    }

    /// Marks a pod as being deleted, as the API server does for a pod with
    /// a grace period; its kubelet removes it.
    fn begin_deletion(&self, name: &str) {
        begin_deletion(&self.0, name);
    }

    /// Stores `object` unless the store already holds the same (its
    /// server-set metadata aside): no change, no new resource version.
    fn put_if_changed(&self, kind: Kind, object: Value) {
        let strip = |mut object: Value| {
            if let Some(metadata) = object["metadata"].as_object_mut() {
                for field in [
                    "resourceVersion",
                    "creationTimestamp",
                    "deletionTimestamp",
                    "namespace",
                ] {
                    metadata.remove(field);
                }
            }
            object
        };
        let current = self.object(kind, &name_of(&object)).map(strip);
        if current.as_ref() != Some(&strip(object.clone())) {
            change(&self.0, kind, object);
        }
    }
}

/// The fake API server; stops when dropped.
///
/// It runs on a runtime of its own, so it keeps answering while a test
/// blocks its own thread waiting for a log line.
#[derive(Debug)]
pub struct FakeApiServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    server: Mutex<Option<JoinHandle<()>>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl FakeApiServer {
    /// Starts an API server on an ephemeral loopback port whose objects
    /// live in `namespace`.
    pub async fn start(namespace: &str) -> FakeApiServer {
        FakeApiServer::start_on("127.0.0.1:0".parse().unwrap(), namespace)
            .expect("an ephemeral loopback port is free")
    }

    /// Starts an API server on `addr`; fails when the port is taken.
    pub fn start_on(addr: SocketAddr, namespace: &str) -> std::io::Result<FakeApiServer> {
        let listener = std::net::TcpListener::bind(addr)?;
        let shared = Arc::new(Shared {
            namespace: namespace.to_owned(),
            world: Mutex::new(World {
                resource_version: 100,
                ..World::default()
            }),
            broadcast: broadcast::channel(1024).0,
            logs: Mutex::new(None),
            graceful_pods: std::sync::atomic::AtomicBool::new(false),
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let fake = FakeApiServer {
            addr: listener.local_addr()?,
            shared,
            server: Mutex::new(None),
            runtime: Some(runtime),
        };
        fake.serve(listener);
        Ok(fake)
    }

    fn handle(&self) -> Handle {
        Handle(self.shared.clone())
    }

    fn object(&self, kind: Kind, name: &str) -> Option<Value> {
        self.handle().object(kind, name)
    }

    /// A kubeconfig file pointing at this server, with `namespace` as the
    /// context's namespace.
    pub fn kubeconfig(&self, namespace: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(self.kubeconfig_yaml(namespace).as_bytes())
            .unwrap();
        file
    }

    /// The kubeconfig's text: one cluster, one context, a dummy token.
    pub fn kubeconfig_yaml(&self, namespace: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters:\n- name: fake\n  cluster:\n    server: http://{addr}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: {namespace}\n\
             users:\n- name: fake\n  user:\n    token: not-a-real-token\n",
            addr = self.addr
        )
    }

    /// Creates or replaces an EndpointSlice, notifying watchers.
    pub fn apply_slice(&self, slice: EndpointSlice) {
        self.change(Kind::Slices, json(&slice));
    }

    /// Deletes the EndpointSlice `name`, notifying watchers.
    pub fn delete_slice(&self, name: &str) {
        self.delete(Kind::Slices, name);
    }

    /// Creates or replaces an Endpoints object, notifying watchers.
    pub fn apply_endpoints(&self, endpoints: Endpoints) {
        self.change(Kind::Endpoints, json(&endpoints));
    }

    /// Creates or replaces a Pod, notifying watchers.
    pub fn apply_pod(&self, pod: Pod) {
        self.change(Kind::Pods, json(&pod));
    }

    /// Deletes the Pod `name`, notifying watchers.
    pub fn delete_pod(&self, name: &str) {
        self.delete(Kind::Pods, name);
    }

    /// Creates a Server or replaces its spec; as with a real status
    /// subresource, the status it has is kept.
    pub fn apply_server(&self, server: &impl Serialize) {
        self.change(Kind::Servers, json(server));
    }

    /// Deletes the Server `name`, notifying watchers.
    pub fn delete_server(&self, name: &str) {
        self.delete(Kind::Servers, name);
    }

    /// The Server `name` as the API server holds it.
    pub fn server(&self, name: &str) -> Option<Value> {
        let world = self.shared.world.lock().unwrap();
        world.objects.get(&Kind::Servers)?.get(name).cloned()
    }

    /// How many status patches have been received.
    pub fn status_patches(&self) -> usize {
        self.shared.world.lock().unwrap().status_patches
    }

    /// From now on status patches are answered 403 Forbidden (or not).
    pub fn set_status_forbidden(&self, forbidden: bool) {
        self.shared.world.lock().unwrap().status_forbidden = forbidden;
    }

    /// Changes an EndpointSlice while no watcher can see it, and forgets
    /// the history before it: only a fresh list shows the change.
    pub fn apply_slice_unseen(&self, slice: EndpointSlice) {
        let mut world = self.shared.world.lock().unwrap();
        let version = bump(&mut world);
        let mut slice = json(&slice);
        stamp(&mut slice, &self.shared.namespace, version);
        let name = name_of(&slice);
        world
            .objects
            .entry(Kind::Slices)
            .or_default()
            .insert(name, slice);
        world.history.clear();
        world.oldest_kept = version + 1;
    }

    /// Ends every open watch; clients resume from their last version.
    pub fn drop_watches(&self) {
        let _ = self.shared.broadcast.send(Broadcast::CloseWatches);
    }

    /// Sends a BOOKMARK with the current version to every watch.
    pub fn bookmark(&self) {
        let version = self.shared.world.lock().unwrap().resource_version;
        let _ = self.shared.broadcast.send(Broadcast::Bookmark(version));
    }

    /// From now on every request is answered 403 Forbidden (or not).
    pub fn set_forbidden(&self, forbidden: bool) {
        self.shared.world.lock().unwrap().forbidden = forbidden;
        if forbidden {
            self.drop_watches();
        }
    }

    /// Answers the next `n` requests 403 Forbidden, then serves again.
    pub fn forbid_next(&self, n: usize) {
        self.shared.world.lock().unwrap().forbid_next = n;
    }

    /// How many list requests have been received (refused ones included).
    pub fn lists(&self) -> usize {
        self.shared.world.lock().unwrap().lists
    }

    /// Goes away: the port refuses connections, open ones are cut.
    pub fn stop(&self) {
        if let Some(server) = self.server.lock().unwrap().take() {
            server.abort();
        }
        self.drop_watches();
    }

    /// Comes back on the same port, with the same objects.
    pub async fn restart(&self) {
        let listener = std::net::TcpListener::bind(self.addr).unwrap();
        self.serve(listener);
    }

    fn serve(&self, listener: std::net::TcpListener) {
        listener.set_nonblocking(true).unwrap();
        let app = routes().with_state(self.shared.clone());
        let runtime = self.runtime.as_ref().unwrap();
        let server = runtime.spawn(async move {
            let listener = TcpListener::from_std(listener).unwrap();
            // Connection tasks live in this set, so aborting the server cuts
            // them too, like a process that dies.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let service = hyper_util::service::TowerToHyperService::new(app.clone());
                connections.spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        *self.server.lock().unwrap() = Some(server);
    }

    fn delete(&self, kind: Kind, name: &str) {
        delete(&self.shared, kind, name);
    }

    fn change(&self, kind: Kind, object: Value) {
        change(&self.shared, kind, object);
    }
}

/// Every collection, its objects, and the discovery documents.
fn routes() -> Router<Arc<Shared>> {
    let mut app = Router::new();
    for kind in Kind::ALL {
        let collection = kind.collection_path();
        app = app
            .route(
                &collection,
                get(move |state, namespace, params, headers| async move {
                    answer(kind, state, namespace, params, headers)
                }),
            )
            .route(
                &format!("{collection}/{{name}}"),
                put(move |state, path, body| async move { put_object(kind, state, path, body) })
                    .get(move |state, path, headers| async move {
                        get_object(kind, state, path, headers)
                    })
                    .patch(move |state, path, headers, body| async move {
                        patch_object(kind, state, path, headers, body)
                    })
                    .delete(move |state, path| async move { delete_object(kind, state, path) }),
            );
    }
    let scale = "/apis/apps/v1/namespaces/{namespace}/deployments/{name}/scale";
    app.route(
        scale,
        get(|state, path| async move { scale::get(state, path) }).patch(
            |state, path, headers, body| async move { scale::patch(state, path, headers, body) },
        ),
    )
    .route(
        "/api/v1/namespaces/{namespace}/pods/{name}/log",
        get(|state, path| async move { pod_log(state, path) }),
    )
    .route("/version", get(|| async { Json(discovery::version()) }))
    .route("/api", get(|| async { Json(discovery::core_versions()) }))
    .route("/apis", get(|| async { Json(discovery::groups()) }))
    .route("/api/v1", get(|| async { resources("v1".into()) }))
    .route(
        "/api/v1/namespaces/{namespace}",
        get(|state, name| async move { namespace(state, name) }),
    )
    .route(
        "/apis/{group}/{version}",
        get(
            |Path((group, version)): Path<(String, String)>| async move {
                resources(format!("{group}/{version}"))
            },
        ),
    )
    .route(
        "/apis/lb.example.com/v1alpha1/namespaces/{namespace}/servers/{name}/status",
        patch(server_status),
    )
    .fallback(not_served)
    .method_not_allowed_fallback(not_served)
}

/// Anything else (`kubectl create`, `apply` of a new object, `exec`,
/// `port-forward`, another resource): a Status that says so and where to go.
async fn not_served(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!(
            "this stand-in API server does not serve {method} {}: it keeps a few resources for \
             list, watch, get, PUT, merge PATCH and DELETE; for kubectl create, apply, exec and \
             port-forward, use kind",
            uri.path()
        ),
    )
}

/// Deletes `kind`'s object `name`, if there is one, notifying watchers.
fn delete(shared: &Shared, kind: Kind, name: &str) -> Option<Value> {
    let mut world = shared.world.lock().unwrap();
    let version = bump(&mut world);
    let mut gone = world.objects.entry(kind).or_default().remove(name)?;
    gone["metadata"]["resourceVersion"] = version.to_string().into();
    record(shared, &mut world, kind, version, "DELETED", gone.clone());
    Some(gone)
}

/// Sets a pod's `deletionTimestamp` (once), notifying watchers; the pod as
/// stored, or `None` if there is no such pod.
fn begin_deletion(shared: &Shared, name: &str) -> Option<Value> {
    let mut pod = shared
        .world
        .lock()
        .unwrap()
        .objects
        .get(&Kind::Pods)?
        .get(name)?
        .clone();
    if pod["metadata"]["deletionTimestamp"].is_string() {
        return Some(pod);
    }
    pod["metadata"]["deletionTimestamp"] = jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
        .into();
    Some(change(shared, Kind::Pods, pod))
}

/// Creates or replaces an object, notifying watchers; returns it as stored.
fn change(shared: &Shared, kind: Kind, mut object: Value) -> Value {
    let mut world = shared.world.lock().unwrap();
    let version = bump(&mut world);
    stamp(&mut object, &shared.namespace, version);
    let name = name_of(&object);
    let collection = world.objects.entry(kind).or_default();
    // Created once; kept through every change after (kubectl's AGE).
    let created = collection
        .get(&name)
        .map(|old| old["metadata"]["creationTimestamp"].clone())
        .filter(|at| at.is_string())
        .unwrap_or_else(|| {
            jiff::Timestamp::now()
                .strftime("%Y-%m-%dT%H:%M:%SZ")
                .to_string()
                .into()
        });
    object["metadata"]["creationTimestamp"] = created;
    // As on the real server, a deletion once begun cannot be taken back.
    let deleting = collection
        .get(&name)
        .and_then(|old| old["metadata"].get("deletionTimestamp"));
    if let Some(deleting) = deleting.filter(|at| at.is_string()) {
        object["metadata"]["deletionTimestamp"] = deleting.clone();
    }
    if kind == Kind::Servers
        && let Some(status) = collection.get(&name).and_then(|old| old.get("status"))
    {
        object["status"] = status.clone();
    }
    let event = match collection.insert(name, object.clone()) {
        Some(_) => "MODIFIED",
        None => "ADDED",
    };
    record(shared, &mut world, kind, version, event, object.clone());
    object
}

/// Keeps the change in history and sends it to watchers.
fn record(
    shared: &Shared,
    world: &mut World,
    kind: Kind,
    version: u64,
    event: &str,
    object: Value,
) {
    let change = Change {
        kind,
        resource_version: version,
        name: name_of(&object),
        labels: labels_of(&object),
        line: event_line(event, &object),
    };
    world.history.push(change.clone());
    let _ = shared.broadcast.send(Broadcast::Change(change));
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop();
        // Not `drop`: that would block, which an async test may not do.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A `WatchEvent` line, `type` first as the real server sends it (a JSON
/// map would sort it after `object`).
fn event_line(event: &str, object: &Value) -> String {
    format!("{{\"type\":\"{event}\",\"object\":{object}}}\n")
}

fn bump(world: &mut World) -> u64 {
    world.resource_version += 1;
    world.resource_version
}

fn stamp(object: &mut Value, namespace: &str, version: u64) {
    object["metadata"]["namespace"] = namespace.into();
    object["metadata"]["resourceVersion"] = version.to_string().into();
}

fn json(object: &impl Serialize) -> Value {
    serde_json::to_value(object).unwrap()
}

fn name_of(object: &Value) -> String {
    object["metadata"]["name"].as_str().unwrap().to_owned()
}

fn labels_of(object: &Value) -> BTreeMap<String, String> {
    serde_json::from_value(object["metadata"]["labels"].clone()).unwrap_or_default()
}

/// Object metadata with a name and labels.
pub fn meta(
    name: &str,
    labels: &[(&str, &str)],
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        name: Some(name.to_owned()),
        labels: Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        ..Default::default()
    }
}

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Params {
    /// `true` or `1`, as the real server takes either.
    watch: Option<String>,
    resource_version: Option<String>,
    label_selector: Option<String>,
    field_selector: Option<String>,
}

/// `PUT .../{name}`: creates or replaces the object in the body.
fn put_object(
    kind: Kind,
    State(shared): State<Arc<Shared>>,
    Path((namespace, name)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    let mut object: Value = match serde_json::from_slice(&body) {
        Ok(object @ Value::Object(_)) => object,
        Ok(_) => return bad_request("the body must be a JSON object".into()),
        Err(e) => return bad_request(format!("the body is not JSON: {e}")),
    };
    let named = object["metadata"]["name"].as_str().unwrap_or_default();
    if named != name {
        return bad_request(format!(
            "the name of the object ({named}) does not match the name on the URL ({name})"
        ));
    }
    if namespace != shared.namespace {
        return bad_request(format!(
            "this API server only keeps objects in namespace {:?}",
            shared.namespace
        ));
    }
    // As the real server does: an object that does not fit its type is refused.
    fn check<T: serde::de::DeserializeOwned>(object: &Value) -> Result<(), String> {
        serde_path_to_error::deserialize::<_, T>(object)
            .map(drop)
            .map_err(|e| e.to_string())
    }
    let typed = match kind {
        Kind::Slices => check::<EndpointSlice>(&object),
        Kind::Endpoints => check::<Endpoints>(&object),
        Kind::Pods => check::<Pod>(&object),
        Kind::Deployments => check::<Deployment>(&object),
        Kind::ConfigMaps => check::<ConfigMap>(&object),
        Kind::Services => check::<Service>(&object),
        Kind::Servers => Ok(()),
    };
    if let Err(e) = typed {
        return bad_request(format!("not a valid {}: {e}", kind.resource()));
    }
    object["apiVersion"] = kind.api_version().into();
    object["kind"] = kind.kind().into();
    let stored = change(&shared, kind, object);
    ([("content-type", "application/json")], stored.to_string()).into_response()
}

/// `PATCH .../{name}` with a JSON merge patch (`kubectl patch --type
/// merge`). Strategic merge and JSON patches are refused, naming what to
/// use instead.
fn patch_object(
    kind: Kind,
    State(shared): State<Arc<Shared>>,
    Path((namespace, name)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let patch = match merge_patch(&headers, &body) {
        Ok(patch) => patch,
        Err(refused) => return refused.into_response(),
    };
    let mut object = match stored(&shared, kind, &namespace, &name) {
        Ok(object) => object,
        Err(missing) => return missing.into_response(),
    };
    merge(&mut object, &patch);
    object["metadata"]["name"] = name.into();
    let stored = change(&shared, kind, object);
    Json(stored).into_response()
}

/// A request refused with a Status: the code, the reason word, the message.
struct Refused(StatusCode, &'static str, String);

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        status(self.0, self.1, self.2)
    }
}

/// The body of a `PATCH`, if it is a JSON merge patch.
fn merge_patch(headers: &axum::http::HeaderMap, body: &[u8]) -> Result<Value, Refused> {
    let content_type = headers.get("content-type").and_then(|v| v.to_str().ok());
    if content_type != Some("application/merge-patch+json") {
        return Err(Refused(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            format!(
                "this stand-in API server takes JSON merge patches only (kubectl patch --type merge), \
                 not {}; for strategic merge patches and kubectl apply, use kind",
                content_type.unwrap_or("no content type")
            ),
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        Refused(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("the patch is not JSON: {e}"),
        )
    })
}

/// `DELETE .../{name}`.
fn delete_object(
    kind: Kind,
    State(shared): State<Arc<Shared>>,
    Path((_namespace, name)): Path<(String, String)>,
) -> Response {
    let graceful = kind == Kind::Pods
        && shared
            .graceful_pods
            .load(std::sync::atomic::Ordering::Relaxed);
    let deleted = match graceful {
        true => begin_deletion(&shared, &name),
        false => delete(&shared, kind, &name),
    };
    match deleted {
        Some(gone) => ([("content-type", "application/json")], gone.to_string()).into_response(),
        None => not_found(kind, &name).into_response(),
    }
}

/// `GET /api/v1/namespaces/{name}`: the one namespace this server keeps
/// (kubectl asks after a NotFound, to say which of the two is missing).
fn namespace(State(shared): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    if name != shared.namespace {
        let message = format!("namespaces \"{name}\" not found");
        return status(StatusCode::NOT_FOUND, "NotFound", message);
    }
    let object = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": { "name": name },
        "status": { "phase": "Active" },
    });
    Json(object).into_response()
}

/// `GET .../pods/{name}/log` (`kubectl logs`): the pod process's output,
/// in a local cluster.
fn pod_log(
    State(shared): State<Arc<Shared>>,
    Path((_namespace, name)): Path<(String, String)>,
) -> Response {
    let dir = shared.logs.lock().unwrap().clone();
    let text = dir.and_then(|dir| std::fs::read_to_string(dir.join(&name).join("log")).ok());
    match text {
        Some(text) => ([("content-type", "text/plain")], text).into_response(),
        None => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!(
                "no log for pod \"{name}\": logs are kept for the backend's pods of a local cluster"
            ),
        ),
    }
}

/// The resources of `group_version`, or a 404 Status.
fn resources(group_version: String) -> Response {
    match discovery::resources(&group_version) {
        Some(list) => Json(list).into_response(),
        None => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("the server could not find the requested resource ({group_version})"),
        ),
    }
}

/// `GET .../{name}`: one object, or a 404 Status as the real server words it.
fn get_object(
    kind: Kind,
    State(shared): State<Arc<Shared>>,
    Path((namespace, name)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
) -> Response {
    match stored(&shared, kind, &namespace, &name) {
        Ok(object) if table::wanted(&headers) => {
            let version = object["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or_default();
            Json(table::of(kind, &[&object], version)).into_response()
        }
        Ok(object) => Json(object).into_response(),
        Err(missing) => missing.into_response(),
    }
}

/// The object `name` of `kind` in `namespace`, or a NotFound in the real
/// server's words (`endpointslices.discovery.k8s.io "x" not found`).
fn stored(shared: &Shared, kind: Kind, namespace: &str, name: &str) -> Result<Value, Refused> {
    let world = shared.world.lock().unwrap();
    let found = world
        .objects
        .get(&kind)
        .and_then(|objects| objects.get(name));
    found
        .filter(|_| namespace == shared.namespace)
        .cloned()
        .ok_or_else(|| not_found(kind, name))
}

fn not_found(kind: Kind, name: &str) -> Refused {
    let message = format!("{} \"{name}\" not found", kind.qualified());
    Refused(StatusCode::NOT_FOUND, "NotFound", message)
}

fn bad_request(message: String) -> Response {
    status(StatusCode::BAD_REQUEST, "BadRequest", message)
}

/// `PATCH .../servers/{name}/status` with a JSON merge patch: only the
/// status changes, as through a real status subresource.
async fn server_status(
    State(shared): State<Arc<Shared>>,
    Path((namespace, name)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let mut world = shared.world.lock().unwrap();
    world.status_patches += 1;
    if world.status_forbidden {
        return status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!(
                "servers.lb.example.com \"{name}\" is forbidden: User \"system:serviceaccount:{namespace}:loadbalancer\" \
                 cannot patch resource \"servers/status\" in API group \"lb.example.com\" in the namespace \"{namespace}\""
            ),
        );
    }
    let content_type = headers.get("content-type").and_then(|v| v.to_str().ok());
    if content_type != Some("application/merge-patch+json") {
        return status(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            format!("the body of the request was in an unknown format: {content_type:?}"),
        );
    }
    let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
        return bad_request("not JSON".into());
    };
    let version = bump(&mut world);
    let Some(object) = world
        .objects
        .get_mut(&Kind::Servers)
        .and_then(|servers| servers.get_mut(&name))
        .filter(|_| namespace == shared.namespace)
    else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("servers.lb.example.com \"{name}\" not found"),
        );
    };
    merge(&mut object["status"], &patch["status"]);
    object["metadata"]["resourceVersion"] = version.to_string().into();
    let object = object.clone();
    record(
        &shared,
        &mut world,
        Kind::Servers,
        version,
        "MODIFIED",
        object.clone(),
    );
    ([("content-type", "application/json")], object.to_string()).into_response()
}

/// RFC 7386 JSON merge patch: objects merge, `null` removes, the rest replaces.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    for (key, value) in patch {
        if value.is_null() {
            target.as_object_mut().unwrap().remove(key);
        } else {
            merge(&mut target[key], value);
        }
    }
}

fn answer(
    kind: Kind,
    State(shared): State<Arc<Shared>>,
    Path(namespace): Path<String>,
    Query(params): Query<Params>,
    headers: axum::http::HeaderMap,
) -> Response {
    let mut world = shared.world.lock().unwrap();
    if !params.is_watch() {
        world.lists += 1;
    }
    let forbid_this = world.forbid_next > 0;
    world.forbid_next = world.forbid_next.saturating_sub(1);
    if world.forbidden || forbid_this {
        return forbidden(kind, &namespace, &params);
    }
    let asked = Asked {
        kind,
        selector: Selector::parse(&params),
        in_namespace: namespace == shared.namespace,
        table: table::wanted(&headers),
    };
    if !params.is_watch() {
        return list(&mut world, &asked);
    }
    let Some(since) = params.resource_version.as_deref().filter(|v| !v.is_empty()) else {
        // No version: the current objects, as ADDED events, then changes.
        let current: Vec<String> = world
            .objects
            .entry(kind)
            .or_default()
            .values()
            .filter(|object| asked.wants(object))
            .map(|object| event_line("ADDED", object))
            .collect();
        let receiver = shared.broadcast.subscribe();
        return watch_stream(current, receiver, asked);
    };
    let since: u64 = since.parse().unwrap_or(0);
    if since + 1 < world.oldest_kept {
        return expired(since);
    }
    let replay: Vec<String> = world
        .history
        .iter()
        .filter(|c| {
            c.kind == kind
                && c.resource_version > since
                && asked.in_namespace
                && asked.selector.matches_change(c)
        })
        .map(|c| c.line.clone())
        .collect();
    // Subscribe before letting go of the lock, so no change falls between.
    let receiver = shared.broadcast.subscribe();
    drop(world);
    watch_stream(replay, receiver, asked)
}

/// What a list or watch asks for.
struct Asked {
    kind: Kind,
    selector: Selector,
    /// Whether the request's namespace is the one the objects live in.
    in_namespace: bool,
    /// Answer in Tables, as `kubectl get` asks ([`table`]).
    table: bool,
}

impl Asked {
    fn wants(&self, object: &Value) -> bool {
        self.in_namespace && self.selector.matches_object(object)
    }
}

/// A 403, worded as the real API server words RBAC's refusal.
fn forbidden(kind: Kind, namespace: &str, params: &Params) -> Response {
    let verb = if params.is_watch() { "watch" } else { "list" };
    let resource = kind.resource();
    status(
        StatusCode::FORBIDDEN,
        "Forbidden",
        format!(
            "{resource} is forbidden: User \"system:serviceaccount:{namespace}:loadbalancer\" \
             cannot {verb} resource \"{resource}\" in API group \"\" in the namespace \"{namespace}\""
        ),
    )
}

/// The matching objects as a list, at the current resource version.
fn list(world: &mut World, asked: &Asked) -> Response {
    let version = world.resource_version.to_string();
    let items: Vec<Value> = world
        .objects
        .entry(asked.kind)
        .or_default()
        .values()
        .filter(|object| asked.wants(object))
        .cloned()
        .collect();
    let list = if asked.table {
        table::of(asked.kind, &items.iter().collect::<Vec<_>>(), &version)
    } else {
        json!({
            "apiVersion": asked.kind.api_version(),
            "kind": asked.kind.list_kind(),
            "metadata": { "resourceVersion": version },
            "items": items,
        })
    };
    ([("content-type", "application/json")], list.to_string()).into_response()
}

/// As after etcd compaction: the client must list again (410 Gone, in a
/// watch event).
fn expired(since: u64) -> Response {
    let gone: WatchEvent<Value> = WatchEvent::ErrorStatus(Status {
        code: Some(410),
        reason: Some("Expired".into()),
        message: Some(format!("too old resource version: {since}")),
        status: Some("Failure".into()),
        ..Default::default()
    });
    (
        [("content-type", "application/json")],
        serde_json::to_string(&gone).unwrap() + "\n",
    )
        .into_response()
}

/// A watch's answer: the `first` lines, then every change from `receiver`
/// that matches, as newline-delimited JSON, until the watches are dropped.
fn watch_stream(
    first: Vec<String>,
    receiver: broadcast::Receiver<Broadcast>,
    asked: Asked,
) -> Response {
    let Asked {
        kind,
        selector,
        in_namespace: items_in_namespace,
        table,
    } = asked;
    let live = futures_util::stream::unfold(receiver, move |mut receiver| {
        let selector = selector.clone();
        async move {
            loop {
                match receiver.recv().await {
                    Ok(Broadcast::Change(c))
                        if c.kind == kind && items_in_namespace && selector.matches_change(&c) =>
                    {
                        return Some((c.line, receiver));
                    }
                    Ok(Broadcast::Change(_)) => {}
                    Ok(Broadcast::Bookmark(version)) => {
                        let bookmark = json!({
                            "type": "BOOKMARK",
                            "object": {
                                "apiVersion": kind.api_version(),
                                "kind": kind.list_kind().trim_end_matches("List"),
                                "metadata": { "resourceVersion": version.to_string() },
                            },
                        });
                        return Some((bookmark.to_string() + "\n", receiver));
                    }
                    Ok(Broadcast::CloseWatches) | Err(_) => return None,
                }
            }
        }
    });
    let lines = futures_util::stream::iter(first)
        .chain(live)
        .map(move |line| match table {
            true => table::event(kind, &line),
            false => line,
        })
        .map(Ok::<_, std::convert::Infallible>);
    (
        [("content-type", "application/json")],
        Body::from_stream(lines),
    )
        .into_response()
}

fn status(code: StatusCode, reason: &str, message: String) -> Response {
    let body = Status {
        code: Some(code.as_u16().into()),
        reason: Some(reason.into()),
        message: Some(message),
        status: Some("Failure".into()),
        ..Default::default()
    };
    (
        code,
        [("content-type", "application/json")],
        serde_json::to_string(&body).unwrap(),
    )
        .into_response()
}

/// `labelSelector` equality terms and `fieldSelector` `metadata.name=`.
#[derive(Debug, Clone, Default)]
struct Selector {
    labels: Vec<(String, String)>,
    name: Option<String>,
}

impl Params {
    fn is_watch(&self) -> bool {
        matches!(self.watch.as_deref(), Some("true" | "1"))
    }
}

impl Selector {
    fn parse(params: &Params) -> Selector {
        let pairs = |text: &Option<String>| -> Vec<(String, String)> {
            text.iter()
                .flat_map(|t| t.split(','))
                .filter_map(|term| term.split_once('='))
                .map(|(k, v)| {
                    (
                        k.trim_end_matches('=').to_owned(),
                        v.trim_start_matches('=').to_owned(),
                    )
                })
                .collect()
        };
        Selector {
            labels: pairs(&params.label_selector),
            name: pairs(&params.field_selector)
                .into_iter()
                .find(|(k, _)| k == "metadata.name")
                .map(|(_, v)| v),
        }
    }

    fn matches_object(&self, object: &Value) -> bool {
        self.matches_parts(&name_of(object), Some(&labels_of(object)))
    }

    fn matches_change(&self, change: &Change) -> bool {
        self.matches_parts(&change.name, Some(&change.labels))
    }

    fn matches_parts(&self, name: &str, labels: Option<&BTreeMap<String, String>>) -> bool {
        self.name.as_ref().is_none_or(|wanted| wanted == name)
            && self
                .labels
                .iter()
                .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
    }
}
