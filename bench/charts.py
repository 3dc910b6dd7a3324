"""SVG charts for docs/bench/RESULTS.md, from the same results.json (no dependencies).

Called by report.py; each chart is one self-contained .svg file under docs/bench/charts/.
"""
from __future__ import annotations

import math
from pathlib import Path
from xml.sax.saxutils import escape

W, H = 720, 300
PAD_L, PAD_R, PAD_T, PAD_B = 70, 170, 36, 44
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf"]


def _nice(hi: float) -> float:
    """A round upper bound at or above hi."""
    if hi <= 0:
        return 1.0
    e = 10 ** math.floor(math.log10(hi))
    for m in (1, 2, 2.5, 5, 10):
        if m * e >= hi:
            return m * e
    return 10 * e


def _fmt(v: float) -> str:
    if v >= 1000:
        return f"{v / 1000:.0f}k" if v % 1000 == 0 or v >= 10000 else f"{v / 1000:.1f}k"
    if v >= 10 or v == 0 or float(v).is_integer():
        return f"{v:.0f}"
    if v >= 1:
        return f"{v:.1f}"
    return f"{v:.2g}"


def _frame(title: str, xlabel: str, ylabel: str) -> list[str]:
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{PAD_L}" y="20" font-size="14" font-weight="bold">{escape(title)}</text>',
        f'<text x="{PAD_L + (W - PAD_L - PAD_R) / 2}" y="{H - 8}" text-anchor="middle">{escape(xlabel)}</text>',
        f'<text x="16" y="{PAD_T + (H - PAD_T - PAD_B) / 2}" text-anchor="middle" '
        f'transform="rotate(-90 16 {PAD_T + (H - PAD_T - PAD_B) / 2})">{escape(ylabel)}</text>',
    ]


