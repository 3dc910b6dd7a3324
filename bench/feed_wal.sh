#!/usr/bin/env bash
# The WAL feed beside the trigger log and no feed, in one run, on a PostgreSQL cluster of
# the script's own (initdb in a temp dir, wal_level = logical, a free port) and a
# redis-server of its own. Writes docs/bench/raw/feed-wal-<date>/*.json and prints a
# summary; docs/bench/FEED.md records the figures of a run.
#
#   bench/feed_wal.sh                          # ~6 min after the build
#   ROUNDS=1 DURATION=5s bench/feed_wal.sh     # a quick pass
#
# 1. pgbench one-row UPDATEs ($CONCURRENCY clients) on a table of the profiles' shape:
#    no feed, the trigger log's triggers (a relay polling: no NOTIFY), the WAL feed (the
#    table in kura's publication, its slot streamed by a running `kura serve`), $ROUNDS
#    times each, alternately; all on the same server (wal_level = logical);
# 2. PUT throughput through kura (closed loop, `invalidate`) with no feed (off, the log's
#    triggers removed), the WAL feed and the trigger log, $ROUNDS times each, alternately;
# 3. commit -> invalidation lag of direct UPDATEs with the WAL feed at $RATES UPDATEs/s
#    (feed_lag: p50/p99/max, missed);
# 4. takeover: two instances, the one streaming the slot SIGKILLed, a direct UPDATE; the
#    time until the other instance invalidated it, $ROUNDS times.
#
# Settings (environment): KURA_BIN / FEED_LAG_BIN (skip the build) RATES (1000,10000)
# SECONDS_LAG (10) DURATION (10s) WARMUP (2s) CONCURRENCY (32) ROUNDS (3) PARTS
# (sql,put,lag,takeover).
# Not part of the test suite: refuses to run under CI=true unless BENCH_FORCE=1.
# Needs: cargo, redis-server, psql, pgbench, PostgreSQL 15's server programs, root or the
# postgres user (initdb runs as postgres).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if [[ "${CI:-}" == "true" && "${BENCH_FORCE:-0}" != "1" ]]; then
  echo "bench/feed_wal.sh: refusing to run under CI=true (benchmarks are not tests); BENCH_FORCE=1 overrides" >&2
  exit 2
fi

RATES=${RATES:-1000,10000}
SECONDS_LAG=${SECONDS_LAG:-10}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
CONCURRENCY=${CONCURRENCY:-32}
ROUNDS=${ROUNDS:-3}
PARTS=${PARTS:-sql,put,lag,takeover}
part() { [[ ",$PARTS," == *",$1,"* ]]; }
PGBIN=/usr/lib/postgresql/15/bin

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

if [[ -z "${KURA_BIN:-}" || -z "${FEED_LAG_BIN:-}" ]]; then
  say "building kura and the feed_lag example (release)"
  cargo build --release -p kura-server --bin kura --example feed_lag
  TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
  KURA_BIN=${KURA_BIN:-$TARGET/release/kura}
  FEED_LAG_BIN=${FEED_LAG_BIN:-$TARGET/release/examples/feed_lag}
fi

