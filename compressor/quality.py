"""Teacher-student agreement measured on what ships: pure functions of embeddings and logits.

A sentence encoder is used through the geometry of its embeddings (retrieval, clustering,
similarity), not through its coordinates, and a slim student has fewer dimensions than its
teacher. So the headline quality of a head-less student needs no learned map:

- `similarity_spearman`: Spearman correlation between the student's and the teacher's pairwise
  cosine similarities over held-out texts (every pair i < j). 1 = the same ranking of pairs.
- `neighbour_top1` / `neighbour_top5`: the fraction of texts whose nearest neighbour under the
  teacher is the student's nearest neighbour (resp. among the student's 5 nearest).

`similarity_discrepancy` = 1 - similarity_spearman is the curve's quantity for such teachers: 0 at
step 0, where the student is the teacher. MLM teachers keep the KL of MLM predictions (the head
ships with the model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_matrix(embeddings: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarities [N, N] of embeddings [N, D]."""
    e = F.normalize(embeddings.double(), dim=-1)
    return e @ e.T


def upper_pairs(matrix: torch.Tensor) -> torch.Tensor:
    """The entries i < j of a square matrix, flattened."""
    i, j = torch.triu_indices(matrix.shape[0], matrix.shape[1], offset=1)
    return matrix[i, j]


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share their mean rank), as Spearman's coefficient needs."""
    order = torch.argsort(x, stable=True)
    r = torch.empty_like(x, dtype=torch.float64)
    r[order] = torch.arange(x.numel(), dtype=torch.float64)
    values, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    if values.numel() < x.numel():  # ties: average their ranks
        sums = torch.zeros(values.numel(), dtype=torch.float64).index_add_(0, inverse, r)
        r = (sums / counts)[inverse]
    return r


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = a.norm() * b.norm()
    return float((a * b).sum() / denom) if float(denom) > 0 else 0.0


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return pearson(ranks(a), ranks(b))


def neighbour_agreement(student: torch.Tensor, teacher: torch.Tensor, k: int) -> float:
    """Fraction of rows whose teacher nearest neighbour (self excluded) is among the student's k
    nearest."""
    n = student.shape[0]
    eye = torch.eye(n, dtype=torch.bool)
    s = cosine_matrix(student).masked_fill(eye, float("-inf"))
    t = cosine_matrix(teacher).masked_fill(eye, float("-inf"))
    teacher_nn = t.argmax(-1)
    student_top = s.topk(min(k, n - 1), dim=-1).indices
    return float((student_top == teacher_nn[:, None]).any(-1).double().mean())


def similarity_agreement(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
    """Map-free agreement of two sets of embeddings of the same texts (widths may differ)."""
    if student.shape[0] != teacher.shape[0] or student.shape[0] < 3:
        raise ValueError("need the embeddings of the same >= 3 texts from student and teacher")
    s, t = upper_pairs(cosine_matrix(student)), upper_pairs(cosine_matrix(teacher))
    return {
        "similarity_spearman": spearman(s, t),
        "neighbour_top1": neighbour_agreement(student, teacher, 1),
        "neighbour_top5": neighbour_agreement(student, teacher, 5),
        "texts": int(student.shape[0]),
    }


def similarity_discrepancy(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """1 - Spearman of pairwise cosine similarities: 0 when the geometry is the teacher's."""
    s, t = upper_pairs(cosine_matrix(student)), upper_pairs(cosine_matrix(teacher))
    return 1.0 - spearman(s, t)
