//! EndpointSlices in, backend addresses out.
//!
//! The EndpointSlice controller splits the pods behind a Service into one or
//! more `discovery.k8s.io/v1` EndpointSlices, each labelled
//! `kubernetes.io/service-name=<service>`. Every endpoint in a slice is one
//! pod, with its IP and three conditions:
//!
//! - `ready`: passing its readiness probe and not terminating (unset means
//!   ready);
//! - `serving`: passing its readiness probe, terminating or not;
//! - `terminating`: being deleted.
//!
//! We send traffic to the ready endpoints of all slices. When none is ready,
//! we fall back to endpoints that are serving while terminating, as
//! kube-proxy does: during a rolling update that leaves nothing ready, a
//! pod that is shutting down but still answering beats a 503.
//!
//! Each endpoint also says which pod it is (`targetRef`), on which node
//! (`nodeName`) and in which zone (`zone`); that travels with the address,
//! for the admin page and `/backends`.

use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};

use crate::balancer::{BackendSet, Origin};
use crate::config::BackendPort;

/// The backend addresses in `slices`, merged and de-duplicated, with the
/// pod each one is.
pub fn backends<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    wanted: &BackendPort,
) -> BackendSet {
    let mut ready = BackendSet::new();
    let mut terminating_but_serving = BackendSet::new();
    for slice in slices {
        // FQDN slices name hosts, not addresses; we only route to IPs.
        if slice.address_type == "FQDN" {
            continue;
        }
        let Some(port) = slice
            .ports
            .iter()
            .flatten()
            .find_map(|p| matching(p, wanted))
        else {
            continue;
        };
        for endpoint in slice.endpoints.iter().flatten() {
            // All addresses of an endpoint are the same pod; like kube-proxy,
            // use the first.
            let Some(ip) = endpoint
                .addresses
                .first()
                .and_then(|a| a.parse::<IpAddr>().ok())
            else {
                continue;
            };
            let conditions = endpoint.conditions.as_ref();
            let condition =
                |pick: fn(&k8s_openapi::api::discovery::v1::EndpointConditions) -> Option<bool>| {
                    conditions.and_then(pick)
                };
            let addr = SocketAddr::new(ip, port);
            if condition(|c| c.ready).unwrap_or(true) {
                ready.insert(addr, pod(endpoint));
            } else if condition(|c| c.serving) == Some(true)
                && condition(|c| c.terminating) == Some(true)
            {
                terminating_but_serving.insert(addr, pod(endpoint));
            }
        }
    }
    if ready.is_empty() {
        terminating_but_serving
    } else {
        ready
    }
}

/// Which pod an endpoint is, as far as the slice says.
fn pod(endpoint: &Endpoint) -> Origin {
    Origin {
        name: super::pod_name(endpoint.target_ref.as_ref()),
        node: endpoint.node_name.clone(),
        zone: endpoint.zone.clone(),
        ..Origin::default()
    }
}

