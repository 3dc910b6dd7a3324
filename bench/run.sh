#!/usr/bin/env bash
# kura's benchmark suite: runs the standard scenarios against `kura serve` (PostgreSQL +
# its own redis-server) and against the seed's Python service side by side, and writes
# docs/bench/RESULTS.md plus raw JSON under docs/bench/raw/<date>/.
#
#   bench/run.sh                      # everything, ~15-20 min on 2 cores
#   DURATION=5s REPEATS=1 bench/run.sh                 # a quick pass
#   SCENARIOS=s2,s6 bench/run.sh                       # a subset (s1 s2 s3 s4 mem s6 s5 s7 near)
#
# `near` runs bench/near.sh after the others: the near cache on and off side by side with the
# ceiling server and HTTP-only /hello (recorded in docs/bench/NEAR.md).
#
# Settings (environment): DURATION (10s) ZIPF_DURATION (20s) WARMUP (2s) REPEATS (3)
# CONCURRENCY (64) ZIPF_EXPONENT (1.0) STAMPEDE_N (200) SEED_WORKERS (2) PROFILE (0; 1 = perf
# profile of kura under scenario 2) KURA_BIN (skip the build, use this binary) BENCH_CMD
# (load generator, default "$KURA_BIN bench") KURA_DB (kura_bench) SEED_DB (seedpeer)
# BENCH_TIMEOUT (45m, hard bound of the whole run) BENCH_PG_RESTART (1: may enable
# pg_stat_statements with ALTER SYSTEM + a PostgreSQL restart when it is not loaded)
# SETTLE_LOAD (0 = off; e.g. 1.0: before measuring, wait until the 1-min load average is at
# most this, for at most SETTLE_MAX, 180s).
#
# Not part of the test suite: refuses to run under CI=true unless BENCH_FORCE=1.
# Needs: cargo, python3 (venv), redis-server, redis-benchmark, psql, a PostgreSQL superuser
# `postgres` on 127.0.0.1:5432 (trust auth). Touches only: the databases $KURA_DB and $SEED_DB
# (dropped/re-created), its own redis-server processes on free ports, .seed-python/ (git-ignored),
# bench/out/ (git-ignored), docs/bench/.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

if [[ "${CI:-}" == "true" && "${BENCH_FORCE:-0}" != "1" ]]; then
  echo "bench/run.sh: refusing to run under CI=true (benchmarks are not tests); BENCH_FORCE=1 overrides" >&2
  exit 2
fi

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
need() { command -v "$1" >/dev/null 2>&1 || { echo "bench/run.sh: '$1' not found ($2)" >&2; exit 1; }; }
need cargo "install Rust"
need python3 "apt-get install python3 python3-venv"
need redis-server "apt-get install redis-server"
need redis-benchmark "apt-get install redis-tools"
need psql "apt-get install postgresql-client"

export SCENARIOS=${SCENARIOS:-s1,s2,s3,s4,mem,s6,s5,s7,near}
RUN_NEAR=0
if [[ ",$SCENARIOS," == *",near,"* ]]; then
  RUN_NEAR=1
  SCENARIOS=$(printf ',%s,' "$SCENARIOS" | sed -e 's/,near,/,/g' -e 's/^,//' -e 's/,$//')
fi
# before this script's own builds add to it
BENCH_LOADAVG_BEFORE_BUILD=$(cut -d' ' -f1-3 /proc/loadavg)
export BENCH_LOADAVG_BEFORE_BUILD
PSQL=(psql -h 127.0.0.1 -p 5432 -U postgres -d postgres -Atq -v ON_ERROR_STOP=1)
"${PSQL[@]}" -c 'select 1' >/dev/null || { echo "bench/run.sh: PostgreSQL at 127.0.0.1:5432 not reachable as postgres" >&2; exit 1; }

# --- pg_stat_statements (counts the SELECTs of the stampede scenario) -----------------------
ensure_pg_stat_statements bench/run.sh

# --- kura (release) and its load generator -------------------------------------------------
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
if [[ -z "${KURA_BIN:-}" ]]; then
  say "building kura (release)"
  cargo build --release -p kura-server
  KURA_BIN=$TARGET_DIR/release/kura
fi
export KURA_BIN
if [[ -z "${BENCH_CMD:-}" ]]; then
  "$KURA_BIN" bench --help >/dev/null 2>&1 \
    || { echo "bench/run.sh: '$KURA_BIN bench' is not available; set BENCH_CMD to a kura-bench binary" >&2; exit 1; }
  export BENCH_CMD="$KURA_BIN bench"
fi
if [[ ",$SCENARIOS," == *",s7,"* ]]; then
  say "building the hit-path benchmark"
  cargo bench -p kura --bench hit_path --no-run
fi

# --- the seed's Python service (copied to .seed-python/, git-ignored) -----------------------
prepare_seed "$ROOT" bench/run.sh
PY=$SEED_DIR/.venv/bin/python

# --- the ceiling server (bare axum + redis-rs), built outside the workspace -----------------
CEIL_SRC=${CEIL_SRC:-$ROOT/../shared/peers/ceiling}
build_ceiling "$ROOT" "$CEIL_SRC"
export CEILING_BIN

# --- run -------------------------------------------------------------------------------------
export ROOT BENCH_WORK=${BENCH_WORK:-$ROOT/bench/out/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$BENCH_WORK"

stop_leftovers() {
  # Whatever the harness started and could not stop itself (it was killed): by pid, and only
  # if that pid still runs the program it was started as.
  [[ -f "$BENCH_WORK/pids" ]] || return 0
  while IFS=$'\t' read -r pid prog; do
    if [[ -r /proc/$pid/cmdline ]] && tr '\0' '\n' < "/proc/$pid/cmdline" | head -1 | grep -qxF "$prog"; then
      kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    fi
  done < "$BENCH_WORK/pids"
}

rc=0
if [[ -n "$SCENARIOS" ]]; then
  say "running the scenarios ($SCENARIOS); work files in $BENCH_WORK"
  timeout --kill-after=30s "${BENCH_TIMEOUT:-45m}" "$PY" "$ROOT/bench/harness.py" &
  HPID=$!
  trap 'kill -TERM "$HPID" 2>/dev/null || true' INT TERM HUP
  trap 'stop_leftovers' EXIT
  wait "$HPID" || rc=$?
  while kill -0 "$HPID" 2>/dev/null; do wait "$HPID" || rc=$?; done
fi
if [[ $rc == 0 && $RUN_NEAR == 1 ]]; then
  say "near cache side by side (bench/near.sh)"
  "$ROOT/bench/near.sh" || rc=$?
fi
exit "$rc"