OUT=$ROOT/docs/bench/raw/feed-wal-$(date +%Y-%m-%d)
WORK=$(mktemp -d)
chmod 755 "$WORK"
mkdir -p "$OUT"
PIDS=()
PGDATA_DIR=$WORK/pg
asp() { if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  asp "$PGBIN/pg_ctl" -D "$PGDATA_DIR" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

start_redis "$WORK" --notify-keyspace-events Eg

PGPORT=$(free_port)
mkdir -p "$PGDATA_DIR"
[[ $(id -u) == 0 ]] && chown -R postgres:postgres "$WORK"
asp "$PGBIN/initdb" -D "$PGDATA_DIR" -U postgres --auth=trust -E UTF8 >/dev/null
asp "$PGBIN/pg_ctl" -D "$PGDATA_DIR" -l "$WORK/pg.log" -w \
  -o "-p $PGPORT -k $WORK -c listen_addresses=127.0.0.1 -c wal_level=logical -c max_connections=200 -c shared_buffers=256MB" start >/dev/null
PG=postgres://postgres@127.0.0.1:$PGPORT
DB=kura_bench_wal
DB_URL=$PG/$DB
PSQL=(psql -h 127.0.0.1 -p "$PGPORT" -U postgres -Atq -v ON_ERROR_STOP=1)
"${PSQL[@]}" -d postgres -c "CREATE DATABASE $DB"

RATE_MAX=$(tr ',' '\n' <<<"$RATES" | sort -n | tail -1)
PROFILES=$((RATE_MAX * SECONDS_LAG > 20000 ? RATE_MAX * SECONDS_LAG : 20000))
export DATABASE_URL=$DB_URL REDIS_URL KURA_NAMESPACE=cache RUST_LOG=warn
export KURA_JWT_SECRET=feed-wal-bench-$RANDOM$RANDOM
"$KURA_BIN" migrate --invalidation-feed wal >/dev/null
say "seeding $PROFILES profiles"
"$KURA_BIN" seed --profiles "$PROFILES" --ids-out "$WORK/ids.txt" >/dev/null
TOKEN=$("$KURA_BIN" token --sub "$(python3 -c 'import uuid; print(uuid.uuid4())')" --admin)

# serve <name> <args...>: kura serve on a free port; sets URL and PID_<name>.
serve() {
  local name=$1; shift
  local port; port=$(free_port)
  URL=http://127.0.0.1:$port
  "$KURA_BIN" serve --listen "127.0.0.1:$port" --db-max-connections 32 "$@" >"$WORK/serve-$name.log" 2>&1 &
  eval "PID_$name=$!"
  PIDS+=($!)
  for _ in $(seq 100); do
    curl -sf "$URL/healthz" | grep -q '"redis":"ok"' && return 0
    sleep 0.1
  done
  echo "kura serve did not come up:" >&2; cat "$WORK/serve-$name.log" >&2; exit 1
}
unserve() { local p; p=$(eval "echo \$PID_$1"); kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; }
# settle: waits until the slot is confirmed up to the server's current WAL position (the
# relay applied what earlier runs wrote), so that warming is not undone by their events.
settle() {
  local lag
  for _ in $(seq 300); do
    lag=$("${PSQL[@]}" -d "$DB" -c "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn) FROM pg_replication_slots WHERE slot_name = 'kura_cache'")
    [[ ${lag%.*} -lt 1000 ]] && { sleep 1; return 0; }
    sleep 0.2
  done
  echo "the WAL feed did not catch up (slot lag $lag bytes)" >&2; exit 1
}
warm() { "$KURA_BIN" warm --limit "$PROFILES" --since-days 36500 --quiet >/dev/null; }
bench() { # bench <name> <kura bench args...>
  local name=$1; shift
  "$KURA_BIN" bench --url "$URL" --token "$TOKEN" --ids-file "$WORK/ids.txt" \
    --duration "$DURATION" --warmup "$WARMUP" --concurrency "$CONCURRENCY" \
    --json --out "$OUT/$name.json" "$@" >/dev/null
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f'{sys.argv[2]}: {r[\"throughput\"]:.0f} req/s, p99 {r[\"latency_ms\"][\"p99\"]} ms')" "$OUT/$name.json" "$name"
}

if part sql; then
  say "1. pgbench one-row UPDATEs, $CONCURRENCY clients, $DURATION each"
  "${PSQL[@]}" -d "$DB" -c "CREATE TABLE feed_bench (id INT PRIMARY KEY, name TEXT, bio TEXT, version BIGINT NOT NULL DEFAULT 1)" \
    -c "INSERT INTO feed_bench (id, name, bio) SELECT i, 'n' || i, repeat('b', 200) FROM generate_series(1, $PROFILES) i"
  "$KURA_BIN" feed sql | sed -e 's/"profiles"/"feed_bench"/g; s/kura_feed_profiles_/kura_feed_feed_bench_/g; s/"user_id"/"id"/g' >"$WORK/log_install.sql"
  "$KURA_BIN" feed sql --remove | sed -e 's/"profiles"/"feed_bench"/g; s/kura_feed_profiles_/kura_feed_feed_bench_/g' >"$WORK/log_remove.sql"
  printf '\\set id random(1, %d)\nUPDATE feed_bench SET name = name || :id, version = version + 1 WHERE id = :id;\n' "$PROFILES" >"$WORK/update.sql"
  pgb() { # pgb <name>
    local tps
    tps=$(pgbench -n -h 127.0.0.1 -p "$PGPORT" -U postgres -c "$CONCURRENCY" -j 2 -T "${DURATION%s}" -f "$WORK/update.sql" "$DB" 2>/dev/null \
      | sed -n 's/^tps = \([0-9.]*\).*/\1/p')
    echo "{\"name\":\"$1\",\"tps\":$tps}" | tee "$OUT/$1.json"
  }
  # The WAL feed streams kura's publication: feed_bench joins it (its rows map to no
  # cached type, so they are decoded by PostgreSQL and read by kura, then skipped).
  # (kura serve makes the publication hold exactly the fed tables at start: feed_bench is
  # added after it started.)
  serve wal --invalidation-feed wal
  for round in $(seq "$ROUNDS"); do
    "${PSQL[@]}" -d "$DB" -f "$WORK/log_remove.sql" >/dev/null 2>&1
    pgb "sql_none_$round"
    "${PSQL[@]}" -d "$DB" -f "$WORK/log_install.sql" >/dev/null 2>&1
    "${PSQL[@]}" -d "$DB" -c "INSERT INTO kura_feed_relay VALUES (TRUE, clock_timestamp() + interval '1 hour') ON CONFLICT DO NOTHING" >/dev/null 2>&1 || true
    pgb "sql_log_$round"
    "${PSQL[@]}" -d "$DB" -f "$WORK/log_remove.sql" >/dev/null 2>&1
    "${PSQL[@]}" -d "$DB" -c "ALTER PUBLICATION kura_cache ADD TABLE feed_bench"
    pgb "sql_wal_$round"
    "${PSQL[@]}" -d "$DB" -c "ALTER PUBLICATION kura_cache DROP TABLE feed_bench"
  done
  unserve wal
  python3 - "$OUT" "$ROUNDS" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
