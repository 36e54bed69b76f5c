//! The kind path, checked without Docker or a cluster: every manifest must
//! parse into its typed Kubernetes object without losing a field, and the
//! pieces must agree with each other and with what the binaries really do.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use axum::body::Body;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, PodSpec, Service, ServiceAccount,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::{Resource, serde::Serialize, serde::de::DeserializeOwned};
use loadbalancer::config::{BackendPort, Cli, FileConfig, Settings, Source};
use serde_json::Value;
use tower::ServiceExt;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// What `kubectl kustomize DIR` builds: exactly what `kubectl apply -k DIR`
/// sends to a kind cluster. The checks below read this output, never the
/// files one by one, so a layout that real kustomize refuses fails here.
struct Built {
    dir: String,
    objects: Vec<Value>,
}

fn build(dir: &str) -> Built {
    let output = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(root().join(dir))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `kubectl kustomize {dir}`: {e}. These tests build every kustomization \
                 with the real tool: install kubectl (it includes kustomize; \
                 https://kubernetes.io/docs/tasks/tools/), the client kind users have"
            )
        });
    assert!(
        output.status.success(),
        "`kubectl kustomize {dir}` fails, so `kubectl apply -k {dir}` would fail on kind too:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    let objects = text
        .split("\n---\n")
        .map(|doc| {
            serde_saphyr::from_str(doc)
                .unwrap_or_else(|e| panic!("{dir}: kustomize wrote something not YAML: {e}"))
        })
        .collect();
    Built {
        dir: dir.to_owned(),
        objects,
    }
}

impl Built {
    /// The objects of `T`'s kind, typed.
    fn all<T: DeserializeOwned + Serialize + kube::Resource<DynamicType = ()>>(&self) -> Vec<T> {
        self.objects
            .iter()
            .filter(|object| object["kind"] == T::kind(&()).as_ref())
            .map(|object| typed(&format!("{} {}", self.dir, name_of(object)), object))
            .collect()
    }

    /// The object of `T`'s kind named `name`, typed.
    fn get<T: DeserializeOwned + Serialize + kube::Resource<DynamicType = ()>>(
        &self,
        name: &str,
    ) -> T {
        let kind = T::kind(&());
        let object = self
            .objects
            .iter()
            .find(|object| object["kind"] == kind.as_ref() && name_of(object) == name)
            .unwrap_or_else(|| panic!("{}: no {kind} named {name}", self.dir));
        typed(&format!("{} {name}", self.dir), object)
    }

    /// `kind/name` of every object, sorted.
    fn names(&self) -> BTreeSet<String> {
        self.objects
            .iter()
            .map(|object| format!("{}/{}", object["kind"].as_str().unwrap(), name_of(object)))
            .collect()
    }
}

fn name_of(object: &Value) -> &str {
    object["metadata"]["name"].as_str().unwrap_or("")
}

/// Parses `raw` into `T` and checks that turning `T` back into JSON gives
/// exactly the same data: a misspelled or misplaced field would be dropped
/// by the typed parse and show up here.
fn typed<T: DeserializeOwned + Serialize>(what: &str, raw: &Value) -> T {
    let object: T = serde_json::from_value(raw.clone())
        .unwrap_or_else(|e| panic!("{what}: not a valid object: {e}"));
    let round_trip = serde_json::to_value(&object).unwrap();
    assert_eq!(
        whole_numbers(round_trip),
        whole_numbers(raw.clone()),
        "{what}: a field was dropped or changed by the typed parse"
    );
    object
}

/// `100.0` as `100`: a typed float field writes what kustomize wrote as an
/// integer back with a decimal point; the number is the same.
fn whole_numbers(value: Value) -> Value {
    match value {
        Value::Number(n)
            if n.as_f64()
                .is_some_and(|f| f.fract() == 0.0 && f.abs() < 1e15) =>
        {
            Value::from(n.as_f64().unwrap() as i64)
        }
        Value::Array(items) => items.into_iter().map(whole_numbers).collect(),
        Value::Object(fields) => fields
            .into_iter()
            .map(|(k, v)| (k, whole_numbers(v)))
            .collect(),
        other => other,
    }
}

/// All the base's objects, typed.
struct Manifests {
    built: Built,
    backend_config: ConfigMap,
    backend: Deployment,
    backend_service: Service,
    lb_config: ConfigMap,
    lb: Deployment,
    lb_service: Service,
    account: ServiceAccount,
    role: Role,
    binding: RoleBinding,
}

