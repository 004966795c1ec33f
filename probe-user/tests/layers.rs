//! The crate's layering, checked on its own source (CONTRIBUTING.md, "Layers"):
//! - pure modules import only pure modules and touch nothing outside the process: no aya, no
//!   files or /proc, no sockets, no NVML, no blazesym;
//! - system modules import pure and system modules, never `agent` or `server`;
//! - only `kernel` imports aya;
//! - `server` reads snapshots: it imports pure modules only;
//! - no two sibling modules import each other, directly or around a loop.
//!
//! Test code (`tests.rs` files and `#[cfg(test)]` items) is not checked. Parsed with `syn`, so a
//! path is seen wherever it is written: `use` trees, expressions, types.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use syn::visit::Visit;

const PURE: &[&str] = &[
    "attribution",
    "cuda",
    "engine",
    "gpu",
    "health",
    "http",
    "metrics",
    "record",
    "requests",
    "threads",
];
const SYSTEM: &[&str] = &[
    "cudalibs",
    "discover",
    "kernel",
    "nvml",
    "scrape",
    "symbolize",
    "webclient",
];
const WIRING: &[&str] = &["agent", "server"];
/// Crates and std modules that reach outside the process; pure modules use none of them.
const OUTSIDE: &[&str] = &[
    "aya",
    "procfs",
    "nvml_wrapper",
    "blazesym",
    "object",
    "libc",
    "netlink_sys",
    "netlink_packet_core",
    "netlink_packet_sock_diag",
    "tokio",
    "std::fs",
    "std::net",
    "std::process",
    "std::os",
];

/// One source file as a module: its path in the crate (`["http", "conn", "egress"]`).
struct Module {
    path: Vec<String>,
    file: PathBuf,
}

fn modules(src: &Path) -> Vec<Module> {
    let mut out = Vec::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("src is readable") {
            let p = entry.expect("dir entry").path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let rel = p.strip_prefix(src).expect("under src");
            let path: Vec<String> = rel
                .with_extension("")
                .iter()
                .map(|c| c.to_string_lossy().into_owned())
                .collect();
            // The binary's own modules and test files are not part of the library's layers.
            if ["lib", "main", "memleak", "explain", "trace"].contains(&path[0].as_str())
                && path.len() == 1
                || path.last().is_some_and(|l| l == "tests")
                || path.iter().any(|c| c == "tests")
            {
                continue;
            }
            out.push(Module { path, file: p });
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// Every path written in a file, outside `#[cfg(test)]` items, as segments; and string literals.
#[derive(Default)]
struct Paths {
    paths: Vec<Vec<String>>,
    literals: Vec<String>,
}

fn is_cfg_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && a.meta.require_list().is_ok_and(|l| {
                l.tokens
                    .to_string()
                    .split(|c: char| !c.is_alphanumeric() && c != '_')
                    .any(|t| t == "test")
            })
    })
}

fn use_tree(prefix: &mut Vec<String>, tree: &syn::UseTree, out: &mut Vec<Vec<String>>) {
    match tree {
        syn::UseTree::Path(p) => {
            prefix.push(p.ident.to_string());
            use_tree(prefix, &p.tree, out);
            prefix.pop();
        }
        syn::UseTree::Name(n) => {
            let mut v = prefix.clone();
            if n.ident != "self" {
                v.push(n.ident.to_string());
            }
            out.push(v);
        }
        syn::UseTree::Rename(r) => {
            let mut v = prefix.clone();
            v.push(r.ident.to_string());
            out.push(v);
        }
        syn::UseTree::Glob(_) => out.push(prefix.clone()),
        syn::UseTree::Group(g) => {
            for t in &g.items {
                use_tree(prefix, t, out);
            }
        }
    }
}

impl<'ast> Visit<'ast> for Paths {
    fn visit_item(&mut self, i: &'ast syn::Item) {
        let attrs = match i {
            syn::Item::Mod(m) => &m.attrs,
            syn::Item::Fn(f) => &f.attrs,
            syn::Item::Impl(x) => &x.attrs,
            syn::Item::Use(u) => &u.attrs,
            syn::Item::Struct(s) => &s.attrs,
            syn::Item::Const(c) => &c.attrs,
            _ => return syn::visit::visit_item(self, i),
        };
        if !is_cfg_test(attrs) {
            syn::visit::visit_item(self, i);
        }
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        use_tree(&mut Vec::new(), &u.tree, &mut self.paths);
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        self.paths
            .push(p.segments.iter().map(|s| s.ident.to_string()).collect());
        syn::visit::visit_path(self, p);
    }

