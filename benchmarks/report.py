"""Everything the runner writes: the stdout tables, the JSON document, CSV rows and PNG plots.

The JSON and CSV fields are documented in benchmarks/README.md; `CSV_FIELDS` is their order.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections import defaultdict

from . import config

CSV_FIELDS = (
    "timestamp", "git_commit", "sweep", "device", "device_name", "threads", "torch_version", "triton_version",
    "mode", "provider", "dtype", "B", "T", "L", "C", "Ca", "kt", "prefix", "status", "backend",
    "median_ms", "p20_ms", "p80_ms", "samples", "ratio_to_fused", "ratio_to_floor", "tokens_per_s",
    "rel_err_vs_reference", "saved_bytes", "saved_activation_bytes", "peak_rss_bytes", "cuda_max_memory_allocated",
    "cuda_peak_rise_bytes", "modelled_ms", "measured_over_modelled", "reason", "notes",
)


def case_key(record: dict) -> tuple:
    s = record["shape"]
    return record["mode"], s["B"], s["T"], s["L"], s["C"], s["Ca"], record["dtype"]


def case_label(record: dict) -> str:
    s = record["shape"]
    return f"{record['mode']}  B={s['B']} T={s['T']} L={s['L']} C={s['C']} Ca={s['Ca']}  {record['dtype']}"


def grouped(records: list[dict]) -> dict[tuple, list[dict]]:
    groups = defaultdict(list)
    for record in records:
        groups[case_key(record)].append(record)
    return groups


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def results_table(records: list[dict]) -> str:
    """One block per case: a row per provider with times, ratios, throughput and memory."""
    header = (f"{'provider':<10} {'median ms':>10} {'p20':>9} {'p80':>9} {'x fused':>8} {'x floor':>8} "
              f"{'ktok/s':>8} {'rel err':>8} {'saved MiB':>10} {'act MiB':>8} {'peak MiB':>9}  backend / notes")
    lines = []
    for group in grouped(records).values():
        lines += ["", case_label(group[0]), header, "-" * len(header)]
        for r in group:
            if r["status"] != "ok":
                lines.append(f"{r['provider']:<10} {r['status']}: {r['reason']}")
                continue
            t, m = r["time"], r["memory"]
            peak = m["cuda_peak_rise_bytes"]
            peak = m["peak_rss_bytes"] if peak is None else peak
            tokens = None if r["tokens_per_s"] is None else r["tokens_per_s"] / 1e3
            detail = "; ".join([r["backend"], *r["notes"]])
            lines.append(
                f"{r['provider']:<10} {t['median_ms']:>10.2f} {t['p20_ms']:>9.2f} {t['p80_ms']:>9.2f} "
                f"{_fmt(r['ratio_to_fused'], '.2f'):>8} {_fmt(r['ratio_to_floor'], '.2f'):>8} "
                f"{_fmt(tokens, '.1f'):>8} {_fmt(r['rel_err_vs_reference'], '.0e'):>8} "
                f"{_mib(m['saved_bytes']):>10} {_mib(m['saved_activation_bytes']):>8} "
                f"{_mib(peak):>9}  {detail}")
    return "\n".join(lines)


def roofline_table(records: list[dict]) -> str:
    """Per micro case: FLOPs, minimal bytes, the modelled H100 time, and each provider's distance."""
    lines = []
    for group in grouped(records).values():
        roof = group[0].get("roofline")
        if roof is None:
            continue
        measured = group[0]["roofline"]["measured_on_gpu"]
        head = (f"{case_label(group[0])}: {roof['flops'] / 1e9:.2f} GFLOP, {roof['min_bytes'] / 2**20:.1f} MiB, "
                f"{roof['intensity']:.0f} FLOP/B -> modelled {roof['machine']} ({roof['peak']}) "
                f"{roof['modelled_ms'] * 1e3:.1f} us, {roof['bound']}-bound")
        parts = []
        for r in group:
            if r["status"] == "ok":
                ratio = r["roofline"]["measured_over_modelled"]
                achieved = r["roofline"]["flops"] / r["time"]["median_ms"] / 1e6
                parts.append(f"{r['provider']} {ratio:.1f}x" if measured else f"{r['provider']} {achieved:.1f} GFLOP/s")
        tail = ("measured / modelled: " if measured else
                "not measured on a GPU (modelled only); achieved on this device: ")
        lines += [head, "    " + tail + ", ".join(parts)]
    return "\n".join(lines)


def markdown_table(records: list[dict]) -> str:
    """The results as one GitHub-markdown table (what README.md embeds)."""
    lines = ["| mode | shape | dtype | provider | median ms (p20-p80) | x fused | x floor | saved MiB (activations) "
             "| backend |", "|---|---|---|---|---|---|---|---|---|"]
    for group in grouped(records).values():
        mode, shape, dtype = case_label(group[0]).split("  ")
        shape = shape.replace(" ", ", ")
        for r in group:
            if r["status"] != "ok":
                lines.append(f"| {mode} | {shape} | {dtype} | {r['provider']} | {r['status']} | | | | {r['reason']} |")
                continue
            t, m = r["time"], r["memory"]
            saved = "-" if m["saved_bytes"] is None else \
                f"{_mib(m['saved_bytes'])} ({_mib(m['saved_activation_bytes'])})"
            lines.append(f"| {mode} | {shape} | {dtype} | {r['provider']} | {t['median_ms']:.1f} "
                         f"({t['p20_ms']:.1f}-{t['p80_ms']:.1f}) | {_fmt(r['ratio_to_fused'], '.2f')} "
                         f"| {_fmt(r['ratio_to_floor'], '.2f')} | {saved} | {r['backend']} |")
    return "\n".join(lines)


