//! Who this pod is.
//!
//! Kubernetes tells a container about itself through the Downward API: the
//! Deployment maps `metadata.name`, `status.podIP`, `metadata.namespace` and
//! `spec.nodeName` into the env vars `POD_NAME`, `POD_IP`, `POD_NAMESPACE`
//! and `NODE_NAME`. Run outside Kubernetes those are unset, so we fall back
//! to the hostname and the address we listen on, and say so once.

use std::net::IpAddr;

use serde::Serialize;

/// The pod's identity, reported in every answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    pub pod_name: String,
    #[serde(rename = "podIP")]
    pub pod_ip: String,
    pub namespace: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    pub service_name: String,
}

impl Identity {
    /// Reads the Downward API variables through `env`, falling back for the
    /// missing ones. Returns the identity and the names of the variables that
    /// were missing, so the caller can log them.
    pub fn from_env(
        env: impl Fn(&str) -> Option<String>,
        service_name: &str,
        listen_ip: IpAddr,
    ) -> (Identity, Vec<&'static str>) {
        let mut missing = Vec::new();
        let mut var = |name: &'static str| {
            let value = env(name).filter(|v| !v.is_empty());
            if value.is_none() {
                missing.push(name);
            }
            value
        };
        let pod_name = var("POD_NAME");
        let pod_ip = var("POD_IP");
        let namespace = var("POD_NAMESPACE");
        let identity = Identity {
            pod_name: pod_name.unwrap_or_else(|| hostname(&env)),
            pod_ip: pod_ip.unwrap_or_else(|| local_ip(listen_ip).to_string()),
            namespace: namespace.unwrap_or_else(|| "local".into()),
            node_name: env("NODE_NAME").filter(|v| !v.is_empty()),
            service_name: service_name.to_owned(),
        };
        (identity, missing)
    }
}

/// The host's name: `HOSTNAME` (a container's hostname is its pod name), else
/// the kernel's, else `localhost`.
fn hostname(env: &impl Fn(&str) -> Option<String>) -> String {
    env("HOSTNAME")
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// The address we are reachable at when listening on `listen_ip`: a wildcard
/// such as `0.0.0.0` means "every interface", so name loopback instead.
fn local_ip(listen_ip: IpAddr) -> IpAddr {
    match listen_ip {
        IpAddr::V4(ip) if ip.is_unspecified() => [127, 0, 0, 1].into(),
        IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    #[test]
    fn downward_api_variables_are_used_when_set() {
        let (identity, missing) = Identity::from_env(
            env(&[
                ("POD_NAME", "backend-7d9f-abcde"),
                ("POD_IP", "10.244.1.5"),
                ("POD_NAMESPACE", "lb-demo"),
                ("NODE_NAME", "kind-worker"),
            ]),
            "backend",
            "0.0.0.0".parse().unwrap(),
        );
        assert!(missing.is_empty());
        assert_eq!(identity.pod_name, "backend-7d9f-abcde");
        assert_eq!(identity.pod_ip, "10.244.1.5");
        assert_eq!(identity.namespace, "lb-demo");
        assert_eq!(identity.node_name.as_deref(), Some("kind-worker"));
    }

    #[test]
    fn outside_kubernetes_it_falls_back_and_reports_what_was_missing() {
        let (identity, missing) = Identity::from_env(
            env(&[("HOSTNAME", "laptop")]),
            "backend",
            "0.0.0.0".parse().unwrap(),
        );
        assert_eq!(missing, ["POD_NAME", "POD_IP", "POD_NAMESPACE"]);
        assert_eq!(identity.pod_name, "laptop");
        assert_eq!(identity.pod_ip, "127.0.0.1");
        assert_eq!(identity.namespace, "local");
        assert_eq!(identity.node_name, None);
    }

    #[test]
    fn a_specific_listen_address_is_reported_as_is() {
        let (identity, _) = Identity::from_env(env(&[]), "backend", "127.0.0.2".parse().unwrap());
        assert_eq!(identity.pod_ip, "127.0.0.2");
    }
}
