//! The import graph of a crate's top-level modules, and its cycles: what
//! the crates' `tests/layering.rs` check, so that "imports point one way"
//! stays true.
//!
//! A top-level module is a file `src/<name>.rs` or a folder `src/<name>/`.
//! Module `a` imports module `b` when a file of `a` names `crate::b` (in a
//! `use`, a path or a macro; doc comments, comments, string literals and
//! `#[cfg(test)]` modules are left out: tests may reach anywhere), or, in
//! `src/a.rs` itself, `super::b`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// `module → the modules it imports`, over every top-level module of the
/// crate whose source folder is `src` (each module listed, importing
/// nothing or not).
///
/// # Panics
///
/// When `src` cannot be read.
#[must_use]
pub fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut modules: BTreeMap<String, Vec<std::path::PathBuf>> = BTreeMap::new();
    for entry in std::fs::read_dir(src).expect("the source folder") {
        let path = entry.expect("a folder entry").path();
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_owned();
        if path.is_dir() {
            let mut files = Vec::new();
            rust_files(&path, &mut files);
            modules.entry(name).or_default().extend(files);
        } else if path.extension().is_some_and(|e| e == "rs")
            && !matches!(name.as_str(), "lib" | "main")
        {
            modules.entry(name).or_default().push(path);
        }
    }
    let names: BTreeSet<String> = modules.keys().cloned().collect();
    modules
        .iter()
        .map(|(m, files)| {
            let mut uses = BTreeSet::new();
            for f in files {
                let text = std::fs::read_to_string(f).expect("a source file");
                let top_file = f.parent() == Some(src);
                for target in imports(&code_only(&text), top_file) {
                    if target != *m && names.contains(&target) {
                        uses.insert(target);
                    }
                }
            }
            (m.clone(), uses)
        })
        .collect()
}

/// The cycles of `graph`: one per strongly connected set of more than one
/// module (each listed in order), empty when imports point one way.
#[must_use]
pub fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Tarjan's algorithm, iterative enough for a few dozen modules.
    struct State<'g> {
        graph: &'g BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on_stack: BTreeSet<&'g str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'g>(s: &mut State<'g>, v: &'g str) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.graph.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut set = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                set.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if set.len() > 1 {
                set.sort();
                s.out.push(set);
            }
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out
}

/// Fails with the edges of each cycle when the crate whose source folder
/// is `src` has an import cycle between its top-level modules.
///
/// # Panics
///
/// On a cycle, or when `src` holds too few modules to be a crate's source.
pub fn assert_acyclic(src: &Path) {
    let graph = graph(src);
    assert!(graph.len() > 5, "modules found: {graph:?}");
    let cycles = cycles(&graph);
    let why: String = cycles.iter().map(|c| explain(&graph, c)).collect();
    assert!(cycles.is_empty(), "import cycles:\n{why}");
}