/// The port number of `port` if it is the one we want.
fn matching(port: &EndpointPort, wanted: &BackendPort) -> Option<u16> {
    let number = u16::try_from(port.port?).ok()?;
    wanted
        .matches(number, port.name.as_deref())
        .then_some(number)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions};

    fn endpoint(
        ip: &str,
        ready: Option<bool>,
        serving: Option<bool>,
        terminating: Option<bool>,
    ) -> Endpoint {
        Endpoint {
            addresses: vec![ip.into()],
            conditions: Some(EndpointConditions {
                ready,
                serving,
                terminating,
            }),
            ..Endpoint::default()
        }
    }

    fn slice(address_type: &str, ports: &[(&str, i32)], endpoints: Vec<Endpoint>) -> EndpointSlice {
        EndpointSlice {
            address_type: address_type.into(),
            endpoints: Some(endpoints),
            ports: Some(
                ports
                    .iter()
                    .map(|(name, port)| EndpointPort {
                        name: Some(name.to_string()),
                        port: Some(*port),
                        ..EndpointPort::default()
                    })
                    .collect(),
            ),
            ..EndpointSlice::default()
        }
    }

    fn addrs(list: &[&str]) -> BackendSet {
        list.iter()
            .map(|a| (a.parse().unwrap(), Origin::default()))
            .collect()
    }

    const HTTP: BackendPort = BackendPort::Number(8080);

    #[test]
    fn each_address_carries_its_pod_node_and_zone() {
        let mut pod_endpoint = endpoint("10.0.0.1", Some(true), None, None);
        pod_endpoint.target_ref = Some(k8s_openapi::api::core::v1::ObjectReference {
            kind: Some("Pod".into()),
            name: Some("backend-7d9f-x2k4q".into()),
            ..Default::default()
        });
        pod_endpoint.node_name = Some("lb-demo-worker".into());
        pod_endpoint.zone = Some("zone-a".into());
        let slices = [slice("IPv4", &[("http", 8080)], vec![pod_endpoint])];
        let found = backends(&slices, &HTTP);
        assert_eq!(
            found[&"10.0.0.1:8080".parse().unwrap()],
            Origin {
                name: Some("backend-7d9f-x2k4q".into()),
                node: Some("lb-demo-worker".into()),
                zone: Some("zone-a".into()),
                ..Origin::default()
            }
        );
    }

    #[test]
    fn ready_and_unset_conditions_count_as_ready() {
        let slices = [slice(
            "IPv4",
            &[("http", 8080)],
            vec![
                endpoint("10.0.0.1", Some(true), Some(true), Some(false)),
                endpoint("10.0.0.2", None, None, None),
                endpoint("10.0.0.3", Some(false), Some(false), Some(false)),
            ],
        )];
        assert_eq!(
            backends(&slices, &HTTP),
            addrs(&["10.0.0.1:8080", "10.0.0.2:8080"])
        );
    }

    #[test]
    fn when_nothing_is_ready_terminating_but_serving_endpoints_are_used() {
        let mut slices = vec![slice(
            "IPv4",
            &[("http", 8080)],
            vec![
                endpoint("10.0.0.1", Some(false), Some(true), Some(true)),
                endpoint("10.0.0.2", Some(false), Some(false), Some(true)),
            ],
        )];
        assert_eq!(backends(&slices, &HTTP), addrs(&["10.0.0.1:8080"]));
        slices.push(slice(
            "IPv4",
            &[("http", 8080)],
            vec![endpoint("10.0.0.9", Some(true), None, None)],
        ));
        assert_eq!(
            backends(&slices, &HTTP),
            addrs(&["10.0.0.9:8080"]),
            "ready ones win"
        );
    }

    #[test]
    fn slices_are_merged_and_duplicates_removed() {
        let slices = [
            slice(
                "IPv4",
                &[("http", 8080)],
                vec![
                    endpoint("10.0.0.1", None, None, None),
                    endpoint("10.0.0.2", None, None, None),
                ],
            ),
            slice(
                "IPv4",
                &[("http", 8080)],
                vec![
                    endpoint("10.0.0.2", None, None, None),
                    endpoint("10.0.0.3", None, None, None),
                ],
            ),
        ];
        assert_eq!(
            backends(&slices, &HTTP),
            addrs(&["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"])
        );
    }

    #[test]
    fn the_port_is_chosen_by_number_or_by_name() {
        let slices = [slice(
            "IPv4",
            &[("metrics", 9090), ("web", 8080)],
            vec![endpoint("10.0.0.1", None, None, None)],
        )];
        assert_eq!(backends(&slices, &HTTP), addrs(&["10.0.0.1:8080"]));
        assert_eq!(
            backends(&slices, &BackendPort::Number(9090)),
            addrs(&["10.0.0.1:9090"])
        );
        assert_eq!(
            backends(&slices, &BackendPort::Name("metrics".into())),
            addrs(&["10.0.0.1:9090"])
        );
        assert!(
            backends(&slices, &BackendPort::Number(80)).is_empty(),
            "no such port"
        );
    }

    #[test]
    fn ipv6_is_supported_and_fqdn_and_bad_addresses_are_skipped() {
        let slices = [
            slice(
                "IPv6",
                &[("http", 8080)],
                vec![endpoint("fd00::7", None, None, None)],
            ),
            slice(
                "FQDN",
                &[("http", 8080)],
                vec![endpoint("backend.example", None, None, None)],
            ),
            slice(
                "IPv4",
                &[("http", 8080)],
                vec![endpoint("not-an-ip", None, None, None)],
            ),
        ];
        let found = backends(&slices, &HTTP);
        assert_eq!(found, addrs(&["[fd00::7]:8080"]));
        assert_eq!(found.keys().next().unwrap().to_string(), "[fd00::7]:8080");
    }

    #[test]
    fn a_slice_without_endpoints_or_ports_contributes_nothing() {
        let empty = EndpointSlice {
            address_type: "IPv4".into(),
            ..EndpointSlice::default()
        };
        assert!(backends([&empty], &HTTP).is_empty());
    }
}
