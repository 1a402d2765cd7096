"""Step 4: the summary of every step's file, as summary.json and summary.md.

Runs in the parent, which imports neither torch nor triton, so a summary is written whatever
happened to the workers: it reads only the step files. Every step renders the same way: a line
of status, its items (name, status, detail), then the tables the step put in its document
("tables": [{"title", "columns", "rows"}]).
"""

from __future__ import annotations

import os
from collections import Counter

from . import SUMMARY_JSON, SUMMARY_MARKDOWN
from .results import read_json, utc_now, write_json

#: Seconds the parent keeps back from the whole check's time box for writing the summary.
RESERVE_S = 5.0
#: Environment fields the summary repeats, in order: (label, key in 0-environment.json's "summary").
ENVIRONMENT_FIELDS = (("device", "device_name"), ("driver", "driver"), ("CUDA runtime", "cuda_runtime"),
                      ("torch", "torch"), ("triton", "triton"), ("python", "python"), ("stack", "stack"),
                      ("SMs", "sms"), ("compute capability", "capability"), ("source", "source"))


def _step_entry(step, document: dict | None) -> dict:
    if document is None:
        return {"name": step.name, "file": None, "status": "not_run", "reason": "no result file was written",
                "elapsed_s": None, "counts": {}, "problems": []}
    items = document.get("items", [])
    return {"name": step.name, "file": step.filename, "status": document.get("status"),
            "reason": document.get("reason"), "elapsed_s": document.get("elapsed_s"),
            "counts": dict(Counter(item["status"] for item in items)),
            "problems": [f"{item['name']}: {item.get('detail', item['status'])}" for item in items
                         if item["status"] in ("fail", "error")]}


def build(out_dir: str, steps, elapsed_s: float) -> tuple[dict, str]:
    documents = [read_json(os.path.join(out_dir, step.filename)) for step in steps]
    entries = [_step_entry(step, document) for step, document in zip(steps, documents)]
    environment = (documents[0] or {}).get("summary", {})
    verdict = "pass" if all(e["status"] == "complete" and not e["problems"] for e in entries) else "fail"
    dry_run = any((d or {}).get("dry_run") for d in documents)
    document = {"verdict": verdict, "dry_run": dry_run, "written": utc_now(), "elapsed_s": round(elapsed_s, 1),
                "environment": environment, "steps": entries,
                "findings": {d["step"]: d["findings"] for d in documents if d and d.get("findings")}}
    return document, render_markdown(document, documents)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "-" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(columns, rows) -> list[str]:
    lines = ["| " + " | ".join(map(str, columns)) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]


def render_markdown(summary: dict, documents) -> str:
    env = summary["environment"]
    title = "GPU check" + (" (DRY RUN on CPU: the numbers mean nothing)" if summary["dry_run"] else "")
    lines = [f"# {title}: {summary['verdict']}", "",
             f"Written {summary['written']}, {summary['elapsed_s']} s in all.", ""]
    lines += markdown_table(("", ""), [(label, env.get(key)) for label, key in ENVIRONMENT_FIELDS])
    lines += ["", "## Steps", ""]
    lines += markdown_table(("step", "file", "status", "seconds", "items", "why"),
                            [(e["name"], e["file"], e["status"], e["elapsed_s"],
                              ", ".join(f"{n} {s}" for s, n in sorted(e["counts"].items())), e["reason"])
                             for e in summary["steps"]])
    for entry, document in zip(summary["steps"], documents):
        if document is None:
            continue
        lines += ["", f"## {entry['name']} ({entry['status']})", ""]
        if document.get("error"):
            lines += ["```", document["error"].strip(), "```", ""]
        items = document.get("items", [])
        if items:
            lines += markdown_table(("item", "status", "detail"),
                                    [(i["name"], i["status"], i.get("detail")) for i in items])
        for table in document.get("tables", []):
            lines += ["", f"**{table['title']}**", ""] + markdown_table(table["columns"], table["rows"])
            if table.get("note"):
                lines += ["", table["note"]]
    return "\n".join(lines) + "\n"


def write(out_dir: str, steps, elapsed_s: float) -> dict:
    document, markdown = build(out_dir, steps, elapsed_s)
    write_json(os.path.join(out_dir, SUMMARY_JSON), document)
    with open(os.path.join(out_dir, SUMMARY_MARKDOWN), "w") as handle:
        handle.write(markdown)
    return document


def console_lines(document: dict) -> str:
    """What the parent prints at the end: one line per step and the verdict."""
    lines = [f"  {e['name']:<12} {e['status']:<10} "
             + ", ".join(f"{n} {s}" for s, n in sorted(e["counts"].items()))
             + (f" ({e['reason']})" if e["reason"] else "") for e in document["steps"]]
    problems = [p for e in document["steps"] for p in e["problems"]]
    lines += [f"  problem: {p}" for p in problems[:20]]
    lines.append(f"gpu_check: {document['verdict']} in {document['elapsed_s']} s")
    return "\n".join(lines)
