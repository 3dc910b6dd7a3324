#!/usr/bin/env bash
# The near cache side by side, in one run: `kura serve` with the near cache on and off,
# the ceiling server (bare axum + one Redis GET) and its HTTP-only `/hello`, on a
# redis-server of the script's own and PostgreSQL. Writes docs/bench/raw/near-<date>/*.json
# and prints a summary; docs/bench/NEAR.md records the figures of a run.
#
#   bench/near.sh                                   # ~6 min after the builds
#   DURATION=5s ROUNDS=1 bench/near.sh               # a quick pass
#
# Measurements (closed loop, $CONCURRENCY connections, `kura bench`):
# 1. hot key: GET of one warmed profile;
# 2. warmed: GET of $WARM uniformly drawn warmed profiles;
#    each for: near cache on, near cache off, the ceiling's GET, the ceiling's /hello,
#    $ROUNDS times in rotating order;
# 3. cross-instance staleness: two `kura serve --near-cache` on one Redis and database,
#    PUTs on one and GETs on the other (the `near_staleness` example);
# 4. memory: L1 bytes (`cache_l1_bytes`) and the process RSS with $MEM_ENTRIES entries;
# 6. revocation checks (PARTS=revocation): warmed GETs with every token checked against
#    the blacklist vs `--revocation off`, near cache off (L2) and on (L1), beside the
#    ceiling's GET;
# 7. per-route request metrics (PARTS=http_metrics): hot-key GETs with the near cache,
#    `--http-metrics` on vs off, beside the ceiling;
# 5. what BCAST tracking costs Redis: redis-benchmark SET throughput (keys under one
#    tracked prefix) with 0, 1, 4 and 16 tracking connections (instances) listening.
#
# Settings (environment): KURA_BIN / STALENESS_BIN (skip the builds) DURATION (10s)
# WARMUP (2s) ROUNDS (3) CONCURRENCY (64) WARM (10000) MEM_ENTRIES (100000) NEAR_DB
# (kura_bench_near, dropped and re-created) CEIL_SRC (../shared/peers/ceiling) PARTS
# (throughput,staleness,memory,bcast; also revocation, http_metrics: which measurements to run).
# Not part of the test suite: refuses to run under CI=true unless BENCH_FORCE=1.
# Needs: cargo, redis-server, psql, curl, python3, a PostgreSQL superuser `postgres` on
# 127.0.0.1:5432.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if [[ "${CI:-}" == "true" && "${BENCH_FORCE:-0}" != "1" ]]; then
  echo "bench/near.sh: refusing to run under CI=true (benchmarks are not tests); BENCH_FORCE=1 overrides" >&2
  exit 2
fi

DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
ROUNDS=${ROUNDS:-3}
CONCURRENCY=${CONCURRENCY:-64}
WARM=${WARM:-10000}
MEM_ENTRIES=${MEM_ENTRIES:-100000}
NEAR_DB=${NEAR_DB:-kura_bench_near}
PARTS=${PARTS:-throughput,staleness,memory,bcast}
part() { [[ ",$PARTS," == *",$1,"* ]]; }
CEIL_SRC=${CEIL_SRC:-$ROOT/../shared/peers/ceiling}
PG=postgres://postgres@127.0.0.1:5432
DB_URL=$PG/$NEAR_DB
PSQL=(psql -h 127.0.0.1 -p 5432 -U postgres -Atq -v ON_ERROR_STOP=1)

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
if [[ -z "${KURA_BIN:-}" || -z "${STALENESS_BIN:-}" ]]; then
  say "building kura and the near_staleness example (release)"
  cargo build --release -p kura-server --bin kura --example near_staleness
  KURA_BIN=${KURA_BIN:-$TARGET/release/kura}
  STALENESS_BIN=${STALENESS_BIN:-$TARGET/release/examples/near_staleness}
fi
build_ceiling "$ROOT" "$CEIL_SRC"

OUT=$ROOT/docs/bench/raw/near-$(date +%Y-%m-%d)
WORK=$(mktemp -d)
mkdir -p "$OUT"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

start_redis "$WORK"

"${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS $NEAR_DB WITH (FORCE)" -c "CREATE DATABASE $NEAR_DB"
export DATABASE_URL=$DB_URL REDIS_URL KURA_NAMESPACE=cache RUST_LOG=warn
export KURA_JWT_SECRET=near-bench-$RANDOM$RANDOM
"$KURA_BIN" migrate >/dev/null
SEEDED=$(( MEM_ENTRIES > WARM ? MEM_ENTRIES : WARM ))
say "seeding $SEEDED profiles"
"$KURA_BIN" seed --profiles "$SEEDED" --ids-out "$WORK/all_ids.txt" >/dev/null
head -n "$WARM" "$WORK/all_ids.txt" >"$WORK/warm_ids.txt"
HOT=$(head -n 1 "$WORK/all_ids.txt")
TOKEN=$("$KURA_BIN" token --sub "$(python3 -c 'import uuid; print(uuid.uuid4())')" --admin --ttl 86400)

