"""Plain-text views of zoo entries for the CLI: pure functions of index rows and reports."""

from __future__ import annotations

from typing import Any

import yaml

from compressor.deploy.bench import format_table as format_bench_table
from compressor.trust import printable, printable_tree
from compressor.zoo.mteb_scores import category_summary


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns, two spaces apart, a rule under the header."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "  ".join(f"{c!s:<{w}}" for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def human_count(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def speedup_text(x: float | None, noisy: bool = False) -> str:
    return "-" if x is None else f"{x:.2f}x" + (" noisy" if noisy else "")


def benchmark_noisy(row: dict[str, Any]) -> bool:
    """Whether the entry's benchmark stayed noisy (`compress bench` could not get a clean one)."""
    return any(v.get("noisy") for v in (row["summary"].get("benchmark") or {}).values())


LIST_HEADERS = ["id", "teacher", "shape", "params", "size", "speedup", "quality", "created"]


def list_table(rows: list[dict[str, Any]]) -> str:
    """Text from entries reaches the terminal escaped (trust.printable): no forged rows."""
    rows = printable_tree(rows)
    body = [
        [
            r["id"],
            r["teacher"],
            r["shape"],
            human_count(r["params"]),
            human_bytes(r["size_bytes"]),
            speedup_text(r["speedup"], benchmark_noisy(r)),
            r["quality"] or "-",
            r["created"],
        ]
        for r in rows
    ]
    return format_table(LIST_HEADERS, body)


def _latest_per_task(evaluations: list[dict]) -> dict[str, dict]:
    return {f"{e['task']} {e['metric']}": e for e in evaluations}


def _eval_text(e: dict | None) -> str:
    if e is None:
        return "-"
    s, t = e["student"], (e.get("teacher") or {}).get("mean")
    text = f"{s['mean']:.4f}" + (f" ± {s['std']:.4f}" if s.get("std") is not None else "")
    return text + (f" (teacher {t:.4f})" if t is not None else "")


def compare_table(rows: list[dict[str, Any]]) -> str:
    """Entries side by side: one column per entry, one line per field."""
    rows = printable_tree(rows)
    fields = [
        ("id", lambda r: r["id"]),
        ("teacher", lambda r: f"{r['teacher']} ({r['teacher_shape']})"),
        ("recipe", lambda r: r["recipe"]),
        ("shape", lambda r: r["shape"]),
        (
            "params",
            lambda r: f"{r['params']:,} ({r['params'] / r['teacher_params']:.1%} of teacher)",
        ),
        ("onnx size", lambda r: human_bytes(r["size_bytes"])),
        ("speedup (ort fp32 p50)", lambda r: speedup_text(r["speedup"], benchmark_noisy(r))),
        (
            "discrepancy (final)",
            lambda r: "-" if r["discrepancy"] is None else f"{r['discrepancy']:.4g}",
        ),
        ("quality", lambda r: r["quality"] or "-"),
        ("created", lambda r: r["created"]),
    ]
    tasks = sorted({k for r in rows for k in _latest_per_task(r["evaluations"])})
    body = [[name, *(get(r) for r in rows)] for name, get in fields]
    body += [
        [t, *(_eval_text(_latest_per_task(r["evaluations"]).get(t)) for r in rows)] for t in tasks
    ]
    return format_table(["", *(f"#{i + 1}" for i in range(len(rows)))], body)


def show_text(e: dict[str, Any]) -> str:
    e = printable_tree(e)
    verified = (e["verify"] or {}).get("passed")
    lines = [
        f"id          {e['id']}",
        f"directory   {e['dir']}",
        f"teacher     {e['teacher']} ({e['teacher_shape']}, {e['teacher_params']:,} params)",
        f"student     {e['shape']}, {e['params']:,} params ({e['params'] / e['teacher_params']:.1%})",
        f"recipe      {e['recipe']}",
        f"size        onnx/model.onnx {human_bytes(e['size_bytes'])}; entry {human_bytes(e['entry_bytes'])} in {len(e['files'])} files",
        f"speedup     {speedup_text(e['speedup'], benchmark_noisy(e))} (onnxruntime fp32 p50, first benchmarked shape)",
        f"quality     {e['quality'] or '-'}",
        f"verified    {'passed' if verified else 'NOT passed'} at registration",
        f"created     {e['created']}",
    ]
    if e["evaluations"]:
        body = [
            [
                x["task"],
                x.get("mode", "-"),
                x["metric"],
                _eval_text(x),
                "-" if x.get("retention") is None else f"{x['retention']:.1f}%",
                str(len(x.get("seeds", []))),
                x.get("created", "-"),
            ]
            for x in e["evaluations"]
        ]
        heads = ["task", "mode", "metric", "student", "retention", "seeds", "created"]
        lines += ["", "evaluations", format_table(heads, body)]
        categories = category_summary(e["evaluations"])
        if categories:
            rows = [
                [
                    c["category"],
                    str(c["tasks"]),
                    f"{c['student']:.4f}",
                    "-" if c["teacher"] is None else f"{c['teacher']:.4f}",
                    "-" if c["retention"] is None else f"{c['retention']:.1f}%",
                ]
                for c in categories
            ]
            heads = ["category", "tasks", "student", "teacher", "retention"]
            lines += ["", "MTEB protocol (latest per task)", format_table(heads, rows)]
    if e["benchmark"]:
        try:
            table = format_bench_table(e["benchmark"])
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            table = f"malformed benchmark.json ({type(err).__name__}: {err})"
        lines += ["", "benchmark", table]
    if e["recipe_resolved"]:
        lines += [
            "",
            "recipe (resolved)",
            yaml.safe_dump(e["recipe_resolved"], sort_keys=False).rstrip(),
        ]
    files = [[p, str(f["bytes"]), str(f["sha256"])[:16]] for p, f in e["files"].items()]
    lines += ["", "files", format_table(["path", "bytes", "sha256"], files)]
    return "\n".join(lines)


def empty_zoo_text(root) -> str:
    return (
        f"the zoo at {root} is empty: `compress run RECIPE` registers every run that passes its"
        " gates"
    )


def verify_zoo_text(result: dict[str, Any], root) -> str:
    lines = [verify_text(r) for r in result["entries"]] + result["zoo_problems"]
    return "\n".join(lines) if lines else f"the zoo at {root} is empty"


def verify_failure(result: dict[str, Any]) -> str:
    lines = [f"{r['id']}: {p}" for r in result["entries"] if not r["passed"] for p in r["problems"]]
    return "zoo verification failed:\n  " + "\n  ".join(lines + result["zoo_problems"])


def verify_text(report: dict[str, Any]) -> str:
    if report.get("removed"):
        return f"{report['id']}: removed while being verified (a concurrent `compress zoo rm`)"
    if report["passed"]:
        models = report["onnx"].get("models", {})
        checks = ", ".join(
            f"{m} max abs diff {v['max_abs_diff']:.2g}"
            for m, v in models.items()
            if v.get("max_abs_diff") is not None
        )
        text = f"{report['id']}: ok (every file matches its sha256; ONNX check passed: {checks})"
    else:
        text = f"{report['id']}: FAILED\n" + "\n".join(
            f"  - {printable(p)}" for p in report["problems"]
        )
    if report.get("code"):
        text += (
            "\n  warning: holds code that runs wherever the model loads (registered with"
            " --trust-remote-code; trust it only if you trust its author):\n"
            + "\n".join(f"    {printable(c)}" for c in report["code"])
        )
    return text
