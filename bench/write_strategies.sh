#!/usr/bin/env bash
# Write strategies side by side: `PUT ?strategy=invalidate|through|behind` under the same load
# against one `kura serve` (PostgreSQL + its own redis-server with AOF everysec), measuring
# accepted writes per second, latency, database statements per accepted write and, for
# `behind`, the flush lag during the run and the time the queue takes to drain after it.
# Writes docs/bench/WRITE_STRATEGIES.md and keeps the raw files under bench/out/.
#
#   bench/write_strategies.sh
#   DURATION=5s PROFILES=20000 bench/write_strategies.sh      # a quick pass
#
# Settings (environment): DURATION (10s) CONCURRENCY (64) PROFILES (100000) KURA_BIN (skip the
# build, use this binary) WB_BENCH_DB (kura_wb_bench) OUT (docs/bench/WRITE_STRATEGIES.md)
# RENDER_ONLY (a bench/out/write-strategies-* directory: only re-render the report from it).
#
# Runs, each from the same state (own Redis emptied, then warmed with every profile unless
# "cold"): invalidate, through, behind, behind (cold cache: every first write of a profile
# reads it from PostgreSQL). Each run: `kura bench --method put --query strategy=<s>
# --body '{"phone":"080-{rand4}-{rand4}"}' --dist uniform --duration $DURATION
# --concurrency $CONCURRENCY --warmup 0s` (no warm-up, so that every request sent is counted
# against the statements PostgreSQL ran).
#
# Statements are counted with pg_stat_statements when PostgreSQL has loaded it (the script
# checks shared_preload_libraries and never changes the server's configuration; it creates the
# extension's view in its own database only), and with pg_stat_database.xact_commit in any
# case. Not a test: refuses to run under CI=true unless BENCH_FORCE=1. Touches only the
# database $WB_BENCH_DB (dropped and re-created), its own redis-server and kura processes (on
# free ports, stopped at exit by pid) and bench/out/.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

if [[ "${CI:-}" == "true" && "${BENCH_FORCE:-0}" != "1" ]]; then
  echo "bench/write_strategies.sh: refusing to run under CI=true (benchmarks are not tests)" >&2
  exit 2
fi

say() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
need() { command -v "$1" >/dev/null 2>&1 || { echo "write_strategies.sh: '$1' not found" >&2; exit 1; }; }
for c in cargo psql redis-server redis-cli python3 curl /usr/bin/time; do need "$c"; done

