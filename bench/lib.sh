# Shared by the benchmark scripts (sourced, not run): logging, free ports, a redis-server
# of the script's own, and the ceiling server's build.

say() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_redis <dir> [redis-server args...]: a redis-server without persistence on a free
# port, its pid added to PIDS; sets REDIS_PORT and REDIS_URL once it answers.
start_redis() {
  local dir=$1; shift
  REDIS_PORT=$(free_port)
  redis-server --port "$REDIS_PORT" --save '' --appendonly no --dir "$dir" --daemonize no \
    "$@" >"$dir/redis.log" 2>&1 &
  PIDS+=($!)
  REDIS_URL=redis://127.0.0.1:$REDIS_PORT
  for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
}

# build_ceiling <root> <source dir>: builds the ceiling server (bare axum + redis-rs)
# outside the workspace, in <root>/.seed-python/ceiling; sets CEILING_BIN ("" when there is
# no source).
build_ceiling() {
  local root=$1 src=$2
  local dir=$root/.seed-python/ceiling
  CEILING_BIN=""
  if [[ -f "$dir/Cargo.toml" || -d "$src" ]]; then
    if [[ ! -f "$dir/Cargo.toml" ]]; then
      mkdir -p "$dir"; cp -R "$src/." "$dir/"; chmod -R u+w "$dir"
    fi
    grep -q '^\[workspace\]' "$dir/Cargo.toml" || printf '\n[workspace]\n' >> "$dir/Cargo.toml"
    say "building the ceiling server"
    (cd "$dir" && CARGO_TARGET_DIR="$dir/target" cargo build --release -q)
    CEILING_BIN=$dir/target/release/ceiling
  else
    say "no ceiling server source at $src: its lines are left out"
  fi
}

# ensure_pg_stat_statements <caller>: loads pg_stat_statements into PostgreSQL at 127.0.0.1:5432
# if it is not (ALTER SYSTEM SET shared_preload_libraries and one restart of the cluster);
# BENCH_PG_RESTART=0 makes it stop with a message instead. Needs PSQL (an array) set.
ensure_pg_stat_statements() {
  local caller=$1 loaded ver cluster
  loaded=$("${PSQL[@]}" -c 'show shared_preload_libraries')
  if [[ ",${loaded// /}," != *",pg_stat_statements,"* ]]; then
    if [[ "${BENCH_PG_RESTART:-1}" != "1" ]]; then
      echo "$caller: pg_stat_statements is not in shared_preload_libraries; add it (and restart PostgreSQL) or allow BENCH_PG_RESTART=1" >&2
      exit 1
    fi
    ver=$("${PSQL[@]}" -c 'show server_version_num'); ver=${ver:0:2}
    cluster=${PG_CLUSTER:-main}
    say "pg_stat_statements not loaded: ALTER SYSTEM SET shared_preload_libraries and restart PostgreSQL $ver/$cluster"
    "${PSQL[@]}" -c "ALTER SYSTEM SET shared_preload_libraries = '${loaded:+$loaded,}pg_stat_statements'"
    pg_ctlcluster --skip-systemctl-redirect "$ver" "$cluster" restart
    for _ in $(seq 60); do "${PSQL[@]}" -c 'select 1' >/dev/null 2>&1 && break; sleep 0.5; done
    "${PSQL[@]}" -c 'show shared_preload_libraries' | grep -q pg_stat_statements \
      || { echo "$caller: pg_stat_statements still not loaded" >&2; exit 1; }
  fi
}

# prepare_seed <root> <caller>: the seed's service copied to $SEED_DIR (default
# <root>/.seed-python/peer, git-ignored) from $SEED_SRC, with a venv; exports SEED_DIR.
prepare_seed() {
  local root=$1 caller=$2
  SEED_SRC=${SEED_SRC:-$root/../shared/peers/seed-python}
  export SEED_DIR=${SEED_DIR:-$root/.seed-python/peer}
  if [[ ! -f "$SEED_DIR/seedpeer/main.py" ]]; then
    [[ -d "$SEED_SRC" ]] || { echo "$caller: the seed's service is not at $SEED_SRC (set SEED_SRC)" >&2; exit 1; }
    say "copying the seed's service to $SEED_DIR"
    mkdir -p "$SEED_DIR"; cp -R "$SEED_SRC/." "$SEED_DIR/"; chmod -R u+w "$SEED_DIR"
  fi
  if [[ ! -x "$SEED_DIR/.venv/bin/uvicorn" ]]; then
    say "creating the seed's venv"
    python3 -m venv "$SEED_DIR/.venv"
    "$SEED_DIR/.venv/bin/pip" install -q fastapi 'uvicorn[standard]' sqlalchemy psycopg2-binary redis
  fi
}
