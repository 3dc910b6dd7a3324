//! The `kura` binary against SQLite: migrate, seed, token, warm,
//! invalidate and stats (with the machine's Redis under a namespace of its
//! own, so the cache commands have something to act on).

mod support;

use std::path::Path;
use std::process::Output;

use serde_json::Value;
use uuid::Uuid;

fn kura(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kura"));
    cmd.current_dir(dir)
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .env_remove("KURA_JWT_SECRET")
        .env_remove("KURA_NAMESPACE")
        .env("RUST_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run kura");
    assert!(
        out.status.success(),
        "kura {args:?} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

#[test]
fn commands_against_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite:{}", dir.path().join("cli.db").display());
    let ns = format!("t_{}", support::random_suffix());
    let redis = support::redis_url();
    let env = [
        ("DATABASE_URL", db.as_str()),
        ("REDIS_URL", redis.as_str()),
        ("KURA_NAMESPACE", ns.as_str()),
    ];

    let out = kura(dir.path(), &["migrate"], &env);
    assert!(
        stdout(&out).contains("migrations applied (sqlite)"),
        "{}",
        stdout(&out)
    );

    let ids_file = dir.path().join("ids.txt");
    let out = kura(
        dir.path(),
        &[
            "seed",
            "--profiles",
            "1000",
            "--seed",
            "3",
            "--ids-out",
            ids_file.to_str().unwrap(),
        ],
        &env,
    );
    assert!(
        stdout(&out).contains("seeded 1000 profiles (1000 new)"),
        "{}",
        stdout(&out)
    );
    let ids: Vec<Uuid> = std::fs::read_to_string(&ids_file)
        .unwrap()
        .lines()
        .map(|l| Uuid::parse_str(l).unwrap())
        .collect();
    assert_eq!(ids.len(), 1000);
    // Deterministic: the same seed gives the same users (all present now).
    let again = dir.path().join("ids2.txt");
    let out = kura(
        dir.path(),
        &[
            "seed",
            "--profiles",
            "10",
            "--seed",
            "3",
            "--ids-out",
            again.to_str().unwrap(),
        ],
        &env,
    );
    assert!(stdout(&out).contains("(0 new)"), "{}", stdout(&out));
    let first10: Vec<String> = std::fs::read_to_string(&again)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        first10,
        ids[..10].iter().map(Uuid::to_string).collect::<Vec<_>>()
    );

    // token: an HS256 token with sub, roles and exp.
    let sub = ids[0].to_string();
    let out = kura(
        dir.path(),
        &["token", "--sub", &sub, "--admin", "--ttl", "120"],
        &[("KURA_JWT_SECRET", "s3cret")],
    );
    let token = stdout(&out).trim().to_owned();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    v.validate_aud = false;
    let claims: Value = jsonwebtoken::decode(
        &token,
        &jsonwebtoken::DecodingKey::from_secret(b"s3cret"),
        &v,
    )
    .expect("valid token")
    .claims;
    assert_eq!(claims["sub"], sub.as_str());
    assert_eq!(claims["roles"], serde_json::json!(["admin"]));
    let exp = claims["exp"].as_u64().unwrap();
    assert!(exp > support::now() + 100 && exp <= support::now() + 120);

    // warm: seeded logins are spread over 30 days.
    let out = kura(
        dir.path(),
        &["warm", "--limit", "5000", "--since-days", "31", "--quiet"],
        &env,
    );
    assert!(
        stdout(&out).contains("cached 1000 profiles"),
        "{}",
        stdout(&out)
    );

    let out = kura(dir.path(), &["stats", "--json"], &env);
    let stats: Value = serde_json::from_str(stdout(&out).trim()).expect("stats JSON");
    for k in ["hits", "misses", "total", "hit_rate"] {
        assert!(stats.get(k).is_some(), "{k} in {stats}");
    }
    let out = kura(dir.path(), &["stats"], &env);
    assert!(stdout(&out).contains("hit rate"), "{}", stdout(&out));

    let out = kura(dir.path(), &["invalidate", "--user", &sub], &env);
    assert!(
        stdout(&out).contains("deleted 1 entries"),
        "{}",
        stdout(&out)
    );
    let id1 = ids[1].to_string();
    let glob = format!("{ns}:profile:{}?", &id1[..id1.len() - 1]);
    let out = kura(dir.path(), &["invalidate", "--pattern", &glob], &env);
    assert!(
        stdout(&out).contains("deleted 1 entries"),
        "{}",
        stdout(&out)
    );
    // A clear: one step, whatever the number of profiles (Redis does not
    // count them).
    let epoch_of = |out: &str| -> u64 {
        out.split("(epoch ")
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no epoch in {out:?}"))
    };
    let out = kura(dir.path(), &["invalidate", "--all-profiles"], &env);
    assert!(
        stdout(&out).contains("cleared every cached profile (epoch "),
        "{}",
        stdout(&out)
    );
    let first = epoch_of(&stdout(&out));
    let out = kura(dir.path(), &["invalidate", "--tag", "kind:profile"], &env);
    assert!(
        stdout(&out).contains("cleared every value tagged kind:profile (epoch "),
        "{}",
        stdout(&out)
    );
    assert!(epoch_of(&stdout(&out)) > first, "{}", stdout(&out));
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kura"));
    cmd.current_dir(dir.path())
        .args(["invalidate", "--tag", "no spaces"]);
    for (k, v) in &env {
        cmd.env(k, v);
    }
    let bad = cmd.output().unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("invalid tag"), "{err}");

    // invalidate needs exactly one target.
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_kura"))
        .args(["invalidate"])
        .output()
        .unwrap();
    assert!(!bad.status.success());

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(support::cleanup_namespace(&redis, &ns));
}

