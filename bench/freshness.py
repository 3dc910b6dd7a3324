"""A hot key across its expiries, eager refresh off and on, beside the seed and the ceiling.

Started by bench/freshness.sh (which builds the binaries and prepares the seed's venv), with
the seed venv's Python. Uses the harness's services (bench/harness.py): PostgreSQL databases
of its own, one redis-server per service, two instances of each service.

- kura: two `kura serve` on one Redis and database, `--ttl settings=5s` (settings have no
  adaptive rule, so 5 s is the TTL the key lives by, ±10 % jitter), with and without
  `--eager-refresh settings=$BETA`; one user's settings document read by $CONCURRENCY
  connections spread over both for $DURATION. Loads: `cache_loads_total{cache_type="settings"}`
  of both instances (read every 20 ms) and, as a cross-check, the SELECTs on `settings`
  reaching PostgreSQL (pg_stat_statements).
- the seed: two instances (its TTL is 300 s in its code): the hot profile's key is deleted
  every 5 s to stand for an expiry; loads: SELECTs on `profiles`.
- the ceiling: the same load on its Redis GET (no expiry), the limit line.

Both services reach PostgreSQL through bench/pg_delay.py, which delays every reply by
$DB_DELAY_MS (20 ms): a load takes at least that long, as a real query over a network does.

Each of kura off, kura on and the seed runs $ROUNDS times in rotating order. Writes
docs/bench/raw/freshness-<date>/ (each run's JSON, results.json) and prints a summary.
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import closing
from pathlib import Path

os.environ.setdefault("BENCH_DATE", "freshness-" + time.strftime("%Y-%m-%d"))
os.environ.setdefault("PROFILES", "2000")
os.environ.setdefault("WARM_IDS", "100")
os.environ.setdefault("KURA_DB", "kura_bench_fresh")
os.environ.setdefault("SEED_DB", "seedpeer_fresh")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from harness import CFG, PROCS, Kura, Redis, Run, Seed, free_port, log, pg, wait_http  # noqa: E402

DURATION = os.environ.get("DURATION", "60s")
ROUNDS = int(os.environ.get("ROUNDS", "2"))
BETA = os.environ.get("BETA", "1.0")
TTL = os.environ.get("TTL", "5s")
TOOL = os.environ.get("HOT_KEY_BIN", str(CFG.root / "target/release/examples/hot_key_expiry"))
# Every database reply is delayed by this much (bench/pg_delay.py), so a load takes a known
# time and a reader that waits for one shows it.
DB_DELAY_MS = float(os.environ.get("DB_DELAY_MS", "20"))

SELECTS = r"""
select coalesce(sum(calls),0)::bigint from pg_stat_statements
where dbid = (select oid from pg_database where datname = current_database())
  and query ~* '^\s*select' and query ~* '\mfrom\s+{table}\M'