/// Every edge of `graph` between two modules of `cycle`, as `a → b` lines:
/// what a failing check prints.
#[must_use]
pub fn explain(graph: &BTreeMap<String, BTreeSet<String>>, cycle: &[String]) -> String {
    let mut out = String::new();
    for a in cycle {
        for b in graph.get(a).into_iter().flatten() {
            if cycle.contains(b) {
                out.push_str(&format!("  {a} → {b}\n"));
            }
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("a source folder") {
        let path = entry.expect("a folder entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The source without comments, string and char literals, and
/// `#[cfg(test)]` items.
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        let rest = &text[i..];
        if rest.starts_with("//") {
            i += rest.find('\n').unwrap_or(rest.len());
        } else if rest.starts_with("/*") {
            i += rest.find("*/").map_or(rest.len(), |e| e + 2);
        } else if rest.starts_with("r#\"") || rest.starts_with("r\"") {
            let hashes = rest[1..].chars().take_while(|c| *c == '#').count();
            let close = format!("\"{}", "#".repeat(hashes));
            let body = 2 + hashes;
            i += rest[body..]
                .find(&close)
                .map_or(rest.len(), |e| body + e + close.len());
            out.push_str("\"\"");
        } else if b[i] == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            i = (j + 1).min(b.len());
            out.push_str("\"\"");
        } else if b[i] == b'\'' && rest.len() > 3 && b[i + 1] == b'\\' {
            // An escaped char literal ('\n', '\'', '\u{..}').
            i += rest[3..].find('\'').map_or(rest.len(), |e| e + 4);
        } else if b[i] == b'\'' && rest.len() > 2 && rest.as_bytes()[2] == b'\'' {
            // A char literal ('a'); a lifetime has no closing quote.
            i += 3;
        } else if let Some(item) = rest.strip_prefix("#[cfg(test)]") {
            i += skip_item(item) + "#[cfg(test)]".len();
        } else {
            let ch = rest.chars().next().unwrap_or(' ');
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

/// The length of the item at the start of `rest`: up to its `;` or its
/// matching closing brace.
fn skip_item(rest: &str) -> usize {
    let mut depth = 0usize;
    for (k, c) in rest.char_indices() {
        match c {
            ';' if depth == 0 => return k + 1,
            '{' => depth += 1,
            '}' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return k + 1;
                }
            }
            _ => {}
        }
    }
    rest.len()
}

/// The top-level modules named by `crate::<m>` (and, in a top-level file,
/// `super::<m>`), including inside `use crate::{a, b::c}` groups.
fn imports(code: &str, top_file: bool) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut prefixes = vec!["crate::"];
    if top_file {
        prefixes.push("super::");
    }
    for p in prefixes {
        let mut from = 0;
        while let Some(k) = code[from..].find(p) {
            let at = from + k;
            from = at + p.len();
            let before = code[..at].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let rest = &code[from..];
            if let Some(group) = rest.strip_prefix('{') {
                // `crate::{a, b::c, d::{e, f}}`: the first segment of each.
                let mut depth = 0usize;
                let mut seg = String::new();
                let mut first = true;
                for c in group.chars() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            if first && !seg.is_empty() {
                                out.insert(std::mem::take(&mut seg));
                            }
                            first = true;
                            seg.clear();
                            continue;
                        }
                        _ => {}
                    }
                    if depth == 0 && first {
                        if c.is_alphanumeric() || c == '_' {
                            seg.push(c);
                        } else if !seg.is_empty() {
                            out.insert(std::mem::take(&mut seg));
                            first = false;
                        }
                    }
                }
                if first && !seg.is_empty() {
                    out.insert(seg);
                }
            } else {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, rel: &str, text: &str) {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn finds_a_cycle_between_folders() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path();
        write(src, "lib.rs", "pub mod a;\npub mod b;\npub mod c;\n");
        write(src, "a/mod.rs", "use crate::b::Thing;\n");
        write(src, "b/mod.rs", "mod inner;\n");
        write(src, "b/inner.rs", "pub fn f() { crate::a::g(); }\n");
        write(src, "c.rs", "use super::{a, b::x};\n");
        let g = graph(src);
        assert_eq!(g["c"], ["a", "b"].map(String::from).into());
        let c = cycles(&g);
        assert_eq!(c, vec![vec!["a".to_owned(), "b".to_owned()]]);
        assert_eq!(explain(&g, &c[0]), "  a → b\n  b → a\n");
    }

    #[test]
    fn comments_strings_and_tests_are_not_imports() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path();
        write(
            src,
            "a.rs",
            "//! see [`crate::b`]\n/// [`crate::b::X`]\nfn f() { let _ = \"crate::b\"; let c = '\"'; }\n\
             /* crate::b */\n#[cfg(test)]\nmod tests { use crate::b; }\n",
        );
        write(src, "b.rs", "use crate::a;\n");
        let g = graph(src);
        assert!(g["a"].is_empty(), "{g:?}");
        assert!(cycles(&g).is_empty());
    }
}