fn manifests() -> Manifests {
    let built = build("k8s");
    Manifests {
        backend_config: built.get("backend-config"),
        backend: built.get("backend"),
        backend_service: built.get("backend"),
        lb_config: built.get("loadbalancer-config"),
        lb: built.get("loadbalancer"),
        lb_service: built.get("loadbalancer"),
        account: built.get("loadbalancer"),
        role: built.get("loadbalancer-discovery"),
        binding: built.get("loadbalancer-discovery"),
        built,
    }
}

fn pod(deployment: &Deployment) -> &PodSpec {
    deployment.spec.template.spec.as_ref().unwrap()
}

/// The labels a deployment gives its pods.
fn pod_labels(deployment: &Deployment) -> &BTreeMap<String, String> {
    let metadata = deployment.spec.template.metadata.as_ref().unwrap();
    metadata.labels.as_ref().unwrap()
}

fn container(deployment: &Deployment) -> &Container {
    let containers = &pod(deployment).containers;
    assert_eq!(containers.len(), 1, "one container per pod");
    &containers[0]
}

fn port_named(container: &Container, name: &str) -> u16 {
    let port = container
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("container {} has no port named {name}", container.name));
    u16::try_from(port.container_port).unwrap()
}

fn config_json(config_map: &ConfigMap) -> &str {
    config_map
        .data
        .as_ref()
        .unwrap()
        .get("config.json")
        .expect("config.json key")
}