    fn visit_lit_str(&mut self, l: &'ast syn::LitStr) {
        self.literals.push(l.value());
    }

    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        // format!("/proc/{pid}/...") and friends: the literal is inside the macro's tokens.
        for t in m.tokens.clone() {
            let s = t.to_string();
            if let Some(inner) = s.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
                self.literals.push(inner.to_owned());
            }
        }
        syn::visit::visit_macro(self, m);
    }
}

/// Resolve a written path to the crate module it names (the longest known module prefix), seen
/// from module `from`; `None` for paths outside the crate.
fn resolve(
    from: &[String],
    written: &[String],
    known: &BTreeSet<Vec<String>>,
) -> Option<Vec<String>> {
    let mut base: Vec<String> = match written.first().map(String::as_str) {
        Some("crate") => Vec::new(),
        Some("super") => {
            // `super` of a file module `a/b.rs` is `a`.
            let mut b = from.to_vec();
            b.pop();
            b
        }
        Some("self") => from.to_vec(),
        Some(first) => {
            // A child module named directly (`use conn::X` inside `http`).
            let mut child = from.to_vec();
            child.push(first.to_owned());
            if known.contains(&child) {
                let mut full = child;
                full.extend(written[1..].iter().cloned());
                return longest_known(&full, known);
            }
            return None;
        }
        None => return None,
    };
    let mut rest = &written[1..];
    while rest.first().is_some_and(|s| s == "super") {
        base.pop();
        rest = &rest[1..];
    }
    base.extend(rest.iter().cloned());
    longest_known(&base, known)
}

fn longest_known(path: &[String], known: &BTreeSet<Vec<String>>) -> Option<Vec<String>> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|p| known.contains(p))
}

fn layer(top: &str) -> &'static str {
    if PURE.contains(&top) {
        "pure"
    } else if SYSTEM.contains(&top) {
        "system"
    } else if WIRING.contains(&top) {
        top_static(top)
    } else {
        panic!("module {top} is in no layer: add it to PURE, SYSTEM or WIRING here and in CONTRIBUTING.md")
    }
}

fn top_static(top: &str) -> &'static str {
    WIRING.iter().find(|w| **w == top).expect("wiring")
}

struct Found {
    /// (module, module it references).
    edges: BTreeSet<(Vec<String>, Vec<String>)>,
    /// (module, outside crate or std module written there).
    outside: BTreeSet<(Vec<String>, String)>,
    /// (module, /proc literal).
    proc_literals: BTreeSet<(Vec<String>, String)>,
}

fn scan() -> Found {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mods = modules(&src);
    let known: BTreeSet<Vec<String>> = mods.iter().map(|m| m.path.clone()).collect();
    let mut found = Found {
        edges: BTreeSet::new(),
        outside: BTreeSet::new(),
        proc_literals: BTreeSet::new(),
    };
    for m in &mods {
        let text = std::fs::read_to_string(&m.file).expect("readable source");
        let file = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", m.file.display()));
        let mut p = Paths::default();
        p.visit_file(&file);
        for written in &p.paths {
            if let Some(target) = resolve(&m.path, written, &known) {
                if target != m.path {
                    found.edges.insert((m.path.clone(), target));
                }
            }
            let joined = written.join("::");
            for o in OUTSIDE {
                if joined == *o || joined.starts_with(&format!("{o}::")) {
                    found.outside.insert((m.path.clone(), (*o).to_owned()));
                }
            }
        }
        for l in &p.literals {
            if l.starts_with("/proc") {
                found.proc_literals.insert((m.path.clone(), l.clone()));
            }
        }
    }
    found
}

