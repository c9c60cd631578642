#!/usr/bin/env python3
"""Cost per order across the load range, as an SVG, from `orderflow bench` JSON reports.

    python3 scripts/perf-plot.py OUT.svg "LABEL=DIR[,DIR...]" ["LABEL=DIR[,DIR...]" ...]

Each DIR holds the rate-<R>.json reports of one `bash scripts/perf.sh rates` run (target/perf/ as
perf.sh leaves it); the DIRs of one LABEL are repeated runs of one build, drawn as the median with
a bar from the lowest to the highest run. Reports made with a baseline (RATE_ARGS="--baseline sync"
or "--baseline procedure") add that monolith as a series of its own, at the same offered rates.

Left: CPU per completed order (core-ms, the whole machine: PostgreSQL, RabbitMQ, orderflow and the
bench) against the offered rate. Right: end-to-end latency p50 and p99 (ms; the monolith's is its
one call). The Python standard library only; the SVG has no script and no external reference.
"""

import glob
import json
import os
import re
import statistics
import sys
from collections import defaultdict

W, H = 980, 420
PANEL_W, PANEL_H = 400, 290
LEFT, TOP = 70, 60
COLOURS = ["#1f6feb", "#d1242f", "#8250df", "#1a7f37", "#bf8700", "#57606a"]


def load(specs):
    """{series: {rate: [values per run]}} for CPU, p50 and p99."""
    cpu, p50, p99 = (defaultdict(lambda: defaultdict(list)) for _ in range(3))
    for spec in specs:
        label, dirs = spec.split("=", 1)
        for d in dirs.split(","):
            for f in glob.glob(os.path.join(d, "rate-*.json")):
                m = re.search(r"rate-(\d+)\.json$", f)
                if not m:
                    continue
                j = json.load(open(f))
                rate = int(m.group(1))
                cpu[label][rate].append(j["cpu"]["core_ms_per_order"]["machine"])
                p50[label][rate].append(j["e2e_p50_ms"])
                p99[label][rate].append(j["e2e_p99_ms"])
                if j.get("baseline_kind") and j.get("baseline_cpu"):
                    name = f"{j['baseline_kind']} monolith"
                    cpu[name][rate].append(j["baseline_cpu"]["core_ms_per_order"]["machine"])
                    p50[name][rate].append(j["baseline_p50_ms"])
                    p99[name][rate].append(j["baseline_p99_ms"])
    return cpu, p50, p99


def panel(x0, title, unit, series, rates, log):
    """One chart: `series` is [(name, colour, dash, {rate: [values]})]."""
    values = [v for _, _, _, by in series for vs in by.values() for v in vs]
    lo, hi = min(values), max(values)
    if log:
        import math
        lo, hi = 10 ** math.floor(math.log10(lo)), 10 ** math.ceil(math.log10(hi))
        scale = lambda v: (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
        ticks = [lo * 10 ** i for i in range(int(round(math.log10(hi / lo))) + 1)]
    else:
        lo, hi = 0, hi * 1.1
        scale = lambda v: v / hi
        step = 10 ** len(str(int(hi))) / 10
        while hi / step > 6:
            step *= 2
        while hi / step < 4:
            step /= 2
        ticks = [i * step for i in range(int(hi / step) + 1)]
    y = lambda v: TOP + PANEL_H - scale(v) * PANEL_H
    x = lambda i: x0 + (i + 0.5) * PANEL_W / len(rates)
    out = [f'<text x="{x0}" y="{TOP - 25}" font-weight="bold">{title}</text>',
           f'<rect x="{x0}" y="{TOP}" width="{PANEL_W}" height="{PANEL_H}" fill="none" stroke="#d0d7de"/>']
    for t in ticks:
        out.append(f'<line x1="{x0}" x2="{x0 + PANEL_W}" y1="{y(t):.1f}" y2="{y(t):.1f}" stroke="#eaeef2"/>')
        out.append(f'<text x="{x0 - 6}" y="{y(t) + 4:.1f}" text-anchor="end" font-size="11">{t:g}</text>')
    out.append(f'<text x="{x0 - 50}" y="{TOP + PANEL_H / 2}" font-size="11" '
               f'transform="rotate(-90 {x0 - 50} {TOP + PANEL_H / 2})" text-anchor="middle">{unit}</text>')
    for i, r in enumerate(rates):
        out.append(f'<text x="{x(i):.1f}" y="{TOP + PANEL_H + 18}" text-anchor="middle" font-size="11">{r}/s</text>')
    out.append(f'<text x="{x0 + PANEL_W / 2}" y="{TOP + PANEL_H + 36}" text-anchor="middle" font-size="11">offered orders per second</text>')
    for name, colour, dash, by in series:
        pts = [(x(i), statistics.median(by[r]), min(by[r]), max(by[r])) for i, r in enumerate(rates) if by.get(r)]
        if not pts:
            continue
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" stroke-dasharray="{dash}" points="'
                   + " ".join(f"{px:.1f},{y(m):.1f}" for px, m, _, _ in pts) + '"/>')
        for px, m, a, b in pts:
            out.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{y(a):.1f}" y2="{y(b):.1f}" stroke="{colour}" stroke-width="6" opacity="0.35"/>')
            out.append(f'<circle cx="{px:.1f}" cy="{y(m):.1f}" r="3" fill="{colour}"/>')
    return out


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    cpu, p50, p99 = load(sys.argv[2:])
    rates = sorted({r for by in cpu.values() for r in by})
    names = list(cpu)
    colour = {n: COLOURS[i % len(COLOURS)] for i, n in enumerate(names)}
    left = panel(LEFT, "CPU per completed order (whole machine)", "core-ms per order",
                 [(n, colour[n], "", cpu[n]) for n in names], rates, log=True)
    right = panel(LEFT + PANEL_W + 110, "End-to-end latency: p50 (solid), p99 (dashed)", "ms",
                  [(n, colour[n], "", p50[n]) for n in names] + [(n, colour[n], "5,4", p99[n]) for n in names],
                  rates, log=False)
    legend = []
    for i, n in enumerate(names):
        lx = LEFT + i * 230
        legend.append(f'<rect x="{lx}" y="{H - 22}" width="14" height="4" fill="{colour[n]}"/>')
        legend.append(f'<text x="{lx + 20}" y="{H - 16}" font-size="12">{n}</text>')
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           'font-family="sans-serif" font-size="13">', f'<rect width="{W}" height="{H}" fill="white"/>',
           *left, *right, *legend, "</svg>"]
    with open(sys.argv[1], "w", encoding="utf-8") as f:
        f.write("\n".join(svg) + "\n")


if __name__ == "__main__":
    main()