DURATION=${DURATION:-10s}
CONCURRENCY=${CONCURRENCY:-64}
PROFILES=${PROFILES:-100000}
DB=${WB_BENCH_DB:-kura_wb_bench}
OUT=${OUT:-$ROOT/docs/bench/WRITE_STRATEGIES.md}
# --- the report, rendered from a work directory's files --------------------------------------
render() { # <work directory>
  WORK="$1" OUT="$OUT" python3 - <<'EOF'
import json, os

work, out = os.environ["WORK"], os.environ["OUT"]
with open(os.path.join(work, "meta.json")) as f:
    meta = json.load(f)
runs = [("invalidate", "invalidate", "warm"), ("through", "through", "warm"),
        ("behind", "behind", "warm"), ("behind-cold", "behind", "cold")]

def load(name):
    with open(os.path.join(work, name)) as f:
        return json.load(f)

def text(name):
    with open(os.path.join(work, name)) as f:
        return f.read().strip()

rows = {}
for label, strategy, cache in runs:
    b = load(f"{label}.bench.json")
    pb, pa = load(f"{label}.pg-before.json"), load(f"{label}.pg-after.json")
    wb0, wb1 = load(f"{label}.wb-before.json"), load(f"{label}.wb-after.json")
    times = load(f"{label}.times.json")
    ok = b["statuses"].get("200", 0)
    stm = {k: pa["statements"].get(k, 0) - pb["statements"].get(k, 0) for k in ("update", "select", "other")}
    xact = pa["db"]["xact_commit"] - pb["db"]["xact_commit"]
    samples = []
    with open(os.path.join(work, f"{label}.queue.jsonl")) as f:
        for line in f:
            try:
                s = json.loads(line)
            except ValueError:
                continue
            if "depth" in s["status"]:
                samples.append((s["t"], s["status"]["depth"], s["status"]["oldest_age_ms"]))
    during = [s for s in samples if s[0] <= times["end"]]
    after = [s for s in samples if s[0] > times["end"]]
    wbd = {k: wb1.get(k, 0) - wb0.get(k, 0) for k in set(wb0) | set(wb1)}
    c0, c1 = load(f"{label}.cpu-before.json"), load(f"{label}.cpu-after.json")
    bc = load(f"{label}.bench-cpu.json")
    cpu = {k: c1[k] - c0[k] for k in c0}
    cpu["bench"] = bc["user"] + bc["system"]
    rows[label] = dict(
        strategy=strategy, cache=cache, accepted=ok, rate=ok / b["duration_secs"],
        p50=b["latency_ms"]["p50"], p99=b["latency_ms"]["p99"],
        other={k: v for k, v in b["statuses"].items() if k != "200"},
        errors=b["errors"] + b["timeouts"], stm=stm, stm_total=sum(stm.values()), xact=xact,
        max_lag=max((s[2] for s in during), default=0) / 1000,
        max_lag_after=max((s[2] for s in after), default=0) / 1000,
        max_depth=max((s[1] for s in samples), default=0),
        drain=(times["drained"] - times["end"]) if times["drained"] else None,
        load_before=text(f"{label}.load-before"), load_after=text(f"{label}.load-after"), wb=wbd,
        cpu=cpu,
    )

def per(n, d):
    return n / d if d else float("nan")

pgss = meta["pgss"] == "1"
through, behind = rows["through"], rows["behind"]
ratio = per(behind["rate"], through["rate"])

L = []
w = L.append
w("# Write strategies: invalidate vs through vs behind")
w("")
w("Generated by `bench/write_strategies.sh` (raw files: `bench/out/`, not committed). One `kura serve` "
  "(release build, default settings: 1 flusher, batches of up to 256, 20 ms linger) on PostgreSQL and "
  "its own `redis-server` with `appendonly yes`, `appendfsync everysec`.")
w("")
w("| | |")
w("|---|---|")
w(f"| date | {meta['date']} |")
w(f"| machine | {meta['machine']} |")
w(f"| PostgreSQL | {meta['pg_version']} (shared server, own database) |")
w(f"| Redis | {meta['redis_version']} (own server, AOF everysec) |")
w(f"| data | {int(meta['profiles']):,} profiles (`kura seed`), ids drawn uniformly |")
w(f"| load | `kura bench --method put --query strategy=<s> --body '{{\"phone\":\"080-{{rand4}}-{{rand4}}\"}}' "
  f"--dist uniform --duration {meta['duration']} --concurrency {meta['concurrency']} --warmup 0s` "
  "(closed loop, the load generator on the same 2 cores) |")
w(f"| load average | {meta['load_before_build']} before the build; per run below (1, 5, 15 min). "
  "Other work shares these 2 cores: absolute numbers move with it, the ratios less so. |")
w("")
w("## Results")
w("")
w("| strategy | cache at start | accepted writes/s | p50 ms | p99 ms | DB statements per accepted write | "
  "of which UPDATE / SELECT / other | DB transactions per accepted write | max flush lag during run | "
  "max queue depth | drain after run | load avg before → after |")
w("|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---|")
for label, _, _ in runs:
    r = rows[label]
    beh = r["strategy"] == "behind"
    stm = (f"{per(r['stm_total'], r['accepted']):.3f}" if pgss else "n/a")
    split = (f"{per(r['stm']['update'], r['accepted']):.3f} / {per(r['stm']['select'], r['accepted']):.3f} / "
             f"{per(r['stm']['other'], r['accepted']):.3f}" if pgss else "n/a")
    lag = f"{r['max_lag']:.2f} s" if beh else "—"
    depth = f"{r['max_depth']:,}" if beh else "—"
    drain = (f"{r['drain']:.2f} s" if r["drain"] is not None else "> 120 s") if beh else "—"
    w(f"| `{r['strategy']}` | {r['cache']} | {r['rate']:,.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {stm} | {split} | "
      f"{per(r['xact'], r['accepted']):.3f} | {lag} | {depth} | {drain} | {r['load_before']} → {r['load_after']} |")
w("")
w(f"**`behind` accepted {ratio:.1f}× the write rate of `through`** ({behind['rate']:,.0f}/s vs "
  f"{through['rate']:,.0f}/s, both on a warm cache)"
  + (f", with the flush lag at most {behind['max_lag']:.2f} s during the run and the queue empty "
     f"{behind['drain']:.2f} s after it." if behind["drain"] is not None else "; the queue did not drain within 120 s.")
  + f" The goal of at least 10× is {'met' if ratio >= 10 else 'missed'} on this machine.")
w("")
cb, ct = behind["cpu"], through["cpu"]
tb, tt = per(sum(cb.values()) * 1e6, behind["accepted"]), per(sum(ct.values()) * 1e6, through["accepted"])
ncpu = os.cpu_count() or 1
if pgss:
    work = (f"{per(behind['stm_total'], behind['accepted']):.3f} statements per accepted write against "
            f"{per(through['stm_total'], through['accepted']):.3f} for `through`")
else:
    work = (f"{per(behind['xact'], behind['accepted']):.3f} transactions per accepted write against "
            f"{per(through['xact'], through['accepted']):.3f} for `through`")
w("Why the ratio is bounded here: the load generator, the service, Redis and PostgreSQL share these "
  f"{ncpu} cores and every run keeps them busy, so each strategy's rate is set by the CPU it costs per "
  f"write, measured in the table below: about {tb:.0f} µs in all for a warm `behind` write (two Redis "
  "round trips per accept: the read of the current profile and the accept script, which writes four keys "
  "and a stream entry; the flusher's stream read and batched acknowledgements; the HTTP request on both "
  f"sides) against {tt:.0f} µs for `through` ({per(ct['postgres'] * 1e6, through['accepted']):.0f} µs of "
  f"it in PostgreSQL, {per(cb['postgres'] * 1e6, behind['accepted']):.0f} µs for `behind`). With the CPU "
  f"shared, the ratio cannot pass {tt:.0f} / {tb:.0f} = {per(tt, tb):.1f}× on this machine however "
  f"`behind` is built: reaching 10× would need a `behind` write to cost under {tt / 10:.0f} µs including "
  "its HTTP request. The ratio grows where `through` waits rather than computes, on a database on "
  "another host or with slow commits, since `behind`'s accept never touches the database: with the "
  "default pool of 16 connections `through` is bound by 16 / (time per UPDATE), so 10× the `behind` "
  f"rate measured here needs about {16 / max(behind['rate'] / 10, 1) * 1000:.0f} ms per UPDATE. What `behind` removes is the database work per write: {work}. With a cold "
  "cache the first write of each profile reads it from PostgreSQL through the cache-aside miss path, "
  "slower than `through`'s single UPDATE: `behind` pays off for profiles that are cached, as hot "
  "profiles are.")
w("")
w("CPU time per accepted write, in µs, from the load's start until the queue was empty (`/proc` "
  "counters; PostgreSQL is every `postgres` process of the shared server, so other databases' work "
  "counts too):")
w("")
w("| strategy | cache | kura serve | Redis | PostgreSQL | load generator | total |")
w("|---|---|---:|---:|---:|---:|---:|")
for label, _, _ in runs:
    r = rows[label]
    c = r["cpu"]
    us = {k: per(v * 1e6, r["accepted"]) for k, v in c.items()}
    w(f"| `{r['strategy']}` | {r['cache']} | {us['serve']:.0f} | {us['redis']:.0f} | {us['postgres']:.0f} | "
      f"{us['bench']:.0f} | {sum(us.values()):.0f} |")
w("")
w("Answers other than 200, transport errors and timeouts per run:")
w("")
for label, _, _ in runs:
    r = rows[label]
    w(f"- `{label}`: {r['other'] or 'none'}; {r['errors']} errors/timeouts")
w("")
w("Write-behind counters over each `behind` run (from `/metrics`):")
w("")
for label in ("behind", "behind-cold"):
    d = rows[label]["wb"]
    w(f"- `{label}`: accepted {d.get('cache_wb_accepted_total', 0):,.0f}, rows flushed {d.get('cache_wb_flushed_total', 0):,.0f}, "
      f"coalesced {d.get('cache_wb_coalesced_total', 0):,.0f}, batch retries {d.get('cache_wb_retried_total', 0):,.0f}, "
      f"dead-lettered {d.get('cache_wb_dead_lettered_total', 0):,.0f}, written through instead "
      f"{d.get('kura_wb_write_through_total', 0):,.0f}")
w("")
w("## How to read it")
w("")
w("- **accepted writes/s**: `200` answers per second of the run. For `invalidate` and `through` a 200 "
  "means PostgreSQL committed the row; for `behind` it means Redis holds the new profile, its pending "
  "copy and its queue entry (one atomic script), and a flusher commits it later.")
w("- **DB statements per accepted write**: statements PostgreSQL ran in the benchmark's database during "
  "the run and, for `behind`, until the queue drained, divided by the accepted writes"
  + (" (`pg_stat_statements`, top-level statements)." if pgss else " (`pg_stat_statements` is not loaded: n/a).")
  + " `invalidate` and `through` run one `UPDATE … RETURNING` per write. `behind` runs one "
  "`UPDATE … FROM UNNEST(…)` per flushed batch (up to 256 rows, several writes of one profile coalesced "
  "into one row), plus a `SELECT` for each profile the cache did not hold when a write to it was "
  "accepted (the accept reads the current profile through the cache): none with a warm cache, about "
  "one per write with a cold one while the cache fills.")
w("- **DB transactions**: `pg_stat_database.xact_commit` over the same span (read after PostgreSQL "
  "published the idle backends' counts); it includes the pool's connection checks.")
w("- **flush lag**: the age of the oldest write not yet committed (`kura wb status`, sampled every "
  "0.5 s); **drain**: from the end of the load until nothing is queued or being applied.")
w("- The cache is emptied before each run and, except for `behind-cold`, warmed with every profile "
  "(`kura warm`), so the three strategies start from the same state.")
w("")
with open(out, "w") as f:
    f.write("\n".join(L))
print(f"wrote {out}")
for label, _, _ in runs:
    r = rows[label]
    print(f"{label:12s} {r['rate']:8.0f}/s p50 {r['p50']:.2f} p99 {r['p99']:.2f} stm/write {per(r['stm_total'], r['accepted']):.3f} lag {r['max_lag']:.2f} drain {r['drain']}")
EOF
}
if [[ -n "${RENDER_ONLY:-}" ]]; then
  render "$RENDER_ONLY"
  exit 0
