//! The layering of a crate, checked from its `use crate::...` lines.
//!
//! Each crate's layering test (`layers.rs` in its tests) lists its modules from the bottom layer
//! up, with why each sits where it does; a module may use only modules of
//! the layers below its own. A backward arrow fails the test with the
//! reason written beside the layer it breaks.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// One layer: its modules (top-level, as `src/` names them) and why it is there.
#[derive(Debug)]
pub struct Layer {
    pub modules: &'static [&'static str],
    pub why: &'static str,
}

/// Fails, listing every backward arrow, unless `src` holds to `layers`.
pub fn assert_points_down(src: &Path, layers: &[Layer]) {
    let problems = backward_arrows(src, layers);
    assert!(
        problems.is_empty(),
        "arrows that point the wrong way:\n{}",
        problems.join("\n")
    );
}

/// Every arrow in `src` that points up or sideways, as readable lines;
/// empty when the layering holds. A module that no layer names is one too.
pub fn backward_arrows(src: &Path, layers: &[Layer]) -> Vec<String> {
    let layer_of = |module: &str| layers.iter().position(|l| l.modules.contains(&module));
    let mut problems = Vec::new();
    for file in rust_files(src) {
        let relative = file.strip_prefix(src).unwrap_or(&file);
        let module = top_module(relative);
        if module == "lib" || module == "main" {
            continue;
        }
        let Some(own) = layer_of(&module) else {
            problems.push(format!(
                "{}: module `{module}` is in no layer; add it to the list, with why",
                relative.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        for used in crate_paths(&text) {
            if used == module {
                continue;
            }
            match layer_of(&used) {
                Some(theirs) if theirs < own => {}
                found => {
                    let allowed: Vec<&str> = layers[..own]
                        .iter()
                        .flat_map(|l| l.modules.iter().copied())
                        .collect();
                    let which = found.map_or("no layer".to_owned(), |l| format!("layer {}", l + 1));
                    problems.push(format!(
                        "{} uses crate::{used} ({which}), but `{module}` is layer {} ({}) and may only use: {}",
                        relative.display(),
                        own + 1,
                        layers[own].why,
                        if allowed.is_empty() { "nothing in the crate".to_owned() } else { allowed.join(", ") },
                    ));
                }
            }
        }
    }
    problems
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// `balancer/stats.rs` and `balancer.rs` are both `balancer`.
fn top_module(relative: &Path) -> String {
    let first = relative.components().next();
    let first = first.map_or_else(String::new, |c| {
        c.as_os_str().to_string_lossy().into_owned()
    });
    first.trim_end_matches(".rs").to_owned()
}

/// The top-level modules that `crate::` paths in `text` name, comments
/// left out: `crate::a::b` gives `a`, `crate::{a, b::c}` gives `a` and `b`.
pub fn crate_paths(text: &str) -> BTreeSet<String> {
    let code: String = text
        .lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut used = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue; // `$crate::` or a longer name
        }
        if let Some(group) = rest.strip_prefix('{') {
            let end = closing_brace(group);
            used.extend(
                top_level_items(&group[..end])
                    .into_iter()
                    .map(first_segment),
            );
        } else {
            used.insert(first_segment(rest));
        }
    }
    used.retain(|m| !m.is_empty() && m != "self");
    used
}

fn closing_brace(group: &str) -> usize {
    let mut depth = 0;
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => return i,
            '}' => depth -= 1,
            _ => {}
        }
    }
    group.len()
}

fn top_level_items(group: &str) -> Vec<&str> {
    let (mut items, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&group[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&group[start..]);
    items
}

fn first_segment(path: &str) -> String {
    path.trim_start()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}
