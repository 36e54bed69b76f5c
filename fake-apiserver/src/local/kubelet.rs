//! Pods as processes: what the kubelet does for each of the backend's pods.
//!
//! A pod is a `backend` process listening on a loopback address of its own
//! (`127.0.0.11`, `.12`, ...), so that each has its own IP as on a cluster.
//! Its config directory is laid out as the kubelet mounts a ConfigMap: the
//! files point into `..data`, a symlink to a timestamped directory, and a
//! change writes a new directory and swaps the symlink in one rename, so
//! the process never reads half a file.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

/// What the Deployment's pod template says, as far as this kubelet acts on it.
#[derive(Debug, Clone)]
pub struct Template {
    pub port: u16,
    pub readiness_path: String,
    pub period: Duration,
    pub pre_stop: Duration,
    pub grace: Duration,
    /// The ConfigMap mounted as the config directory.
    pub config_map: String,
    pub labels: Value,
}

/// One pod's process and what the kubelet knows of it.
#[derive(Debug)]
struct Running {
    ip: Ipv4Addr,
    child: Option<Child>,
    ready: bool,
    restarts: u32,
    last_probe: Option<Instant>,
    /// Set when its deletion began.
    terminating: Option<Instant>,
    /// When its process last exited unasked, for the restart back-off.
    exited_at: Option<Instant>,
    signalled: bool,
}

/// An endpoint of the backend Service.
#[derive(Debug)]
pub struct Endpoint {
    pub pod: String,
    pub ip: Ipv4Addr,
    pub ready: bool,
    pub terminating: bool,
}

/// The backend's pods on this machine.
#[derive(Debug)]
pub struct Kubelet {
    backend: PathBuf,
    state: PathBuf,
    first_ip: Ipv4Addr,
    /// The namespace the pods are in (the Downward API's `POD_NAMESPACE`).
    namespace: String,
    pub template: Template,
    pods: BTreeMap<String, Running>,
    config: Value,
    config_version: u64,
    made: u64,
}

impl Template {
    /// The template of `deployment`, or why it cannot be run here.
    pub fn of(deployment: Option<&Value>) -> Result<Template, String> {
        let deployment = deployment.ok_or("the manifests have no Deployment named backend")?;
        let spec = &deployment["spec"]["template"]["spec"];
        let container = &spec["containers"][0];
        let port = container["ports"][0]["containerPort"]
            .as_u64()
            .unwrap_or(8080) as u16;
        let probe = &container["readinessProbe"];
        let config_map = spec["volumes"]
            .as_array()
            .and_then(|volumes| volumes.iter().find_map(|v| v["configMap"]["name"].as_str()))
            .ok_or("the backend Deployment mounts no ConfigMap")?;
        let seconds =
            |value: &Value, default| Duration::from_secs(value.as_u64().unwrap_or(default));
        Ok(Template {
            port,
            readiness_path: probe["httpGet"]["path"]
                .as_str()
                .unwrap_or("/readyz")
                .to_owned(),
            period: seconds(&probe["periodSeconds"], 10),
            pre_stop: seconds(&container["lifecycle"]["preStop"]["sleep"]["seconds"], 0),
            grace: seconds(&spec["terminationGracePeriodSeconds"], 30),
            config_map: config_map.to_owned(),
            labels: deployment["spec"]["template"]["metadata"]["labels"].clone(),
        })
    }
}

impl Kubelet {
    pub fn new(
        backend: PathBuf,
        state: PathBuf,
        first_ip: Ipv4Addr,
        namespace: String,
        template: Template,
    ) -> Kubelet {
        Kubelet {
            backend,
            state,
            first_ip,
            namespace,
            template,
            pods: BTreeMap::new(),
            config: Value::Null,
            config_version: 0,
            made: 0,
        }
    }

    /// Takes the ConfigMap's `data`; when it changed, every pod's mounted
    /// files are swapped for the new ones.
    pub fn configure(&mut self, data: &Value) {
        if *data == self.config {
            return;
        }
        self.config = data.clone();
        self.config_version += 1;
        let names: Vec<String> = self.pods.keys().cloned().collect();
        for name in names {
            if let Err(error) = self.mount(&name) {
                eprintln!("local cluster: cannot update the config of pod {name}: {error}");
            }
        }
    }

    /// Pods that are `deleted` in the API begin terminating.
    pub fn terminate_deleted(&mut self, deleted: impl Fn(&String) -> bool) {
        for (name, pod) in &mut self.pods {
            if pod.terminating.is_none() && deleted(name) {
                pod.terminating = Some(Instant::now());
            }
        }
    }

