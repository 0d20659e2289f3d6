"""`compress zoo report`: one static, self-contained HTML page of the zoo.

    <out>/index.html   the leaderboard, a quality-vs-latency plot with the Pareto front, and
                       per entry its discrepancy curve and model card; every image inline as a
                       data: URI, no script, and a Content-Security-Policy that forbids any fetch

The page is drawn from what each entry recorded: its index row (shape, parameters, ONNX size,
speedup, created, the summary's held-out quality and discrepancy, the evaluations),
benchmark.json (p50 latency of student and teacher at every benchmarked shape), metrics.jsonl
(the discrepancy curve) and README.md (the model card). Anything an entry did not record shows
as '-'. Everything taken from an entry is HTML-escaped; the model card is shown as text.

Quality vs the teacher is the shipped model's agreement with its teacher on held-out text
(`summary.json` quality: similarity Spearman, nearest-neighbour top-1; the teacher scores 1), the
final held-out discrepancy (the teacher's is 0) and each recorded downstream evaluation beside the
teacher's number. The plot's quality is the similarity Spearman; its latency the onnxruntime p50
at the benchmarked shape most entries share (each entry's own benchmark run, so machine load
differs between entries; the in-run speedup in the table compares like with like).
"""

from __future__ import annotations

import html
import json
import os
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.errors import CompressError, ZooError
from compressor.run_files import (
    benchmark_problems,
    evaluations_problems,
    metrics_problems,
    summary_problems,
)
from compressor.rundir import (
    BENCH_FILE,
    CARD_FILE,
    EVALS_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    ZOO_REPORT_DIR,
    ZOO_REPORT_FILE,
    require_not_entry,
)
from compressor.trust import read_text_inside
from compressor.zoo import report_plots
from compressor.zoo import store as zoo
from compressor.zoo.mteb_scores import category_summary
from compressor.zoo.pareto import finite, pareto_front
from compressor.zoo.report import (
    benchmark_noisy,
    empty_zoo_text,
    human_bytes,
    human_count,
    speedup_text,
)

BenchPoint = tuple[str, int, int]  # (runtime, batch, sequence length)
PLOT_RUNTIME = "onnxruntime"
MISSING = "-"
MAX_CURVES = 50  # discrepancy curves drawn (best ranked first): each is a PNG of ~50 kB, ~0.3 s
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


@dataclass(frozen=True)
class ReportEntry:
    """One zoo entry as the report needs it."""

    row: dict[str, Any]  # the index row (store.list_entries)
    latency: dict[BenchPoint, tuple[float, float]]  # -> (student p50 ms, teacher p50 ms)
    curve: list[dict[str, Any]]  # metrics.jsonl records
    card: str  # README.md ("" when absent)


# ---------------------------------------------------------------------------- reading


