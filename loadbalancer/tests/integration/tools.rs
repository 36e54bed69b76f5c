//! The outside tools the tests start: named, with their package, when missing.

use common::testkit::missing_tool;

#[test]
fn every_tool_the_tests_start_is_installed() {
    let list = include_str!("../../../scripts/test-deps.list");
    let path = std::env::var_os("PATH");
    let missing: Vec<String> = list
        .lines()
        .filter_map(|line| {
            line.split_whitespace()
                .next()
                .filter(|t| !t.starts_with('#'))
        })
        .filter_map(|tool| missing_tool(tool, path.clone()))
        .collect();
    assert!(missing.is_empty(), "{}", missing.join("\n"));
}

#[test]
fn a_missing_tool_is_named_with_the_package_to_install() {
    let problem = missing_tool("prometheus", Some("/nonexistent".into())).unwrap();
    assert!(problem.contains("`prometheus`"), "{problem}");
    assert!(
        problem.contains("sudo apt-get install prometheus"),
        "{problem}"
    );
    let problem = missing_tool("dnsmasq", None).unwrap();
    assert!(
        problem.contains("apt-get install dnsmasq-base"),
        "{problem}"
    );
}
