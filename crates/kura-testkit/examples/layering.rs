//! Prints the import graph of a crate's top-level modules and its cycles:
//! `cargo run -p kura-testkit --example layering -- crates/kura-server/src`.
//! Exits 1 when there is a cycle.

fn main() {
    let src = std::env::args().nth(1).unwrap_or_else(|| "src".to_owned());
    let graph = kura_testkit::layering::graph(std::path::Path::new(&src));
    for (m, uses) in &graph {
        let list: Vec<&str> = uses.iter().map(String::as_str).collect();
        println!("{m} → {}", list.join(", "));
    }
    let cycles = kura_testkit::layering::cycles(&graph);
    for c in &cycles {
        println!("cycle: {}", c.join(", "));
        print!("{}", kura_testkit::layering::explain(&graph, c));
    }
    if !cycles.is_empty() {
        std::process::exit(1);
    }
}