fn backend_config(m: &Manifests) -> backend::config::Config {
    backend::config::Config::parse(
        Path::new("k8s/base/backend-configmap.yaml"),
        config_json(&m.backend_config),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn lb_settings(m: &Manifests) -> Settings {
    let path = Path::new("k8s/base/loadbalancer-configmap.yaml");
    let file: FileConfig =
        common::config::parse(path, config_json(&m.lb_config)).unwrap_or_else(|e| panic!("{e}"));
    let cli = <Cli as clap::Parser>::parse_from(["loadbalancer"]);
    Settings::resolve(path, file, &cli).unwrap_or_else(|e| panic!("{e}"))
}

/// Every folder under k8s/ with a kustomization.yaml, and whether it is a
/// component (which only builds inside a kustomization that uses it).
fn kustomizations() -> Vec<(String, bool)> {
    fn walk(dir: &Path, found: &mut Vec<(String, bool)>) {
        let file = dir.join("kustomization.yaml");
        if let Ok(text) = std::fs::read_to_string(&file) {
            let relative = dir.strip_prefix(root()).unwrap();
            found.push((
                relative.to_string_lossy().into_owned(),
                text.contains("\nkind: Component"),
            ));
        }
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for entry in entries.into_iter().filter(|e| e.is_dir()) {
            walk(&entry, found);
        }
    }
    let mut found = Vec::new();
    walk(&root().join("k8s"), &mut found);
    found
}

#[test]
fn every_kustomization_builds_with_kubectl_into_typed_objects_without_losing_a_field() {
    use k8s_openapi::api::apps::v1::StatefulSet;
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let all = kustomizations();
    assert!(all.len() >= 9, "{all:?}");
    for (dir, _) in all.iter().filter(|(_, component)| !component) {
        let built = build(dir);
        for object in &built.objects {
            let what = format!(
                "{dir}: {}/{}",
                object["kind"].as_str().unwrap_or("?"),
                name_of(object)
            );
            match object["kind"].as_str().unwrap_or("") {
                "Namespace" => drop(typed::<Namespace>(&what, object)),
                "ConfigMap" => drop(typed::<ConfigMap>(&what, object)),
                "Deployment" => drop(typed::<Deployment>(&what, object)),
                "StatefulSet" => drop(typed::<StatefulSet>(&what, object)),
                "Service" => drop(typed::<Service>(&what, object)),
                "ServiceAccount" => drop(typed::<ServiceAccount>(&what, object)),
                "Role" => drop(typed::<Role>(&what, object)),
                "RoleBinding" => drop(typed::<RoleBinding>(&what, object)),
                "CustomResourceDefinition" => {
                    drop(typed::<CustomResourceDefinition>(&what, object))
                }
                "Server" => drop(typed::<loadbalancer::discovery::servers::Server>(
                    &what, object,
                )),
                other => panic!("{what}: unexpected kind {other}"),
            }
            let cluster_wide = matches!(
                object["kind"].as_str(),
                Some("Namespace" | "CustomResourceDefinition")
            );
            if !cluster_wide {
                assert_eq!(
                    object["metadata"]["namespace"], "lb-demo",
                    "{what}: in the lb-demo namespace"
                );
            }
        }
    }
}

#[test]
fn every_manifest_file_is_used_by_a_kustomization() {
    let mut named = BTreeSet::new();
    for (dir, _) in kustomizations() {
        let kustomization: Value =
            serde_saphyr::from_str(&read(&format!("{dir}/kustomization.yaml"))).unwrap();
        let entries = kustomization["resources"].as_array().into_iter().flatten();
        let patches = kustomization["patches"].as_array().into_iter().flatten();
        for entry in entries.chain(patches.map(|p| &p["path"])) {
            let path = root().join(&dir).join(entry.as_str().unwrap());
            named.insert(path.canonicalize().unwrap_or(path));
        }
    }
    let mut unused = Vec::new();
    let mut stack = vec![root().join("k8s")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()) {
            if entry.is_dir() {
                stack.push(entry);
            } else if entry.extension().is_some_and(|e| e == "yaml")
                && entry.file_name().is_some_and(|n| n != "kustomization.yaml")
                && !named.contains(&entry.canonicalize().unwrap())
            {
                unused.push(entry);
            }
        }
    }
    assert!(
        unused.is_empty(),
        "no kustomization names {unused:?}: kubectl apply -k would never send them"
    );
}

#[test]
fn services_select_their_own_pods() {
    let m = manifests();
    for (service, deployment) in [(&m.backend_service, &m.backend), (&m.lb_service, &m.lb)] {
        let selector = service.spec.as_ref().unwrap().selector.as_ref().unwrap();
        let spec = &deployment.spec;
        let labels = pod_labels(deployment);
        assert!(!selector.is_empty());
        for (key, value) in selector {
            assert_eq!(
                labels.get(key),
                Some(value),
                "Service {:?} selects {key}={value}",
                service.metadata.name
            );
        }
        assert_eq!(
            spec.selector.match_labels.as_ref(),
            Some(selector),
            "Deployment selector"
        );
    }
}

/// Answers `GET path` on `app` with a status code.
async fn get(app: axum::Router, path: &str) -> u16 {
    let request = axum::http::Request::get(path).body(Body::empty()).unwrap();
    app.oneshot(request).await.unwrap().status().as_u16()
}

#[tokio::test]
async fn ports_and_probes_match_what_the_binaries_serve() {
    let m = manifests();

    // The backend listens on its ConfigMap's port, and its probes hit real routes.
    let config = backend_config(&m);
    let backend = container(&m.backend);
    assert_eq!(port_named(backend, "http"), config.port);
    let identity = backend::identity::Identity {
        pod_name: "p".into(),
        pod_ip: "10.0.0.1".into(),
        namespace: "n".into(),
        node_name: None,
        service_name: config.service_name.clone(),
    };
    let app = backend::routes::app(backend::routes::AppState::new(identity));
    for probe in [&backend.liveness_probe, &backend.readiness_probe] {
        let http = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(http.port, IntOrString::String("http".into()));
        assert_eq!(
            get(app.clone(), http.path.as_deref().unwrap()).await,
            200,
            "backend probe {:?}",
            http.path
        );
    }
    let target = &m
        .backend_service
        .spec
        .as_ref()
        .unwrap()
        .ports
        .as_ref()
        .unwrap()[0];
    assert_eq!(target.target_port, Some(IntOrString::String("http".into())));

    // The load balancer listens on its ConfigMap's ports; probes use the admin port.
    let settings = lb_settings(&m);
    let lb = container(&m.lb);
    assert_eq!(port_named(lb, "http"), settings.listen.port());
    assert_eq!(port_named(lb, "admin"), settings.admin_listen.port());
    let balancer = std::sync::Arc::new(loadbalancer::balancer::Balancer::new(settings.cooldown));
    let discovery = std::sync::Arc::new(loadbalancer::discovery::Status::default());
    let none = loadbalancer::config::Source::Static(Vec::new());
    loadbalancer::discovery::start(&none, balancer.clone(), discovery.clone())
        .await
        .unwrap();
    let admin = loadbalancer::admin::app(loadbalancer::admin::AdminState {
        readiness: Default::default(),
        balancer,
        discovery,
        tcp: false,
    });
    for probe in [&lb.liveness_probe, &lb.readiness_probe] {
        let http = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(http.port, IntOrString::String("admin".into()));
        assert_eq!(
            get(admin.clone(), http.path.as_deref().unwrap()).await,
            200,
            "admin probe {:?}",
            http.path
        );
    }
    let lb_port = &m.lb_service.spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
    assert_eq!(
        lb_port.target_port,
        Some(IntOrString::String("http".into()))
    );
}

#[test]
fn the_load_balancer_watches_the_backend_service_on_the_pods_port() {
    let m = manifests();
    let Source::Kubernetes { service, port, .. } = lb_settings(&m).source else {
        panic!("the cluster config must use Kubernetes discovery");
    };
    assert_eq!(Some(service), m.backend_service.metadata.name);
    // EndpointSlices list the pods' ports, so backendPort is the container port.
    assert_eq!(
        port,
        BackendPort::Number(port_named(container(&m.backend), "http"))
    );
}

#[test]
fn the_node_port_is_the_one_kind_publishes_on_localhost_8080() {
    let m = manifests();
    let node_port = m.lb_service.spec.as_ref().unwrap().ports.as_ref().unwrap()[0]
        .node_port
        .unwrap();
    assert_eq!(
        m.lb_service.spec.as_ref().unwrap().type_.as_deref(),
        Some("NodePort")
    );
    assert!((30000..=32767).contains(&node_port));
    let kind: Value = serde_saphyr::from_str(&read("kind-config.yaml")).unwrap();
    let mapping = &kind["nodes"][0]["extraPortMappings"][0];
    assert_eq!(kind["nodes"][0]["role"], "control-plane");
    assert_eq!(mapping["containerPort"], node_port);
    assert_eq!(mapping["hostPort"], 8080);
    assert_eq!(mapping["listenAddress"], "127.0.0.1");
}

#[test]
fn rbac_grants_exactly_list_and_watch_on_what_discovery_watches() {
    let m = manifests();
    let watched = |group, resource| grant(group, resource, &["list", "watch"]);
    let expected = BTreeMap::from([
        watched(EndpointSlice::GROUP, EndpointSlice::URL_PATH_SEGMENT),
        watched(
            k8s_openapi::api::core::v1::Endpoints::GROUP,
            k8s_openapi::api::core::v1::Endpoints::URL_PATH_SEGMENT,
        ),
    ]);
    assert_eq!(grants(&m.role), expected);

    assert_eq!(
        m.binding.role_ref.kind, "Role",
        "namespaced, not a ClusterRole"
    );
    assert_eq!(
        Some(&m.binding.role_ref.name),
        m.role.metadata.name.as_ref()
    );
    let subject = &m.binding.subjects.as_ref().unwrap()[0];
    assert_eq!(subject.kind, "ServiceAccount");
    assert_eq!(Some(&subject.name), m.account.metadata.name.as_ref());
    assert_eq!(
        pod(&m.lb).service_account_name.as_ref(),
        m.account.metadata.name.as_ref()
    );
}

#[test]
fn every_pod_runs_with_the_restricted_security_profile() {
    let m = manifests();
    for deployment in [&m.backend, &m.lb] {
        let name = deployment.metadata.name.clone().unwrap();
        let pod_security = pod(deployment).security_context.as_ref().unwrap();
        assert_eq!(pod_security.run_as_non_root, Some(true), "{name}");
        assert_eq!(
            pod_security.run_as_user,
            Some(65532),
            "{name}: the distroless nonroot user"
        );
        assert_eq!(
            pod_security.seccomp_profile.as_ref().unwrap().type_,
            "RuntimeDefault",
            "{name}"
        );
        let security = container(deployment).security_context.as_ref().unwrap();
        assert_eq!(security.allow_privilege_escalation, Some(false), "{name}");
        assert_eq!(security.read_only_root_filesystem, Some(true), "{name}");
        assert_eq!(
            security.capabilities.as_ref().unwrap().drop,
            Some(vec!["ALL".to_owned()]),
            "{name}"
        );
    }
    let namespace: Namespace = m.built.get("lb-demo");
    let labels = namespace.metadata.labels.unwrap();
    assert_eq!(
        labels
            .get("pod-security.kubernetes.io/enforce")
            .map(String::as_str),
        Some("restricted")
    );
}

#[test]
fn config_maps_are_mounted_as_directories_and_read_by_the_binaries() {
    let m = manifests();
    for (deployment, config_map) in [(&m.backend, &m.backend_config), (&m.lb, &m.lb_config)] {
        let container = container(deployment);
        assert_eq!(
            container.args.as_ref().unwrap(),
            &["--config", "/etc/config/config.json"]
        );
        let mount = &container.volume_mounts.as_ref().unwrap()[0];
        assert_eq!(mount.mount_path, "/etc/config");
        assert_eq!(
            mount.sub_path, None,
            "subPath mounts never see ConfigMap updates"
        );
        let volume = pod(deployment)
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == mount.name)
            .unwrap();
        assert_eq!(
            volume.config_map.as_ref().unwrap().name,
            config_map.metadata.name.clone().unwrap()
        );
    }
    // Both parse with the binaries' own loaders (the helpers panic otherwise).
    backend_config(&m);
    lb_settings(&m);
}

