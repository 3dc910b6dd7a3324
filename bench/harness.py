"""kura benchmark harness: runs the standard scenarios against `kura serve` and the seed's
Python service side by side, and writes docs/bench/RESULTS.md plus raw JSON.

Started by bench/run.sh (which builds the binaries and prepares the seed's venv); run with
the seed venv's Python (it needs `redis` and `psycopg2`). Every process it starts is stopped
on exit, on error and on SIGINT/SIGTERM/SIGHUP.

Scenarios (ids: 100,000 per service, same generator, same seeds, same concurrency):
  s1  hot key GET                          s4  cold 100k uniform GET
  s2  10,000 warmed ids, uniform GET       s5  PUT per write strategy
      (+ ceiling server, redis-benchmark)  s6  stampede: 200 GETs of one cold id, 1 and 2 instances
  s3  zipf over 100k ids from cold         s7  library hit path (criterion)
  mem Redis memory per 100,000 cached profiles (kura's warm endpoint)
"""
from __future__ import annotations

import datetime as dt
from contextlib import closing
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psycopg2
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
import http_tools  # noqa: E402
import report  # noqa: E402


# ----------------------------------------------------------------------------- config

def env(name, default):
    v = os.environ.get(name)
    return v if v not in (None, "") else default


def secs(d: str) -> float:
    m = re.fullmatch(r"\s*([\d.]+)\s*(ms|s|m)?\s*", d)
    if not m:
        raise SystemExit(f"bad duration {d!r} (use 500ms, 10s, 2m)")
    n = float(m.group(1))
    return {"ms": n / 1000, "m": n * 60}.get(m.group(2) or "s", n)


class Cfg:
    def __init__(self):
        self.root = Path(env("ROOT", Path(__file__).resolve().parent.parent))
        self.kura_bin = env("KURA_BIN", str(self.root / "target/release/kura"))
        self.bench_cmd = shlex.split(env("BENCH_CMD", f"{self.kura_bin} bench"))
        self.ceiling_bin = env("CEILING_BIN", "")
        self.seed_dir = Path(env("SEED_DIR", self.root / ".seed-python/peer"))
        self.duration = env("DURATION", "10s")
        self.zipf_duration = env("ZIPF_DURATION", "20s")
        self.warmup = env("WARMUP", "2s")
        self.repeats = int(env("REPEATS", "3"))
        self.concurrency = int(env("CONCURRENCY", "64"))
        self.zipf_exponent = env("ZIPF_EXPONENT", "1.0")
        self.warm_ids = int(env("WARM_IDS", "10000"))
        self.profiles = int(env("PROFILES", "100000"))
        self.stampede_n = int(env("STAMPEDE_N", "200"))
        self.seed_workers = int(env("SEED_WORKERS", "2"))
        self.scenarios = [s.strip() for s in env("SCENARIOS", "s1,s2,s3,s4,mem,s6,s5,s7").split(",")]
        self.profile = env("PROFILE", "0") == "1"
        self.settle_load = float(env("SETTLE_LOAD", "0"))
        self.settle_max = secs(env("SETTLE_MAX", "180s"))
        self.pg = env("PG_DSN", "host=127.0.0.1 port=5432 user=postgres")
        self.kura_db = env("KURA_DB", "kura_bench")
        self.seed_db = env("SEED_DB", "seedpeer")
        self.date = env("BENCH_DATE", dt.date.today().isoformat())
        self.raw = self.root / "docs/bench/raw" / self.date
        self.work = Path(env("BENCH_WORK", self.root / "bench/out" / dt.datetime.now().strftime("%Y%m%d-%H%M%S")))
        self.results_md = self.root / "docs/bench/RESULTS.md"
        self.jwt_secret = "kura-bench-" + os.urandom(8).hex()


CFG = Cfg()


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(cmd, **kw) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# ----------------------------------------------------------------------------- processes

