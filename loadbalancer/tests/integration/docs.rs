//! The README and `docs/` are checked like code: what they name exists, and
//! the commands that need no cluster run.
//!
//! - Every relative link points at a file that exists; a link whose text is
//!   a code name (`` [`Proxy::handle`](../loadbalancer/src/proxy/mod.rs) ``)
//!   names something that file defines.
//! - Every metric named (`loadbalancer_...`, `backend_...`) is exported by a
//!   running binary.
//! - Every config field named (`` `"algorithm"` ``, `` `"mode": "tcp"` ``)
//!   is one the load balancer's or the backend's config accepts.
//! - Every `make` target named exists (`make -n`); blocks marked
//!   ```` ```sh local ```` are run, line by line, on loopback.
//!
//! `make demo` itself is run by CI (`.ci/run`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::LazyLock;

use crate::support::{start_backend_named, start_backends, start_load_balancer};
use common::testkit::{Http, PATIENCE, Process, binary, poll};
use serde_json::json;

/// The workspace root.
static ROOT: LazyLock<PathBuf> = LazyLock::new(|| {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
});

/// The folders of the workspace a path in the docs may start with.
const ROOTS: [&str; 8] = [
    "backend/",
    "common/",
    "docs/",
    "fake-apiserver/",
    "k8s/",
    "loadbalancer/",
    "scripts/",
    ".ci/",
];

/// A page of the docs, with its path (relative to the root) and its text.
struct Page {
    path: PathBuf,
    text: String,
}

impl Page {
    /// Fenced code blocks: (info string, body).
    fn blocks(&self) -> Vec<(String, String)> {
        let mut blocks = Vec::new();
        let mut open: Option<(String, String)> = None;
        for line in self.text.lines() {
            let fence = line.trim_start().strip_prefix("```");
            match (&mut open, fence) {
                (None, Some(info)) => open = Some((info.trim().to_owned(), String::new())),
                (Some(_), Some(_)) => blocks.push(open.take().unwrap()),
                (Some((_, body)), None) => {
                    body.push_str(line);
                    body.push('\n');
                }
                (None, None) => {}
            }
        }
        blocks
    }

    /// The text outside fenced blocks.
    fn prose(&self) -> String {
        let mut inside = false;
        let mut prose = String::new();
        for line in self.text.lines() {
            if line.trim_start().starts_with("```") {
                inside = !inside;
            } else if !inside {
                prose.push_str(line);
                prose.push('\n');
            }
        }
        prose
    }

    /// Inline code spans in the prose.
    fn code_spans(&self) -> Vec<String> {
        self.prose()
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect()
    }

    /// Markdown links `[text](target)` in the prose.
    fn links(&self) -> Vec<(String, String)> {
        let prose = self.prose().replace('\n', " ");
        let mut links = Vec::new();
        let mut rest = prose.as_str();
        while let Some(start) = rest.find("](") {
            let text_start = rest[..start].rfind('[').map_or(start, |i| i + 1);
            let text = rest[text_start..start].to_owned();
            let after = &rest[start + 2..];
            let end = after.find(')').unwrap_or(after.len());
            links.push((text, after[..end].to_owned()));
            rest = &after[end..];
        }
        links
    }
}

fn pages() -> Vec<Page> {
    let mut paths = vec![PathBuf::from("README.md")];
    for entry in std::fs::read_dir(ROOT.join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            paths.push(path.strip_prefix(&*ROOT).unwrap().to_owned());
        }
    }
    paths.sort();
    paths
        .into_iter()
        .map(|path| Page {
            text: std::fs::read_to_string(ROOT.join(&path)).unwrap(),
            path,
        })
        .collect()
}

/// Whether `source` defines `name` (a function, type, trait, constant or
/// module, or has an `impl` of it).
fn defines(source: &str, name: &str) -> bool {
    [
        "fn", "struct", "enum", "trait", "type", "const", "static", "mod", "impl",
    ]
    .iter()
    .any(|keyword| {
        source
            .match_indices(&format!("{keyword} {name}"))
            .any(|(i, m)| {
                let next = source[i + m.len()..].chars().next();
                !next.is_some_and(|c| c.is_alphanumeric() || c == '_')
            })
    })
}