#[test]
fn pods_learn_who_they_are_and_shut_down_in_time() {
    let m = manifests();
    let env = |deployment: &Deployment| -> BTreeMap<String, String> {
        container(deployment)
            .env
            .iter()
            .flatten()
            .map(|e| {
                (
                    e.name.clone(),
                    e.value_from
                        .as_ref()
                        .unwrap()
                        .field_ref
                        .as_ref()
                        .unwrap()
                        .field_path
                        .clone(),
                )
            })
            .collect()
    };
    assert_eq!(
        env(&m.backend),
        BTreeMap::from([
            ("POD_NAME".into(), "metadata.name".into()),
            ("POD_IP".into(), "status.podIP".into()),
            ("POD_NAMESPACE".into(), "metadata.namespace".into()),
            ("NODE_NAME".into(), "spec.nodeName".into()),
        ])
    );
    assert_eq!(
        env(&m.lb),
        BTreeMap::from([("NAMESPACE".into(), "metadata.namespace".into())])
    );
    assert_eq!(pod(&m.backend).automount_service_account_token, Some(false));
    assert_eq!(m.backend.spec.replicas, Some(3));

    let settings = lb_settings(&m);
    let pre_stop = container(&m.lb)
        .lifecycle
        .as_ref()
        .unwrap()
        .pre_stop
        .as_ref()
        .unwrap();
    let sleep = pre_stop
        .sleep
        .as_ref()
        .expect("a sleep action: the image has no shell")
        .seconds;
    let needed = sleep as f64 + (settings.drain_delay + settings.shutdown_timeout).as_secs_f64();
    let grace = pod(&m.lb).termination_grace_period_seconds.unwrap() as f64;
    assert!(
        grace > needed,
        "terminationGracePeriodSeconds {grace} must exceed preStop + drain + shutdown = {needed}"
    );
}