#[test]
fn layers_hold() {
    let f = scan();
    let mut broken = Vec::new();
    for (from, to) in &f.edges {
        let (a, b) = (from[0].as_str(), to[0].as_str());
        if a == b {
            continue;
        }
        let ok = matches!(
            (layer(a), layer(b)),
            ("pure" | "server", "pure") | ("system", "pure" | "system") | ("agent", _)
        );
        if !ok {
            broken.push(format!(
                "{} ({}) imports {} ({})",
                from.join("::"),
                layer(a),
                to.join("::"),
                layer(b)
            ));
        }
    }
    for (m, o) in &f.outside {
        let top = m[0].as_str();
        let allowed = match layer(top) {
            "pure" => false,
            _ => o != "aya" || top == "kernel",
        };
        if !allowed {
            broken.push(format!("{} ({}) uses {o}", m.join("::"), layer(top)));
        }
    }
    for (m, l) in &f.proc_literals {
        if layer(&m[0]) == "pure" {
            broken.push(format!("{} (pure) names {l:?}", m.join("::")));
        }
    }
    assert!(
        broken.is_empty(),
        "layering broken:\n  {}",
        broken.join("\n  ")
    );
}

/// Sibling modules (children of one parent, or the crate's top-level modules) form no cycle.
/// Parent ↔ child references are normal Rust (a parent re-exports a child; a child uses its
/// parent's types) and are not counted.
#[test]
fn no_import_cycles_between_siblings() {
    let f = scan();
    // parent → (child → children it references).
    let mut graphs: BTreeMap<Vec<String>, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for (from, to) in &f.edges {
        let common = from.iter().zip(to).take_while(|(a, b)| a == b).count();
        if common == from.len() || common == to.len() {
            continue; // one is an ancestor of the other
        }
        graphs
            .entry(from[..common].to_vec())
            .or_default()
            .entry(from[common].clone())
            .or_default()
            .insert(to[common].clone());
    }
    let mut cycles = Vec::new();
    for (parent, g) in &graphs {
        // Depth-first search for a back edge.
        fn visit(
            n: &str,
            g: &BTreeMap<String, BTreeSet<String>>,
            stack: &mut Vec<String>,
            done: &mut BTreeSet<String>,
            out: &mut Vec<String>,
        ) {
            if let Some(i) = stack.iter().position(|s| s == n) {
                out.push(format!("{} → {n}", stack[i..].join(" → ")));
                return;
            }
            if !done.insert(n.to_owned()) {
                return;
            }
            stack.push(n.to_owned());
            for m in g.get(n).into_iter().flatten() {
                visit(m, g, stack, done, out);
            }
            stack.pop();
        }
        let mut done = BTreeSet::new();
        let mut found = Vec::new();
        for n in g.keys() {
            visit(n, g, &mut Vec::new(), &mut done, &mut found);
        }
        for c in found {
            let at = if parent.is_empty() {
                "crate".to_owned()
            } else {
                parent.join("::")
            };
            cycles.push(format!("in {at}: {c}"));
        }
    }
    assert!(
        cycles.is_empty(),
        "import cycles:\n  {}",
        cycles.join("\n  ")
    );
}

/// The checker itself sees what it must: a known edge, a known use of aya, a /proc literal.
#[test]
fn the_checker_sees_real_references() {
    let f = scan();
    let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
    assert!(f.edges.contains(&(s(&["agent"]), s(&["kernel"]))));
    assert!(f
        .edges
        .contains(&(s(&["http", "response"]), s(&["http", "sse"]))));
    assert!(f.outside.contains(&(s(&["kernel"]), "aya".to_owned())));
    assert!(f
        .proc_literals
        .iter()
        .any(|(m, _)| m == &s(&["agent", "collector"])));
}

/// One module style in the whole workspace: `foo.rs` + `foo/`, no `mod.rs`, no `#[path]`.
#[test]
fn one_module_style() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut bad = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("readable") {
            let p = entry.expect("dir entry").path();
            let name = p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            if p.is_dir() {
                if !name.starts_with('.') && name != "target" && name != "node_modules" {
                    stack.push(p);
                }
                continue;
            }
            if p.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            if name == "mod.rs" {
                bad.push(format!("{}: a mod.rs file", p.display()));
            }
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            if text.lines().any(|l| l.trim_start().starts_with("#[path")) {
                bad.push(format!("{}: a #[path] attribute", p.display()));
            }
        }
    }
    assert!(bad.is_empty(), "module style:\n  {}", bad.join("\n  "));
}
