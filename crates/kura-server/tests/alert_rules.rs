//! The alerting rules in `deploy/prometheus/kura-rules.yml`: valid
//! (`promtool check rules`), their unit tests pass (`promtool test rules`),
//! and every series they name is one kura emits (described in the
//! library's or the service's metrics).
//!
//! Needs `promtool` (Debian's `prometheus` package; `.ci/run` installs it).
//! Without it the test says so and passes only outside CI: under `CI=true`
//! a missing `promtool` fails.

use std::path::PathBuf;
use std::process::Command;

fn deploy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/prometheus")
}

fn promtool() -> Option<PathBuf> {
    let found = Command::new("promtool").arg("--version").output().is_ok();
    if found {
        return Some(PathBuf::from("promtool"));
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "promtool not found: install Debian's `prometheus` package (apt-get install prometheus)"
    );
    eprintln!(
        "SKIPPED: promtool not found (apt-get install prometheus); the rules were not checked"
    );
    None
}

fn run(tool: &PathBuf, args: &[&str]) {
    let out = Command::new(tool)
        .args(args)
        .current_dir(deploy())
        .output()
        .expect("promtool runs");
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_rules_are_valid_and_their_tests_pass() {
    let Some(tool) = promtool() else { return };
    run(&tool, &["check", "rules", "kura-rules.yml"]);
    run(&tool, &["test", "rules", "kura-rules.test.yml"]);
}

#[test]
fn every_series_the_rules_name_exists() {
    let rules = std::fs::read_to_string(deploy().join("kura-rules.yml")).unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let described = [
        std::fs::read_to_string(root.join("crates/kura/src/metrics.rs")).unwrap(),
        std::fs::read_to_string(root.join("crates/kura-server/src/telemetry/mod.rs")).unwrap(),
    ]
    .concat();
    let mut named = 0;
    for word in rules.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("cache_") && word != "cache_type" {
            named += 1;
            assert!(
                described.contains(&format!("\"{word}\"")),
                "the rules name {word}, which kura does not describe"
            );
        }
    }
    assert!(named >= 5, "the rules name {named} series");
}