#[test]
fn images_are_versioned_and_agree_with_the_makefile_and_dockerfile() {
    let m = manifests();
    let version = env!("CARGO_PKG_VERSION");
    let makefile = read("Makefile");
    let dockerfile = read("Dockerfile");
    assert!(makefile.contains(
        r#"VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)"#
    ));
    assert!(
        read(".dockerignore").lines().any(|l| l.trim() == "target/"),
        ".dockerignore keeps target/ out"
    );

    for (binary, deployment) in [("backend", &m.backend), ("loadbalancer", &m.lb)] {
        let image = format!("lb-demo/{binary}");
        let container = container(deployment);
        assert_eq!(
            container.image.as_deref(),
            Some(format!("{image}:{version}").as_str())
        );
        assert_eq!(
            container.image_pull_policy.as_deref(),
            Some("IfNotPresent"),
            "kind-loaded images, never pulled"
        );
        let variable = format!("{}_IMAGE", binary.to_uppercase());
        assert!(
            makefile.contains(&format!("{variable} := {image}:$(VERSION)")),
            "Makefile {variable}"
        );
        assert!(
            makefile.contains(&format!(
                "docker build --target {binary} -t $({variable}) ."
            )),
            "Makefile builds {binary}"
        );

        // The Dockerfile stage of that name ships that binary as its entrypoint.
        let stage = dockerfile
            .split("\nFROM ")
            .find(|stage| {
                stage
                    .lines()
                    .next()
                    .unwrap_or("")
                    .ends_with(&format!(" AS {binary}"))
            })
            .unwrap_or_else(|| panic!("Dockerfile has no stage {binary}"));
        assert!(stage.contains(&format!(
            "COPY --from=builder /src/target/release/{binary} /usr/local/bin/{binary}"
        )));
        assert!(stage.contains(&format!("ENTRYPOINT [\"/usr/local/bin/{binary}\"]")));
        assert!(stage.contains("USER 65532:65532"));
        assert!(
            stage.starts_with("gcr.io/distroless/"),
            "a runtime image without a shell"
        );
    }
    assert!(dockerfile.contains("cargo build --release --locked -p backend -p loadbalancer"));
}