fi

WORK=$ROOT/bench/out/write-strategies-$(date +%Y%m%d-%H%M%S)
mkdir -p "$WORK/redis"
LOAD_BEFORE_BUILD=$(cut -d' ' -f1-3 /proc/loadavg)
RUN_DATE=$(date '+%Y-%m-%d %H:%M %Z')

if [[ -z "${KURA_BIN:-}" ]]; then
  say "building kura (release)"
  cargo build --release -q -p kura-server
  KURA_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/kura
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PSQL=(psql -h 127.0.0.1 -p 5432 -U postgres -Atq -v ON_ERROR_STOP=1)

REDIS_PID="" SERVE_PID="" SAMPLER_PID=""
cleanup() {
  for pid in $SAMPLER_PID $SERVE_PID $REDIS_PID; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
}
trap cleanup EXIT

# --- PostgreSQL: a database of our own ------------------------------------------------------
say "re-creating database $DB"
"${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)"
"${PSQL[@]}" -d postgres -c "CREATE DATABASE $DB"
PGSS=0
if "${PSQL[@]}" -d postgres -c 'show shared_preload_libraries' | tr ', ' '\n\n' | grep -qx pg_stat_statements; then
  "${PSQL[@]}" -d "$DB" -c 'CREATE EXTENSION IF NOT EXISTS pg_stat_statements'
  PGSS=1
