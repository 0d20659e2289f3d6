"""Downstream evaluation of an encoder: a classification task by fine-tuning or a linear probe, a
retrieval task zero-shot (cosine similarity of embeddings, nDCG@10 as in MTEB).

All read mean-pooled token states (how the packaged sentence encoder is meant to be used, and the
same pooling for teacher and student). Every choice (probe regularisation, fine-tuning epoch) is
made on the validation split; the test split is read once, for the reported number.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import replace

import torch
from torch import nn
from tqdm import tqdm

from compressor.evaluate.settings import EvalSettings
from compressor.evaluate.tasks import Example, RetrievalTask, Split, Task
from compressor.forward import mean_pool
from compressor.stats import over_seeds

PROBE_L2 = (1e-4, 1e-3, 1e-2, 1e-1)
DOC_MAX_LENGTH = 128  # retrieval documents (plot summaries) are longer than the queries


# ---------------------------------------------------------------------------- pure helpers


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return float((pred == labels).float().mean())


def batched(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def tokenize(tokenizer, texts: list[Example], max_length: int) -> dict[str, torch.Tensor]:
    first = [a for a, _ in texts]
    second = [b for _, b in texts] if texts and texts[0][1] is not None else None
    enc = tokenizer(first, second, padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt")  # fmt: skip
    return {
        k: v.long()
        for k, v in enc.items()
        if k in ("input_ids", "attention_mask", "token_type_ids")
    }


def pooled(encoder: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = encoder(**batch)
    return mean_pool(out.last_hidden_state, batch["attention_mask"])


# ---------------------------------------------------------------------------- linear probe


@torch.no_grad()
def embed(encoder: nn.Module, tokenizer, split: Split, s: EvalSettings, device) -> torch.Tensor:
    encoder.eval()
    chunks = [
        pooled(encoder, {k: v.to(device) for k, v in tokenize(tokenizer, b, s.max_length).items()})
        for b in batched(split.texts, s.batch_size)
    ]
    return torch.cat(chunks).float().cpu()


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_labels: int, l2: float) -> nn.Linear:
    """Multinomial logistic regression, full batch L-BFGS (convex: deterministic)."""
    torch.manual_seed(0)
    clf = nn.Linear(x.shape[1], n_labels)
    nn.init.zeros_(clf.weight)
    nn.init.zeros_(clf.bias)
    opt = torch.optim.LBFGS(clf.parameters(), lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(clf(x), y) + l2 * clf.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return clf


def fit_probe(features: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], n_labels: int
              ) -> tuple[nn.Linear, float, float]:  # fmt: skip
    """Logistic regression on features standardised with train statistics, the L2 strength chosen
    on validation. Returns it as a head on the raw features (standardisation folded into the
    weights), its validation accuracy and its L2 strength."""
    mu, sd = features["train"].mean(0), features["train"].std(0) + 1e-6
    x = {k: (features[k] - mu) / sd for k in ("train", "validation")}
    best = None
    for l2 in PROBE_L2:
        clf = fit_logistic(x["train"], labels["train"], n_labels, l2)
        with torch.no_grad():
            val = accuracy(clf(x["validation"]).argmax(-1), labels["validation"])
        if best is None or val > best[0]:
            best = (val, l2, clf)
    val, l2, clf = best
    head = nn.Linear(len(mu), n_labels)
    with torch.no_grad():
        head.weight.copy_(clf.weight / sd)
        head.bias.copy_(clf.bias - (clf.weight / sd) @ mu)
    return head, val, l2


def linear_probe(features: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], n_labels: int
                 ) -> dict:  # fmt: skip
    """The probe of `fit_probe`, scored once on test."""
    head, val, l2 = fit_probe(features, labels, n_labels)
    with torch.no_grad():
        test = accuracy(head(features["test"]).argmax(-1), labels["test"])
    return {"test": test, "validation": val, "l2": l2}


# ---------------------------------------------------------------------------- retrieval


def relevant_ranks(queries: torch.Tensor, docs: torch.Tensor, relevant: torch.Tensor
                   ) -> torch.Tensor:  # fmt: skip
    """1-based rank of each query's relevant document by cosine similarity. A tie counts against
    the relevant document (pessimistic), so equal embeddings never score by luck."""
    q = nn.functional.normalize(queries.double(), dim=-1)
    d = nn.functional.normalize(docs.double(), dim=-1)
    sim = q @ d.T
    own = sim.gather(1, relevant[:, None])
    others = torch.ones_like(sim, dtype=torch.bool).scatter_(1, relevant[:, None], False)
    return 1 + ((sim >= own) & others).sum(1)


def retrieval_metrics(ranks: torch.Tensor, k: int = 10) -> dict[str, float]:
    """nDCG@k (one relevant document per query), recall@1 and mean reciprocal rank."""
    r = ranks.double()
    ndcg = torch.where(r <= k, 1.0 / torch.log2(r + 1.0), torch.zeros_like(r))
    return {
        f"ndcg@{k}": float(ndcg.mean()),
        "recall@1": float((r == 1).double().mean()),
        "mrr": float((1.0 / r).mean()),
    }


def retrieval(encoder: nn.Module, tokenizer, task: RetrievalTask, s: EvalSettings, device
              ) -> dict:  # fmt: skip
    """Zero-shot: embed the corpus and the queries, rank documents by cosine similarity."""
    doc_settings = replace(s, max_length=max(s.max_length, DOC_MAX_LENGTH))
    docs = embed(encoder, tokenizer, as_split(task.corpus), doc_settings, device)
    out: dict = {}
    for name, queries in (("validation", task.validation), ("test", task.test)):
        q = embed(encoder, tokenizer, as_split(queries.texts), s, device)
        metrics = retrieval_metrics(relevant_ranks(q, docs, torch.tensor(queries.relevant)))
        out[name] = metrics[RETRIEVAL_METRIC]
        out |= {f"{name}_{k}": v for k, v in metrics.items() if k != RETRIEVAL_METRIC}
    return out


def as_split(texts: list[str]) -> Split:
    return Split([(t, None) for t in texts], [0] * len(texts))


RETRIEVAL_METRIC = "ndcg@10"


def task_metric(task: Task | RetrievalTask) -> str:
    return RETRIEVAL_METRIC if isinstance(task, RetrievalTask) else "accuracy"


# ---------------------------------------------------------------------------- fine-tuning


class Classifier(nn.Module):
    """Encoder + a linear layer on the mean-pooled states."""

    def __init__(self, encoder: nn.Module, n_labels: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, n_labels)

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        return self.head(pooled(self.encoder, batch))


@torch.no_grad()
def predict(model: Classifier, tokenizer, split: Split, s: EvalSettings, device) -> torch.Tensor:
    model.eval()
    preds = []
    for b in batched(split.texts, s.batch_size * 2):
        enc = {k: v.to(device) for k, v in tokenize(tokenizer, b, s.max_length).items()}
        preds.append(model(**enc).argmax(-1).cpu())
    return torch.cat(preds)


def probe_head(encoder: nn.Module, tokenizer, task: Task, s: EvalSettings, device
               ) -> tuple[nn.Linear, float]:  # fmt: skip
    """The linear probe of the frozen encoder, as a head on its pooled states, and its validation
    accuracy."""
    splits = {"train": task.train, "validation": task.validation}
    feats = {k: embed(encoder, tokenizer, v, s, device) for k, v in splits.items()}
    labels = {k: torch.tensor(v.labels) for k, v in splits.items()}
    head, val, _ = fit_probe(feats, labels, task.num_labels)
    return head, val


def finetune(encoder: nn.Module, tokenizer, task: Task, s: EvalSettings, seed: int, device,
             desc: str = "finetune") -> dict:  # fmt: skip
    """Fine-tune copies of the encoder from its linear probe (LP-FT: the head starts as the probe,
    so training starts from the probe's accuracy instead of a random head) at each learning rate
    of the settings; keep the (learning rate, epoch) with the best validation accuracy, epoch 0
    being the probe itself, and report test accuracy there. Test is read once, at the choice."""
    head, val = probe_head(encoder.to(device), tokenizer, task, s, device)
    model = Classifier(copy.deepcopy(encoder), task.num_labels).to(device)
    model.head.load_state_dict(head.state_dict())  # epoch 0: the probe on the frozen encoder
    best = {"validation": val, "epoch": 0, "lr": None, "state": None}
    for lr in s.learning_rates():
        for epoch, val, state in train_epochs(encoder, head, tokenizer, task, s, lr, seed, device,
                                              f"{desc} lr {lr:g}"):  # fmt: skip
            if val > best["validation"]:
                best = {"validation": val, "epoch": epoch, "lr": lr, "state": state}
    if (state := best.pop("state")) is not None:
        model.load_state_dict(state)
    y_test = torch.tensor(task.test.labels)
    return {**best, "test": accuracy(predict(model, tokenizer, task.test, s, device), y_test)}


def train_epochs(encoder: nn.Module, head: nn.Linear, tokenizer, task: Task, s: EvalSettings,
                 lr: float, seed: int, device, desc: str):  # fmt: skip
    """Yield (epoch, validation accuracy, weights) after each epoch of fine-tuning a copy of
    encoder + head: AdamW, linear warm-up (10%) then linear decay, seeded order."""
    torch.manual_seed(seed)
    model = Classifier(copy.deepcopy(encoder), task.num_labels).to(device)
    model.head.load_state_dict(head.state_dict())
    for p in model.parameters():
        p.requires_grad_(True)  # a frozen teacher is fine-tuned like any other encoder
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    order = list(range(len(task.train)))
    steps = s.epochs * math.ceil(len(order) / s.batch_size)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min((i + 1) / warm, max(0.0, (steps - i) / max(1, steps - warm)))
    )
    y_val = torch.tensor(task.validation.labels)
    bar = tqdm(total=steps, desc=desc, unit="step", leave=False)
    for epoch in range(s.epochs):
        random.Random(seed * 1000 + epoch).shuffle(order)
        model.train()
        for idx in batched(order, s.batch_size):
            texts = [task.train.texts[i] for i in idx]
            enc = {k: v.to(device) for k, v in tokenize(tokenizer, texts, s.max_length).items()}
            y = torch.tensor([task.train.labels[i] for i in idx], device=device)
            loss = nn.functional.cross_entropy(model(**enc), y)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        val = accuracy(predict(model, tokenizer, task.validation, s, device), y_val)
        yield epoch + 1, val, copy.deepcopy(model.state_dict())
    bar.close()


# ---------------------------------------------------------------------------- one model, many seeds


def evaluate_encoder(encoder: nn.Module, tokenizer, task: Task | RetrievalTask, s: EvalSettings,
                     seeds: list[int], device, label: str = "model") -> dict:  # fmt: skip
    """The task's test metric over seeds (mean, std, per seed). The probe and retrieval are
    deterministic given the encoder, so they run once whatever the seeds."""
    started = time.time()
    encoder = encoder.to(device)
    if isinstance(task, RetrievalTask):
        runs = [retrieval(encoder, tokenizer, task, s, device)]
    elif s.mode == "probe":
        splits = {"train": task.train, "validation": task.validation, "test": task.test}
        feats = {k: embed(encoder, tokenizer, v, s, device) for k, v in splits.items()}
        labels = {k: torch.tensor(v.labels) for k, v in splits.items()}
        runs = [linear_probe(feats, labels, task.num_labels)]
    else:
        runs = [finetune(encoder, tokenizer, task, s, seed, device, f"{label} seed {seed}")
                for seed in seeds]  # fmt: skip
    out = over_seeds([r["test"] for r in runs])
    out["validation"] = [r["validation"] for r in runs]
    out["chosen"] = [{k: v for k, v in r.items() if k not in ("test", "validation")} for r in runs]
    out["seconds"] = round(time.time() - started, 1)
    return out
