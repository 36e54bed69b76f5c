//! The collections this server keeps, and how the API names each.

/// Which collection a request or change is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Slices,
    Endpoints,
    Pods,
    Servers,
    Deployments,
    ConfigMaps,
    Services,
}

/// How the API names a collection.
struct Names {
    /// As RBAC, URLs and error messages name it: `endpointslices`.
    resource: &'static str,
    singular: &'static str,
    /// As objects say it: `"kind": "EndpointSlice"`.
    kind: &'static str,
    api_version: &'static str,
    /// What `kubectl get` also accepts (`kubectl get deploy`).
    short_names: &'static [&'static str],
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Slices,
        Kind::Endpoints,
        Kind::Pods,
        Kind::Servers,
        Kind::Deployments,
        Kind::ConfigMaps,
        Kind::Services,
    ];

    fn names(self) -> Names {
        let names = |resource, singular, kind, api_version, short_names| Names {
            resource,
            singular,
            kind,
            api_version,
            short_names,
        };
        match self {
            Kind::Slices => names(
                "endpointslices",
                "endpointslice",
                "EndpointSlice",
                "discovery.k8s.io/v1",
                &[],
            ),
            Kind::Endpoints => names("endpoints", "endpoints", "Endpoints", "v1", &["ep"]),
            Kind::Pods => names("pods", "pod", "Pod", "v1", &["po"]),
            Kind::Servers => names(
                "servers",
                "server",
                "Server",
                "lb.example.com/v1alpha1",
                &[],
            ),
            Kind::Deployments => names(
                "deployments",
                "deployment",
                "Deployment",
                "apps/v1",
                &["deploy"],
            ),
            Kind::ConfigMaps => names("configmaps", "configmap", "ConfigMap", "v1", &["cm"]),
            Kind::Services => names("services", "service", "Service", "v1", &["svc"]),
        }
    }

    /// The collection an object of the manifests belongs in, if this
    /// server keeps that kind.
    pub fn of(object: &serde_json::Value) -> Option<Kind> {
        let (api_version, kind) = (object["apiVersion"].as_str()?, object["kind"].as_str()?);
        Kind::ALL
            .into_iter()
            .find(|k| k.api_version() == api_version && k.kind() == kind)
    }

    /// The collection's URL path, with `{namespace}` for axum to fill.
    pub fn collection_path(self) -> String {
        let group = match self.api_version() {
            "v1" => "/api/v1".to_owned(),
            group => format!("/apis/{group}"),
        };
        format!("{group}/namespaces/{{namespace}}/{}", self.resource())
    }

    pub fn resource(self) -> &'static str {
        self.names().resource
    }

    pub fn singular(self) -> &'static str {
        self.names().singular
    }

    pub fn kind(self) -> &'static str {
        self.names().kind
    }

    pub fn api_version(self) -> &'static str {
        self.names().api_version
    }

    pub fn short_names(self) -> &'static [&'static str] {
        self.names().short_names
    }

    pub fn list_kind(self) -> String {
        format!("{}List", self.kind())
    }

    /// `endpointslices.discovery.k8s.io`, or `pods` in the core group, as
    /// the real server names a resource in its errors.
    pub fn qualified(self) -> String {
        match self.api_version().split_once('/') {
            Some((group, _)) => format!("{}.{group}", self.resource()),
            None => self.resource().to_owned(),
        }
    }
}
