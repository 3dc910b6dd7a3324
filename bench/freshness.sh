#!/usr/bin/env bash
# Freshness without spikes, in one run: a hot key across its expiries with eager refresh off
# and on (two `kura serve` on one Redis and database, `--ttl settings=5s`), the seed's
# service with its hot key deleted every 5 s to stand for an expiry, and the ceiling server's
# bare GET as the limit line. Writes docs/bench/raw/freshness-<date>/ (each run's JSON and
# results.json) and prints a summary; docs/bench/FRESHNESS.md records the figures of a run.
#
#   bench/freshness.sh                          # ~8 min after the builds
#   DURATION=20s ROUNDS=1 bench/freshness.sh    # a quick pass
#
# Settings (environment): DURATION (60s) ROUNDS (2) CONCURRENCY (64) BETA (1.0) TTL (5s)
# KURA_BIN / HOT_KEY_BIN (skip the builds) KURA_DB (kura_bench_fresh) SEED_DB (seedpeer_fresh)
# BENCH_PG_RESTART (1: may load pg_stat_statements with one PostgreSQL restart).
# Not part of the test suite: refuses to run under CI=true unless BENCH_FORCE=1.
# Needs: cargo, python3 (venv), redis-server, psql, a PostgreSQL superuser `postgres` on
# 127.0.0.1:5432 (trust auth).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if [[ "${CI:-}" == "true" && "${BENCH_FORCE:-0}" != "1" ]]; then
  echo "bench/freshness.sh: refusing to run under CI=true (benchmarks are not tests); BENCH_FORCE=1 overrides" >&2
  exit 2
fi
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
PSQL=(psql -h 127.0.0.1 -p 5432 -U postgres -d postgres -Atq -v ON_ERROR_STOP=1)
"${PSQL[@]}" -c 'select 1' >/dev/null || { echo "bench/freshness.sh: PostgreSQL at 127.0.0.1:5432 not reachable as postgres" >&2; exit 1; }
ensure_pg_stat_statements bench/freshness.sh

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
if [[ -z "${KURA_BIN:-}" || -z "${HOT_KEY_BIN:-}" ]]; then
  say "building kura and the hot_key_expiry example (release)"
  cargo build --release -p kura-server --bin kura --example hot_key_expiry
  export KURA_BIN=${KURA_BIN:-$TARGET/release/kura}
  export HOT_KEY_BIN=${HOT_KEY_BIN:-$TARGET/release/examples/hot_key_expiry}
fi
prepare_seed "$ROOT" bench/freshness.sh
build_ceiling "$ROOT" "${CEIL_SRC:-$ROOT/../shared/peers/ceiling}"
export CEILING_BIN ROOT BENCH_WORK=${BENCH_WORK:-$ROOT/bench/out/freshness-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$BENCH_WORK"
say "running; work files in $BENCH_WORK"
exec timeout --kill-after=30s "${BENCH_TIMEOUT:-30m}" "$SEED_DIR/.venv/bin/python" "$ROOT/bench/freshness.py"