    /// Makes or deletes pods until `desired` are live; `delete` marks a
    /// pod's object as being deleted.
    pub fn scale(&mut self, desired: usize, delete: impl Fn(&str)) {
        let live: Vec<String> = self.live().map(|(name, _)| name.clone()).collect();
        for name in live.iter().rev().take(live.len().saturating_sub(desired)) {
            delete(name);
            if let Some(pod) = self.pods.get_mut(name) {
                pod.terminating = Some(Instant::now());
            }
        }
        for _ in live.len()..desired {
            self.make_pod();
        }
    }

    /// Probes, restarts, and moves terminating pods along; the pods whose
    /// processes are gone after their deletion, for the API to forget.
    pub async fn tend(&mut self) -> Vec<String> {
        let template = self.template.clone();
        let mut gone = Vec::new();
        let mut restart = Vec::new();
        for (name, pod) in &mut self.pods {
            let exited = pod
                .child
                .as_mut()
                .is_none_or(|c| c.try_wait().ok().flatten().is_some());
            match pod.terminating {
                Some(_) if exited => gone.push(name.clone()),
                Some(since) => stop(pod, since, &template),
                None if exited => {
                    // As the kubelet's CrashLoopBackOff: 1 s per restart so
                    // far, at most 10 s, so a pod that cannot start does
                    // not spin.
                    let exited_at = *pod.exited_at.get_or_insert_with(Instant::now);
                    let back_off = Duration::from_secs(u64::from(pod.restarts).clamp(0, 10));
                    if exited_at.elapsed() >= back_off {
                        pod.exited_at = None;
                        restart.push(name.clone());
                    }
                }
                None => probe(pod, &template).await,
            }
        }
        for name in &gone {
            self.pods.remove(name);
        }
        for name in restart {
            eprintln!(
                "local cluster: pod {name}'s process exited; restarting it (restartPolicy: Always)"
            );
            if let Some(pod) = self.pods.get_mut(&name) {
                pod.restarts += 1;
                pod.ready = false;
            }
            self.spawn(&name);
        }
        gone
    }

    /// Every pod process, stopped: SIGTERM, then SIGKILL after 5 s.
    pub async fn stop_all(&mut self) {
        for pod in self.pods.values_mut() {
            if let Some(pid) = pod.child.as_ref().and_then(Child::id) {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            }
        }
        for pod in self.pods.values_mut() {
            if let Some(child) = pod.child.as_mut()
                && tokio::time::timeout(Duration::from_secs(5), child.wait())
                    .await
                    .is_err()
            {
                let _ = child.kill().await;
            }
        }
        self.pods.clear();
    }

