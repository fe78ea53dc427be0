"""Tables and the summary JSON of bench/serve.py (plain text, so logs and pipes read the same as a terminal)."""

from __future__ import annotations

from typing import Any

SYSTEMS = ("rewardserve-http", "rewardserve-grpc", "naive-async", "naive-threadpool")
NAIVE = ("naive-async", "naive-threadpool")


def _rate(system: dict[str, Any] | None, c: int) -> float | None:
    run = ((system or {}).get("runs") or {}).get(str(c))
    return None if run is None else run["pairs_per_s"]


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def ratios(dres: dict[str, Any], c: int) -> dict[str, Any]:
    """server_vs_raw, server_vs_naive, grpc_vs_raw (and grpc_vs_naive) at c clients for one dtype."""
    systems = dres.get("systems", {})
    raw = (dres.get("raw") or {}).get("best_pairs_per_s")
    http, grpc = _rate(systems.get("rewardserve-http"), c), _rate(systems.get("rewardserve-grpc"), c)
    naive_rates = {name: _rate(systems.get(name), c) for name in NAIVE}
    known = {k: v for k, v in naive_rates.items() if v is not None}
    best_naive = max(known, key=known.get) if known else None
    http_run = ((systems.get("rewardserve-http") or {}).get("runs") or {}).get(str(c)) or {}
    packed = ((dres.get("raw") or {}).get("packed") or {}).get("best_pairs_per_s")
    extra = {"server_vs_raw_packed": _ratio(http, packed)} if packed else {}
    idle_run = ((systems.get("rewardserve-http") or {}).get("runs") or {}).get("1") or {}
    bs1 = next((r for r in (dres.get("raw") or {}).get("by_batch_size") or [] if r["batch_size"] == 1), None)
    forward_ms = 1000.0 / bs1["pairs_per_s"] if bs1 and bs1.get("pairs_per_s") else None
    served_ms = ((dres.get("raw") or {}).get("served_forward_bs1") or {}).get("ms_per_input")
    return {
        **extra,
        # HTTP p50 at 1 client / the bare forward's mean time per input at batch size 1, same workload
        "idle_latency_vs_forward": _ratio(idle_run.get("p50_ms"), forward_ms),
        # the same p50 / the server's own forward (its backend called directly, one input at a time)
        "idle_latency_vs_served_forward": _ratio(idle_run.get("p50_ms"), served_ms),
        "server_vs_raw": _ratio(http, raw),
        "server_vs_naive": _ratio(http, known.get(best_naive)),
        "grpc_vs_raw": _ratio(grpc, raw),
        "grpc_vs_naive": _ratio(grpc, known.get(best_naive)),
        "faster_naive": best_naive,
        "mean_batch_size_http": http_run.get("mean_batch_size"),
        "ratio_concurrency": c,
    }