#[test]
fn the_shared_counter_overlay_adds_a_restricted_redis_that_the_config_points_at() {
    let built = build("k8s/overlays/shared-counter");
    let base = manifests().built.names();
    let added: Vec<String> = built.names().difference(&base).cloned().collect();
    assert_eq!(added, ["Deployment/redis", "Service/redis"]);

    let redis: Deployment = built.get("redis");
    let service: Service = built.get("redis");
    let pod_security = pod(&redis).security_context.as_ref().unwrap();
    assert_eq!(pod_security.run_as_non_root, Some(true));
    let security = container(&redis).security_context.as_ref().unwrap();
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(
        security.capabilities.as_ref().unwrap().drop,
        Some(vec!["ALL".to_owned()])
    );
    assert_eq!(
        service.spec.as_ref().unwrap().selector,
        redis.spec.selector.match_labels
    );

    // The patched config goes through the load balancer's own loader and
    // points at that Service, for both replicas.
    let settings = settings_of("shared-counter", &built.get("loadbalancer-config"));
    let port = service.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port;
    assert_eq!(
        settings.shared_counter,
        Some(format!("redis://redis:{port}"))
    );
    let lb: Deployment = built.get("loadbalancer");
    assert_eq!(lb.spec.replicas, Some(2));
}

#[test]
fn the_slow_pod_overlay_adds_one_slow_backend_the_service_selects() {
    let built = build("k8s/overlays/slow-pod");
    assert_eq!(
        built.names(),
        BTreeSet::from(["Deployment/backend-slow".to_owned()]),
        "applied beside the base: one more Deployment, nothing else"
    );
    let slow: Deployment = built.get("backend-slow");
    assert_eq!(slow.spec.replicas, Some(1));
    let args = container(&slow).args.clone().unwrap();
    assert_eq!(
        args,
        [
            "--config",
            "/etc/config/config.json",
            "--response-delay-ms",
            "50"
        ]
    );
    // Same labels as the base, so the backend Service selects the slow pod;
    // the same image and ConfigMap as the base's backend.
    let m = manifests();
    assert_eq!(slow.spec.selector, m.backend.spec.selector);
    assert_eq!(pod_labels(&slow), pod_labels(&m.backend));
    assert_eq!(container(&slow).image, container(&m.backend).image);
    assert_eq!(pod(&slow).volumes, pod(&m.backend).volumes);
}

// === The other discovery sources and TCP mode ===