def collect(root: Path) -> tuple[list[ReportEntry], list[str]]:
    """Every entry of the zoo at `root` with its benchmark, curve and card, and one warning per
    entry left out: an entry is untrusted input, so a malformed file or a link (which could point
    anywhere on this machine) skips that entry, never the report."""
    entries, warnings = [], []
    for row in zoo.list_entries(root):
        try:
            entries.append(read_entry(zoo.entry_dir(root, row["id"]), row))
        except (CompressError, OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            why = str(err) if isinstance(err, CompressError) else f"{type(err).__name__}: {err}"
            warnings.append(
                f"{row['id']}: left out of the report ({why}); check it with"
                f" `compress zoo verify {row['id']}`"
            )
    return entries, warnings


def read_entry(d: Path, row: dict[str, Any]) -> ReportEntry:
    """One entry as the report needs it; its files are read only from inside `d`, never through
    a link, and their types checked (run_files)."""
    bench_text = read_text_inside(d, BENCH_FILE)
    bench = json.loads(bench_text) if bench_text is not None else None
    metrics_text = read_text_inside(d, METRICS_FILE)
    problems = [f"{BENCH_FILE}: {p}" for p in benchmark_problems(bench, True)] if bench else []
    if metrics_text is not None:
        problems += [f"{METRICS_FILE}: {p}" for p in metrics_problems(metrics_text)]
    problems += [f"{SUMMARY_FILE}: {p}" for p in summary_problems(row["summary"])]
    problems += [
        f"{EVALS_FILE}: {p}" for p in evaluations_problems({"evaluations": row["evaluations"]})
    ]
    if problems:
        raise ZooError("malformed: " + "; ".join(problems[:3]))
    curve = [json.loads(line) for line in (metrics_text or "").splitlines() if line.strip()]
    return ReportEntry(
        row=row,
        latency=latencies(bench),
        curve=curve,
        card=read_text_inside(d, CARD_FILE) or "",
    )


def latencies(bench: dict[str, Any] | None) -> dict[BenchPoint, tuple[float, float]]:
    """(runtime, batch, seq) -> (student p50 ms, teacher p50 ms) of a benchmark.json."""
    return {
        (r["runtime"], int(r["batch"]), int(r["seq"])): (
            float(r["student_ms"]["p50"]),
            float(r["teacher_ms"]["p50"]),
        )
        for r in (bench or {}).get("results", [])
    }


# ---------------------------------------------------------------------------- the numbers


def quality(row: dict[str, Any], key: str) -> float | None:
    """A held-out agreement measure of the shipped model with its teacher (summary.json)."""
    value = (row["summary"].get("quality") or {}).get(key)
    return float(value) if finite(value) else None


def similarity(row: dict[str, Any]) -> float | None:
    return quality(row, "similarity_spearman")


def ranked(entries: list[ReportEntry]) -> list[ReportEntry]:
    """Best similarity to the teacher first (entries without one last), then oldest first."""
    return sorted(entries, key=lambda e: (-(similarity(e.row) or -float("inf")), e.row["created"]))


def bench_points(entries: list[ReportEntry]) -> list[BenchPoint]:
    return sorted({p for e in entries for p in e.latency})


def plot_point(entries: list[ReportEntry]) -> BenchPoint | None:
    """The onnxruntime shape most entries were benchmarked at (ties: smaller batch, then seq)."""
    counts = Counter(p for e in entries for p in e.latency if p[0] == PLOT_RUNTIME)
    return min(counts, key=lambda p: (-counts[p], p[1], p[2])) if counts else None


def point_label(p: BenchPoint) -> str:
    return f"{p[0]}, batch {p[1]} x {p[2]} tokens"


def eval_key(e: dict[str, Any]) -> str:
    return f"{e['task']} {e['metric']} ({e.get('mode', 'eval')})"


def latest_evaluations(row: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {eval_key(e): e for e in row["evaluations"]}


def eval_columns(entries: list[ReportEntry]) -> list[str]:
    return sorted({k for e in entries for k in latest_evaluations(e.row)})


def front_ids(entries: list[ReportEntry], point: BenchPoint | None) -> list[str]:
    """Ids of the entries on the Pareto front of (latency at `point`, similarity)."""
    if point is None:
        return []
    pts = [(e.latency.get(point, (None,))[0], similarity(e.row)) for e in entries]
    return [entries[i].row["id"] for i in pareto_front(pts)]


def teacher_latencies(entries: list[ReportEntry], point: BenchPoint) -> dict[str, list[float]]:
    """Teacher name -> its p50 at `point`, one per entry that measured it."""
    out: dict[str, list[float]] = {}
    for e in entries:
        if point in e.latency:
            out.setdefault(e.row["teacher"], []).append(e.latency[point][1])
    return out


# ---------------------------------------------------------------------------- figures


def figures(entries: list[ReportEntry]) -> dict[str, str]:
    """data: URIs: "plot" (quality vs latency, when any entry has both) and each entry's id ->
    its discrepancy curve (entries without a recorded curve have none)."""
    out: dict[str, str] = {}
    point = plot_point(entries)
    front = set(front_ids(entries, point))
    plotted = [
        (i, e)
        for i, e in enumerate(entries, 1)
        if point in e.latency and similarity(e.row) is not None
    ]
    if plotted:
        points = [(f"#{i}", e.latency[point][0], similarity(e.row)) for i, e in plotted]
        teachers = [
            (f"teacher {name}", statistics.median(ms))
            for name, ms in teacher_latencies(entries, point).items()
        ]
        png = report_plots.quality_latency_png(
            points,
            [k for k, (_, e) in enumerate(plotted) if e.row["id"] in front],
            teachers,
            f"student p50 latency, ms (log scale; {point_label(point)})",
            "similarity to the teacher (Spearman, held-out texts)",
        )
        out["plot"] = report_plots.data_uri(png)
    for i, e in enumerate(entries[:MAX_CURVES], 1):
        if any("discrepancy" in r for r in e.curve):
            png = report_plots.curve_png(e.curve, f"#{i} {e.row['id']}")
            out[e.row["id"]] = report_plots.data_uri(png)
    return out


# ---------------------------------------------------------------------------- HTML


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def num(x: float | None, fmt: str = ".4f") -> str:
    return MISSING if not finite(x) else format(x, fmt)


def _eval_cell(e: dict[str, Any] | None) -> str:
    if e is None:
        return MISSING
    student = (e.get("student") or {}).get("mean")
    teacher = (e.get("teacher") or {}).get("mean")
    kept = e.get("retention")
    kept_text = f", {num(kept, '.1f')}%" if kept is not None else ""
    return f"{num(student)}<br><small>teacher {num(teacher)}{kept_text}</small>"


def mteb_categories(entries: list[ReportEntry]) -> list[str]:
    """The MTEB categories any entry was scored on ("average" last)."""
    names = {c["category"] for e in entries for c in category_summary(e.row["evaluations"])}
    return sorted(names - {"average"}) + (["average"] if "average" in names else [])


def _category_cell(row: dict[str, Any], name: str) -> str:
    found = [c for c in category_summary(row["evaluations"]) if c["category"] == name]
    if not found:
        return MISSING
    c = found[0]
    return f"{num(c['retention'], '.1f')}%<br><small>{c['tasks']} tasks</small>"


def _latency_cell(ms: tuple[float, float] | None) -> str:
    if ms is None:
        return MISSING
    return f"{num(ms[0], '.3g')}<br><small>teacher {num(ms[1], '.3g')}</small>"


def leaderboard(
    entries: list[ReportEntry], points: list[BenchPoint], evals: list[str], front: set[str]
) -> str:
    """The table: one row per entry, in the order given (its rank)."""
    categories = mteb_categories(entries)
    heads = [
        ("#", "rank: best similarity to the teacher first"),
        ("entry", "zoo id (links to its curve and model card)"),
        ("teacher", "teacher and its shape"),
        ("shape", "student: layers, hidden, heads, FFN"),
        ("recipe", "the recipe's name"),
        ("params", "student parameters (share of the teacher's)"),
        ("size", "onnx/model.onnx"),
        *((f"p50 ms<br>{esc(point_label(p))}", "student latency, teacher below") for p in points),
        ("speedup", "vs the teacher: onnxruntime fp32 p50 at the first benchmarked shape"),
        ("similarity", "to the teacher: Spearman of pairwise cosine similarities (teacher 1)"),
        ("top-1", "teacher's nearest neighbour is the student's (teacher 1)"),
        ("discrepancy", "final held-out discrepancy (teacher 0)"),
        *((esc(k), "downstream evaluation, teacher below (and retention)") for k in evals),
        *(
            (f"MTEB {esc(c)}", "mean teacher retention (percent) over the category's tasks")
            for c in categories
        ),
        ("Pareto", "on the quality-vs-latency Pareto front"),
        ("created", "registered"),
    ]
    head = "".join(f'<th title="{esc(t)}">{h}</th>' for h, t in heads)
    body = []
    for i, e in enumerate(entries, 1):
        r, ev = e.row, latest_evaluations(e.row)
        share = r["params"] / r["teacher_params"] if r["teacher_params"] else None
        cells = [
            str(i),
            f'<a href="#entry-{i}"><code>{esc(r["id"])}</code></a>',
            f"{esc(r['teacher'])}<br><small>{esc(r['teacher_shape'])}</small>",
            esc(r["shape"]),
            esc(r["recipe"]),
            f"{esc(human_count(r['params']))}<br><small>{num(share, '.1%')}</small>",
            esc(human_bytes(r["size_bytes"])),
            *(_latency_cell(e.latency.get(p)) for p in points),
            esc(speedup_text(r["speedup"] if finite(r["speedup"]) else None, benchmark_noisy(r))),
            num(similarity(r)),
            num(quality(r, "neighbour_top1")),
            num(r["discrepancy"], ".4g"),
            *(_eval_cell(ev.get(k)) for k in evals),
            *(_category_cell(r, c) for c in categories),
            "&#9733;" if r["id"] in front else "",
            esc(r["created"]),
        ]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return (
        f'<table id="leaderboard"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def plot_section(entries: list[ReportEntry], images: dict[str, str]) -> str:
    point = plot_point(entries)
    if "plot" not in images:
        why = "no entry has both an onnxruntime benchmark and a held-out similarity to plot"
        return f'<p class="note">{esc(why)}</p>'
    front = front_ids(entries, point)
    left_out = [
        f"#{i} {e.row['id']}"
        for i, e in enumerate(entries, 1)
        if point not in e.latency or similarity(e.row) is None
    ]
    lines = [
        f'<img id="pareto-plot" src="{images["plot"]}" alt="quality vs latency, Pareto front">',
        '<p class="note">Each point is an entry (its leaderboard number): the student\'s p50 at '
        f"{esc(point_label(point))} and its similarity to the teacher on held-out text. The "
        "Pareto front (red) holds the entries no other entry beats on both. The star is the "
        "teacher (similarity 1 by definition; the median of its p50 over the entries' own "
        "benchmark runs). Latencies come from each entry's benchmark run, under whatever load "
        "the machine had then; the speedup column compares student and teacher within one run."
        "</p>",
        f"<p>On the front: {esc(', '.join(front)) or MISSING}</p>",
    ]
    if left_out:
        lines.append(f'<p class="note">Not plotted (no such benchmark or no similarity): '
                     f"{esc(', '.join(left_out))}</p>")  # fmt: skip
    return "\n".join(lines)


def entry_section(i: int, e: ReportEntry, images: dict[str, str]) -> str:
    rid = e.row["id"]
    if rid in images:
        curve = f'<img class="curve" src="{images[rid]}" alt="discrepancy curve of {esc(rid)}">'
    elif i > MAX_CURVES:
        curve = (
            f'<p class="note">curves are drawn for the first {MAX_CURVES} entries only (a large'
            f" zoo stays a small page); see <code>compress zoo show {esc(rid)}</code></p>"
        )
    else:
        curve = '<p class="note">no discrepancy curve recorded (metrics.jsonl)</p>'

    card = f"<pre>{esc(e.card)}</pre>" if e.card else '<p class="note">no model card</p>'
    return (
        f'<section class="entry" id="entry-{i}"><h3>#{i} <code>{esc(rid)}</code></h3>'
        f"<h4>Discrepancy curve</h4>{curve}"
        f"<details open><summary>Model card (README.md)</summary>{card}</details></section>"
    )


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.5em; text-align: right; vertical-align: top; }
th { background: #f0f0f0; }
td:nth-child(2), td:nth-child(3), td:nth-child(5) { text-align: left; }
small { color: #666; }
.note { color: #555; font-size: 0.9em; max-width: 60em; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.8em; }
img { max-width: 100%; }
section.entry { border-top: 1px solid #ddd; margin-top: 1.5em; }
"""


def render_page(
    entries: list[ReportEntry], images: dict[str, str], root: str, generated: str
) -> str:
    """The whole page, for `entries` in rank order and `images` from `figures`."""
    point = plot_point(entries)
    front = set(front_ids(entries, point))
    table = leaderboard(entries, bench_points(entries), eval_columns(entries), front)
    sections = "\n".join(entry_section(i, e, images) for i, e in enumerate(entries, 1))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<title>compress model zoo</title><style>{STYLE}</style></head>
<body>
<h1>compress model zoo</h1>
<p class="note">{len(entries)} entries in <code>{esc(root)}</code>; generated {esc(generated)}
by <code>compress zoo report</code>. '-': not recorded by the entry.</p>
<h2>Leaderboard</h2>
{table}
<h2>Quality vs latency</h2>
{plot_section(entries, images)}
<h2>Entries</h2>
{sections}
</body></html>
"""


# ---------------------------------------------------------------------------- writing


def default_out(root: Path) -> Path:
    return Path(root) / ZOO_REPORT_DIR


def write_report(root: Path, out: Path | None = None) -> tuple[Path, int, list[str]]:
    """Write <out>/index.html (default <zoo>/report/); returns (its path, the number of
    entries, a warning per entry left out). An empty zoo is refused (ZooError) and nothing is
    written; so is an `out` inside a zoo entry (entries never change)."""
    root = Path(root)
    out = require_not_entry(Path(out) if out is not None else default_out(root), "a report folder")
    found, warnings = collect(root)
    entries = ranked(found)
    if not entries:
        if warnings:
            raise ZooError("no entry could be reported:\n  " + "\n  ".join(warnings))
        raise ZooError(empty_zoo_text(root) + "; nothing to report")
    if out.exists() and not out.is_dir():
        raise ZooError(f"{out}: exists and is not a directory; give a directory for --out")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    page = render_page(entries, figures(entries), str(root), stamp)
    path = out / ZOO_REPORT_FILE
    tmp = out / f".{ZOO_REPORT_FILE}.tmp-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:
        raise ZooError(f"could not write the report to {out}: {zoo.fault_text(err)}") from err
    finally:
        tmp.unlink(missing_ok=True)
    return path, len(entries), warnings
