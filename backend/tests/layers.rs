//! The backend's modules as layers: every `use crate::...` points down.

use std::path::Path;

use common::testkit::layers::{Layer, assert_points_down};

const LAYERS: &[Layer] = &[
    Layer {
        modules: &["config", "identity", "metrics", "tcp"],
        why: "the config file, who this pod is, the counters, the TCP echo: each stands alone",
    },
    Layer {
        modules: &["routes"],
        why: "the HTTP routes, over the identity and the counters",
    },
    Layer {
        modules: &["reload", "server"],
        why: "a changed config applied to the routes' state; serving the routes until shutdown",
    },
];

#[test]
fn every_use_of_the_crate_points_down_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    assert_points_down(&src, LAYERS);
}
