//! The dependency rule of `src/`, read from the code: which top-level module may name which
//! (`crate::module` paths, in `use` lines or inline), and no cycle among them. A layer that
//! reaches up or sideways fails here with the file and the line, so the map in `src/lib.rs`
//! stays true.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Who may name whom, besides the composition roots below. Everything not listed is refused.
const ALLOWED: &[(&str, &[&str])] = &[
    ("proto", &[]),
    ("domain", &["proto"]),
    ("engine", &["domain"]),
    ("telemetry", &[]),
    ("kafka", &["telemetry"]),
    ("store", &["engine", "domain", "proto", "telemetry"]),
    (
        "scaleout",
        &["store", "domain", "proto", "kafka", "telemetry"],
    ),
    (
        "ingest",
        &[
            "store",
            "engine",
            "domain",
            "proto",
            "scaleout",
            "kafka",
            "telemetry",
        ],
    ),
    (
        "publish",
        &["store", "domain", "proto", "kafka", "telemetry"],
    ),
    (
        "api",
        &[
            "ingest",
            "store",
            "publish",
            "scaleout",
            "domain",
            "proto",
            "telemetry",
        ],
    ),
    ("ctl", &["proto", "domain"]),
];

/// `config` composes every component's section and `daemon` wires the components and the
/// config together: each may name every module listed in [`ALLOWED`] except `ctl`.
const COMPOSITION_ROOTS: [&str; 2] = ["config", "daemon"];

/// The rule in full: [`ALLOWED`], with the composition roots (`daemon` naming `config` too).
fn rule() -> BTreeMap<&'static str, Vec<&'static str>> {
    let mut rule: BTreeMap<&str, Vec<&str>> = ALLOWED
        .iter()
        .map(|(module, targets)| (*module, targets.to_vec()))
        .collect();
    let components: Vec<&str> = ALLOWED
        .iter()
        .map(|(module, _)| *module)
        .filter(|m| *m != "ctl")
        .collect();
    rule.insert("config", components.clone());
    rule.insert("daemon", [components, vec!["config"]].concat());
    rule
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("src/ is readable")
        .map(|e| e.expect("entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file of `src/` belongs to (`src/store/writer/mod.rs` → `store`);
/// `None` for the crate root, the binaries and their modules.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).ok()?;
    let first = relative.components().next()?.as_os_str().to_str()?;
    match first {
        "lib.rs" | "main.rs" | "bin" => None,
        name => Some(name.trim_end_matches(".rs").to_owned()),
    }
}

/// The top-level modules a line names through `crate::`, including every branch of a
/// grouped `use crate::{a::X, b}`.
fn named_modules(line: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("crate::") {
        let after = &rest[at + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            let mut depth = 1;
            let mut at_item_start = true;
            let mut ident = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => {
                        if !ident.is_empty() {
                            names.push(std::mem::take(&mut ident));
                        }
                        at_item_start = true;
                        continue;
                    }
                    _ => {}
                }
                if at_item_start && depth == 1 {
                    if c.is_alphanumeric() || c == '_' {
                        ident.push(c);
                        continue;
                    }
                    if !ident.is_empty() {
                        names.push(std::mem::take(&mut ident));
                        at_item_start = false;
                    }
                }
            }
            if !ident.is_empty() {
                names.push(ident);
            }
        } else {
            let ident: String = after
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !ident.is_empty() {
                names.push(ident);
            }
        }
        rest = after;
    }
    names
}

/// Every (from, to, where) edge between top-level modules in `src/`.
fn edges() -> Vec<(String, String, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(&src, f)).collect();
    let mut edges = Vec::new();
    for file in &files {
        let Some(from) = module_of(&src, file) else {
            continue;
        };
        let text = std::fs::read_to_string(file).expect("readable");
        // A multi-line `use crate::{...}` is read as one statement.
        let joined = text.replace("{\n", "{").replace(",\n", ",");
        for (number, line) in joined.lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            for to in named_modules(line) {
                if to != from && modules.contains(&to) {
                    let place = format!("{}: {}", file.display(), line.trim());
                    edges.push((from.clone(), to, format!("{place} (statement {number})")));
                }
            }
        }
    }
    edges
}

#[test]
fn every_module_names_only_the_layers_it_may_depend_on() {
    let allowed = rule();
    let mut refused = Vec::new();
    for (from, to, place) in edges() {
        let ok = allowed
            .get(from.as_str())
            .is_some_and(|targets| targets.contains(&to.as_str()));
        if !ok {
            refused.push(format!("{from} -> {to}: {place}"));
        }
    }
    assert!(
        refused.is_empty(),
        "imports against the dependency rule (tests/architecture.rs, src/lib.rs):\n{}",
        refused.join("\n")
    );
}

#[test]
fn the_allowed_dependencies_have_no_cycle() {
    let allowed = rule();
    fn visit<'a>(
        node: &'a str,
        allowed: &'a BTreeMap<&'a str, Vec<&'a str>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) {
        if let Some(start) = path.iter().position(|n| *n == node) {
            panic!("cycle: {} -> {node}", path[start..].join(" -> "));
        }
        if !done.insert(node) {
            return;
        }
        path.push(node);
        for next in allowed.get(node).into_iter().flatten() {
            visit(next, allowed, path, done);
        }
        path.pop();
    }
    let mut done = BTreeSet::new();
    for node in allowed.keys() {
        visit(node, &allowed, &mut Vec::new(), &mut done);
    }
}

#[test]
fn every_top_level_module_has_a_place_in_the_rule() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let rule = rule();
    let listed: BTreeSet<&str> = rule.keys().copied().chain(COMPOSITION_ROOTS).collect();
    let unlisted: BTreeSet<String> = files
        .iter()
        .filter_map(|f| module_of(&src, f))
        .filter(|m| !listed.contains(m.as_str()))
        .collect();
    assert!(
        unlisted.is_empty(),
        "modules the rule does not place: {unlisted:?}"
    );
}

#[test]
fn grouped_and_inline_paths_are_all_read() {
    assert_eq!(
        named_modules("use crate::{domain::{A, B}, engine, store::keys};"),
        ["domain", "engine", "store"]
    );
    assert_eq!(
        named_modules("let x = crate::proto::pb::Scan::default(); crate::telemetry::m();"),
        ["proto", "telemetry"]
    );
}
