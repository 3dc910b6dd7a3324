#!/usr/bin/env bash
# The invalidation feed's costs and lag, against `kura serve` on PostgreSQL and a
# redis-server of its own. Writes docs/bench/raw/feed-<date>/*.json and prints a summary;
# docs/bench/FEED.md records the figures of a run.
#
#   bench/feed.sh                                  # ~3 min after the build
#   RATE=500 SECONDS_LAG=10 DURATION=5s bench/feed.sh   # a quick pass
#
# 1. lag from commit to invalidation under $RATE direct UPDATEs/s (plain SQL, each on a
#    cached profile), p50/p99/max: with NOTIFY (default) and polling only
#    (--feed-listen false, --feed-poll $POLL);
# 2. PUT throughput (closed loop, $CONCURRENCY connections, `invalidate`) on one server,
#    alternately with the feed's triggers installed (and the relay on) and removed (the
#    SQL of `kura feed sql --remove`: what writes cost before the feed), $ROUNDS times;
# 3. GET on the hit path (warmed ids) with the relay on and off: the read path does not
#    touch the feed, so the two should match within noise;
# 4. the triggers' own cost in PostgreSQL, without kura: pgbench one-row UPDATEs on a
#    table of the profiles' shape, without triggers, with them (NOTIFY sent) and with
#    them while a relay polls (NOTIFY skipped), $ROUNDS times each.
#
# Settings (environment): KURA_BIN / FEED_LAG_BIN (skip the build, use these binaries)
# RATE (1000) SECONDS_LAG (20) POLL (1s) DURATION (10s, each throughput run) WARMUP (2s)
# CONCURRENCY (32) FEED_DB (kura_bench_feed, dropped and re-created)
# PARTS (lag,put,get,sql: which of the measurements to run) ROUNDS (3, PUT runs
# with the feed on and off, alternately).
# Not part of the test suite: refuses to run under CI=true unless BENCH_FORCE=1.
# Needs: cargo, redis-server, psql, pgbench, a PostgreSQL superuser `postgres` on 127.0.0.1:5432.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if [[ "${CI:-}" == "true" && "${BENCH_FORCE:-0}" != "1" ]]; then
  echo "bench/feed.sh: refusing to run under CI=true (benchmarks are not tests); BENCH_FORCE=1 overrides" >&2
  exit 2
fi

RATE=${RATE:-1000}
SECONDS_LAG=${SECONDS_LAG:-20}
POLL=${POLL:-1s}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
CONCURRENCY=${CONCURRENCY:-32}
FEED_DB=${FEED_DB:-kura_bench_feed}
PARTS=${PARTS:-lag,put,get,sql}
ROUNDS=${ROUNDS:-3}
part() { [[ ",$PARTS," == *",$1,"* ]]; }
PROFILES=$((RATE * SECONDS_LAG))
PG=postgres://postgres@127.0.0.1:5432
DB_URL=$PG/$FEED_DB
PSQL=(psql -h 127.0.0.1 -p 5432 -U postgres -Atq -v ON_ERROR_STOP=1)

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

if [[ -z "${KURA_BIN:-}" || -z "${FEED_LAG_BIN:-}" ]]; then
  say "building kura and the feed_lag example (release)"
  cargo build --release -p kura-server --bin kura --example feed_lag
  TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
  KURA_BIN=${KURA_BIN:-$TARGET/release/kura}
  FEED_LAG_BIN=${FEED_LAG_BIN:-$TARGET/release/examples/feed_lag}
fi

OUT=$ROOT/docs/bench/raw/feed-$(date +%Y-%m-%d)
WORK=$(mktemp -d)
mkdir -p "$OUT"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

start_redis "$WORK" --notify-keyspace-events Eg

