"""The light half of `compress eval --mteb` results (no mteb, no torch): teacher retention, task
categories and their averages, read by the zoo's card, `zoo show` and the zoo report (here, in
the zoo, because evaluate/ records into the zoo and the zoo never imports evaluate/)."""

from __future__ import annotations

import statistics
from typing import Any

MODE = "mteb"  # an evaluation record's mode when mteb scored it
CATEGORIES = {
    "Classification": "classification",
    "Retrieval": "retrieval",
    "Clustering": "clustering",
    "PairClassification": "pair classification",
    "STS": "sts",
}


def category(task_type: str) -> str:
    return CATEGORIES.get(task_type, task_type.lower())


def retention(student: float, teacher: float | None) -> float | None:
    """The student's main score as a percentage of the teacher's."""
    if teacher is None or teacher == 0:
        return None
    return 100.0 * student / teacher


def is_mteb(record: dict) -> bool:
    return record.get("mode") == MODE


def latest(records: list[dict]) -> list[dict]:
    """The MTEB records, the latest one per task (a task evaluated again replaces its result)."""
    by_task = {r["task"]: r for r in records if is_mteb(r)}
    return list(by_task.values())


def category_summary(records: list[dict]) -> list[dict[str, Any]]:
    """Per category, then over all tasks ("average"): the mean main score of student and
    teacher over the tasks, and the mean of the tasks' retentions (percent). The latest record
    of each task counts."""
    groups: dict[str, list[dict]] = {}
    for r in latest(records):
        groups.setdefault(r["category"], []).append(r)
    rows = [(c, groups[c]) for c in sorted(groups)]
    if len(groups) > 1:
        rows.append(("average", [r for c in sorted(groups) for r in groups[c]]))
    out = []
    for name, rs in rows:
        teachers = [r["teacher"]["mean"] for r in rs if "teacher" in r]
        kept = [r["retention"] for r in rs if r.get("retention") is not None]
        out.append({
            "category": name,
            "tasks": len(rs),
            "student": statistics.fmean(r["student"]["mean"] for r in rs),
            "teacher": statistics.fmean(teachers) if len(teachers) == len(rs) else None,
            "retention": statistics.fmean(kept) if len(kept) == len(rs) else None,
        })  # fmt: skip
    return out