#[test]
fn default_database_is_kura_db_in_the_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    let out = kura(dir.path(), &["migrate"], &[]);
    assert!(stdout(&out).contains("sqlite"));
    assert!(dir.path().join("kura.db").exists());
    let out = kura(dir.path(), &["stats", "--json"], &[]);
    let stats: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(stats["total"], 0);
    let help = kura(dir.path(), &["serve", "--help"], &[]);
    let text = stdout(&help);
    for flag in [
        "--listen",
        "--database-url",
        "--redis-url",
        "--write-strategy",
        "--warm-on-start",
        "--namespace",
        "--db-max-connections",
        "--request-timeout",
        "--ttl",
        "--max-stale",
        "--redis-timeout",
        "--log-format",
        "--demo",
        "--eager-refresh",
        "--load-soft-timeout",
        "--load-hard-timeout",
        "KURA_EAGER_REFRESH",
        "KURA_LOAD_SOFT_TIMEOUT",
        "KURA_LOAD_HARD_TIMEOUT",
        "KURA_LISTEN",
        "DATABASE_URL",
        "REDIS_URL",
    ] {
        assert!(text.contains(flag), "serve --help mentions {flag}");
    }
}

/// `kura migrate` on PostgreSQL with the default log level: one line per
/// step, and none of the server's notices ("relation … already exists,
/// skipping"), on a fresh database and again on a migrated one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_prints_one_line_per_step() {
    let db = support::TestDb::create().await;
    for round in ["fresh", "again"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kura"))
            .args(["migrate", "--database-url", &db.url])
            .env_remove("RUST_LOG")
            .env_remove("DATABASE_URL")
            .output()
            .expect("run kura migrate");
        assert!(out.status.success(), "{round}: {out:?}");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            !text.contains("notice") && !text.contains("already exists"),
            "{round}: server notices printed:\n{text}"
        );
        assert!(
            (2..=3).contains(&lines.len()),
            "{round}: {} lines:\n{text}",
            lines.len()
        );
        assert!(text.contains("schema"), "{round}: {text}");
        assert!(text.contains("invalidation feed"), "{round}: {text}");
    }
}