else
  say "pg_stat_statements is not loaded: counting transactions (pg_stat_database) only"
fi

# --- Redis: our own, AOF everysec -------------------------------------------------------------
REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --protected-mode no --daemonize no \
  --dir "$WORK/redis" --logfile "$WORK/redis/redis.log" --save "" \
  --appendonly yes --appendfsync everysec &
REDIS_PID=$!
for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
RCLI=(redis-cli -p "$REDIS_PORT")

export DATABASE_URL="postgres://postgres@127.0.0.1:5432/$DB"
export REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
export KURA_NAMESPACE=cache
KURA_JWT_SECRET=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
export KURA_JWT_SECRET

say "seeding $PROFILES profiles"
"$KURA_BIN" seed --profiles "$PROFILES" --ids-out "$WORK/ids.txt" >/dev/null

SERVE_PORT=$(free_port)
BASE="http://127.0.0.1:$SERVE_PORT"
"$KURA_BIN" serve --listen "127.0.0.1:$SERVE_PORT" --wb-flushers 1 >"$WORK/serve.log" 2>&1 &
SERVE_PID=$!
for _ in $(seq 200); do curl -sf "$BASE/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
curl -sf "$BASE/healthz" >/dev/null || { echo "kura serve did not start:"; cat "$WORK/serve.log"; exit 1; }
TOKEN=$("$KURA_BIN" token --admin --sub "$(python3 -c 'import uuid; print(uuid.uuid4())')")