"""


def selects(db, table):
    with closing(pg(db)) as c, c.cursor() as cur:
        cur.execute(SELECTS.replace("{table}", table))
        return int(cur.fetchone()[0])


def http(method, url, token, body=None):
    req = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode())
    req.add_header("Authorization", f"Bearer {token}")
    if body is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status


def tool(name, urls, path, token, extra):
    out = CFG.raw / f"{name}.json"
    argv = [TOOL, "--path", path, "--concurrency", str(CFG.concurrency), "--duration", DURATION]
    for u in urls:
        argv += ["--url", u]
    if token:
        argv += ["--token", token]
    argv += extra
    with open(CFG.work / "freshness.log", "ab") as lf:
        lf.write(f"\n### {name}: {' '.join(argv)}\n".encode())
        res = subprocess.run(argv, stdout=subprocess.PIPE, stderr=lf, check=True,
                             timeout=harness.secs(DURATION) + 120)
    rep = json.loads(res.stdout)
    out.write_text(json.dumps(rep, indent=1))
    return rep


def summary(rep, loads_db):
    ev = rep["events"]
    worst = lambda k: max((e[k] for e in ev), default=None)  # noqa: E731
    return {
        "throughput": round(rep["whole"]["throughput"]),
        "p50_ms": rep["whole"]["p50_ms"], "p99_ms": rep["whole"]["p99_ms"], "max_ms": rep["whole"]["max_ms"],
        "misses": rep["whole"]["misses"],
        "events": len(ev),
        "loads_per_event": [e["loads"] for e in ev],
        "loads_db": loads_db,
        "event_p99_ms_worst": worst("p99_ms"), "event_max_ms_worst": worst("max_ms"),
        "event_misses": [e["misses"] for e in ev],
    }


def kura_round(run, rds, mode, r, db_port):
    k = Kura(rds)
    k.db_url = f"postgres://postgres@127.0.0.1:{db_port}/{CFG.kura_db}"
    k.extra = ["--ttl", f"settings={TTL}"] + (["--eager-refresh", f"settings={BETA}"] if mode == "on" else [])
    rds.flush()
    k.start(2)
    hot = run.ids["kura"][0]
    http("PUT", f"{k.urls[0]}/api/v1/profiles/{hot}/settings", k.token, {"theme": "dark", "lang": "ja"})
    # Cached before the load starts: every miss measured is an expiry's.
    http("GET", f"{k.urls[0]}/api/v1/profiles/{hot}/settings", k.token)
    harness.pgss_reset(CFG.kura_db)
    before = selects(CFG.kura_db, "settings")
    rep = tool(f"kura_{mode}.r{r + 1}", k.urls, f"/api/v1/profiles/{hot}/settings", k.token,
               ["--loads-metric", 'cache_loads_total{cache_type="settings"}'])
    loads_db = selects(CFG.kura_db, "settings") - before
    k.stop()
    return summary(rep, loads_db)


def seed_round(run, seed, r):
    seed.reset(2)
    hot = run.ids["seed"][0]
    urllib.request.urlopen(urllib.request.Request(f"{seed.urls[0]}/api/v1/profiles/{hot}"), timeout=10).read()
    harness.pgss_reset(CFG.seed_db)
    before = selects(CFG.seed_db, "profiles")
    rep = tool(f"seed.r{r + 1}", seed.urls, f"/api/v1/profiles/{hot}", seed.token,
               ["--expire-key", f"cache:profile:{hot}", "--expire-redis", seed.rds.url + "/0",
                "--expire-every", TTL])
    loads_db = selects(CFG.seed_db, "profiles") - before
    return summary(rep, loads_db)


def main():
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, harness._on_signal)
    run = Run()
    run.res["meta"] = harness.environment()
    run.res["meta"].update({"duration": DURATION, "rounds": ROUNDS, "beta": BETA, "ttl": TTL,
                            "concurrency": CFG.concurrency, "db_delay_ms": DB_DELAY_MS})
    res = run.res["freshness"] = {"kura_off": [], "kura_on": [], "seed": [], "ceiling": []}
    try:
        run.setup_databases()
        kura_redis = Redis("redis-kura")
        seed_redis = Redis("redis-seed")
        db_port = free_port()
        PROCS.start("pg-delay", [sys.executable, str(CFG.root / "bench/pg_delay.py"), "--listen-port",
                                 str(db_port), "--delay-ms", str(DB_DELAY_MS)])
        time.sleep(0.5)
        seed = Seed(seed_redis)
        seed.db_url = f"postgresql+psycopg2://seedpeer:seedpeer@127.0.0.1:{db_port}/{CFG.seed_db}"
        seed.start(2)
        ceiling = None
        if CFG.ceiling_bin:
            port = free_port()
            p = PROCS.start("ceiling", [CFG.ceiling_bin],
                            env={"PORT": str(port), "REDIS_URL": kura_redis.url + "/0"})
            ceiling = f"http://127.0.0.1:{port}"
            wait_http(ceiling + "/hello", proc=p)
        order = ["kura_off", "kura_on", "seed"]
        for r in range(ROUNDS):
            for what in order[r % 3:] + order[:r % 3]:
                log(f"round {r + 1}: {what}")
                if what == "seed":
                    s = seed_round(run, seed, r)
                else:
                    s = kura_round(run, kura_redis, what.split("_")[1], r, db_port)
                res[what].append(s)
                log(f"  {what}: {s['throughput']} req/s, p99 {s['p99_ms']} ms, max {s['max_ms']} ms, "
                    f"misses {s['misses']}, events {s['events']}, loads/event {s['loads_per_event']}, "
                    f"db loads {s['loads_db']}, worst event p99 {s['event_p99_ms_worst']} ms "
                    f"max {s['event_max_ms_worst']} ms")
                (CFG.raw / "results.json").write_text(json.dumps(run.res, indent=1))
            if ceiling:
                # The same hot profile, cached by kura's first read, through the bare GET.
                k = Kura(kura_redis)
                k.db_url = f"postgres://postgres@127.0.0.1:{db_port}/{CFG.kura_db}"
                k.start(1)
                hot = run.ids["kura"][0]
                http("GET", f"{k.url}/api/v1/profiles/{hot}", k.token)
                k.stop()
                rep = tool(f"ceiling.r{r + 1}", [ceiling], f"/api/v1/profiles/{hot}", None, [])
                res["ceiling"].append(summary(rep, None))
                log(f"  ceiling: {res['ceiling'][-1]['throughput']} req/s p99 {res['ceiling'][-1]['p99_ms']} ms")
    finally:
        PROCS.stop_all()
    (CFG.raw / "results.json").write_text(json.dumps(run.res, indent=1))
    log(f"results: {CFG.raw / 'results.json'}")


if __name__ == "__main__":
    main()