med = {}
for name in ("sql_none", "sql_log", "sql_wal"):
    runs = [json.load(open(f"{out}/{name}_{i}.json"))["tps"] for i in range(1, rounds + 1)]
    med[name] = statistics.median(runs)
    print(f"{name}: median {med[name]:.0f} tps of", ", ".join(f"{t:.0f}" for t in runs))
for name in ("sql_log", "sql_wal"):
    print(f"{name} vs none: {100 * (med[name] / med['sql_none'] - 1):+.1f} %")
PY
fi

if part put; then
  for round in $(seq "$ROUNDS"); do
    for mode in off wal log; do
      say "2. PUT throughput, round $round/$ROUNDS: --invalidation-feed $mode"
      if [[ $mode == log ]]; then "$KURA_BIN" migrate --invalidation-feed log >/dev/null; fi
      serve put --invalidation-feed "$mode"
      # `off` still installs the log's triggers (for other instances): removed here, so
      # that `off` is writes without any feed.
      if [[ $mode == off ]]; then "$KURA_BIN" feed sql --remove | "${PSQL[@]}" -d "$DB" >/dev/null; fi
      bench "put_${mode}_$round" --method put
      unserve put
      if [[ $mode == log ]]; then "$KURA_BIN" migrate --invalidation-feed wal >/dev/null; fi
    done
  done
  python3 - "$OUT" "$ROUNDS" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
med = {}
for mode in ("off", "wal", "log"):
    runs = [json.load(open(f"{out}/put_{mode}_{i}.json")) for i in range(1, rounds + 1)]
    med[mode] = statistics.median(r["throughput"] for r in runs)
    print(f"put {mode}: median {med[mode]:.0f} writes/s of", ", ".join(f"{r['throughput']:.0f}" for r in runs))
for mode in ("wal", "log"):
    print(f"put {mode} vs off: {100 * (med[mode] / med['off'] - 1):+.1f} %")
PY
fi

if part lag; then
  serve lag --invalidation-feed wal
  for rate in ${RATES//,/ }; do
    say "3. lag with the WAL feed, $rate UPDATEs/s for ${SECONDS_LAG}s"
    settle
    warm
    "$FEED_LAG_BIN" --database-url "$DB_URL" --redis-url "$REDIS_URL" --namespace cache \
      --ids "$WORK/ids.txt" --rate "$rate" --seconds "$SECONDS_LAG" --connections 16 | tee "$OUT/lag_wal_$rate.json"
  done
  unserve lag
fi

if part takeover; then
  for round in $(seq "$ROUNDS"); do
    say "4. takeover after SIGKILL, round $round/$ROUNDS"
    serve a --invalidation-feed wal; URL_A=$URL
    sleep 1
    serve b --invalidation-feed wal
    sleep 1
    # The instance streaming the slot is the one whose name /healthz shows relaying.
    holder=$(curl -s "$URL_A/healthz" | python3 -c 'import json,sys; print(json.load(sys.stdin)["feed"]["relaying"] or "")')
    if [[ $holder == *"-$PID_a" ]]; then victim=a; survivor=$URL; else victim=b; survivor=$URL_A; fi
    user=$(sed -n "$((round + 1))p" "$WORK/ids.txt")
    curl -sf -H "Authorization: Bearer $TOKEN" "$survivor/api/v1/profiles/$user" >/dev/null
    curl -sf -H "Authorization: Bearer $TOKEN" "$survivor/api/v1/profiles/$user" >/dev/null
    kill -9 "$(eval "echo \$PID_$victim")"
    python3 - "$survivor" "$TOKEN" "$user" "$DB_URL" "$OUT/takeover_$round.json" "$PGPORT" <<'PY'
import json, subprocess, sys, time, urllib.request
url, token, user, db, out, port = sys.argv[1:7]
name = f"takeover-{time.time_ns()}"
t0 = time.monotonic()
subprocess.run(["psql", "-h", "127.0.0.1", "-p", port, "-U", "postgres", "-Atq", "-d", db.rsplit("/", 1)[1],
                "-c", f"UPDATE profiles SET first_name = '{name}' WHERE user_id = '{user}'"], check=True)
committed = time.monotonic()
while True:
    req = urllib.request.Request(f"{url}/api/v1/profiles/{user}", headers={"Authorization": f"Bearer {token}"})
    body = json.load(urllib.request.urlopen(req))
    if body.get("first_name") == name:
        break
    if time.monotonic() - committed > 60:
        raise SystemExit("not seen within 60 s")
    time.sleep(0.01)
r = {"kill_to_seen_ms": round((time.monotonic() - t0) * 1000, 1)}
print(json.dumps(r)); open(out, "w").write(json.dumps(r))
PY
    unserve a; unserve b
  done
fi

{
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), load $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "commit: $(git rev-parse --short HEAD), date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "postgres: $("${PSQL[@]}" -d postgres -c 'show server_version') (own cluster, wal_level=logical), redis: $(redis-server --version | cut -d' ' -f3)"
} | tee "$OUT/machine.txt"
say "raw results in $OUT"