def _fmt(x: float | None, nd: int = 1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def dtype_table(dtype: str, dres: dict[str, Any], concurrency: list[int]) -> str:
    """Rows raw / rewardserve-http / -grpc / naive-async / naive-threadpool; columns pairs/s and p50 per c."""
    cell = 22
    head = f"{'system':<22}" + "".join(f"| {str(c) + (' client' if c == 1 else ' clients'):<{cell}}" for c in concurrency)
    sub = f"{'':<22}" + "".join(f"| {'pairs/s':>9} {'p50 ms':>9}   " for _ in concurrency)
    lines = [head, sub, "-" * len(sub)]
    raw = dres.get("raw") or {}
    if "best_pairs_per_s" in raw:
        label = f"raw (best bs={raw['best_batch_size']})"
        lines.append(f"{label:<22}" + "".join(f"| {raw['best_pairs_per_s']:>9.2f} {'offline':>9}   " for _ in concurrency))
        packed = raw.get("packed") or {}
        if "best_pairs_per_s" in packed:
            label = f"raw-packed (bs={packed['best_batch_size']})"
            lines.append(f"{label:<22}" + "".join(f"| {packed['best_pairs_per_s']:>9.2f} {'offline':>9}   " for _ in concurrency))
    else:
        error = str(raw.get("error", "not run"))
        lines.append(f"{'raw':<22}| " + (error if error.startswith("not run") else f"FAILED: {error[:80]}"))
    for name in SYSTEMS:
        system = dres.get("systems", {}).get(name) or {}
        if "error" in system and not system.get("runs"):
            lines.append(f"{name:<22}| FAILED: {system['error'].splitlines()[0][:80]}")
            continue
        row = f"{name:<22}"
        for c in concurrency:
            run = (system.get("runs") or {}).get(str(c))
            if run is None:
                row += f"| {'-':>9} {'-':>9}   "
            else:
                flag = "!" if run["errors"] else ("?" if run["ok"] < 2 * c else " ")
                row += f"| {run['pairs_per_s']:>9.2f} {_fmt(run['p50_ms'], 0):>9} {flag} "
        lines.append(row)
    return "\n".join(lines)


def raw_line(raw: dict[str, Any], title: str = "raw forward") -> str:
    parts = [f"bs={r['batch_size']}: {r['pairs_per_s']:.2f} ({r['padding_ratio']:.0%} pad)" for r in raw.get("by_batch_size", [])]
    return f"{title} by batch size (pairs/s, length-sorted): " + (", ".join(parts) or "-")


def notes(dres: dict[str, Any], concurrency: list[int]) -> list[str]:
    raw = dres.get("raw") or {}
    out = [raw_line(raw)] + ([raw_line(raw["packed"], "raw-packed forward")] if raw.get("packed") else [])
    for name in ("rewardserve-http", "rewardserve-grpc"):
        runs = ((dres.get("systems", {}).get(name) or {}).get("runs") or {})
        parts = [
            f"{c}c: {run['mean_batch_size']:.2f} (pad {run.get('mean_padding_ratio') or 0:.0%}, busy {run.get('model_busy') or 0:.0%})"
            for c in concurrency if (run := runs.get(str(c))) and run.get("mean_batch_size") is not None
        ]
        if parts:
            out.append(f"{name} mean batch size from /metrics: " + ", ".join(parts))
    checks = [
        f"{name} {s['check_max_abs_diff']:.1e}" for name, s in dres.get("systems", {}).items()
        if s and s.get("check_max_abs_diff") is not None
    ]
    if checks:
        out.append("reward check, max |reward - raw bs=1| over the first pairs: " + ", ".join(checks))
    errors = sum(run["errors"] for s in dres.get("systems", {}).values() if s for run in (s.get("runs") or {}).values())
    out.append(f"request errors: {errors}" + ("  <-- MUST BE 0: see error_samples in the JSON" if errors else "")
               + "  (! = errors in that run, ? = fewer answers than 2x clients in the window: lengthen --duration)")
    return out


def render(results: dict[str, Any], concurrency: list[int]) -> str:
    lengths = results["lengths"]
    blocks = []
    for dtype in results["dtypes"]:
        dres = results[dtype]
        r = {k: dres.get(k) for k in ("server_vs_raw", "server_vs_naive", "grpc_vs_raw")}
        title = (
            f"== {dtype}: {results['model']} | {lengths['n_pairs']} pairs, {lengths['min']}-{lengths['max']} tokens "
            f"(mean {lengths['mean']}) | {results['machine']['cores']} cores, {results['threads']} torch threads | "
            f"windows >= {results['settings']['duration_s']:g} s =="
        )
        ratio_text = ", ".join(f"{k}={_fmt(v, 2)}" for k, v in r.items())
        blocks.append("\n".join([title, dtype_table(dtype, dres, concurrency), *notes(dres, concurrency),
                                 f"at {dres.get('ratio_concurrency')} clients: {ratio_text}"]))
    return "\n\n".join(blocks)
