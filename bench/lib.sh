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