#[test]
fn every_link_resolves_and_every_code_name_is_defined_where_it_points() {
    let mut problems = Vec::new();
    let mut checked = 0;
    for page in pages() {
        let dir = page.path.parent().unwrap();
        for (text, target) in page.links() {
            if target.starts_with("http")
                || target.starts_with('#')
                || target.starts_with("mailto:")
            {
                continue;
            }
            let file = target.split('#').next().unwrap();
            let path = ROOT.join(dir).join(file);
            if !path.exists() {
                problems.push(format!(
                    "{}: [{text}]({target}): no such file",
                    page.path.display()
                ));
                continue;
            }
            checked += 1;
            let Some(name) = text.strip_prefix('`').and_then(|t| t.strip_suffix('`')) else {
                continue;
            };
            let is_code_name = name
                .chars()
                .all(|c| c.is_alphanumeric() || c == '_' || c == ':');
            if !is_code_name || !file.ends_with(".rs") {
                continue;
            }
            let source = std::fs::read_to_string(&path).unwrap();
            for part in name.split("::") {
                if !defines(&source, part) {
                    problems.push(format!(
                        "{}: [`{name}`]({target}): {file} defines no `{part}`",
                        page.path.display()
                    ));
                }
            }
        }
    }
    // Paths in inline code, such as `loadbalancer/src/proxy/mod.rs`.
    for page in pages() {
        for span in page.code_spans() {
            let is_path = span.contains('/')
                && !span.contains(' ')
                && ROOTS.iter().any(|root| span.starts_with(root));
            if is_path && !ROOT.join(span.trim_end_matches('/')).exists() {
                problems.push(format!("{}: `{span}`: no such file", page.path.display()));
            }
            checked += usize::from(is_path);
        }
    }
    assert!(
        checked > 50,
        "only {checked} links and paths found: is the parser broken?"
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// `loadbalancer_*` and `backend_*` names in the pages.
fn metric_names(pages: &[Page]) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for page in pages {
        for word in page
            .text
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        {
            let is_metric = ["loadbalancer_", "backend_"]
                .iter()
                .any(|prefix| word.starts_with(prefix) && word.len() > prefix.len());
            if is_metric {
                names.insert(word.to_owned());
            }
        }
    }
    names
}

/// The metric families (`# TYPE` lines) and sample names of an exposition.
fn exported(exposition: &str, into: &mut BTreeSet<String>) {
    for line in exposition.lines() {
        let name = match line.strip_prefix("# TYPE ") {
            Some(rest) => rest.split(' ').next(),
            None if !line.starts_with('#') => line.split(['{', ' ']).next(),
            None => None,
        };
        into.extend(name.filter(|n| !n.is_empty()).map(str::to_owned));
    }
}

#[tokio::test]
async fn every_metric_the_docs_name_is_exported() {
    let http = Http::new();
    let mut exported_names = BTreeSet::new();
    let backends = start_backends(2);
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    // HTTP mode, with every optional family switched on (no Redis listens
    // on port 1: the shared counter falls back, and says so).
    let lb = start_load_balancer(
        &addrs,
        json!({
            "healthCheck": { "path": "/readyz" },
            "sharedCounter": "redis://127.0.0.1:1",
        }),
    );
    for _ in 0..4 {
        assert_eq!(http.get(&lb.url("/")).await.status, 200);
    }
    exported(
        &String::from_utf8_lossy(&http.get(&lb.admin_url("/metrics")).await.body),
        &mut exported_names,
    );
    let tcp = start_load_balancer(&addrs, json!({ "mode": "tcp" }));
    exported(
        &String::from_utf8_lossy(&http.get(&tcp.admin_url("/metrics")).await.body),
        &mut exported_names,
    );
    let backend_metrics = http.get(&format!("http://{}/metrics", addrs[0])).await;
    exported(
        &String::from_utf8_lossy(&backend_metrics.body),
        &mut exported_names,
    );

    let suffixes = ["", "_total", "_bucket", "_sum", "_count"];
    let missing: Vec<String> = metric_names(&pages())
        .into_iter()
        .filter(|name| {
            !suffixes
                .iter()
                .any(|s| exported_names.contains(&format!("{name}{s}")))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "the docs name metrics no binary exports: {missing:?}\nexported: {exported_names:?}"
    );
}

/// Config field names in inline code: `` `"name"` `` or `` `"name": ...` ``.
fn config_fields(pages: &[Page]) -> BTreeSet<String> {
    let mut fields = BTreeSet::new();
    for page in pages {
        for span in page.code_spans() {
            let Some(rest) = span.strip_prefix('"') else {
                continue;
            };
            let Some((name, after)) = rest.split_once('"') else {
                continue;
            };
            let is_field = name.chars().all(|c| c.is_ascii_alphanumeric())
                && (after.is_empty() || after.starts_with(':'));
            if is_field && !name.is_empty() {
                fields.insert(name.to_owned());
            }
        }
    }
    fields
}

/// Whether the config parser at hand knows `field`: anything but "unknown
/// field" (a type error for `null` is fine) means it does.
fn known(parse: impl Fn(&str) -> Result<(), String>, field: &str) -> bool {
    match parse(&json!({ field: null }).to_string()) {
        Ok(()) => true,
        Err(e) => !e.contains("unknown field"),
    }
}

#[test]
fn every_config_field_the_docs_name_is_accepted_by_a_config() {
    let load_balancer = |text: &str| {
        serde_json::from_str::<loadbalancer::config::FileConfig>(text)
            .map(drop)
            .map_err(|e| e.to_string())
    };
    let health_check = |text: &str| {
        serde_json::from_str::<loadbalancer::balancer::checker::HealthCheck>(text)
            .map(drop)
            .map_err(|e| e.to_string())
    };
    let backend = |text: &str| {
        backend::config::Config::parse(Path::new("docs"), text)
            .map(drop)
            .map_err(|e| e.to_string())
    };
    let fields = config_fields(&pages());
    assert!(fields.len() > 10, "only {fields:?}: is the parser broken?");
    let unknown: Vec<&String> = fields
        .iter()
        .filter(|f| !known(load_balancer, f) && !known(health_check, f) && !known(backend, f))
        .collect();
    assert!(
        unknown.is_empty(),
        "the docs name config fields no config accepts: {unknown:?}"
    );
    // The check itself can fail.
    assert!(!known(load_balancer, "algorithmm"));
}

/// `make TARGET [VAR=value...]` in code blocks and inline code, as
/// argument lists.
fn make_commands(pages: &[Page]) -> BTreeSet<Vec<String>> {
    let mut commands = BTreeSet::new();
    for page in pages {
        let block_lines: Vec<String> = page
            .blocks()
            .into_iter()
            .flat_map(|(_, body)| body.lines().map(str::to_owned).collect::<Vec<_>>())
            .collect();
        for line in block_lines.iter().chain(&page.code_spans()) {
            let line = line.trim().trim_start_matches("$ ");
            let line = line.split("  #").next().unwrap().trim();
            if let Some(args) = line.strip_prefix("make ") {
                commands.insert(args.split_whitespace().map(str::to_owned).collect());
            }
        }
    }
    commands
}

#[test]
fn every_make_target_the_docs_use_exists() {
    let commands = make_commands(&pages());
    assert!(
        commands.len() > 5,
        "only {commands:?}: is the parser broken?"
    );
    for args in commands {
        let output = Command::new("make")
            .arg("-n")
            .args(&args)
            .current_dir(&*ROOT)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "make -n {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// Runs one line of a `sh local` block: `cargo run` (directly, or through a
/// `make run-*` target) starts a process that lives until the block ends;
/// anything else must exit 0, retried while the processes start.
fn run_line(line: &str, started: &mut Vec<Process>) {
    let mut line = line.to_owned();
    if line.starts_with("make run-") {
        let output = Command::new("make")
            .args(["-n", "--no-print-directory"])
            .args(line.split_whitespace().skip(1))
            .current_dir(&*ROOT)
            .output()
            .unwrap();
        line = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    }
    if let Some(rest) = line.strip_prefix("cargo run -p ") {
        let (package, args) = rest.split_once(" -- ").unwrap_or((rest, ""));
        let mut command = Command::new(binary(package.trim()));
        command.args(args.split_whitespace()).current_dir(&*ROOT);
        started.push(Process::start(package, command));
        return;
    }
    let mut last = None;
    let ran = poll(PATIENCE, || {
        let output = Command::new("bash")
            .args(["-c", &line])
            .current_dir(&*ROOT)
            .output()
            .unwrap();
        let ok = output.status.success()
            && !output.stdout.is_empty()
            && !String::from_utf8_lossy(&output.stdout).contains("(failed)");
        last = Some(output);
        ok.then_some(())
    });
    let output = last.unwrap();
    assert!(
        ran.is_some(),
        "`{line}` failed: {}\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_local_commands_in_the_docs_run() {
    // What the README's local blocks assume: backends on 9001-9003.
    let _backends: Vec<_> = (1..=3)
        .map(|i| start_backend_named(&format!("backend-{i}"), json!({ "port": 9000 + i })))
        .collect();
    let mut ran = 0;
    for page in pages() {
        for (info, body) in page.blocks() {
            if info != "sh local" {
                continue;
            }
            let mut started = Vec::new();
            for line in body.lines() {
                let line = line.split("  #").next().unwrap().trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                run_line(line, &mut started);
                ran += 1;
            }
            // Processes stop (by PID) as `started` drops, before the next block.
        }
    }
    assert!(ran >= 6, "only {ran} local commands found");
}

#[test]
fn the_code_name_check_can_fail() {
    let source = "pub fn handle() {}\nstruct Proxy;\nfn handled() {}";
    assert!(defines(source, "handle"));
    assert!(defines(source, "Proxy"));
    assert!(!defines(source, "handl"));
    assert!(!defines(source, "pick"));
}
