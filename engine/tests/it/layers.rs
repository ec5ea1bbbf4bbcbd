//! The engine's modules form a DAG: no two top-level modules import each other, directly or
//! around a circle, and neither do two files or folders inside one module. Read from the
//! source's `crate::` and `super::` paths, so the test fails the moment a cycle is written.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module path, e.g. `["transport", "edge"]`.
type Module = Vec<String>;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every module of the crate, by its file, with the file's text.
fn modules() -> BTreeMap<Module, String> {
    fn walk(dir: &Path, prefix: &[String], out: &mut BTreeMap<Module, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_string_lossy().to_string();
            if path.is_dir() {
                let mut inner = prefix.to_vec();
                inner.push(name);
                walk(&path, &inner, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let mut module = prefix.to_vec();
                if !matches!(name.as_str(), "mod" | "lib" | "main") {
                    module.push(name.clone());
                } else if name == "main" {
                    continue; // the binary may use anything
                }
                out.insert(module, std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(&src(), &[], &mut out);
    out
}

/// The paths a file names: `crate::a::b`, `super::c`, and the members of `use crate::{…}`.
fn referenced(module: &Module, text: &str) -> Vec<Module> {
    let code: String = text.lines().filter(|l| !l.trim_start().starts_with("//")).map(|l| format!("{l}\n")).collect();
    let ident = |s: &str| s.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>();
    let mut out = Vec::new();
    for (at, _) in code.match_indices("crate::").chain(code.match_indices("super::")) {
        let before = code[..at].chars().last();
        // Part of a longer path (`super::super::`, `x::crate`): the path's start handles it.
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let mut base: Module = if code[at..].starts_with("crate::") { Vec::new() } else { module.clone() };
        let mut rest = &code[at..];
        loop {
            if let Some(r) = rest.strip_prefix("crate::") {
                rest = r;
            } else if let Some(r) = rest.strip_prefix("super::") {
                base.pop();
                rest = r;
            } else {
                break;
            }
        }
        // `{a, b::c}`: each member's first segment; else the path's segments.
        if let Some(group) = rest.strip_prefix('{') {
            let inner = &group[..group.find('}').unwrap_or(group.len())];
            for item in inner.split(',') {
                let mut m = base.clone();
                m.extend(item.trim().split("::").map(ident).filter(|s| !s.is_empty()));
                out.push(m);
            }
        } else {
            let mut m = base;
            for seg in rest.split("::") {
                let s = ident(seg);
                if s.is_empty() {
                    break;
                }
                m.push(s.clone());
                if s.len() != seg.len() {
                    break;
                }
            }
            out.push(m);
        }
    }
    out
}

/// The longest known module a path starts with.
fn resolve(path: &Module, known: &BTreeSet<Module>) -> Option<Module> {
    (1..=path.len()).rev().map(|n| path[..n].to_vec()).find(|m| known.contains(m))
}

/// A cycle in `edges`, if there is one, as the modules around it.
fn cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for m in edges.get(n).into_iter().flatten() {
            match state.get(m.as_str()).copied().unwrap_or(0) {
                1 => {
                    let from = stack.iter().position(|s| s == m).unwrap();
                    let mut c = stack[from..].to_vec();
                    c.push(m.clone());
                    return Some(c);
                }
                0 => {
                    if let Some(c) = visit(m, edges, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in edges.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(n, edges, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

/// Import edges between the children of `parent` (the top level when empty).
fn edges_under(parent: &[String], mods: &BTreeMap<Module, String>) -> BTreeMap<String, BTreeSet<String>> {
    let known: BTreeSet<Module> = mods.keys().cloned().collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let child = |m: &Module| (m.len() > parent.len() && m.starts_with(parent)).then(|| m[parent.len()].clone());
    for (module, text) in mods {
        let Some(from) = child(module) else { continue };
        for path in referenced(module, text) {
            let Some(to) = resolve(&path, &known).as_ref().and_then(child) else { continue };
            if to != from {
                edges.entry(from.clone()).or_default().insert(to);
            }
        }
    }
    edges
}

#[test]
fn engine_modules_form_a_dag() {
    let mods = modules();
    assert!(mods.len() > 30, "found the engine's modules");
    let parents: BTreeSet<Module> = mods.keys().filter(|m| !m.is_empty()).map(|m| m[..m.len() - 1].to_vec()).collect();
    let mut checked = 0;
    for parent in parents {
        let edges = edges_under(&parent, &mods);
        if let Some(c) = cycle(&edges) {
            let place =
                if parent.is_empty() { "engine/src".to_string() } else { format!("engine/src/{}", parent.join("/")) };
            panic!("modules in {place} import each other in a circle: {}", c.join(" -> "));
        }
        checked += edges.len();
    }
    assert!(checked > 20, "import edges were read ({checked})");
}

#[test]
fn the_check_sees_a_cycle_when_there_is_one() {
    let mut mods = BTreeMap::new();
    mods.insert(vec!["a".to_string()], "use crate::b::Thing;".to_string());
    mods.insert(vec!["b".to_string()], "use crate::{c::More, x};".to_string());
    mods.insert(vec!["c".to_string()], "fn f() { super::a::g() }".to_string());
    let edges = edges_under(&[], &mods);
    assert_eq!(cycle(&edges), Some(vec!["a".into(), "b".into(), "c".into(), "a".into()]));
    mods.insert(vec!["c".to_string()], "// crate::a is only mentioned\nfn f() {}".to_string());
    assert_eq!(cycle(&edges_under(&[], &mods)), None);
}
