"""Renders docs/bench/RESULTS.md from the harness's results.json.

Re-render without re-running:  python3 bench/report.py docs/bench/raw/<date>/results.json
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import charts  # noqa: E402  (bench/charts.py, beside this file)

SCENARIOS = [
    ("s1_hot", "1. hot key GET (one id)"),
    ("s2_warm", "2. 10,000 warmed ids, uniform GET"),
    ("s3_zipf", "3. zipf(1.0) over 100,000 ids, from cold"),
    ("s4_cold", "4. 100,000 ids uniform GET, from cold"),
    ("s5_put_invalidate", "5a. PUT `strategy=invalidate`"),
    ("s5_put_through", "5b. PUT `strategy=through`"),
    ("s5_put_behind", "5c. PUT `strategy=behind`"),
]


HP_GROUPS = {"hit_path": "one at a time", "hit_path_64_in_flight": "64 in flight"}


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def f_rps(x):
    return "–" if x is None else f"{x:,.0f}"


def f_ms(x):
    if x is None:
        return "–"
    return f"{x:.2f}" if x < 100 else f"{x:.0f}"


def f_pct(x):
    return "–" if x is None else f"{x * 100:.1f} %"


def f_ratio(x):
    return "–" if x is None else (f"{x:.1f}×" if x < 100 else f"{x:.0f}×")


def ok_runs(runs):
    """Runs that got at least one 2xx answer."""
    return [r for r in runs if any(str(k).startswith("2") for k in r.get("statuses", {}))]


def agg(runs):
    runs = ok_runs(runs)
    if not runs:
        return None
    tp = [r["throughput"] for r in runs]
    hit = [r.get("hit_ratio") if r.get("hit_ratio") is not None else r.get("seed_hit_ratio") for r in runs]
    statuses = {}
    for r in runs:
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    return {"rps": med(tp), "rps_min": min(tp), "rps_max": max(tp), "n": len(runs),
            "p50": med(r["p50"] for r in runs), "p90": med(r["p90"] for r in runs),
            "p99": med(r["p99"] for r in runs), "p999": med(r["p999"] for r in runs),
            "hit": med(hit), "statuses": statuses,
            "errors": sum(r["errors"] + r["timeouts"] for r in runs),
            "rss_max_kb": med(r.get("rss_max_kb") for r in runs),
            "update_rows_end": med(r.get("db_update_rows_at_end") for r in runs),
            "update_rows_final": med(r.get("db_update_rows_final") for r in runs),
            "drain_s": med(r.get("drain_s") for r in runs),
            "requests": med(r["requests"] for r in runs)}


def non2xx(a):
    bad = {k: v for k, v in a["statuses"].items() if not str(k).startswith("2")}
    parts = [f"{k}: {v}" for k, v in sorted(bad.items())]
    if a["errors"]:
        parts.append(f"transport errors/timeouts: {a['errors']}")
    return ", ".join(parts)


def rps_cell(a):
    if a is None:
        return "n/a"
    spread = f" ({a['rps_min']:,.0f}–{a['rps_max']:,.0f})" if a["n"] > 1 else ""
    return f"**{f_rps(a['rps'])}**{spread}"


def lat_cell(a):
    return "n/a" if a is None else f"{f_ms(a['p50'])} / {f_ms(a['p99'])}"


def bar(x, width=30):
    if x is None:
        return ""
    n = round(x * width)
    return "█" * n + "·" * (width - n)


def write(res: dict, out: Path, raw_rel: Path, findings: Path | None = None) -> None:
    m = res.get("meta", {})
    cfg = m.get("config", {})
    sc = res.get("scenarios", {})
    L: list[str] = []
    w = L.append

    w("# kura benchmark results")
    w("")
    w(f"Measured {m.get('date', '?')} by `bench/run.sh` (one invocation; kura and the seed's Python service "
      f"interleaved per scenario, medians of {cfg.get('repeats')} repeats). "
      f"Raw data: [`{raw_rel}/`]({raw_rel}/). How to run and read this: [README.md](README.md).")
    w("")
    la0, la1 = m.get("loadavg_start"), m.get("loadavg_end")
    lab = m.get("loadavg_before_build")
    per = []
    for key, label in SCENARIOS:
        runs = sc.get(key, {}).get("kura", []) + sc.get(key, {}).get("seed", [])
        v = med(r.get("loadavg1") for r in runs)
        if v is not None:
            per.append(f"{label.split()[0].rstrip('.')} {v:.1f}")
    w(f"> **Noise.** Load average (1/5/15 min) before the script's builds: {lab or '?'}; when the "
      f"measurements started: {la0}; at the end: {la1}"
      + (f"; 1-min load at the start of the runs (median per scenario): {', '.join(per)}" if per else "")
      + ". On this 2-core machine the load generator, the service, Redis and PostgreSQL already "
      "fill both cores, so a load average well above ~3 means other work (compiles, test suites) "
      "competed for the CPU: absolute numbers are then low and noisy, while the kura/seed ratios, "
      "measured back to back under the same conditions, hold better. Re-run on a quiet machine "
      "for reference numbers.")
    w("")

    # ------------------------------------------------------------ machine
    w("## Machine and versions")
    w("")
    w("| | |")
    w("|---|---|")
    w(f"| CPU | {m.get('cpu_model')} — {m.get('cores')} cores |")
    w(f"| RAM | {m.get('mem_gib')} GiB |")
    w(f"| OS / kernel | {m.get('os')} / {m.get('kernel')} |")
    dirty = m.get("kura_dirty") or []
    dirty_s = f" + uncommitted changes in {len(dirty)} files ({', '.join(dirty[:6])}{'…' if len(dirty) > 6 else ''})" if dirty else ""
    w(f"| kura | `{m.get('kura_commit_short')}`{dirty_s}; `{m.get('kura_version')}`, release build |")
    w(f"| Rust | {m.get('rustc')} |")
    w(f"| Redis | {m.get('redis')} (one private `redis-server` per service, no persistence) |")
    w(f"| PostgreSQL | {m.get('postgresql')} (shared server, one database per service, `pg_stat_statements`) |")
    deps = ", ".join(f"{k} {v}" for k, v in m.get("seed_deps", {}).items())
    w(f"| Python (seed) | {m.get('python')}; {deps} |")
    w(f"| load generator | `{m.get('bench_cmd')}` for every HTTP row (same ids, seeds, concurrency, durations) |")
    w(f"| settings | duration {cfg.get('duration')} (zipf {cfg.get('zipf_duration')}), warm-up {cfg.get('warmup')} "
      f"(0 s for cold scenarios), concurrency {cfg.get('concurrency')}, {cfg.get('profiles'):,} profiles per "
      f"service, seed: uvicorn × {cfg.get('seed_workers')} workers; kura: `kura serve` defaults (Tokio, all cores) |")
    w(f"| run time | {m.get('wall_s', 0) / 60:.1f} min |")
    w("")

    # ------------------------------------------------------------ main table
    w("## Results")
    w("")
    w("Throughput in requests/s (median, with min–max over repeats); latency p50 / p99 in ms; "
      "hit ratio from `X-Cache` (kura) or from the seed's `metrics:cache:*` counters sampled "
      "during the measured window.")
    w("")
    w("| scenario | kura req/s | kura p50 / p99 | seed req/s | seed p50 / p99 | kura / seed | hit ratio kura / seed | notes |")
    w("|---|---:|---:|---:|---:|---:|---:|---|")
    aggs = {}
    for key, label in SCENARIOS:
        if key not in sc:
            continue
        k, s = agg(sc[key]["kura"]), agg(sc[key]["seed"])
        aggs[key] = (k, s)
        ratio = (k["rps"] / s["rps"]) if k and s and s["rps"] else None
        notes = []
        for who, a, runs in (("kura", k, sc[key]["kura"]), ("seed", s, sc[key]["seed"])):
            if a is None:
                st = {}
                for r in runs:
                    for c, v in r.get("statuses", {}).items():
                        st[c] = st.get(c, 0) + v
                notes.append(f"{who}: not available (answered {st or 'nothing'})")
            elif non2xx(a):
                notes.append(f"{who}: {non2xx(a)}")
            if a and key.startswith("s5") and a.get("update_rows_final") is not None:
                notes.append(f"{who}: {a['update_rows_end']:,.0f} DB rows updated by the end "
                             f"(warm-up included), {a['update_rows_final']:,.0f} after {a['drain_s']:.0f} s")
        hit = f"{f_pct(k['hit'] if k else None)} / {f_pct(s['hit'] if s else None)}"
        if key.startswith("s5"):
            hit = "–"
        w(f"| {label} | {rps_cell(k)} | {lat_cell(k)} | {rps_cell(s)} | {lat_cell(s)} | "
          f"{f_ratio(ratio)} | {hit} | {'; '.join(notes)} |")
    lim = res.get("limits", {})
    cg, ch = agg(lim.get("ceiling_get", [])), agg(lim.get("ceiling_hello", []))
    rb = lim.get("redis_benchmark", [])
    rb_get = med(x.get("GET", {}).get("rps") for x in rb)
    rb_set = med(x.get("SET", {}).get("rps") for x in rb)
    rb_get50 = med(x.get("GET", {}).get("p50") for x in rb)
    if cg or ch or rb:
        w("| *physical limit:* ceiling server, Redis GET route, same 10k ids as kura | "
          f"{rps_cell(cg)} | {lat_cell(cg)} | | | | | bare axum + redis-rs, no logic |")
        w(f"| *physical limit:* ceiling server, fixed `/hello` body (HTTP only) | {rps_cell(ch)} | {lat_cell(ch)} | | | | | |")
        w(f"| *physical limit:* `redis-benchmark -t get,set -n 200000 -q -c 50` | GET **{f_rps(rb_get)}**, "
          f"SET **{f_rps(rb_set)}** | GET p50 {f_ms(rb_get50)} | | | | | Redis alone, no HTTP |")
    w("")

    # ------------------------------------------------------------ stampede
    st = res.get("stampede", {})
    if st:
        w(f"### Stampede: {cfg.get('stampede_n')} concurrent GETs of one cold id")
        w("")
        w("SELECTs on `profiles` counted by `pg_stat_statements` (reset before each burst), one value per repeat. "
          "Two instances: two service processes on the same database and Redis, the burst split evenly "
          "(for the seed an *instance* is one uvicorn server with its workers).")
        w("")
        w("| service | instances | SELECTs per repeat | statuses | X-Cache | loads (kura metric) | sending the burst (ms) | burst answered in (ms) |")
        w("|---|---:|---|---|---|---|---:|---:|")
        for name in ("kura_1", "kura_2", "seed_1", "seed_2"):
            rows = st.get(name)
            if not rows:
                continue
            svc, inst = name.split("_")
            statuses, xc = {}, {}
            for r in rows:
                for k, v in r["statuses"].items():
                    statuses[k] = statuses.get(k, 0) + v
                for k, v in r["x_cache"].items():
                    xc[k] = xc.get(k, 0) + v
            loads = ", ".join(str(r.get("loads")) for r in rows) if svc == "kura" else "–"
            err = sum(r["errors"] for r in rows)
            w(f"| {svc} | {inst} | **{', '.join(str(r['selects']) for r in rows)}** | "
              f"{statuses}{f' + {err} errors' if err else ''} | {xc} | {loads} | "
              f"{f_ms(med(r.get('send_ms') for r in rows))} | {f_ms(med(r['wall_s'] * 1000 for r in rows))} |")
        w("")

    # ------------------------------------------------------------ hit path
    hp = res.get("hit_path", {})
    if hp.get("hit_path"):
        w("### Library hit path (criterion, `cargo bench -p kura --bench hit_path`)")
        w("")
        w("Mean time per iteration against the run's private Redis; `64 in flight` = 64 concurrent gets over the "
          "one multiplexed connection per iteration (ops/s = 64 / time).")
        w("")
        funcs = ["bare_get", "store_get", "cache_aside_get", "cache_aside_get_json"]
        funcs += sorted({f for g in HP_GROUPS for f in hp.get(g, {}) if isinstance(hp[g], dict)} - set(funcs))
        funcs = [f for f in funcs if any(f in hp.get(g, {}) for g in HP_GROUPS)]
        over = [f for f in funcs if f.startswith("cache_aside")]
        w("| group | " + " | ".join(f"`{f}`" for f in funcs) + " | "
          + " | ".join(f"`{f}` vs bare" for f in over) + " |")
        w("|---|" + "---:|" * (len(funcs) + len(over)))
        for g in HP_GROUPS:
            d = hp.get(g)
            if not d:
                continue
            cells = []
            for f in funcs:
                v = d.get(f)
                cells.append("–" if not v else f"{v['mean_ns'] / 1000:.1f} µs ({v['ops_per_s']:,.0f} ops/s)")
            for f in over:
                ov = (d[f]["mean_ns"] / d["bare_get"]["mean_ns"] - 1) if f in d and "bare_get" in d else None
                cells.append("–" if ov is None else f"{ov * 100:+.1f} %")
            w(f"| {HP_GROUPS[g]} | {' | '.join(cells)} |")
        w("")
    elif hp:
        w(f"### Library hit path: criterion failed (exit {hp.get('exit')}); see the run's criterion.log")
        w("")

    # ------------------------------------------------------------ goals
    w("## Goals")
    w("")
    w("| goal | measured | status |")
    w("|---|---|---|")

    def goal(name, measured, met):
        w(f"| {name} | {measured} | {'✅ met' if met else ('❌ missed' if met is not None else '– not measured')} |")

    k2, s2 = aggs.get("s2_warm", (None, None))
    if k2 and s2:
        r = k2["rps"] / s2["rps"]
        goal("warmed GET throughput ≥ 20× the seed's, with p99 ≤ 5 ms (scenario 2)",
             f"{f_ratio(r)} ({f_rps(k2['rps'])} vs {f_rps(s2['rps'])} req/s), kura p99 {f_ms(k2['p99'])} ms",
             r >= 20 and k2["p99"] <= 5)
    else:
        goal("warmed GET ≥ 20× the seed's, p99 ≤ 5 ms", "–", None)
    k1, s1 = aggs.get("s1_hot", (None, None))
    if k1 and s1:
        r = k1["rps"] / s1["rps"]
        goal("… the same for the hot key (scenario 1)",
             f"{f_ratio(r)} ({f_rps(k1['rps'])} vs {f_rps(s1['rps'])} req/s), kura p99 {f_ms(k1['p99'])} ms",
             r >= 20 and k1["p99"] <= 5)
    k4, s4 = aggs.get("s4_cold", (None, None))
    if k4 and s4:
        r = k4["rps"] / s4["rps"]
        goal("cold GET throughput ≥ 10× the seed's (scenario 4)",
             f"{f_ratio(r)} ({f_rps(k4['rps'])} vs {f_rps(s4['rps'])} req/s)", r >= 10)
    else:
        goal("cold GET ≥ 10× the seed's", "–", None)
    if st.get("kura_1") or st.get("kura_2"):
        vals = {n: [r["selects"] for r in st.get(n, [])] for n in ("kura_1", "kura_2")}
        allv = vals["kura_1"] + vals["kura_2"]
        goal("stampede: 1 SELECT per cold key, for any number of instances (scenario 6)",
             f"1 instance: {vals['kura_1']}; 2 instances: {vals['kura_2']} "
             f"(seed: {[r['selects'] for r in st.get('seed_1', [])]} / {[r['selects'] for r in st.get('seed_2', [])]})",
             bool(allv) and all(v == 1 for v in allv))
    else:
        goal("stampede: 1 SELECT per cold key", "–", None)
    if hp.get("hit_path"):
        for f, what in (("cache_aside_get", "typed `CacheAside::get`"),
                        ("cache_aside_get_json", "`CacheAside::get_json` (the JSON passed through)")):
            parts, mets = [], []
            for g, label in HP_GROUPS.items():
                d = hp.get(g, {})
                if f in d and "bare_get" in d:
                    ov = d[f]["mean_ns"] / d["bare_get"]["mean_ns"] - 1
                    parts.append(f"{label}: {ov * 100:+.1f} %")
                    mets.append(ov <= 0.15)
            if parts:
                goal(f"library hit path within 15 % of a bare GET (scenario 7): {what}", "; ".join(parts),
                     all(mets))
    else:
        goal("library hit path within 15 % of a bare GET", "–", None)
    if k2 and rb_get:
        r = k2["rps"] / rb_get
        goal("service warmed GET ≥ 30 % of `redis-benchmark` GET",
             f"{r * 100:.1f} % ({f_rps(k2['rps'])} vs {f_rps(rb_get)} req/s)", r >= 0.30)
    else:
        goal("service warmed GET ≥ 30 % of redis-benchmark GET", "–", None)
    if k2 and cg:
        w("")
        w(f"For scale: in the same run the ceiling server (one Redis GET per request, no logic) served "
          f"{f_rps(cg['rps'])} req/s with p99 {f_ms(cg['p99'])} ms on scenario 2's ids, so kura's warmed GET "
          f"reached {k2['rps'] / cg['rps'] * 100:.0f} % of what an HTTP + Redis service can do on this machine "
          f"under the same load, and the ceiling's p99 shows the latency floor the scheduler allows.")
    w("")
    # the seed document's own targets, for the record
    k3, _ = aggs.get("s3_zipf", (None, None))
    mem = res.get("memory", {})
    w("The seed document's stated targets, for the record (kura): "
      + "; ".join(x for x in [
          f"p99 < 10 ms: {f_ms(k2['p99'])} ms (warmed)" if k2 else "",
          f"≥ 10,000 ops/s: {f_rps(k2['rps'])} (warmed)" if k2 else "",
          f"hit rate > 80 %: {f_pct(k3['hit'])} over the whole zipf run from cold" if k3 else "",
          f"memory < 400 MB: {mem['kura_rss_after_kb'] / 1024:.0f} MiB RSS with 100k profiles warmed" if mem.get("kura_rss_after_kb") else "",
      ] if x) + ".")
    w("")

    # ------------------------------------------------------------ memory
    w("## Memory")
    w("")
    w("| what | value |")
    w("|---|---|")
    if k2 and k2.get("rss_max_kb"):
        w(f"| `kura serve` resident memory (VmRSS) under scenario 2, peak, median of repeats | **{k2['rss_max_kb'] / 1024:.1f} MiB** |")
    if s2 and s2.get("rss_max_kb"):
        w(f"| seed (uvicorn master + {cfg.get('seed_workers')} workers) VmRSS under scenario 2 | {s2['rss_max_kb'] / 1024:.1f} MiB |")
    if mem.get("per_100k_bytes"):
        a = mem.get("after", {})
        w(f"| Redis memory per 100,000 cached kura profiles (`used_memory_dataset` growth while the warm "
          f"endpoint cached {mem['cached']:,} profiles in {mem['seconds']:.1f} s) | "
          f"**{mem['per_100k_bytes'] / 2**20:.1f} MiB** ({mem['per_100k_bytes'] / 100_000:.0f} B per profile; "
          f"`used_memory` growth {mem['per_100k_used_memory'] / 2**20:.1f} MiB) |")
        if a.get("avg_key_memory_usage"):
            w(f"| … per key: `MEMORY USAGE` / value length (sample of {a['profile_keys_sampled']}) | "
              f"{a['avg_key_memory_usage']:.0f} B / {a['avg_value_bytes']:.0f} B |")
        w(f"| `kura serve` VmRSS before / after that warm | {mem['kura_rss_before_kb'] / 1024:.1f} / "
          f"{mem['kura_rss_after_kb'] / 1024:.1f} MiB |")
    pm = res.get("prime_memory", {})
    for svc in ("kura", "seed"):
        xs = [x for x in pm.get(svc, []) if x.get("cached")]
        d = med(x["dataset_delta"] / x["cached"] * 100_000 for x in xs)
        ku = med(x["after"].get("avg_key_memory_usage") for x in xs)
        vl = med(x["after"].get("avg_value_bytes") for x in xs)
        if d:
            w(f"| Redis memory per 100,000 profiles cached by reads, {svc} (`used_memory_dataset` growth over "
              f"scenario 2's {cfg.get('warm_ids'):,}-id priming, scaled) | {d / 2**20:.1f} MiB"
              f"{f'; MEMORY USAGE {ku:.0f} B, value {vl:.0f} B per key' if ku else ''} |")
    w("")

    # ------------------------------------------------------------ hit ratio over time
    z = sc.get("s3_zipf")
    if z:
        w("## Hit ratio over time, scenario 3 (zipf(1.0) over 100,000 ids, starting cold)")
        w("")
        w("Per second of the measured run, median over repeats; kura from `X-Cache`, the seed from its "
          "Redis hit/miss counters.")
        w("")
        kser = [[iv.get("hit_ratio") for iv in r.get("intervals", [])] for r in ok_runs(z["kura"])]
        sser = [[iv.get("hit_ratio") for iv in r.get("seed_intervals", [])] for r in ok_runs(z["seed"])]
        kreq = [[iv.get("requests") for iv in r.get("intervals", [])] for r in ok_runs(z["kura"])]
        sreq = [[iv.get("requests") for iv in r.get("intervals", [])] for r in ok_runs(z["seed"])]
        n = max([len(x) for x in kser + sser] or [0])
        w("```text")
        w(f"{'s':>3}  {'kura req/s':>10} {'hit':>6}  {'':30}  {'seed req/s':>10} {'hit':>6}  {'':30}")
        for i in range(n):
            kh = med(x[i] for x in kser if i < len(x))
            sh_ = med(x[i] for x in sser if i < len(x))
            kr = med(x[i] for x in kreq if i < len(x))
            sr = med(x[i] for x in sreq if i < len(x))
            w(f"{i:>3}  {f_rps(kr):>10} {f_pct(kh):>6}  {bar(kh):30}  {f_rps(sr):>10} {f_pct(sh_):>6}  {bar(sh_):30}")
        w("```")
        w("")

    # ------------------------------------------------------------ notes
    w("## Notes")
    w("")
    w("- Every HTTP row is driven by the same generator (`kura bench`: keep-alive HTTP/1.1, closed loop, "
      "one connection per worker) with the same id distribution, seed, concurrency and durations against "
      "both services; each service has its own database (same schema size, 100,000 rows) and its own "
      "`redis-server`. The generator, both services, Redis and PostgreSQL all share the machine's cores.")
    w("- *Cold* means: the service's Redis was emptied (`FLUSHALL` on its private server) and, for kura, "
      "the process restarted just before the run; cold runs have no warm-up, so they include the cache filling up.")
    w("- Scenario 2 fills the cache by reading every id once through the service (so both services cache "
      "exactly what their GET caches), then measures uniform GETs over those ids.")
    w("- PUT rows send `{\"phone\":\"080-NNNN-NNNN\"}` to uniformly chosen ids; the seed's `behind` "
      "acknowledges before its background task writes the database; its DB rows are counted from `pg_stat_statements`.")
    w("- The seed answers without `X-Cache`; its hit ratio comes from its own `metrics:cache:hits|misses` counters.")
    w("")
    # ------------------------------------------------------------ charts
    made = charts.render_all(res, out.parent / "charts")
    if made:
        w("## Charts")
        w("")
        w("Drawn from the same raw files by `bench/charts.py` (re-rendered with this report).")
        w("")
        for title, name in made:
            w(f"![{title}](charts/{name})")
            w("")
    if findings and findings.exists():
        w(findings.read_text().rstrip())
        w("")
    out.write_text("\n".join(L) + "\n")


if __name__ == "__main__":
    src = Path(sys.argv[1])
    root = Path(__file__).resolve().parent.parent
    write(json.loads(src.read_text()), root / "docs/bench/RESULTS.md",
          src.resolve().parent.relative_to(root / "docs/bench"), root / "docs/bench/findings.md")
    print(f"wrote {root / 'docs/bench/RESULTS.md'}")
