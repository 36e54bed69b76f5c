//! A v1 Endpoints object in, backend addresses out.
//!
//! Before EndpointSlices, the endpoints controller kept one `Endpoints`
//! object per Service, named like the Service. Its `subsets` list the ready
//! pod IPs in `addresses` and the others in `notReadyAddresses`, with the
//! ports they serve. The API is deprecated since Kubernetes 1.33 (it cannot
//! hold more than 1000 endpoints), but many guides still teach it, so it is
//! kept here for comparison.

use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::Endpoints;

use crate::balancer::{BackendSet, Origin};
use crate::config::BackendPort;

/// The ready backend addresses in `endpoints`, with the pod and node each
/// one is (v1 Endpoints know no zone).
pub fn backends<'a>(
    endpoints: impl IntoIterator<Item = &'a Endpoints>,
    wanted: &BackendPort,
) -> BackendSet {
    let mut found = BackendSet::new();
    for subset in endpoints
        .into_iter()
        .flat_map(|e| e.subsets.iter().flatten())
    {
        let port = subset.ports.iter().flatten().find_map(|port| {
            let number = u16::try_from(port.port).ok()?;
            wanted
                .matches(number, port.name.as_deref())
                .then_some(number)
        });
        let Some(port) = port else { continue };
        // `notReadyAddresses` are deliberately not used.
        for address in subset.addresses.iter().flatten() {
            if let Ok(ip) = address.ip.parse::<IpAddr>() {
                let pod = Origin {
                    name: super::pod_name(address.target_ref.as_ref()),
                    node: address.node_name.clone(),
                    ..Origin::default()
                };
                found.insert(SocketAddr::new(ip, port), pod);
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{EndpointAddress, EndpointPort, EndpointSubset};

    fn address(ip: &str) -> EndpointAddress {
        EndpointAddress {
            ip: ip.into(),
            ..EndpointAddress::default()
        }
    }

    #[test]
    fn ready_addresses_on_the_wanted_port_are_used_not_ready_ones_are_not() {
        let endpoints = Endpoints {
            subsets: Some(vec![EndpointSubset {
                addresses: Some(vec![address("10.0.0.1"), address("fd00::2")]),
                not_ready_addresses: Some(vec![address("10.0.0.3")]),
                ports: Some(vec![EndpointPort {
                    name: Some("http".into()),
                    port: 8080,
                    ..EndpointPort::default()
                }]),
            }]),
            ..Endpoints::default()
        };
        let expected: BackendSet = ["10.0.0.1:8080", "[fd00::2]:8080"]
            .iter()
            .map(|a| (a.parse().unwrap(), Origin::default()))
            .collect();
        assert_eq!(backends([&endpoints], &BackendPort::Number(8080)), expected);
        assert_eq!(
            backends([&endpoints], &BackendPort::Name("http".into())),
            expected
        );
        assert!(backends([&endpoints], &BackendPort::Number(9090)).is_empty());
        assert!(
            backends([], &BackendPort::Number(8080)).is_empty(),
            "no object, no backends"
        );
    }
}