start_kura() { # start_kura <name> <args...>: sets URL_<name>, PID_<name>
  local name=$1; shift
  local port; port=$(free_port)
  "$KURA_BIN" serve --listen "127.0.0.1:$port" --invalidation-feed off "$@" >"$WORK/$name.log" 2>&1 &
  local pid=$!
  PIDS+=("$pid")
  printf -v "URL_$name" '%s' "http://127.0.0.1:$port"
  printf -v "PID_$name" '%s' "$pid"
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$port/healthz" | grep -q '"redis":"ok"' && return 0
    sleep 0.1
  done
  echo "kura serve ($name) did not come up:" >&2; cat "$WORK/$name.log" >&2; exit 1
}

start_kura on --near-cache "profile=$((MEM_ENTRIES * 2))" --near-cache-max-mb 512
start_kura off
if [[ -n "$CEILING_BIN" ]]; then
  CEIL_PORT=$(free_port)
  PORT=$CEIL_PORT REDIS_URL=$REDIS_URL/0 "$CEILING_BIN" >"$WORK/ceiling.log" 2>&1 &
  PIDS+=($!)
  URL_ceiling=http://127.0.0.1:$CEIL_PORT
  for _ in $(seq 100); do curl -sf "$URL_ceiling/hello" >/dev/null && break; sleep 0.1; done
fi

bench() { # bench <name> <url> <token or -> <kura bench args...>
  local name=$1 url=$2 token=$3; shift 3
  local auth=()
  [[ "$token" != "-" ]] && auth=(--token "$token")
  "$KURA_BIN" bench --url "$url" "${auth[@]}" --duration "$DURATION" --warmup "$WARMUP" \
    --concurrency "$CONCURRENCY" --json --out "$OUT/$name.json" "$@" >/dev/null
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f'{sys.argv[2]}: {r[\"throughput\"]:.0f} req/s, p50 {r[\"latency_ms\"][\"p50\"]} ms, p99 {r[\"latency_ms\"][\"p99\"]} ms, x-cache {r.get(\"x_cache\")}')" "$OUT/$name.json" "$name"
}

if part throughput; then
say "warming $WARM profiles (L2 first, then L1, through the API)"
for pass in 1 2; do
  "$KURA_BIN" bench --url "$URL_on" --token "$TOKEN" --ids-file "$WORK/warm_ids.txt" --dist uniform \
    --duration 5s --warmup 0s --concurrency 32 --json --out "$WORK/fill_$pass.json" >/dev/null
done


for round in $(seq "$ROUNDS"); do
  order=(on off ceiling hello)
  (( round % 2 == 0 )) && order=(hello ceiling off on)
  for what in "${order[@]}"; do
    case $what in
      on|off)
        url_var=URL_$what
        say "round $round: kura, near cache $what"
        bench "hot_$what.r$round" "${!url_var}" "$TOKEN" --id "$HOT" --dist hot
        bench "warm_$what.r$round" "${!url_var}" "$TOKEN" --ids-file "$WORK/warm_ids.txt" --dist uniform
        ;;
      ceiling)
        [[ -n "$CEILING_BIN" ]] || continue
        say "round $round: ceiling GET"
        bench "hot_ceiling.r$round" "$URL_ceiling" - --id "$HOT" --dist hot
        bench "warm_ceiling.r$round" "$URL_ceiling" - --ids-file "$WORK/warm_ids.txt" --dist uniform
        ;;
      hello)
        [[ -n "$CEILING_BIN" ]] || continue
        say "round $round: ceiling /hello (HTTP only)"
        bench "hello.r$round" "$URL_ceiling" - --path /hello
        ;;
    esac
  done
done

fi

if part revocation; then
say "revocation checks on vs off (every request's jti checked against the blacklist)"
start_kura rev_off --revocation off
start_kura rev_off_near --revocation off --near-cache "profile=$((MEM_ENTRIES * 2))" --near-cache-max-mb 512
for url in "$URL_off" "$URL_rev_off" "$URL_on" "$URL_rev_off_near"; do
  for pass in 1 2; do
    "$KURA_BIN" bench --url "$url" --token "$TOKEN" --ids-file "$WORK/warm_ids.txt" --dist uniform \
      --duration 5s --warmup 0s --concurrency 32 --json --out "$WORK/rev_fill.json" >/dev/null
  done