def _axes(out: list[str], xmax: float, ymax: float, ylog: bool, ymin: float, xticks=None) -> None:
    x0, y0, x1, y1 = PAD_L, H - PAD_B, W - PAD_R, PAD_T
    out.append(f'<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="black"/>')
    out.append(f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" stroke="black"/>')
    if ylog:
        lo, hi = math.floor(math.log10(ymin)), math.ceil(math.log10(ymax))
        ticks = [10 ** e for e in range(lo, hi + 1)]
    else:
        ticks = [ymax * i / 5 for i in range(6)]
    for t in ticks:
        y = _y(t, ymax, ylog, ymin)
        out.append(f'<line x1="{x0 - 4}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{x0 - 8}" y="{y + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    xt = xticks or [(xmax * i / 5, _fmt(xmax * i / 5)) for i in range(6)]
    for v, label in xt:
        x = _x(v, xmax)
        out.append(f'<line x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y0 + 4}" stroke="black"/>')
        out.append(f'<text x="{x:.1f}" y="{y0 + 17}" text-anchor="middle">{escape(label)}</text>')


def _x(v: float, xmax: float) -> float:
    return PAD_L + (W - PAD_L - PAD_R) * (v / xmax if xmax else 0)


def _y(v: float, ymax: float, ylog: bool, ymin: float) -> float:
    span = H - PAD_T - PAD_B
    if ylog:
        lo, hi = math.floor(math.log10(ymin)), math.ceil(math.log10(ymax))
        f = (math.log10(max(v, 10.0 ** lo)) - lo) / max(hi - lo, 1e-9)
    else:
        f = v / ymax if ymax else 0
    return H - PAD_B - span * f


def _legend(out: list[str], names: list[str]) -> None:
    for i, n in enumerate(names):
        y = PAD_T + 8 + 18 * i
        c = COLORS[i % len(COLORS)]
        out.append(f'<line x1="{W - PAD_R + 12}" y1="{y}" x2="{W - PAD_R + 32}" y2="{y}" stroke="{c}" stroke-width="3"/>')
        out.append(f'<text x="{W - PAD_R + 38}" y="{y + 4}">{escape(n)}</text>')


def line_chart(path: Path, title: str, xlabel: str, ylabel: str,
               series: dict[str, list[tuple[float, float]]], ylog: bool = False,
               xticks: list[tuple[float, str]] | None = None, ymax: float | None = None) -> bool:
    """Writes a line chart; False (nothing written) when there is no point."""
    pts = [p for s in series.values() for p in s]
    if not pts:
        return False
    xmax = max(x for x, _ in pts) or 1.0
    if xticks:
        xmax = max(xmax, max(v for v, _ in xticks))
    ys = [y for _, y in pts if y > 0] or [1.0]
    ymin = min(ys)
    top = ymax or (_nice(max(ys)) if not ylog else max(ys))
    out = _frame(title, xlabel, ylabel)
    _axes(out, xmax, top, ylog, ymin, xticks)
    for i, (name, s) in enumerate(series.items()):
        if not s:
            continue
        d = " ".join(f"{_x(x, xmax):.1f},{_y(y, top, ylog, ymin):.1f}" for x, y in s)
        c = COLORS[i % len(COLORS)]
        out.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="{d}"/>')
        for x, y in s:
            out.append(f'<circle cx="{_x(x, xmax):.1f}" cy="{_y(y, top, ylog, ymin):.1f}" r="2.5" fill="{c}"/>')
    _legend(out, list(series))
    out.append("</svg>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out) + "\n")
    return True


def bar_chart(path: Path, title: str, ylabel: str, bars: list[tuple[str, float]]) -> bool:
    """Writes a bar chart of labelled values; False when there is none."""
    if not bars:
        return False
    top = _nice(max(v for _, v in bars))
    out = _frame(title, "", ylabel)
    n = len(bars)
    _axes(out, float(n), top, False, 0.0, [(i + 0.5, label) for i, (label, _) in enumerate(bars)])
    for i, (_, v) in enumerate(bars):
        x0, x1 = _x(i + 0.15, n), _x(i + 0.85, n)
        y = _y(v, top, False, 0.0)
        out.append(f'<rect x="{x0:.1f}" y="{y:.1f}" width="{x1 - x0:.1f}" height="{H - PAD_B - y:.1f}" fill="{COLORS[0]}"/>')
        out.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{y - 4:.1f}" text-anchor="middle">{_fmt(v)}</text>')
    out.append("</svg>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out) + "\n")
    return True


def _median_run(runs: list[dict]) -> dict | None:
    ok = [r for r in runs if r.get("intervals")]
    if not ok:
        return None
    ok.sort(key=lambda r: r.get("throughput") or 0)
    return ok[len(ok) // 2]


def render_all(res: dict, charts_dir: Path) -> list[tuple[str, str]]:
    """Writes every chart the results allow; returns (title, file name) pairs in order."""
    sc = res.get("scenarios", {})
    made: list[tuple[str, str]] = []
    for key, label in [("s1_hot", "1. hot key"), ("s2_warm", "2. 10,000 warmed ids"),
                       ("s3_zipf", "3. zipf from cold"), ("s4_cold", "4. 100,000 ids from cold"),
                       ("s5_put_behind", "5c. PUT behind")]:
        runs = {t: _median_run(sc.get(key, {}).get(t, [])) for t in ("kura", "seed")}
        series = {
            f"{t} (median repeat)": [(iv["second"] + 1, iv["requests"]) for iv in r["intervals"]]
            for t, r in runs.items() if r
        }
        name = f"{key}_throughput.svg"
        if line_chart(charts_dir / name, f"Scenario {label}: throughput per second", "second", "requests/s", series):
            made.append((f"Scenario {label}: throughput per second", name))
        if key in ("s3_zipf", "s4_cold"):
            # Only answers with X-Cache have a per-second hit ratio (the seed's has none).
            hr = {
                f"{t} (median repeat)": [(iv["second"] + 1, 100 * iv["hit_ratio"])
                                         for iv in r["intervals"] if iv.get("hit_ratio") is not None]
                for t, r in runs.items() if r
            }
            hr = {k: v for k, v in hr.items() if v}
            name = f"{key}_hit_ratio.svg"
            if line_chart(charts_dir / name, f"Scenario {label}: hit ratio per second", "second", "hit ratio %", hr, ymax=100):
                made.append((f"Scenario {label}: hit ratio per second", name))
    # Latency distribution of the warmed-GET scenario, percentiles on a log scale.
    pcts = [("p50", 50), ("p90", 90), ("p99", 99), ("p999", 99.9), ("max", 100)]
    dist = {}
    for t in ("kura", "seed"):
        r = _median_run(sc.get("s2_warm", {}).get(t, []))
        if r:
            dist[t] = [(i, r[p]) for i, (p, _) in enumerate(pcts) if r.get(p)]
    name = "s2_warm_latency.svg"
    if line_chart(charts_dir / name, "Scenario 2: latency distribution (median repeat)", "percentile",
                  "ms (log)", dist, ylog=True, xticks=[(i, p) for i, (p, _) in enumerate(pcts)]):
        made.append(("Scenario 2: latency distribution", name))
    # Write-behind lag: how long the queue took to reach the database after the load stopped.
    drains = [(r.get("name", "").split(".")[-1], r["drain_s"])
              for r in sc.get("s5_put_behind", {}).get("kura", []) if r.get("drain_s") is not None]
    name = "s5_behind_drain.svg"
    if bar_chart(charts_dir / name, "Scenario 5c: write-behind lag (queue drained after the load, per repeat)",
                 "seconds", drains):
        made.append(("Scenario 5c: write-behind lag after the load", name))
    return made
