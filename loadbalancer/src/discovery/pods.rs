//! Pods in, backend addresses out: discovery without a Service.
//!
//! `"discovery": "pods"` watches the Pods matching `podSelector` directly,
//! as some Ingress controllers and Traefik-style internal load balancers do.
//! A pod is a backend while:
//!
//! - it has an IP (`status.podIP`),
//! - it is not being deleted (no `metadata.deletionTimestamp`), and
//! - its `Ready` condition is `True` (the kubelet's readiness probe passes).
//!
//! The port is a number, or the name of one of its containers' ports.
//!
//! Compared with EndpointSlices, we now do the EndpointSlice controller's
//! job ourselves: the readiness rule above is the controller's, but a pod
//! that is terminating is dropped at once rather than kept as "serving
//! while terminating", every change to any pod (a label, an annotation,
//! a status heartbeat) reaches us instead of only address changes, and the
//! RBAC grant is on pods, which say much more than their addresses.

use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::Pod as KubePod;

use crate::balancer::{BackendSet, Origin};
use crate::config::BackendPort;

/// The ready pods in `pods`, on the `wanted` port.
pub fn backends<'a>(
    pods: impl IntoIterator<Item = &'a KubePod>,
    wanted: &BackendPort,
) -> BackendSet {
    pods.into_iter()
        .filter(|pod| pod.metadata.deletion_timestamp.is_none() && is_ready(pod))
        .filter_map(|pod| {
            let ip: IpAddr = pod.status.as_ref()?.pod_ip.as_deref()?.parse().ok()?;
            let port = port(pod, wanted)?;
            let about = Origin {
                name: pod.metadata.name.clone(),
                node: pod.spec.as_ref().and_then(|spec| spec.node_name.clone()),
                ..Origin::default()
            };
            Some((SocketAddr::new(ip, port), about))
        })
        .collect()
}

/// Whether the pod's `Ready` condition is `True`.
fn is_ready(pod: &KubePod) -> bool {
    pod.status
        .as_ref()
        .and_then(|status| status.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|condition| condition.type_ == "Ready" && condition.status == "True")
}

/// The port: the number itself, or the named container port.
fn port(pod: &KubePod, wanted: &BackendPort) -> Option<u16> {
    match wanted {
        BackendPort::Number(number) => Some(*number),
        BackendPort::Name(name) => pod
            .spec
            .as_ref()?
            .containers
            .iter()
            .flat_map(|container| container.ports.iter().flatten())
            .find(|port| port.name.as_deref() == Some(name.as_str()))
            .and_then(|port| u16::try_from(port.container_port).ok()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, ContainerPort, PodCondition, PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    fn pod(name: &str, ip: &str, ready: &str) -> KubePod {
        KubePod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "backend".into(),
                    ports: Some(vec![ContainerPort {
                        name: Some("http".into()),
                        container_port: 8080,
                        ..ContainerPort::default()
                    }]),
                    ..Container::default()
                }],
                node_name: Some("kind-worker".into()),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                pod_ip: Some(ip.into()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: ready.into(),
                    ..PodCondition::default()
                }]),
                ..PodStatus::default()
            }),
        }
    }

    #[test]
    fn only_ready_pods_that_are_not_being_deleted_are_backends() {
        let mut deleting = pod("backend-c", "10.0.0.3", "True");
        deleting.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::UNIX_EPOCH));
        let mut no_ip = pod("backend-d", "", "True");
        no_ip.status.as_mut().unwrap().pod_ip = None;
        let pods = [
            pod("backend-a", "10.0.0.1", "True"),
            pod("backend-b", "10.0.0.2", "False"),
            deleting,
            no_ip,
        ];
        let found = backends(&pods, &BackendPort::Number(8080));
        assert_eq!(found.len(), 1);
        let (addr, about) = found.iter().next().unwrap();
        assert_eq!(*addr, "10.0.0.1:8080".parse().unwrap());
        assert_eq!(about.name.as_deref(), Some("backend-a"));
        assert_eq!(about.node.as_deref(), Some("kind-worker"));
    }

    #[test]
    fn the_port_is_a_number_or_a_container_port_name() {
        let pods = [pod("backend-a", "10.0.0.1", "True")];
        let by_name = backends(&pods, &BackendPort::Name("http".into()));
        assert!(by_name.contains_key(&"10.0.0.1:8080".parse().unwrap()));
        assert!(backends(&pods, &BackendPort::Name("grpc".into())).is_empty());
        let by_number = backends(&pods, &BackendPort::Number(9090));
        assert!(by_number.contains_key(&"10.0.0.1:9090".parse().unwrap()));
    }
}