/// The settings a ConfigMap file's config.json gives the load balancer.
fn settings_of(path: &str, config: &ConfigMap) -> Settings {
    let cli = <Cli as clap::Parser>::parse_from(["loadbalancer"]);
    Settings::parse(PathBuf::from(path), config_json(config).to_owned(), &cli)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// (group, resource) -> verbs, from a Role.
fn grants(role: &Role) -> BTreeMap<(String, String), Vec<String>> {
    role.rules
        .iter()
        .flatten()
        .flat_map(|rule| {
            let groups = rule.api_groups.clone().unwrap_or_default();
            let resources = rule.resources.clone().unwrap_or_default();
            groups.into_iter().flat_map(move |group| {
                let verbs = rule.verbs.clone();
                resources
                    .clone()
                    .into_iter()
                    .map(move |resource| ((group.clone(), resource), verbs.clone()))
            })
        })
        .collect()
}

fn grant(group: &str, resource: &str, verbs: &[&str]) -> ((String, String), Vec<String>) {
    (
        (group.to_owned(), resource.to_owned()),
        verbs.iter().map(|v| v.to_string()).collect(),
    )
}

/// A RoleBinding gives `role` to the load balancer's service account.
fn binds_to_the_load_balancer(binding: &RoleBinding, role: &Role) {
    assert_eq!(binding.role_ref.kind, "Role");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subject = &binding.subjects.as_ref().unwrap()[0];
    assert_eq!(subject.kind, "ServiceAccount");
    assert_eq!(
        Some(&subject.name),
        manifests().account.metadata.name.as_ref()
    );
}

#[test]
fn the_server_crd_is_generated_from_the_rust_type() {
    use kube::CustomResourceExt;
    use loadbalancer::discovery::servers::Server;
    let path = "k8s/crd/servers.yaml";
    let generated = Server::crd();
    if std::env::var_os("UPDATE_CRD").is_some() {
        let header = "# Generated from loadbalancer/src/discovery/servers/resource.rs by `make crd`;\n\
                      # a test fails while the two differ. Do not edit by hand.\n";
        let yaml = serde_saphyr::to_string(&generated).unwrap();
        std::fs::write(root().join(path), format!("{header}{yaml}")).unwrap();
    }
    let crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition =
        build("k8s/crd").get("servers.lb.example.com");
    assert_eq!(
        serde_json::to_value(&crd).unwrap(),
        serde_json::to_value(&generated).unwrap(),
        "{path} differs from the Rust type: run `make crd`"
    );
    assert_eq!(crd.spec.scope, "Namespaced");
    let version = &crd.spec.versions[0];
    assert_eq!(version.name, "v1alpha1");
    assert!(version.subresources.as_ref().unwrap().status.is_some());
    let columns: Vec<&str> = version
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(columns, ["URL", "Healthy", "Last Check", "Age"]);
}

#[test]
fn the_servers_overlay_declares_servers_the_load_balancer_can_reach_and_may_update() {
    use loadbalancer::discovery::servers::Server;
    let dir = "k8s/overlays/servers";
    let built = build(dir);
    let base = manifests().built.names();
    let added: BTreeSet<String> = built.names().difference(&base).cloned().collect();
    assert_eq!(
        added,
        BTreeSet::from(
            [
                "CustomResourceDefinition/servers.lb.example.com",
                "Role/loadbalancer-servers",
                "RoleBinding/loadbalancer-servers",
                "Server/backend-service",
                "Server/server-0",
                "Server/server-1",
                "Server/server-2",
                "Service/server",
                "StatefulSet/server",
            ]
            .map(String::from)
        )
    );

    let config: ConfigMap = built.get("loadbalancer-config");
    let settings = settings_of(dir, &config);
    assert!(matches!(settings.source, Source::Servers { .. }));
    let check = settings.health_check.expect("Servers are checked");

    // Least privilege: read Servers, patch their status, nothing else.
    let role: Role = built.get("loadbalancer-servers");
    assert_eq!(
        grants(&role),
        BTreeMap::from([
            grant("lb.example.com", "servers", &["get", "list", "watch"]),
            grant("lb.example.com", "servers/status", &["patch"]),
        ])
    );
    binds_to_the_load_balancer(&built.get("loadbalancer-servers"), &role);

    // Each pod of the StatefulSet has a DNS name through the headless
    // Service, published even while not ready (the checks decide).
    let statefulset: k8s_openapi::api::apps::v1::StatefulSet = built.get("server");
    let headless: Service = built.get("server");
    let spec = &statefulset.spec;
    let headless_spec = headless.spec.as_ref().unwrap();
    assert_eq!(spec.service_name, headless.metadata.name);
    assert_eq!(headless_spec.cluster_ip.as_deref(), Some("None"));
    assert_eq!(headless_spec.publish_not_ready_addresses, Some(true));
    assert_eq!(headless_spec.selector, spec.selector.match_labels);
    let pod_spec = spec.template.spec.as_ref().unwrap();
    let pod_port = port_named(&pod_spec.containers[0], "http");
    let probe = pod_spec.containers[0].readiness_probe.as_ref().unwrap();
    assert_eq!(
        probe.http_get.as_ref().unwrap().path.as_deref(),
        Some(check.path.as_str())
    );

    let set_name = statefulset.metadata.name.clone().unwrap();
    let service_name = headless.metadata.name.clone().unwrap();
    let mut per_pod = 0;
    for server in built.all::<Server>() {
        let url: hyper::Uri = server.spec.url.parse().unwrap();
        let host = url.host().unwrap();
        if let Some(ordinal) = host.strip_prefix(&format!("{set_name}-")).and_then(|rest| {
            rest.strip_suffix(&format!(".{service_name}.lb-demo.svc.cluster.local"))
        }) {
            assert!(ordinal.parse::<i32>().unwrap() < spec.replicas.unwrap());
            assert_eq!(url.port_u16(), Some(pod_port), "{url}");
            per_pod += 1;
        } else {
            // The whole backend Service: DNS SRV gives the port named http.
            let m = manifests();
            assert_eq!(
                host,
                format!(
                    "{}.lb-demo.svc.cluster.local",
                    m.backend_service.metadata.name.unwrap()
                )
            );
            assert_eq!(url.port_u16(), None, "the port comes from DNS SRV");
            let ports = m.backend_service.spec.unwrap().ports.unwrap();
            assert!(ports.iter().any(|p| p.name.as_deref() == Some("http")));
        }
    }
    assert_eq!(per_pod, spec.replicas.unwrap());
}

#[test]
fn the_pods_overlay_selects_the_backend_pods_by_label_on_their_named_port() {
    let dir = "k8s/overlays/pods";
    let built = build(dir);
    let added: Vec<String> = built
        .names()
        .difference(&manifests().built.names())
        .cloned()
        .collect();
    assert_eq!(
        added,
        ["Role/loadbalancer-pods", "RoleBinding/loadbalancer-pods"]
    );
    let config: ConfigMap = built.get("loadbalancer-config");
    let Source::Pods { selector, port } = settings_of(dir, &config).source else {
        panic!("{dir}: the config must use pods discovery");
    };
    let m = manifests();
    let labels = pod_labels(&m.backend);
    for term in selector.split(',') {
        let (key, value) = term.split_once('=').unwrap();
        assert_eq!(labels.get(key).map(String::as_str), Some(value), "{term}");
    }
    let BackendPort::Name(name) = port else {
        panic!("by container port name");
    };
    port_named(container(&m.backend), &name);

    let role: Role = built.get("loadbalancer-pods");
    assert_eq!(
        grants(&role),
        BTreeMap::from([grant("", "pods", &["list", "watch"])])
    );
    binds_to_the_load_balancer(&built.get("loadbalancer-pods"), &role);
}

#[test]
fn the_tcp_load_balancer_reaches_the_backends_tcp_port_and_kind_publishes_9090() {
    let path = "k8s/base/loadbalancer-tcp.yaml";
    let m = manifests();
    let config: ConfigMap = m.built.get("loadbalancer-tcp-config");
    let deployment: Deployment = m.built.get("loadbalancer-tcp");
    let service: Service = m.built.get("loadbalancer-tcp");
    let settings = settings_of(path, &config);
    assert_eq!(settings.mode, loadbalancer::config::Mode::Tcp);
    assert_eq!(
        settings.algorithm,
        loadbalancer::balancer::Algorithm::LeastConnections,
        "the default in TCP mode"
    );

    // Discovery: the backend Service's port named tcp, which is the
    // backend's own tcpPort.
    let Source::Kubernetes {
        service: watched,
        port: BackendPort::Name(port_name),
        ..
    } = settings.source
    else {
        panic!("{path}: watch the backend Service by port name");
    };
    assert_eq!(Some(watched), m.backend_service.metadata.name);
    let backend_port = m
        .backend_service
        .spec
        .as_ref()
        .unwrap()
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .find(|p| p.name.as_deref() == Some(port_name.as_str()))
        .unwrap_or_else(|| panic!("the backend Service has a port named {port_name}"))
        .clone();
    assert_eq!(
        backend_port.target_port,
        Some(IntOrString::String("tcp".into()))
    );
    assert_eq!(
        Some(port_named(container(&m.backend), "tcp")),
        backend_config(&m).tcp_port,
        "the backend listens where its container port says"
    );

    // Its own pods, its own Service, the HTTP one does not select them.
    let labels = pod_labels(&deployment);
    let selector = service.spec.as_ref().unwrap().selector.clone().unwrap();
    assert!(selector.iter().all(|(k, v)| labels.get(k) == Some(v)));
    let http_selector = m
        .lb_service
        .spec
        .as_ref()
        .unwrap()
        .selector
        .clone()
        .unwrap();
    assert!(!http_selector.iter().all(|(k, v)| labels.get(k) == Some(v)));
    let tcp = container(&deployment);
    assert_eq!(port_named(tcp, "tcp"), settings.listen.port());
    assert_eq!(port_named(tcp, "admin"), settings.admin_listen.port());
    assert_eq!(
        pod(&deployment).service_account_name,
        pod(&m.lb).service_account_name
    );
    assert_eq!(tcp.security_context, container(&m.lb).security_context);
    let volume = &pod(&deployment).volumes.as_ref().unwrap()[0];
    assert_eq!(
        volume.config_map.as_ref().unwrap().name,
        config.metadata.name.unwrap()
    );

    // NodePort 30090, published by kind as localhost:9090.
    let node_port = service.spec.as_ref().unwrap().ports.as_ref().unwrap()[0]
        .node_port
        .unwrap();
    let kind: Value = serde_saphyr::from_str(&read("kind-config.yaml")).unwrap();
    let mappings = kind["nodes"][0]["extraPortMappings"].as_array().unwrap();
    assert!(
        mappings
            .iter()
            .any(|m| m["containerPort"] == node_port && m["hostPort"] == 9090),
        "{mappings:?}"
    );
}