"${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS $FEED_DB WITH (FORCE)" -c "CREATE DATABASE $FEED_DB"
export DATABASE_URL=$DB_URL REDIS_URL KURA_NAMESPACE=cache RUST_LOG=warn
export KURA_JWT_SECRET=feed-bench-$RANDOM$RANDOM
"$KURA_BIN" migrate >/dev/null
say "seeding $PROFILES profiles"
"$KURA_BIN" seed --profiles "$PROFILES" --ids-out "$WORK/ids.txt" >/dev/null
TOKEN=$("$KURA_BIN" token --sub "$(python3 -c 'import uuid; print(uuid.uuid4())')" --admin)

SERVE_PID=
serve() { # serve <args...>: starts kura serve on a free port, sets URL
  local port; port=$(free_port)
  URL=http://127.0.0.1:$port
  "$KURA_BIN" serve --listen "127.0.0.1:$port" --db-max-connections 32 "$@" >"$WORK/serve.log" 2>&1 &
  SERVE_PID=$!
  PIDS+=("$SERVE_PID")
  local up=0
  for _ in $(seq 100); do
    curl -sf "$URL/healthz" | grep -q '"redis":"ok"' && { up=1; break; }
    sleep 0.1
  done
  [[ $up == 1 ]] || { echo "kura serve did not come up:" >&2; cat "$WORK/serve.log" >&2; exit 1; }
  # A relay that starts without a position replays the whole log (the seed's
  # inserts): let it finish first, or it overlaps the warm-up (voiding its fills)
  # and the first measured UPDATEs.
  for _ in $(seq 600); do
    curl -sf "$URL/healthz" | grep -Eq '"state":"off"|"backlog":0[,}]' && return 0
    sleep 0.1
  done
  echo "the feed did not catch up: $(curl -s "$URL/healthz")" >&2; exit 1
}
unserve() { kill "$SERVE_PID"; wait "$SERVE_PID" 2>/dev/null || true; }
warm() { "$KURA_BIN" warm --limit "$PROFILES" --since-days 36500 --quiet >/dev/null; }
bench() { # bench <name> <kura bench args...>
  local name=$1; shift
  "$KURA_BIN" bench --url "$URL" --token "$TOKEN" --ids-file "$WORK/ids.txt" \
    --duration "$DURATION" --warmup "$WARMUP" --concurrency "$CONCURRENCY" \
    --json --out "$OUT/$name.json" "$@" >/dev/null
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f'{sys.argv[2]}: {r[\"throughput\"]:.0f} req/s, p99 {r[\"latency_ms\"][\"p99\"]} ms')" "$OUT/$name.json" "$name"
}
lag() { # lag <name>
  warm
  "$FEED_LAG_BIN" --database-url "$DB_URL" --redis-url "$REDIS_URL" --namespace cache \
    --ids "$WORK/ids.txt" --rate "$RATE" --seconds "$SECONDS_LAG" | tee "$OUT/$1.json"
}

if part lag; then
say "1a. lag, NOTIFY + poll $POLL, $RATE UPDATEs/s for ${SECONDS_LAG}s"
serve --feed-poll "$POLL"
lag lag_notify
unserve
say "1b. lag, polling only every $POLL"
serve --feed-poll "$POLL" --feed-listen false
lag lag_poll
unserve
fi

if part put; then
# One server, the feed's triggers installed and removed in turn: on a shared
# 2-core machine, runs drift by more than the effect, so the two are
# measured alternately, $ROUNDS times each, and compared by their medians.
serve
for round in $(seq "$ROUNDS"); do
  say "2. PUT throughput, round $round/$ROUNDS: triggers + relay on"
  "$KURA_BIN" migrate >/dev/null
  bench put_feed_on_$round --method put
  say "2. PUT throughput, round $round/$ROUNDS: triggers removed (kura feed sql --remove)"
  "$KURA_BIN" feed sql --remove | "${PSQL[@]}" -d "$FEED_DB" >/dev/null
  bench put_feed_off_$round --method put