# --- measurements ------------------------------------------------------------------------------
pg_snapshot() { # -> json {statements: {update, select, other}, xact_commit, xact_rollback}
  local stm='{}'
  if [[ $PGSS == 1 ]]; then
    stm=$("${PSQL[@]}" -d "$DB" -c "
      select json_build_object(
        'update', coalesce(sum(calls) filter (where query ilike 'update%'), 0),
        'select', coalesce(sum(calls) filter (where query ilike 'select%'), 0),
        'other',  coalesce(sum(calls) filter (where query not ilike 'update%' and query not ilike 'select%'), 0))
      from pg_stat_statements
      where dbid = (select oid from pg_database where datname = current_database())
        and query not ilike '%pg_stat%' and query not ilike '%pg_database%'")
  fi
  local x
  x=$("${PSQL[@]}" -d postgres -c "select json_build_object('xact_commit', xact_commit, 'xact_rollback', xact_rollback) from pg_stat_database where datname = '$DB'")
  printf '{"statements": %s, "db": %s}\n' "$stm" "$x"
}

wb_metrics() { # the service's write-behind counters
  curl -sf "$BASE/metrics" | python3 -c '
import json, sys
out = {}
for line in sys.stdin:
    if line.startswith("#"):
        continue
    for name in ("cache_wb_accepted_total", "cache_wb_flushed_total", "cache_wb_coalesced_total",
                 "cache_wb_retried_total", "cache_wb_dead_lettered_total", "kura_wb_write_through_total"):
        if line.startswith(name + "{") or line.startswith(name + " "):
            out[name] = out.get(name, 0) + float(line.split()[-1])
print(json.dumps(out))'
}

sample_queue() { # every 0.5 s: time, depth, oldest age (ms), one JSON object per line
  while true; do
    s=$("$KURA_BIN" wb status --json 2>/dev/null || echo '{}')
    printf '{"t": %s, "status": %s}\n' "$(date +%s.%N)" "$s"
    sleep 0.5
  done
}

cpu_snapshot() { # CPU seconds used so far by kura serve, our redis-server and every PostgreSQL process
  python3 - "$SERVE_PID" "$REDIS_PID" <<'PY'
import json, os, sys
tick = os.sysconf("SC_CLK_TCK")
def cpu(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            v = f.read().rsplit(")", 1)[1].split()
        return (int(v[11]) + int(v[12])) / tick
    except (OSError, IndexError, ValueError):
        return 0.0
def comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""
pg = sum(cpu(p) for p in os.listdir("/proc") if p.isdigit() and comm(p) == "postgres")
print(json.dumps({"serve": cpu(sys.argv[1]), "redis": cpu(sys.argv[2]), "postgres": pg}))
PY
}

run_one() { # label strategy warm(0|1)
  local label=$1 strategy=$2 warm=$3
  say "run $label: strategy=$strategy, cache $([[ $warm == 1 ]] && echo warm || echo cold)"
  "${RCLI[@]}" flushall >/dev/null
  if [[ $warm == 1 ]]; then
    "$KURA_BIN" warm --limit "$PROFILES" --since-days 3650 --quiet >/dev/null
  fi
  # The same table state for every run: the dead rows of the previous one vacuumed.
  "${PSQL[@]}" -d "$DB" -c 'VACUUM (ANALYZE) profiles'
  sleep 11 # PostgreSQL publishes an idle backend's transaction counts within 10 s
  pg_snapshot >"$WORK/$label.pg-before.json"
  wb_metrics >"$WORK/$label.wb-before.json"
  cut -d' ' -f1-3 /proc/loadavg >"$WORK/$label.load-before"
  sample_queue >"$WORK/$label.queue.jsonl" &
  SAMPLER_PID=$!
  local t0 t1
  cpu_snapshot >"$WORK/$label.cpu-before.json"
  t0=$(date +%s.%N)
  /usr/bin/time -f '{"user": %U, "system": %S}' -o "$WORK/$label.bench-cpu.json" \
    "$KURA_BIN" bench --url "$BASE" --token "$TOKEN" --method put --query "strategy=$strategy" \
    --body '{"phone":"080-{rand4}-{rand4}"}' --ids-file "$WORK/ids.txt" --dist uniform \
    --duration "$DURATION" --concurrency "$CONCURRENCY" --warmup 0s \
    --json --out "$WORK/$label.bench.json" >/dev/null
  t1=$(date +%s.%N)
  cut -d' ' -f1-3 /proc/loadavg >"$WORK/$label.load-after"
  # Drain: until nothing is queued or being applied.
  local drained=""
  for _ in $(seq 1200); do
    s=$("$KURA_BIN" wb status --json)
    if python3 -c 'import json,sys; s=json.loads(sys.argv[1]); sys.exit(0 if s["depth"]==0 and s["in_flight"]==0 else 1)' "$s"; then
      drained=$(date +%s.%N); break
    fi
    sleep 0.1
  done
  cpu_snapshot >"$WORK/$label.cpu-after.json"
  kill "$SAMPLER_PID" 2>/dev/null || true; wait "$SAMPLER_PID" 2>/dev/null || true; SAMPLER_PID=""
  sleep 11
  pg_snapshot >"$WORK/$label.pg-after.json"
  wb_metrics >"$WORK/$label.wb-after.json"
  printf '{"start": %s, "end": %s, "drained": %s}\n' "$t0" "$t1" "${drained:-null}" >"$WORK/$label.times.json"
}

run_one invalidate invalidate 1
run_one through through 1
run_one behind behind 1
run_one behind-cold behind 0

say "stopping kura serve"
kill -TERM "$SERVE_PID"; wait "$SERVE_PID" 2>/dev/null || true; SERVE_PID=""

# --- report -------------------------------------------------------------------------------------
PG_VERSION=$("${PSQL[@]}" -d postgres -c 'show server_version')
REDIS_VERSION=$(redis-server --version | sed -E 's/.*v=([^ ]+).*/\1/')
export PGSS PG_VERSION REDIS_VERSION DURATION CONCURRENCY PROFILES LOAD_BEFORE_BUILD RUN_DATE
python3 -c '
import json, os, platform
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
mem = int(next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal"))) / 1048576
e = os.environ
print(json.dumps({
    "date": e["RUN_DATE"],
    "machine": f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, {platform.system()} {platform.release()}",
    "pg_version": e["PG_VERSION"], "redis_version": e["REDIS_VERSION"], "pgss": e["PGSS"],
    "duration": e["DURATION"], "concurrency": e["CONCURRENCY"], "profiles": e["PROFILES"],
    "load_before_build": e["LOAD_BEFORE_BUILD"]}))' >"$WORK/meta.json"
render "$WORK"