done
for round in $(seq "$ROUNDS"); do
  order=(l2_on l2_off l1_on l1_off ceiling)
  (( round % 2 == 0 )) && order=(ceiling l1_off l1_on l2_off l2_on)
  for what in "${order[@]}"; do
    case $what in
      l2_on) bench "rev_l2_on.r$round" "$URL_off" "$TOKEN" --ids-file "$WORK/warm_ids.txt" --dist uniform ;;
      l2_off) bench "rev_l2_off.r$round" "$URL_rev_off" "$TOKEN" --ids-file "$WORK/warm_ids.txt" --dist uniform ;;
      l1_on) bench "rev_l1_on.r$round" "$URL_on" "$TOKEN" --ids-file "$WORK/warm_ids.txt" --dist uniform ;;
      l1_off) bench "rev_l1_off.r$round" "$URL_rev_off_near" "$TOKEN" --ids-file "$WORK/warm_ids.txt" --dist uniform ;;
      ceiling)
        [[ -n "$CEILING_BIN" ]] || continue
        bench "rev_ceiling.r$round" "$URL_ceiling" - --ids-file "$WORK/warm_ids.txt" --dist uniform
        ;;
    esac
  done
done
fi

if part http_metrics; then
say "per-route request metrics on vs off (hot key, near cache on)"
start_kura hm_off --http-metrics off --near-cache "profile=$((MEM_ENTRIES * 2))" --near-cache-max-mb 512
for url in "$URL_on" "$URL_hm_off"; do
  for pass in 1 2; do
    "$KURA_BIN" bench --url "$url" --token "$TOKEN" --ids-file "$WORK/warm_ids.txt" --dist uniform \
      --duration 5s --warmup 0s --concurrency 32 --json --out "$WORK/hm_fill.json" >/dev/null
  done
done
for round in $(seq "$ROUNDS"); do
  order=(on off ceiling)
  (( round % 2 == 0 )) && order=(ceiling off on)
  for what in "${order[@]}"; do
    case $what in
      on) bench "hm_hot_on.r$round" "$URL_on" "$TOKEN" --id "$HOT" --dist hot ;;
      off) bench "hm_hot_off.r$round" "$URL_hm_off" "$TOKEN" --id "$HOT" --dist hot ;;
      ceiling)
        [[ -n "$CEILING_BIN" ]] || continue
        bench "hm_hot_ceiling.r$round" "$URL_ceiling" - --id "$HOT" --dist hot
        ;;
    esac
  done
done
fi

if part staleness; then
say "3. cross-instance staleness (writes on one instance, reads on another)"
start_kura s1 --near-cache profile=10000
start_kura s2 --near-cache profile=10000
"$STALENESS_BIN" --writer "$URL_s1" --reader "$URL_s2" --token "$TOKEN" --ids "$WORK/warm_ids.txt" \
  --writes 2000 | tee "$OUT/staleness.json"

fi

if part memory; then
say "4. memory with $MEM_ENTRIES entries in L1"
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
RSS_BEFORE=$(rss "$PID_on")
head -n "$MEM_ENTRIES" "$WORK/all_ids.txt" >"$WORK/mem_ids.txt"
for pass in 1 2 3; do
  "$KURA_BIN" bench --url "$URL_on" --token "$TOKEN" --ids-file "$WORK/mem_ids.txt" --dist uniform \
    --duration 20s --warmup 0s --concurrency 32 --json --out "$WORK/mem_$pass.json" >/dev/null
done
METRICS=$(curl -s "$URL_on/metrics")
L1_ENTRIES=$(grep -E '^cache_l1_entries' <<<"$METRICS" | awk '{print $2}')
L1_BYTES=$(grep -E '^cache_l1_bytes' <<<"$METRICS" | awk '{print $2}')
RSS_AFTER=$(rss "$PID_on")
echo "{\"l1_entries\":${L1_ENTRIES:-0},\"l1_bytes\":${L1_BYTES:-0},\"rss_before_kb\":$RSS_BEFORE,\"rss_after_kb\":$RSS_AFTER}" | tee "$OUT/memory.json"
fi

if part bcast; then
say "5. BCAST tracking cost: redis-benchmark SET with 0, 1, 4, 16 tracking connections"
TRACKERS=()
for n in 0 1 4 16; do
  while (( ${#TRACKERS[@]} < n )); do
    python3 - "$REDIS_PORT" <<'PY' &
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"HELLO 3\r\nCLIENT TRACKING ON BCAST PREFIX key:\r\n")
while s.recv(1 << 16):
    pass
PY
    TRACKERS+=($!)
    PIDS+=($!)
  done
  sleep 0.5
  rps=$(redis-benchmark -p "$REDIS_PORT" -t set -n 300000 -c 50 -r 100000 -q 2>/dev/null | sed -n 's/.*SET: \([0-9.]*\) requests.*/\1/p' | tail -1)
  echo "{\"trackers\":$n,\"set_rps\":${rps:-0}}" | tee "$OUT/bcast_$n.json"
done
for p in "${TRACKERS[@]}"; do kill "$p" 2>/dev/null || true; done
fi

{
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), load $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "commit: $(git rev-parse --short HEAD), date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "redis: $(redis-server --version | cut -d' ' -f3)"
} | tee "$OUT/machine.txt"
"${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS $NEAR_DB WITH (FORCE)"
say "raw results in $OUT"