def write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(text + "\n")


def write_json(path: str, document: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(document, handle, indent=1)


def csv_row(record: dict) -> dict:
    row = {k: record.get(k) for k in CSV_FIELDS}
    row.update(record["shape"])
    row.update(record["time"] or {})
    row.update(record["memory"] or {})
    roof = record.get("roofline") or {}
    row.update(modelled_ms=roof.get("modelled_ms"), measured_over_modelled=roof.get("measured_over_modelled"))
    row["notes"] = "; ".join(record["notes"])
    return {k: row.get(k) for k in CSV_FIELDS}


def append_csv(path: str, records: list[dict]) -> None:
    """Append one row per record; a file with other columns (an older schema) is moved aside first."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:
        with open(path, newline="") as handle:
            header = next(csv.reader(handle), [])
        if tuple(header) != CSV_FIELDS:
            os.replace(path, path + ".old")
            print(f"{path} had other columns: moved to {path}.old, starting a new file", file=sys.stderr)
            new = True
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(csv_row(r) for r in records)


def _bar_plot(path: str, records: list[dict], value, ylabel: str, title: str, *, spread=None, part=None,
              part_label: str = "") -> None:
    """Grouped bars: a subplot per mode, a group per case, a bar per provider.

    `spread(record)` gives (low, high) error bars; `part(record)` a hatched sub-bar (e.g. the
    activation share of the saved bytes). The y axis turns logarithmic when a subplot spans more
    than 20x, so small sweeps keep the honest linear scale from zero.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_mode = defaultdict(dict)
    for key, group in grouped(records).items():
        ok = {r["provider"]: r for r in group if r["status"] == "ok" and value(r) is not None}
        if ok:
            by_mode[key[0]][case_label(group[0]).split("  ", 1)[1]] = ok
    if not by_mode:
        return
    providers = [p for p in config.PROVIDERS if any(p in v for cases in by_mode.values() for v in cases.values())]
    colours = {p: f"C{i}" for i, p in enumerate(config.PROVIDERS)}
    height = 2.8 * len(by_mode) + 0.9
    fig, axes = plt.subplots(len(by_mode), 1, figsize=(max(7.0, 1.4 * max(map(len, by_mode.values())) + 4), height),
                             squeeze=False)
    width = 0.8 / len(providers)
    for ax, (mode, cases) in zip(axes[:, 0], by_mode.items()):
        for i, provider in enumerate(providers):
            xs = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(cases))]
            rows = [case.get(provider) for case in cases.values()]
            ys = [float("nan") if r is None else value(r) for r in rows]
            err = None
            if spread is not None:
                err = [[0 if r is None else y - spread(r)[0] for r, y in zip(rows, ys)],
                       [0 if r is None else spread(r)[1] - y for r, y in zip(rows, ys)]]
            ax.bar(xs, ys, width, yerr=err, capsize=2, color=colours[provider], label=provider)
            if part is not None:
                ax.bar(xs, [float("nan") if r is None else part(r) for r in rows], width, fill=False, hatch="///",
                       edgecolor="black", linewidth=0, label=part_label if i == 0 else None)
        finite = [value(r) for case in cases.values() for r in case.values() if value(r) and value(r) > 0]
        if finite and max(finite) / min(finite) > 20:
            ax.set_yscale("log")
        ax.set_xticks(range(len(cases)), [label.replace("  ", "\n") for label in cases], fontsize=7)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(mode, fontsize=9)
        ax.grid(axis="y", alpha=0.3, which="both")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    # Title and legend share a fixed 0.75 inch band at the top, whatever the figure's height.
    fig.suptitle(title, fontsize=10, y=1 - 0.1 / height)
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8,
               bbox_to_anchor=(0.5, 1 - 0.4 / height))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.75 / height))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_time(path: str, records: list[dict], device_name: str) -> None:
    """Median time per provider, p20-p80 as error bars."""
    _bar_plot(path, records, lambda r: r["time"]["median_ms"], "median ms (p20-p80)",
              f"ST-Adapter time per provider, {device_name}",
              spread=lambda r: (r["time"]["p20_ms"], r["time"]["p80_ms"]))


def plot_memory(path: str, records: list[dict], device_name: str) -> None:
    """Bytes saved for backward, each storage once; hatched: the activations (inputs and weights left out)."""
    mib = lambda key: lambda r: None if r["memory"][key] is None else r["memory"][key] / 2**20
    _bar_plot(path, records, mib("saved_bytes"), "MiB saved for backward",
              f"Bytes saved for backward (all / hatched: activations), {device_name}",
              part=mib("saved_activation_bytes"), part_label="activations (not inputs or weights)")