done
unserve
"$KURA_BIN" migrate >/dev/null
python3 - "$OUT" "$ROUNDS" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
med = {}
for name in ("put_feed_on", "put_feed_off"):
    runs = [json.load(open(f"{out}/{name}_{i}.json")) for i in range(1, rounds + 1)]
    med[name] = statistics.median(r["throughput"] for r in runs)
    print(f"{name}: median {med[name]:.0f} writes/s of", ", ".join(f"{r['throughput']:.0f}" for r in runs),
          "; p99", ", ".join(f"{r['latency_ms']['p99']:.1f}" for r in runs), "ms")
print(f"feed on vs off: {100 * (med['put_feed_on'] / med['put_feed_off'] - 1):+.1f} % writes/s")
PY
fi

if part get; then
say "3. GET hit path, relay on and off"
serve
warm
bench get_feed_on
unserve
serve --invalidation-feed off
warm
bench get_feed_off
unserve
fi

if part sql; then
# What the triggers cost PostgreSQL itself, without kura: pgbench UPDATEs of one row
# per transaction ($CONCURRENCY clients) on a table of the profiles' shape, with the
# library's triggers (the SQL of `kura feed sql`, for this table) and without.
say "4. the triggers' own cost: pgbench UPDATEs, $DURATION each"
"${PSQL[@]}" -d "$FEED_DB" -c "CREATE TABLE feed_bench (id INT PRIMARY KEY, name TEXT, bio TEXT, version BIGINT NOT NULL DEFAULT 1)" \
  -c "INSERT INTO feed_bench (id, name, bio) SELECT i, 'n' || i, repeat('b', 200) FROM generate_series(1, $PROFILES) i"
"$KURA_BIN" feed sql | sed -e 's/"profiles"/"feed_bench"/g; s/kura_feed_profiles_/kura_feed_feed_bench_/g; s/"user_id"/"id"/g' >"$WORK/bench_install.sql"
"$KURA_BIN" feed sql --remove | sed -e 's/"profiles"/"feed_bench"/g; s/kura_feed_profiles_/kura_feed_feed_bench_/g' >"$WORK/bench_remove.sql"
printf '\\set id random(1, %d)\nUPDATE feed_bench SET name = name || :id, version = version + 1 WHERE id = :id;\n' "$PROFILES" >"$WORK/update.sql"
pgb() { # pgb <name>
  local tps
  tps=$(pgbench -n -h 127.0.0.1 -U postgres -c "$CONCURRENCY" -j 2 -T "${DURATION%s}" -f "$WORK/update.sql" "$FEED_DB" 2>/dev/null \
    | sed -n 's/^tps = \([0-9.]*\).*/\1/p')
  echo "{\"name\":\"$1\",\"tps\":$tps}" | tee "$OUT/$1.json"
}
for round in $(seq "$ROUNDS"); do
  "${PSQL[@]}" -d "$FEED_DB" -f "$WORK/bench_remove.sql" >/dev/null 2>&1
  pgb "sql_none_$round"
  "${PSQL[@]}" -d "$FEED_DB" -f "$WORK/bench_install.sql" >/dev/null 2>&1
  "${PSQL[@]}" -d "$FEED_DB" -c "DELETE FROM kura_feed_relay"
  pgb "sql_notify_$round"
  "${PSQL[@]}" -d "$FEED_DB" -c "INSERT INTO kura_feed_relay VALUES (TRUE, clock_timestamp() + interval '1 hour')"
  pgb "sql_polled_$round"
done
"${PSQL[@]}" -d "$FEED_DB" -c "DELETE FROM kura_feed_relay"
fi

{
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), load $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "commit: $(git rev-parse --short HEAD), date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "postgres: $("${PSQL[@]}" -d postgres -c 'show server_version'), redis: $(redis-server --version | cut -d' ' -f3)"
} | tee "$OUT/machine.txt"
"${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS $FEED_DB WITH (FORCE)"
say "raw results in $OUT"
