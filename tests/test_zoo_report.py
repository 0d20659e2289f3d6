"""`compress zoo report`: the Pareto front, the page (escaping, '-' for what is not recorded, one
row per entry, nothing fetched), the CLI, and the page of a real zoo rendered in headless
chromium (a screenshot is saved)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from compressor.zoo import html_report
from compressor.zoo import store as zoo
from compressor.zoo.html_report import ReportEntry
from compressor.zoo.pareto import dominates, pareto_front
from tests.browser import browser_or_skip, check_page
from tests.helpers import EVALUATION, distinct_copy, zoo_cli

NAN = float("nan")


# ---------------------------------------------------------------------------- the Pareto front


def test_pareto_front_by_hand():
    points = [
        (1.0, 0.5),  # 0: on the front
        (2.0, 0.9),  # 1: slower but better: on the front
        (3.0, 0.8),  # 2: beaten by 1 on both
        (0.5, 0.1),  # 3: fastest: on the front
        (1.0, 0.5),  # 4: equal to 0: neither dominates, both on the front
        (1.0, 0.4),  # 5: as fast as 0, worse: dominated
        (NAN, 1.0),  # 6: no latency: never on the front, dominates nothing
        (0.1, None),  # 7: no quality
        (math.inf, 0.95),  # 8: not finite
    ]
    assert pareto_front(points) == [0, 1, 3, 4]
    assert pareto_front([]) == [] and pareto_front([(NAN, NAN)]) == []


coords = st.floats(0.01, 100, allow_nan=False)


@given(st.lists(st.tuples(coords, st.one_of(coords, st.just(NAN))), max_size=12))
def test_pareto_front_properties(points):
    front = pareto_front(points)
    valid = [i for i, (_, q) in enumerate(points) if not math.isnan(q)]
    assert set(front) <= set(valid) and (front or not valid)
    for i in front:  # nothing beats a point of the front
        assert not any(dominates(points[j], points[i]) for j in valid)
    for i in set(valid) - set(front):  # every other point is beaten by one on the front
        assert any(dominates(points[j], points[i]) for j in front)


# ---------------------------------------------------------------------------- the page


def fake_entry(n: int, similarity=None, latency=None, evaluations=(), card="", teacher="t"):
    summary = {"quality": {"similarity_spearman": similarity} if similarity is not None else {}}
    return ReportEntry(
        row={
            "id": f"{teacher}/homodistil/2L-64H-2A-128I/{n:010x}",
            "teacher": teacher,
            "recipe": "r",
            "shape": "2L-64H-2A-128I",
            "teacher_shape": "4L-128H-4A-512I",
            "params": 1000,
            "teacher_params": 4000,
            "size_bytes": 5000,
            "speedup": None,
            "discrepancy": None,
            "created": f"2026-01-0{n}T00:00:00Z",
            "summary": summary,
            "evaluations": list(evaluations),
        },
        latency=latency or {},
        curve=[],
        card=card,
    )


def page_of(entries: list[ReportEntry]) -> str:
    entries = html_report.ranked(entries)
    return html_report.render_page(entries, html_report.figures(entries), "zoo", "now")


def leaderboard_rows(page: str) -> list[str]:
    body = re.search(r'<table id="leaderboard">.*?<tbody>(.*?)</tbody>', page, re.S).group(1)
    return re.findall(r"<tr>(.*?)</tr>", body, re.S)


def test_the_page_escapes_what_entries_hold_and_fetches_nothing():
    evil = '<script>alert("x")</script><img src="http://example.com/x.png">'
    page = page_of([fake_entry(1, card=f"# card\n{evil}", teacher="<b>t</b>")])
    assert html_report.esc(evil) in page and "&lt;b&gt;t&lt;/b&gt;" in page
    assert "<script" not in page and "<b>" not in page
    assert re.findall(r'src="([^"]*)"', page) == []  # nothing to load: no benchmark, no curve
    assert f'content="{html_report.CSP}"' in page and "default-src 'none'" in html_report.CSP


def test_one_row_per_entry_ranked_with_dashes_for_what_is_not_recorded():
    point = ("onnxruntime", 1, 32)
    evaluation = {**EVALUATION, "student": {"mean": 0.7}, "teacher": {"mean": 0.75}}
    entries = [
        fake_entry(1),  # nothing recorded
        fake_entry(2, similarity=0.9, latency={point: (2.0, 20.0)}, evaluations=[evaluation]),
        fake_entry(3, similarity=0.5, latency={point: (1.0, 21.0)}),
        fake_entry(4, similarity=0.4, latency={point: (3.0, 22.0)}),  # beaten by #2 and #3
    ]
    page = page_of(entries)
    rows = leaderboard_rows(page)
    assert len(rows) == 4
    ids = [re.search(r"<code>(.*?)</code>", r).group(1) for r in rows]
    assert [i[-1] for i in ids] == ["2", "3", "4", "1"]  # best similarity first, none last
    cells = [re.findall(r"<td>(.*?)</td>", r) for r in rows]
    assert cells[0][12] == "0.7000<br><small>teacher 0.7500</small>"  # the evaluation column
    assert cells[1][12] == "-"  # not evaluated
    # no benchmark, speedup, similarity, top-1, discrepancy or evaluation
    assert cells[3][7:13] == ["-"] * 6
    assert [c[13] for c in cells] == ["&#9733;", "&#9733;", "", ""]  # the Pareto front
    assert "On the front: " + ", ".join(ids[:2]) in page
    assert f"Not plotted (no such benchmark or no similarity): #4 {ids[3]}" in page
    assert page.count('src="data:image/png;base64,') == 1  # the plot; no curves recorded


def test_the_plot_uses_the_shape_most_entries_were_benchmarked_at():
    a, b = ("onnxruntime", 1, 128), ("onnxruntime", 1, 32)
    entries = [
        fake_entry(1, 0.9, {a: (2.0, 9.0), ("torch", 1, 32): (1.0, 9.0)}),
        fake_entry(2, 0.8, {b: (1.0, 9.0)}),
        fake_entry(3, 0.7, {b: (0.5, 9.0)}),
    ]
    assert html_report.plot_point(entries) == b
    assert html_report.front_ids(entries, b) == [entries[1].row["id"], entries[2].row["id"]]
    assert html_report.plot_point([fake_entry(1, 0.9, {a: (1, 1), b: (1, 1)})]) == b  # a tie


# ---------------------------------------------------------------------------- CLI


def test_an_empty_zoo_is_refused_and_nothing_is_written(tmp_path):
    out = tmp_path / "page"
    res = zoo_cli("report", "--zoo", str(tmp_path / "zoo"), "--out", str(out))
    assert res.exit_code == 2
    assert "is empty" in res.output and "nothing to report" in res.output
    assert "Traceback" not in res.output and not out.exists()


def test_an_out_that_is_a_file_is_refused(report_zoo, tmp_path):
    out = tmp_path / "file"
    out.write_text("x")
    res = zoo_cli("report", "--zoo", str(report_zoo["root"]), "--out", str(out))
    assert res.exit_code == 2 and f"{out}: exists and is not a directory" in res.output
    assert out.read_text() == "x"


def test_a_zoo_of_only_unreadable_entries_is_one_clear_error(tiny_run, tmp_path):
    """An unreadable entry is left out with a warning (tests/reliability/test_untrusted.py); when
    none is left, nothing is written."""
    root = tmp_path / "zoo"
    entry = zoo.register(tiny_run.run_dir, root)
    metrics = zoo.entry_dir(root, entry) / "metrics.jsonl"
    metrics.chmod(0o644)
    metrics.write_text("{not json\n")
    res = zoo_cli("report", "--zoo", str(root), "--out", str(tmp_path / "page"))
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert (
        f"{entry}: left out of the report" in res.output and "metrics.jsonl: line 1" in res.output
    )
    assert f"compress zoo verify {entry}" in res.output and not (tmp_path / "page").exists()


# ---------------------------------------------------------------------------- a real zoo


def rewrite(path: Path, edit) -> None:
    """Edit a JSON file of a hard-linked copy without writing through the link."""
    data = json.loads(path.read_text())
    path.unlink()
    path.write_text(json.dumps(edit(data)))


def tweaked(run_dir: Path, dest: Path, salt: str, similarity: float, slower: float) -> Path:
    """A distinct copy of the tiny run with another similarity and a slower student."""
    distinct_copy(run_dir, dest, salt)

    def bench(b):
        for r in b["results"]:
            r["student_ms"]["p50"] *= slower
            r["speedup_p50"] /= slower
        return b

    def summary(s):
        return {**s, "quality": {**s["quality"], "similarity_spearman": similarity}}

    rewrite(dest / "benchmark.json", bench)
    rewrite(dest / "summary.json", summary)
    return dest


@pytest.fixture(scope="module")
def report_zoo(tiny_run, tmp_path_factory):
    """A zoo of three real entries: the tiny run, a slower but better copy (on the front with
    it) and a slower, worse one (dominated); one evaluation recorded. Its report, written by the
    CLI to the default place."""
    run_dir, tmp = tiny_run.run_dir, tmp_path_factory.mktemp("report")
    root = tmp / "zoo"
    similarity = tiny_run.summary["quality"]["similarity_spearman"]
    ids = [
        zoo.register(run_dir, root),
        zoo.register(tweaked(run_dir, tmp / "better", "b", min(1.0, similarity + 0.3), 2.0), root),
        zoo.register(tweaked(run_dir, tmp / "worse", "w", similarity - 0.1, 3.0), root),
    ]
    zoo.record_evaluation(root, ids[0], EVALUATION)
    res = zoo_cli("report", "--zoo", str(root))
    assert res.exit_code == 0, res.output
    page = root / "report" / "index.html"
    assert res.output.strip() == f"wrote {page} (3 entries)"
    return {"root": root, "ids": ids, "page": page}


def test_the_report_of_a_real_zoo(report_zoo):
    page, (plain, better, worse) = report_zoo["page"].read_text(), report_zoo["ids"]
    rows = leaderboard_rows(page)
    assert len(rows) == 3
    assert [re.search(r"<code>(.*?)</code>", r).group(1) for r in rows] == [better, plain, worse]
    assert f"On the front: {better}, {plain}" in page
    assert "0.8120<br><small>teacher 0.8530</small>" in rows[1]  # the recorded evaluation
    assert "p50 ms<br>onnxruntime, batch 1 x 32 tokens" in page  # the tiny recipe's benchmark
    # the plot and every entry's discrepancy curve, inline
    assert len(re.findall(r'<img[^>]* src="data:image/png;base64,', page)) == 4
    assert "library_name: sentence-transformers" in page  # the model cards


def test_the_report_renders_in_a_headless_browser(report_zoo, tmp_path):
    chromium, driver = browser_or_skip()
    shot = tmp_path / "zoo-report.png"
    result = check_page(report_zoo["page"], shot, chromium, driver)
    print(f"screenshot: {shot}")
    assert result.title == "compress model zoo"
    assert result.leaderboard_rows == 3
    assert result.images == 4 and result.broken_images == []
    assert result.console_errors == []
    assert shot.stat().st_size > 10_000


def browser_outcome() -> tuple[type | None, str]:
    """What browser_or_skip raised (a skip or a failure are both BaseExceptions), as data."""
    try:
        browser_or_skip()
    except BaseException as err:
        return type(err), str(err)
    return None, ""


def test_a_missing_browser_skips_but_fails_under_ci(monkeypatch):
    monkeypatch.setattr("tests.browser.shutil.which", lambda name: None)
    for name in ("CI", "COMPRESS_REQUIRE_BROWSER"):
        monkeypatch.delenv(name, raising=False)
    kind, text = browser_outcome()
    assert kind is pytest.skip.Exception and "chromium/chromedriver not found" in text
    for name in ("CI", "COMPRESS_REQUIRE_BROWSER"):
        monkeypatch.setenv(name, "1")
        kind, text = browser_outcome()
        assert kind is pytest.fail.Exception and f"a browser is required here ({name}" in text
        monkeypatch.delenv(name)
