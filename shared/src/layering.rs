//! A test, not code: the crate's modules import each other without cycles. A cycle means a
//! small helper lives in the wrong module (it once did: `protocol` took the pickle refusal from
//! `settings`, which reached `protocol` again through `schedule` and `client`). The check
//! reads the sources as text — every `crate::<module>` outside a module's tests is an edge —
//! so it needs no tool beyond `cargo test`; a module is a top-level file or folder of `src`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module → the modules it names, from the sources under `src`.
fn imports(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut texts: BTreeMap<String, String> = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("src is readable").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path.strip_prefix(src).expect("under src");
            let top = relative
                .components()
                .next()
                .and_then(|c| c.as_os_str().to_str())
                .unwrap_or_default()
                .trim_end_matches(".rs")
                .to_owned();
            if top == "lib" || top == "bin" || top == "main" {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("a source file is readable");
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            texts.entry(top).or_default().push_str(code);
        }
    }
    let modules: BTreeSet<String> = texts.keys().cloned().collect();
    texts
        .iter()
        .map(|(module, code)| {
            let named = code
                .split("crate::")
                .skip(1)
                .filter_map(|rest| {
                    let name: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    (modules.contains(&name) && name != *module).then_some(name)
                })
                .chain(grouped_imports(code, &modules, module))
                .collect();
            (module.clone(), named)
        })
        .collect()
}

/// Modules named inside `use crate::{a, b::c}` groups.
fn grouped_imports<'a>(
    code: &'a str,
    modules: &'a BTreeSet<String>,
    module: &'a str,
) -> impl Iterator<Item = String> + 'a {
    code.split("use crate::{").skip(1).flat_map(move |rest| {
        let group = rest.split('}').next().unwrap_or_default();
        group
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| modules.contains(*w) && *w != module)
            .map(str::to_owned)
            .collect::<Vec<_>>()
    })
}

/// One cycle in `graph`, if there is any, as the modules along it.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    // Depth-first search with an explicit stack: 0 unvisited, 1 on the path, 2 done.
    let mut state: BTreeMap<&str, u8> = BTreeMap::new();
    for start in graph.keys() {
        if state.get(start.as_str()).copied().unwrap_or(0) != 0 {
            continue;
        }
        let mut path: Vec<(&str, Vec<&str>)> = vec![(start, successors(graph, start))];
        state.insert(start, 1);
        while let Some((node, next)) = path.last_mut() {
            let node = *node;
            match next.pop() {
                Some(child) => match state.get(child).copied().unwrap_or(0) {
                    0 => {
                        state.insert(child, 1);
                        path.push((child, successors(graph, child)));
                    }
                    1 => {
                        let from = path.iter().position(|(n, _)| *n == child).unwrap_or(0);
                        let mut cycle: Vec<String> =
                            path[from..].iter().map(|(n, _)| (*n).to_owned()).collect();
                        cycle.push(child.to_owned());
                        return Some(cycle);
                    }
                    _ => {}
                },
                None => {
                    state.insert(node, 2);
                    path.pop();
                }
            }
        }
    }
    None
}

fn successors<'a>(graph: &'a BTreeMap<String, BTreeSet<String>>, node: &str) -> Vec<&'a str> {
    graph
        .get(node)
        .map(|s| s.iter().map(String::as_str).collect())
        .unwrap_or_default()
}

#[test]
fn modules_import_each_other_without_cycles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = imports(&src);
    assert!(graph.len() > 10, "the sources were read: {graph:?}");
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "import cycle: {} — move the helper that closes it down into a module both can use",
            cycle.join(" → ")
        );
    }
}

#[test]
fn the_check_finds_a_cycle_when_there_is_one() {
    let edge = |a: &str, b: &[&str]| (a.to_owned(), b.iter().map(|s| (*s).to_owned()).collect());
    let graph: BTreeMap<String, BTreeSet<String>> = [
        edge("a", &["b"]),
        edge("b", &["c"]),
        edge("c", &["a"]),
        edge("d", &["a"]),
    ]
    .into_iter()
    .collect();
    let cycle = find_cycle(&graph).expect("a → b → c → a");
    assert_eq!(cycle.first(), cycle.last());
    assert_eq!(cycle.len(), 4);
    let acyclic: BTreeMap<String, BTreeSet<String>> =
        [edge("a", &["b"]), edge("b", &["c"]), edge("c", &[])]
            .into_iter()
            .collect();
    assert_eq!(find_cycle(&acyclic), None);
}
