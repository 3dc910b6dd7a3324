//! Imports point one way: no cycle between the crate's top-level modules
//! (see [`kura_testkit::layering`] for what counts as an import).

#[test]
fn no_import_cycle_between_top_level_modules() {
    kura_testkit::layering::assert_acyclic(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
    );
}
