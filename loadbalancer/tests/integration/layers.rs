//! The load balancer's modules as layers: every `use crate::...` points down.
//!
//! Read the list from the bottom: each layer may use only the layers above
//! it in this list. A learner who opens `src/lib.rs` finds the modules in
//! this order, so a request and a change each read one way.

use std::path::Path;

use common::testkit::layers::{Layer, assert_points_down, crate_paths};

const LAYERS: &[Layer] = &[
    Layer {
        modules: &["connections"],
        why: "connections to a backend, by address: no knowledge of the balancer",
    },
    Layer {
        modules: &["balancer"],
        why: "the snapshot, algorithms, health and the counters they read: no knowledge of HTTP",
    },
    Layer {
        modules: &["config"],
        why: "the config file and flags, checked into the balancer's terms",
    },
    Layer {
        modules: &["discovery", "proxy", "tcp"],
        why: "where backends come from, the HTTP path, the TCP path: side by side, none uses another",
    },
    Layer {
        modules: &["metrics"],
        why: "encodes what the layers below counted, at scrape time",
    },
    Layer {
        modules: &["admin"],
        why: "the admin port: health, metrics, the backends as JSON and the page",
    },
    Layer {
        modules: &["reload"],
        why: "applies a changed config file to the running parts",
    },
    Layer {
        modules: &["server"],
        why: "wires everything together and runs it until shutdown",
    },
];

#[test]
fn every_use_of_the_crate_points_down_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    assert_points_down(&src, LAYERS);
}

#[test]
fn the_crate_doc_lists_every_module_in_layer_order() {
    let lib =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    let layout = &lib[lib.find("# Layout").expect("a Layout section in lib.rs")..];
    let listed: Vec<&str> = layout
        .lines()
        .filter_map(|line| line.strip_prefix("//! - [`"))
        .filter_map(|rest| rest.split('`').next())
        .collect();
    let layered: Vec<&str> = LAYERS
        .iter()
        .flat_map(|l| l.modules.iter().copied())
        .collect();
    assert_eq!(
        listed, layered,
        "lib.rs's Layout, in the order of the layers"
    );
    let declared: Vec<&str> = lib
        .lines()
        .filter_map(|line| line.strip_prefix("pub mod "))
        .map(|m| m.trim_end_matches(';'))
        .collect();
    let mut sorted = layered.clone();
    sorted.sort();
    assert_eq!(declared, sorted, "every module of lib.rs is in a layer");
}

#[test]
fn the_check_sees_grouped_nested_and_inline_paths() {
    let text = "use crate::{balancer::{Backend, stats}, config};\n\
                // use crate::admin;\n\
                let x = crate::proxy::error(); use $crate::nothing;";
    let found: Vec<String> = crate_paths(text).into_iter().collect();
    assert_eq!(found, ["balancer", "config", "proxy"]);
}