class Procs:
    """Every process the harness starts, each in its own process group, stopped by id."""

    def __init__(self):
        self.live: dict[str, subprocess.Popen] = {}

    def start(self, name, argv, env=None, cwd=None):
        logf = open(CFG.work / f"{name}.log", "ab")
        p = subprocess.Popen(argv, env={**os.environ, **(env or {})}, cwd=cwd, stdout=logf,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        logf.close()
        self.live[name] = p
        # run.sh's exit trap stops whatever is still listed here if the harness itself dies
        with open(CFG.work / "pids", "a") as f:
            f.write(f"{p.pid}\t{argv[0]}\n")
        return p

    def stop(self, name, grace=10.0):
        p = self.live.pop(name, None)
        if p is None:
            return
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(5)
        # uvicorn workers share the group; make sure none is left behind
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def stop_all(self):
        for name in list(self.live)[::-1]:
            self.stop(name, grace=5.0)


PROCS = Procs()


def _on_signal(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def wait_http(url, timeout=30.0, proc=None):
    end = time.time() + timeout
    while time.time() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except Exception:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def rss_kb(pid: int) -> int:
    """VmRSS of a process and its descendants, in KiB."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for t in Path(f"/proc/{p}/task").iterdir():
                kids = (t / "children").read_text().split()
                todo.extend(int(k) for k in kids)
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
    return total


# ----------------------------------------------------------------------------- services

class Redis:
    def __init__(self, name):
        self.name = name
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        d = CFG.work / f"{name}-data"
        d.mkdir(parents=True, exist_ok=True)
        self.proc = PROCS.start(name, ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                       "--save", "", "--appendonly", "no", "--dir", str(d)])
        self.r = redis.Redis(port=self.port)
        for _ in range(100):
            try:
                self.r.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        else:
            raise RuntimeError(f"{name} did not start")

    def flush(self):
        self.r.flushall()

    def used_memory(self) -> int:
        return int(self.r.info("memory")["used_memory"])

    def memory(self) -> dict:
        """used_memory and used_memory_dataset (which leaves out client buffers), key counts,
        and MEMORY USAGE / STRLEN averaged over up to 500 profile keys."""
        info = self.r.info("memory")
        keys = []
        for k in self.r.scan_iter(match="cache:profile:*", count=1000):
            keys.append(k)
            if len(keys) >= 500:
                break
        pipe = self.r.pipeline()
        for k in keys:
            pipe.memory_usage(k, samples=0)
            pipe.strlen(k)
        vals = pipe.execute() if keys else []
        usage, lens = vals[0::2], vals[1::2]
        return {"used_memory": int(info["used_memory"]),
                "dataset": int(info.get("used_memory_dataset", info["used_memory"])),
                "keys": int(self.r.dbsize()),
                "profile_keys_sampled": len(keys),
                "avg_key_memory_usage": sum(usage) / len(usage) if usage else None,
                "avg_value_bytes": sum(lens) / len(lens) if lens else None}


class Kura:
    """One or more `kura serve` instances on the same database, Redis and namespace."""

    def __init__(self, rds: Redis):
        self.rds = rds
        self.db_url = f"postgres://postgres@127.0.0.1:5432/{CFG.kura_db}"
        # more `kura serve` flags (bench/freshness.py)
        self.extra: list[str] = []
        self.urls: list[str] = []
        self.names: list[str] = []
        self.token = sh([CFG.kura_bin, "token", "--sub", "00000000-0000-4000-8000-00000000beef",
                         "--admin", "--ttl", "86400"], env={**os.environ, "KURA_JWT_SECRET": CFG.jwt_secret})
        if not self.token:
            raise RuntimeError("kura token failed")

    def start(self, instances=1):
        for i in range(len(self.urls), instances):
            port = free_port()
            name = f"kura-{i}"
            p = PROCS.start(name, [CFG.kura_bin, "serve", "--listen", f"127.0.0.1:{port}",
                                   "--database-url", self.db_url, "--redis-url", self.rds.url,
                                   "--namespace", "cache"] + self.extra,
                            env={"KURA_JWT_SECRET": CFG.jwt_secret})
            url = f"http://127.0.0.1:{port}"
            wait_http(url + "/healthz", proc=p)
            self.urls.append(url)
            self.names.append(name)

    def stop(self):
        for n in self.names:
            PROCS.stop(n)
        self.urls, self.names = [], []

    def reset(self, instances=1):
        """A cold cache: stop, FLUSHALL, start fresh processes."""
        self.stop()
        self.rds.flush()
        self.start(instances)

    @property
    def url(self):
        return self.urls[0]

    @property
    def pid(self):
        return PROCS.live[self.names[0]].pid

    def loads(self) -> int:
        total = 0
        for u in self.urls:
            try:
                text = urllib.request.urlopen(u + "/metrics", timeout=5).read().decode()
            except Exception:
                continue
            for line in text.splitlines():
                if line.startswith("cache_loads_total") and 'cache_type="profile"' in line:
                    total += int(float(line.split()[-1]))
        return total


class Seed:
    """The seed's FastAPI service (uvicorn, SEED_WORKERS workers per instance)."""

    def __init__(self, rds: Redis):
        self.rds = rds
        self.db_url = f"postgresql+psycopg2://seedpeer:seedpeer@127.0.0.1:5432/{CFG.seed_db}"
        self.urls: list[str] = []
        self.names: list[str] = []
        self.token = None

    def start(self, instances=1):
        for i in range(len(self.urls), instances):
            port = free_port()
            name = f"seed-{i}"
            p = PROCS.start(name, [str(CFG.seed_dir / ".venv/bin/uvicorn"), "seedpeer.main:app",
                                   "--host", "127.0.0.1", "--port", str(port), "--workers",
                                   str(CFG.seed_workers), "--no-access-log", "--log-level", "warning"],
                            env={"DATABASE_URL": self.db_url, "REDIS_URL": self.rds.url + "/0",
                                 "WARM_ON_STARTUP": "0"}, cwd=CFG.seed_dir)
            url = f"http://127.0.0.1:{port}"
            wait_http(url + "/api/v1/admin/cache/metrics", proc=p, timeout=60)
            self.urls.append(url)
            self.names.append(name)

    def stop_extra(self):
        while len(self.names) > 1:
            PROCS.stop(self.names.pop())
            self.urls.pop()

    def reset(self, instances=1):
        """A cold cache: FLUSHALL (the seed keeps no state in process)."""
        if len(self.urls) > instances:
            self.stop_extra()
        self.start(instances)
        self.rds.flush()

    @property
    def url(self):
        return self.urls[0]

    @property
    def pid(self):
        return PROCS.live[self.names[0]].pid

    def counters(self):
        h, m = self.rds.r.mget("metrics:cache:hits", "metrics:cache:misses")
        return int(h or 0), int(m or 0)


# ----------------------------------------------------------------------------- PostgreSQL

def pg(db):
    c = psycopg2.connect(f"{CFG.pg} dbname={db}")
    c.autocommit = True
    return c


def pgss_reset(db):
    with closing(pg(db)) as c, c.cursor() as cur:
        cur.execute("select pg_stat_statements_reset(0, (select oid from pg_database "
                    "where datname = current_database()), 0)")


PGSS_SELECT = r"""
select coalesce(sum(calls),0)::bigint, coalesce(sum(rows),0)::bigint, coalesce(json_agg(json_build_object(
         'query', left(query, 200), 'calls', calls)), '[]')
from pg_stat_statements
where dbid = (select oid from pg_database where datname = current_database())
  and query ~* '^\s*select' and query ~* '\mfrom\s+profiles\M'
  and query ~* 'user_id\s*=\s*\$1'
"""
PGSS_UPDATE = r"""
select coalesce(sum(calls),0)::bigint, coalesce(sum(rows),0)::bigint
from pg_stat_statements
where dbid = (select oid from pg_database where datname = current_database())
  and query ~* '^\s*(with\M.*)?update\s+profiles\M'
"""


def pgss(db, sql):
    with closing(pg(db)) as c, c.cursor() as cur:
        cur.execute(sql)
        return cur.fetchone()


# ----------------------------------------------------------------------------- load runs

class Sampler(threading.Thread):
    """Samples RSS of a process tree and (for the seed) its hit/miss counters."""

    def __init__(self, pid=None, seed: Seed | None = None, every=0.25):
        super().__init__(daemon=True)
        self.pid, self.seed, self.every = pid, seed, every
        self.stop_ev = threading.Event()
        self.rss: list[int] = []
        self.counters: list[tuple[float, int, int]] = []

    def run(self):
        while not self.stop_ev.is_set():
            t = time.monotonic()
            if self.pid:
                self.rss.append(rss_kb(self.pid))
            if self.seed is not None:
                try:
                    h, m = self.seed.counters()
                    self.counters.append((t, h, m))
                except redis.RedisError:
                    pass
            self.stop_ev.wait(self.every)

    def stop(self):
        self.stop_ev.set()
        self.join()


def _at(samples, t):
    """The last sample taken at or before t (or the first)."""
    best = samples[0]
    for s in samples:
        if s[0] <= t:
            best = s
        else:
            break
    return best


def seed_hit_series(samples, t0, seconds):
    """Per-second hit ratio of the seed from its Redis counters, measuring from t0."""
    out = []
    if not samples:
        return out
    for k in range(int(seconds)):
        a, b = _at(samples, t0 + k), _at(samples, t0 + k + 1)
        dh, dm = b[1] - a[1], b[2] - a[2]
        out.append({"second": k, "hits": dh, "misses": dm,
                    "hit_ratio": (dh / (dh + dm)) if dh + dm else None})
    return out


def summarize(rep: dict) -> dict:
    lat = rep.get("latency_ms", {})
    return {
        "throughput": rep.get("throughput", 0.0),
        "requests": rep.get("requests", 0),
        "p50": lat.get("p50"), "p90": lat.get("p90"), "p99": lat.get("p99"),
        "p999": lat.get("p999"), "max": lat.get("max"), "mean": lat.get("mean"),
        "statuses": rep.get("statuses", {}), "errors": rep.get("errors", 0),
        "timeouts": rep.get("timeouts", 0), "x_cache": rep.get("x_cache", {}),
        "hit_ratio": rep.get("hit_ratio"),
        "intervals": rep.get("intervals", []),
    }


def bench(name: str, url: str, token: str | None, args: list[str], *, duration=None, warmup=None,
          pid=None, seed: Seed | None = None, seed_no=0) -> dict:
    """One `kura bench` run; returns a summary (and keeps its JSON under raw/)."""
    duration = duration or CFG.duration
    warmup = CFG.warmup if warmup is None else warmup
    out = CFG.raw / f"{name}.json"
    argv = CFG.bench_cmd + ["--url", url, "--concurrency", str(CFG.concurrency),
                            "--duration", duration, "--warmup", warmup, "--timeout", "5s",
                            "--seed", str(1000 + seed_no), "--out", str(out)] + args
    env_ = {**os.environ, "RUST_LOG": "warn"}
    if token:
        env_["KURA_BENCH_TOKEN"] = token
    sampler = Sampler(pid=pid, seed=seed)
    sampler.start()
    load0 = loadavg()[0]
    t_start = time.monotonic()
    try:
        with open(CFG.work / "bench.log", "ab") as lf:
            lf.write(f"\n### {name}: {' '.join(argv)}\n".encode())
            lf.flush()
            subprocess.run(argv, env=env_, stdout=lf, stderr=lf, check=True,
                           timeout=secs(duration) + secs(warmup) + 120)
    finally:
        sampler.stop()
    rep = json.loads(out.read_text())
    s = summarize(rep)
    s["name"] = name
    s["loadavg1"] = load0
    if sampler.rss:
        s["rss_max_kb"] = max(sampler.rss)
        s["rss_last_kb"] = sampler.rss[-1]
    if seed is not None and sampler.counters:
        t0 = t_start + secs(warmup)
        series = seed_hit_series(sampler.counters, t0, rep.get("duration_secs", secs(duration)))
        h = sum(x["hits"] for x in series)
        m = sum(x["misses"] for x in series)
        s["seed_hit_ratio"] = h / (h + m) if h + m else None
        s["seed_intervals"] = series
    log(f"  {name}: {s['throughput']:.0f} req/s p50 {s['p50']} ms p99 {s['p99']} ms "
        f"statuses {s['statuses']} hit {s.get('hit_ratio') if s.get('hit_ratio') is not None else s.get('seed_hit_ratio')}")
    return s


def rotate(r, pair):
    return pair if r % 2 == 0 else pair[::-1]


# ----------------------------------------------------------------------------- scenarios

class Run:
    def __init__(self):
        self.res: dict = {"scenarios": {}}
        CFG.work.mkdir(parents=True, exist_ok=True)
        if CFG.raw.exists():
            shutil.rmtree(CFG.raw)
        CFG.raw.mkdir(parents=True)

    # -- setup
    def setup_databases(self):
        log("databases: fresh", CFG.kura_db, "and", CFG.seed_db)
        with closing(pg("postgres")) as c, c.cursor() as cur:
            cur.execute(f'drop database if exists "{CFG.kura_db}" with (force)')
            cur.execute(f'create database "{CFG.kura_db}"')
            cur.execute("select 1 from pg_roles where rolname = 'seedpeer'")
            if not cur.fetchone():
                cur.execute("create role seedpeer login password 'seedpeer'")
            cur.execute("select 1 from pg_database where datname = %s", (CFG.seed_db,))
            if not cur.fetchone():
                cur.execute(f'create database "{CFG.seed_db}" owner seedpeer')
        for db in (CFG.kura_db, CFG.seed_db):
            with closing(pg(db)) as c, c.cursor() as cur:
                cur.execute("create extension if not exists pg_stat_statements")
        self.kura_ids_file = CFG.work / "kura_ids.txt"
        t = time.time()
        out = subprocess.run([CFG.kura_bin, "seed", "--profiles", str(CFG.profiles), "--seed", "42",
                              "--ids-out", str(self.kura_ids_file), "--database-url",
                              f"postgres://postgres@127.0.0.1:5432/{CFG.kura_db}"],
                             capture_output=True, text=True, check=True)
        log(" ", out.stdout.strip().splitlines()[-1], f"({time.time() - t:.1f}s)")
        t = time.time()
        out = subprocess.run([str(CFG.seed_dir / ".venv/bin/python"), "scripts/seed_db.py", str(CFG.profiles)],
                             cwd=CFG.seed_dir, capture_output=True, text=True, check=True,
                             env={**os.environ, "DATABASE_URL":
                                  f"postgresql+psycopg2://seedpeer:seedpeer@127.0.0.1:5432/{CFG.seed_db}"})
        log(" ", out.stdout.strip(), f"({time.time() - t:.1f}s)")
        self.seed_ids_file = CFG.work / "seed_ids.txt"
        shutil.copy(CFG.seed_dir / "data/all_ids.txt", self.seed_ids_file)
        self.ids = {"kura": self.kura_ids_file.read_text().split(),
                    "seed": self.seed_ids_file.read_text().split()}
        for svc in ("kura", "seed"):
            assert len(self.ids[svc]) == CFG.profiles, f"{svc}: {len(self.ids[svc])} ids"
            p = CFG.work / f"{svc}_warm_ids.txt"
            p.write_text("\n".join(self.ids[svc][:CFG.warm_ids]) + "\n")
        self.files = {"kura": {"all": self.kura_ids_file, "warm": CFG.work / "kura_warm_ids.txt"},
                      "seed": {"all": self.seed_ids_file, "warm": CFG.work / "seed_warm_ids.txt"}}

    def start_services(self):
        self.kura_redis = Redis("redis-kura")
        self.seed_redis = Redis("redis-seed")
        self.kura = Kura(self.kura_redis)
        self.seed = Seed(self.seed_redis)
        self.kura.start()
        self.seed.start()
        self.ceiling = None
        if CFG.ceiling_bin:
            port = free_port()
            p = PROCS.start("ceiling", [CFG.ceiling_bin],
                            env={"PORT": str(port), "REDIS_URL": self.kura_redis.url + "/0"})
            self.ceiling = f"http://127.0.0.1:{port}"
            wait_http(self.ceiling + "/hello", proc=p)
        log("services up: kura", self.kura.url, "seed", self.seed.url, "ceiling", self.ceiling,
            "redis", self.kura_redis.port, self.seed_redis.port)

    def svc(self, name):
        return self.kura if name == "kura" else self.seed

    def run_one(self, svc_name, name, args, r, **kw):
        s = self.svc(svc_name)
        return bench(f"{name}.{svc_name}.r{r + 1}", s.url, s.token, args, pid=s.pid,
                     seed=self.seed if svc_name == "seed" else None, seed_no=r, **kw)

    def scen(self, key):
        return self.res["scenarios"].setdefault(key, {"kura": [], "seed": []})

    # -- s1
    def s1(self):
        log("s1 hot key GET")
        sc = self.scen("s1_hot")
        for r in range(CFG.repeats):
            for svc in rotate(r, ["kura", "seed"]):
                s = self.svc(svc)
                s.reset()
                hot = self.ids[svc][0]
                http_tools.prime(s.url, [hot], s.token, 1)
                sc[svc].append(self.run_one(svc, "s1_hot", ["--id", hot, "--dist", "hot"], r))

    # -- s2
    def s2(self):
        log(f"s2 {CFG.warm_ids} warmed ids, uniform GET (+ ceiling, redis-benchmark)")
        sc = self.scen("s2_warm")
        lim = self.res.setdefault("limits", {"ceiling_get": [], "ceiling_hello": [], "redis_benchmark": []})
        prime_mem = self.res.setdefault("prime_memory", {"kura": [], "seed": []})
        for r in range(CFG.repeats):
            for svc in ("kura", "seed"):
                s = self.svc(svc)
                s.reset()
                before = s.rds.memory()
                p = http_tools.prime(s.url, self.ids[svc][:CFG.warm_ids], s.token, 32)
                after = s.rds.memory()
                n = sum(v for k, v in p["statuses"].items() if k == 200)
                row = {"cached": n, "before": before, "after": after, "prime": p,
                       "dataset_delta": after["dataset"] - before["dataset"],
                       "used_memory_delta": after["used_memory"] - before["used_memory"]}
                prime_mem[svc].append(row)
                log(f"  primed {svc}: {p['statuses']} in {p['seconds']:.1f}s, {after['keys']} keys, "
                    f"dataset +{row['dataset_delta'] / 1e6:.1f} MB, used_memory "
                    f"+{row['used_memory_delta'] / 1e6:.1f} MB, {after['avg_key_memory_usage']} B/key "
                    f"(value {after['avg_value_bytes']} B)")
            runs = ["kura", "seed"] + (["ceiling_get", "ceiling_hello"] if self.ceiling else [])
            runs = runs if r % 2 == 0 else runs[::-1]
            for what in runs:
                if what in ("kura", "seed"):
                    sc[what].append(self.run_one(what, "s2_warm", ["--ids-file", str(self.files[what]["warm"]),
                                                                   "--dist", "uniform"], r))
                elif what == "ceiling_get":
                    lim["ceiling_get"].append(bench(f"s2_warm.ceiling_get.r{r + 1}", self.ceiling, None,
                                                    ["--ids-file", str(self.files["kura"]["warm"]),
                                                     "--dist", "uniform"], seed_no=r))
                else:
                    lim["ceiling_hello"].append(bench(f"s2_warm.ceiling_hello.r{r + 1}", self.ceiling, None,
                                                      ["--path", "/hello"], seed_no=r))
            lim["redis_benchmark"].append(self.redis_benchmark(r))
            if CFG.profile and r == 0:
                self.perf_profile()

    def redis_benchmark(self, r):
        out = subprocess.run(["redis-benchmark", "-h", "127.0.0.1", "-p", str(self.kura_redis.port),
                              "-t", "get,set", "-n", "200000", "-q", "-c", "50"],
                             capture_output=True, text=True, timeout=300).stdout
        (CFG.raw / f"s2_warm.redis_benchmark.r{r + 1}.txt").write_text(out)
        res = {}
        for line in out.replace("\r", "\n").splitlines():
            m = re.match(r"^(GET|SET): ([\d.]+) requests per second(?:, p50=([\d.]+) msec)?", line.strip())
            if m:
                res[m.group(1)] = {"rps": float(m.group(2)),
                                   "p50": float(m.group(3)) if m.group(3) else None}
        log(f"  redis-benchmark: {res}")
        return res

    def perf_profile(self):
        """A flat perf profile of kura serve under the warmed GET load (PROFILE=1)."""
        if not shutil.which("perf"):
            log("  perf not installed; skipping the profile")
            return
        data = CFG.work / "perf.data"
        # flat profile: the release build has no frame pointers, so call chains would be noise
        p = subprocess.Popen(["perf", "record", "-F", "999", "-p", str(self.kura.pid), "-o", str(data)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            bench("s2_warm.kura.perf", self.kura.url, self.kura.token,
                  ["--ids-file", str(self.files["kura"]["warm"]), "--dist", "uniform"])
        finally:
            p.send_signal(signal.SIGINT)
            p.wait(60)
        rep = sh(["perf", "report", "--stdio", "-i", str(data), "--percent-limit", "0.3",
                  "--no-children", "--sort", "dso,symbol"])
        (CFG.raw / "perf_kura_warm.txt").write_text(
            "\n".join(" ".join(l.split()) for l in rep.splitlines()
                      if l.strip() and not l.startswith("# ....")) + "\n")
        log("  perf profile written")

    # -- s3
    def s3(self):
        log(f"s3 zipf({CFG.zipf_exponent}) over {CFG.profiles} ids from a cold cache")
        sc = self.scen("s3_zipf")
        for r in range(CFG.repeats):
            for svc in rotate(r, ["kura", "seed"]):
                self.svc(svc).reset()
                sc[svc].append(self.run_one(svc, "s3_zipf", ["--ids-file", str(self.files[svc]["all"]),
                                                             "--dist", "zipf", "--zipf-exponent",
                                                             CFG.zipf_exponent], r,
                                            duration=CFG.zipf_duration, warmup="0s"))

    # -- s4
    def s4(self):
        log(f"s4 cold cache, uniform over {CFG.profiles} ids")
        sc = self.scen("s4_cold")
        for r in range(CFG.repeats):
            for svc in rotate(r, ["kura", "seed"]):
                self.svc(svc).reset()
                sc[svc].append(self.run_one(svc, "s4_cold", ["--ids-file", str(self.files[svc]["all"]),
                                                             "--dist", "uniform"], r, warmup="0s"))

    # -- memory
    def mem(self):
        log("mem: Redis memory per 100,000 cached profiles (kura warm endpoint)")
        k = self.kura
        k.reset()
        before = k.rds.memory()
        rss0 = rss_kb(k.pid)
        t = time.time()
        rep = http_tools.request(k.url, "POST", f"/api/v1/admin/cache/warm?limit={CFG.profiles}&since_days=30",
                                 k.token)
        secs_ = time.time() - t
        body = json.loads(rep.body or b"{}")
        after = k.rds.memory()
        cached = body.get("cached", 0)
        m = {"status": rep.status, "cached": cached, "keys": after["keys"], "seconds": secs_,
             "before": before, "after": after,
             "per_100k_bytes": (after["dataset"] - before["dataset"]) / cached * 100_000 if cached else None,
             "per_100k_used_memory": (after["used_memory"] - before["used_memory"]) / cached * 100_000
             if cached else None,
             "kura_rss_before_kb": rss0, "kura_rss_after_kb": rss_kb(k.pid),
             "redis_info": {kk: v for kk, v in k.rds.r.info("memory").items()
                            if kk in ("used_memory", "used_memory_rss", "mem_fragmentation_ratio",
                                      "used_memory_dataset", "mem_allocator")}}
        self.res["memory"] = m
        log(f"  warm: {rep.status} {body} in {secs_:.1f}s; dataset +{(after['dataset'] - before['dataset']) / 1e6:.1f} MB "
            f"for {cached}; {after['avg_key_memory_usage']} B/key (value {after['avg_value_bytes']} B)")

    # -- s6
    def s6(self):
        log(f"s6 stampede: {CFG.stampede_n} concurrent GETs of one cold id")
        st = self.res.setdefault("stampede", {})
        for r in range(CFG.repeats):
            plan = [("kura", 1), ("seed", 1), ("kura", 2), ("seed", 2)]
            if r % 2:
                plan = [("seed", 1), ("kura", 1), ("seed", 2), ("kura", 2)]
            for svc, inst in plan:
                s = self.svc(svc)
                db = CFG.kura_db if svc == "kura" else CFG.seed_db
                s.reset(inst)
                uid = self.ids[svc][100 + r]
                time.sleep(0.3)
                pgss_reset(db)
                loads0 = s.loads() if svc == "kura" else None
                res = http_tools.stampede(s.urls[:inst], uid, CFG.stampede_n, s.token)
                time.sleep(0.5)  # pg_stat_statements counts at statement end
                calls, rows, queries = pgss(db, PGSS_SELECT)
                row = {"instances": inst, "id": uid, "selects": int(calls), "rows": int(rows),
                       "queries": queries, "statuses": res.statuses, "x_cache": res.x_cache,
                       "errors": res.errors, "wall_s": res.wall_s, "send_ms": res.send_s * 1000,
                       "max_ms": res.max_latency_ms,
                       "p50_ms": res.p50_latency_ms}
                if svc == "kura":
                    row["loads"] = s.loads() - loads0
                else:
                    h, m = s.counters()
                    row["app_hits"], row["app_misses"] = h, m
                st.setdefault(f"{svc}_{inst}", []).append(row)
                (CFG.raw / f"s6_stampede.{svc}_{inst}.r{r + 1}.json").write_text(json.dumps(row, indent=2))
                log(f"  {svc} x{inst}: SELECTs {calls}, statuses {res.statuses}, x-cache {res.x_cache}, "
                    f"errors {res.errors}, wall {res.wall_s * 1000:.0f} ms")
        self.kura.reset(1)
        self.seed.reset(1)

    # -- s5
    def s5(self):
        log("s5 PUT per write strategy (uniform over all ids, cold cache)")
        for strat in ("invalidate", "through", "behind"):
            sc = self.scen(f"s5_put_{strat}")
            unavailable = set()
            for r in range(CFG.repeats):
                for svc in rotate(r, ["kura", "seed"]):
                    if svc in unavailable:
                        continue
                    s = self.svc(svc)
                    db = CFG.kura_db if svc == "kura" else CFG.seed_db
                    s.reset()
                    pgss_reset(db)
                    res = self.run_one(svc, f"s5_put_{strat}", ["--ids-file", str(self.files[svc]["all"]),
                                                                "--dist", "uniform", "--method", "put",
                                                                "--query", f"strategy={strat}"], r)
                    res["db_update_rows_at_end"] = int(pgss(db, PGSS_UPDATE)[1])
                    # write-behind: wait (bounded) until the database stops receiving updates
                    t0, prev, cur = time.time(), -1, res["db_update_rows_at_end"]
                    while cur != prev and time.time() - t0 < 60:
                        time.sleep(1.0)
                        prev, cur = cur, int(pgss(db, PGSS_UPDATE)[1])
                    res["db_update_rows_final"] = cur
                    res["drain_s"] = max(0.0, time.time() - t0 - 1.0)
                    ok = sum(v for k, v in res["statuses"].items() if str(k).startswith("2"))
                    res["accepted"] = ok
                    sc[svc].append(res)
                    if ok == 0:
                        log(f"  {svc} {strat}: no 2xx answer ({res['statuses']}): not available")
                        unavailable.add(svc)

    # -- s7
    def s7(self):
        log("s7 library hit path vs bare redis-rs GET (criterion)")
        self.kura_redis.flush()
        crit = Path(os.environ.get("CARGO_TARGET_DIR", CFG.root / "target")) / "criterion"
        for g in ("hit_path", "hit_path_64_in_flight"):
            shutil.rmtree(crit / g, ignore_errors=True)
        with open(CFG.work / "criterion.log", "wb") as lf:
            p = subprocess.run(["cargo", "bench", "-p", "kura", "--bench", "hit_path", "--", "--noplot"],
                               cwd=CFG.root, env={**os.environ, "REDIS_URL": self.kura_redis.url},
                               stdout=lf, stderr=subprocess.STDOUT, timeout=1800)
        hp = {"exit": p.returncode}
        for g, per in (("hit_path", 1), ("hit_path_64_in_flight", 64)):
            for est in sorted((crit / g).glob("*/new/estimates.json")):
                f = est.parent.parent.name
                e = json.loads(est.read_text())
                shutil.copy(est, CFG.raw / f"s7_{g}.{f}.estimates.json")
                mean, median = e["mean"]["point_estimate"], e["median"]["point_estimate"]
                hp.setdefault(g, {})[f] = {"mean_ns": mean, "median_ns": median,
                                           "ci_low_ns": e["mean"]["confidence_interval"]["lower_bound"],
                                           "ci_high_ns": e["mean"]["confidence_interval"]["upper_bound"],
                                           "ops_per_s": per * 1e9 / mean, "per_iter": per}
        self.res["hit_path"] = hp
        log(f"  criterion exit {p.returncode}: "
            + ", ".join(f"{g}/{f} {v['mean_ns'] / 1000:.1f} us" for g in ("hit_path", "hit_path_64_in_flight")
                        for f, v in hp.get(g, {}).items()))


def environment() -> dict:
    cpu = sh(["lscpu"])
    model = next((l.split(":", 1)[1].strip() for l in cpu.splitlines() if l.startswith("Model name")), "?")
    mem_kb = int(next(l.split()[1] for l in Path("/proc/meminfo").read_text().splitlines()
                      if l.startswith("MemTotal")))
    git = lambda *a: sh(["git", "-C", str(CFG.root), *a])  # noqa: E731
    dirty = subprocess.run(["git", "-C", str(CFG.root), "status", "--porcelain", "--", "crates", "Cargo.toml",
                            "Cargo.lock", "migrations"], capture_output=True, text=True).stdout
    try:
        from importlib import metadata
        deps = {d: metadata.version(d) for d in ("fastapi", "starlette", "uvicorn", "uvloop", "httptools",
                                                  "SQLAlchemy", "psycopg2-binary", "redis")}
    except Exception:
        deps = {}
    with closing(pg("postgres")) as c, c.cursor() as cur:
        cur.execute("show server_version")
        pgv = cur.fetchone()[0]
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu_model": model, "cores": os.cpu_count(), "mem_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": sh(["uname", "-r"]), "os": sh(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "loadavg_start": loadavg(),
        "loadavg_before_build": os.environ.get("BENCH_LOADAVG_BEFORE_BUILD", ""),
        "rustc": sh(["rustc", "-V"]),
        "kura_commit": git("rev-parse", "HEAD"), "kura_commit_short": git("rev-parse", "--short", "HEAD"),
        "kura_dirty": [l[3:] for l in dirty.splitlines()],
        "kura_version": sh([CFG.kura_bin, "--version"]),
        "redis": sh(["redis-server", "--version"]),
        "postgresql": pgv,
        "python": sys.version.split()[0],
        "seed_deps": deps,
        "config": {k: getattr(CFG, k) for k in ("duration", "zipf_duration", "warmup", "repeats",
                                                "concurrency", "zipf_exponent", "warm_ids", "profiles",
                                                "stampede_n", "seed_workers", "scenarios",
                                                "settle_load")},
        "bench_cmd": " ".join(CFG.bench_cmd).replace(str(CFG.root) + "/", ""),
    }


def main():
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    run = Run()
    if CFG.settle_load > 0:
        # let the builds' load decay (and, on a shared machine, wait a bit for quieter cores)
        end = time.time() + CFG.settle_max
        while loadavg()[0] > CFG.settle_load and time.time() < end:
            time.sleep(5)
        log(f"settled: load {loadavg()} (target {CFG.settle_load}, waited at most {CFG.settle_max:.0f} s)")
    t0 = time.time()
    run.res["meta"] = environment()
    log(f"load average at start: {run.res['meta']['loadavg_start']}; raw -> {CFG.raw}")
    try:
        run.setup_databases()
        run.start_services()
        for s in CFG.scenarios:
            getattr(run, s)()
            run.res["meta"].setdefault("loadavg_after", {})[s] = loadavg()
            (CFG.raw / "results.json").write_text(json.dumps(run.res, indent=1))
    finally:
        PROCS.stop_all()
    run.res["meta"]["loadavg_end"] = loadavg()
    run.res["meta"]["wall_s"] = time.time() - t0
    (CFG.raw / "results.json").write_text(json.dumps(run.res, indent=1))
    report.write(run.res, CFG.results_md, CFG.raw.relative_to(CFG.root / "docs/bench"),
                 CFG.root / "docs/bench/findings.md")
    log(f"done in {(time.time() - t0) / 60:.1f} min: {CFG.results_md}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as e:
        PROCS.stop_all()
        log(f"interrupted ({e}); every started process stopped")
        sys.exit(130)