    /// `(pods, ready pods)` that are not terminating.
    pub fn counts(&self) -> (usize, usize) {
        let live: Vec<_> = self.live().collect();
        (live.len(), live.iter().filter(|(_, p)| p.ready).count())
    }

    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.pods
            .iter()
            .map(|(name, pod)| Endpoint {
                pod: name.clone(),
                ip: pod.ip,
                ready: pod.ready,
                terminating: pod.terminating.is_some(),
            })
            .collect()
    }

    /// The Pod objects of the live pods, as the kubelet reports them.
    pub fn pod_objects(&self) -> Vec<Value> {
        let namespace = &self.namespace;
        self.pods
            .iter()
            .map(|(name, pod)| {
                let ready = if pod.ready { "True" } else { "False" };
                json!({
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": { "name": name, "namespace": namespace, "labels": self.template.labels },
                    "spec": { "nodeName": "local", "containers": [{ "name": "backend", "image": "lb-demo/backend" }] },
                    "status": {
                        "phase": "Running",
                        "podIP": pod.ip.to_string(),
                        "conditions": [{ "type": "Ready", "status": ready }],
                        "containerStatuses": [{ "name": "backend", "ready": pod.ready, "restartCount": pod.restarts, "image": "lb-demo/backend", "imageID": "", "started": true }],
                    },
                })
            })
            .collect()
    }

    /// Whether `name` is one of the pods and not terminating.
    pub fn is_live(&self, name: &str) -> bool {
        self.pods
            .get(name)
            .is_some_and(|pod| pod.terminating.is_none())
    }

    fn live(&self) -> impl Iterator<Item = (&String, &Running)> {
        self.pods
            .iter()
            .filter(|(_, pod)| pod.terminating.is_none())
    }

    fn make_pod(&mut self) {
        self.made += 1;
        let name = format!("backend-local-{:05x}", suffix(self.made));
        let used: Vec<Ipv4Addr> = self.pods.values().map(|p| p.ip).collect();
        let [a, b, c, first] = self.first_ip.octets();
        let free = (first..=250)
            .map(|n| Ipv4Addr::new(a, b, c, n))
            .find(|ip| !used.contains(ip));
        let Some(ip) = free else {
            eprintln!("local cluster: no loopback address left for another pod");
            return;
        };
        let pod = Running {
            ip,
            child: None,
            ready: false,
            restarts: 0,
            last_probe: None,
            terminating: None,
            exited_at: None,
            signalled: false,
        };
        self.pods.insert(name.clone(), pod);
        if let Err(error) = self.mount(&name) {
            eprintln!("local cluster: cannot write pod {name}'s config: {error}");
        }
        self.spawn(&name);
    }

    /// Starts (or restarts) the pod's process, its output to its log file.
    fn spawn(&mut self, name: &str) {
        let dir = self.state.join("pods").join(name);
        let Some(pod) = self.pods.get_mut(name) else {
            return;
        };
        let log = std::fs::create_dir_all(&dir).and_then(|()| {
            File::options()
                .create(true)
                .append(true)
                .open(dir.join("log"))
        });
        let (out, err) = match log.and_then(|file| Ok((file.try_clone()?, file))) {
            Ok((out, err)) => (Stdio::from(out), Stdio::from(err)),
            Err(error) => {
                eprintln!("local cluster: cannot open pod {name}'s log: {error}");
                (Stdio::null(), Stdio::null())
            }
        };
        let spawned = Command::new(&self.backend)
            .args([
                "--config",
                &dir.join("config/config.json").to_string_lossy(),
            ])
            .args([
                "--host",
                &pod.ip.to_string(),
                "--port",
                &self.template.port.to_string(),
            ])
            .env("POD_NAME", name)
            .env("POD_IP", pod.ip.to_string())
            .env("POD_NAMESPACE", &self.namespace)
            .env("NODE_NAME", "local")
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn();
        match spawned {
            Ok(child) => pod.child = Some(child),
            Err(error) => eprintln!(
                "local cluster: cannot start {}: {error}",
                self.backend.display()
            ),
        }
    }

    /// Writes the ConfigMap into the pod's config directory, as the kubelet
    /// lays it out: `config.json -> ..data/config.json`, `..data -> ..N`.
    fn mount(&self, name: &str) -> std::io::Result<()> {
        let dir = self.state.join("pods").join(name).join("config");
        let version = dir.join(format!("..{}", self.config_version));
        std::fs::create_dir_all(&version)?;
        if let Some(files) = self.config.as_object() {
            for (file, text) in files {
                std::fs::write(version.join(file), text.as_str().unwrap_or_default())?;
                let link = dir.join(file);
                if link.symlink_metadata().is_err() {
                    std::os::unix::fs::symlink(Path::new("..data").join(file), &link)?;
                }
            }
        }
        let next = dir.join("..data_tmp");
        let _ = std::fs::remove_file(&next);
        std::os::unix::fs::symlink(version.file_name().unwrap_or_default(), &next)?;
        std::fs::rename(&next, dir.join("..data"))
    }
}

/// A pod name's random-looking suffix, different for each pod made.
fn suffix(n: u64) -> u64 {
    (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 44) & 0xF_FFFF
}

/// Deletion: the endpoint is terminating at once; after `preStop`, SIGTERM;
/// after the grace period, SIGKILL.
fn stop(pod: &mut Running, since: Instant, template: &Template) {
    let Some(child) = pod.child.as_mut() else {
        return;
    };
    let elapsed = since.elapsed();
    if elapsed >= template.grace {
        let _ = child.start_kill();
    } else if elapsed >= template.pre_stop
        && !pod.signalled
        && let Some(pid) = child.id()
    {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        pod.signalled = true;
    }
}

/// The readiness probe, every period: an HTTP GET of its path that answers 2xx.
async fn probe(pod: &mut Running, template: &Template) {
    if pod
        .last_probe
        .is_some_and(|at| at.elapsed() < template.period)
    {
        return;
    }
    pod.last_probe = Some(Instant::now());
    let addr = (pod.ip, template.port);
    let answer = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!(
            "GET {} HTTP/1.0\r\nhost: {}\r\n\r\n",
            template.readiness_path, pod.ip
        );
        stream.write_all(request.as_bytes()).await?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await?;
        Ok::<_, std::io::Error>(head)
    };
    pod.ready = match tokio::time::timeout(Duration::from_secs(1), answer).await {
        Ok(Ok(head)) => head[9] == b'2',
        _ => false,
    };
}
