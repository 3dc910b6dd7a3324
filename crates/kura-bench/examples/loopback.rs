//! Runs `kura bench` against a minimal in-process HTTP service, to see what the generator
//! itself sustains on this machine (the service answers from memory, like a cache hit).
//!
//! ```text
//! cargo run --release -p kura-bench --example loopback -- --duration 5s --concurrency 64
//! ```
//!
//! Any `kura bench` flag may follow `--`; `--url` and `--id` are filled in.

use axum::Router;
use axum::extract::Path;
use axum::routing::get;

async fn profile(Path(id): Path<String>) -> ([(&'static str, &'static str); 1], String) {
    (
        [("x-cache", "hit")],
        format!(r#"{{"user_id":"{id}","name":"test"}}"#),
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let app = Router::new().route("/api/v1/profiles/{id}", get(profile));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });

    let mut flags = vec!["--url".to_owned(), url, "--id".to_owned(), "42".to_owned()];
    flags.extend(std::env::args().skip(1));
    let args = kura_bench::BenchArgs::from_args(flags).unwrap_or_else(|e| e.exit());
    kura_bench::run(args).await?;
    Ok(())
}
