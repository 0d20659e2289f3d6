"""`st_distill`: the baseline users actually reach for, the distillation recipe that
sentence-transformers documents (examples/sentence_transformer/training/distillation), built with
its own model classes, loss and trainer; nothing of it is re-implemented here.

    student = the teacher's evenly spaced layers (model_distillation_layer_reduction.py) at the
              recipe's target widths, taken from the teacher's first units (the `slice` baseline)
    teacher = the teacher's SentenceTransformer, plus, when the student's embedding is narrower,
              the documented down-projection: a `models.Dense` holding the PCA components of the
              teacher's embeddings of the training texts (model_distillation.py)
    loss    = `losses.MSELoss` between the student's sentence embedding and the teacher's
    trainer = `SentenceTransformerTrainer` / `SentenceTransformerTrainingArguments`

At the same tokens as HomoDistil: the texts are the sequences HomoDistil's steps see (the recipe's
corpus, seed, steps x batch_size x grad_accum, max_length), decoded, in the same order (step s
trains on step s's texts); the optimiser settings (lr, warm-up, linear decay, AdamW betas and eps,
weight decay, clipping) are the recipe's. The student keeps the model's own dropout, as the
documented recipe does. The result is a finished run directory like the other baselines' (stock
transformers model + sentence-transformers files, summary with the shipped quality, the held-out
discrepancy curve), so `compress baselines` evaluates it like any run.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch
import yaml

from compressor.checks import check_param_count
from compressor.data import Corpus
from compressor.environment import pick_device
from compressor.errors import RecipeError
from compressor.forward import mean_pool
from compressor.metrics import MetricsLog, discrepancy_summary, plot_run, read_metrics
from compressor.pipeline import RunResult, check_against_teacher, masks_at_target, shipped_quality
from compressor.prune.importance import truncation_scores
from compressor.prune.slim import PrunePlan, save_slim_model, slim
from compressor.quality import similarity_discrepancy
from compressor.recipe import Recipe, recipe_to_dict
from compressor.rundir import (
    HELDOUT_FILE,
    METRICS_FILE,
    MODEL_DIR,
    PLAN_FILE,
    PLOT_FILE,
    RECIPE_FILE,
    ST_DISTILL_FILE,
    RunSummary,
    new_run_dir,
    write_summary,
)
from compressor.teacher import Teacher, load_teacher, sentence_transformers_files

ENCODE_BATCH = 64  # texts per teacher.encode call (labels, PCA)
MSE_TEXTS = 256  # training texts on which the embedding MSE is measured before and after


def step_sequences(corpus: Corpus, steps: int) -> list[list[int]]:
    """The token sequences of HomoDistil's steps 0 .. steps-1, in order, unpadded."""
    return [ids[att.bool()].tolist() for micro in islice(corpus.batches(0), steps)
            for b in micro for ids, att in zip(b.input_ids, b.attention_mask, strict=True)]  # fmt: skip


def training_texts(corpus: Corpus, steps: int, sequences: list[list[int]]) -> list[str]:
    """The texts of HomoDistil's steps 0 .. steps-1, in order: the corpus's texts where it keeps
    them (one text per sequence, in memory), else its sequences decoded (packed or streamed)."""
    if corpus.step_texts(0) is not None:
        return [t for step in range(steps) for t in corpus.step_texts(step)]
    return corpus.tok.batch_decode(sequences, skip_special_tokens=True)


def retokenized_mismatches(texts: list[str], sequences: list[list[int]], tokenizer,
                           max_length: int) -> int:  # fmt: skip
    """How many texts the student's tokenizer does not turn into the sequence HomoDistil trains
    on (0 for raw texts; decoded ones can differ where truncation cut a word)."""
    enc = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return sum(a != b for a, b in zip(enc, sequences, strict=True))


def in_order(dataset, batch_size, drop_last, valid_label_columns=None, generator=None, seed=0):
    """sentence-transformers' DefaultBatchSampler over the rows in order (its default shuffles):
    step s trains on HomoDistil's step-s texts."""
    from sentence_transformers import DefaultBatchSampler
    from torch.utils.data import SequentialSampler

    return DefaultBatchSampler(SequentialSampler(dataset), batch_size=batch_size,
                               drop_last=drop_last, valid_label_columns=valid_label_columns,
                               generator=generator, seed=seed)  # fmt: skip


def down_projection(teacher_st, texts: list[str], dim: int, seed: int):
    """The documented projection of the teacher's embeddings to the student's width: a bias-free
    `models.Dense` whose weight is the PCA components of the teacher's embeddings."""
    from sentence_transformers.sentence_transformer.modules import Dense
    from sklearn.decomposition import PCA

    if len(texts) < dim:
        raise RecipeError("st_distill", [
            f"the PCA down-projection to the student's {dim} dimensions needs at least {dim}"
            f" training texts; train.steps x batch_size x grad_accum gives {len(texts)}"
        ])  # fmt: skip
    embeddings = teacher_st.encode(texts, batch_size=ENCODE_BATCH, convert_to_numpy=True)
    pca = PCA(n_components=dim, svd_solver="full", random_state=seed).fit(embeddings)
    dense = Dense(in_features=embeddings.shape[1], out_features=dim, bias=False,
                  activation_function=torch.nn.Identity())  # fmt: skip
    dense.linear.weight = torch.nn.Parameter(torch.tensor(pca.components_, dtype=torch.float32))
    return dense, float(pca.explained_variance_ratio_.sum())


def embedding_mse(model, texts: list[str], labels: torch.Tensor) -> float:
    """MSE of the model's sentence embeddings (eval mode) against the teacher's."""
    got = model.encode(texts, batch_size=ENCODE_BATCH, convert_to_tensor=True).cpu()
    return float(torch.nn.functional.mse_loss(got, labels))


def st_distill(recipe: Recipe, output: Path, teacher: Teacher | None = None) -> RunResult:
    """Train the `st_distill` baseline into a new run directory under `output`/<recipe name>."""
    check_against_teacher(recipe, teacher.model.config.to_dict() if teacher else None)
    run_dir = new_run_dir(Path(output), recipe.name)
    try:
        return _train(recipe, run_dir, teacher)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)  # nothing in it can be resumed
        raise


def _train(recipe: Recipe, run_dir: Path, teacher: Teacher | None) -> RunResult:
    started, tr, data = time.time(), recipe.train, recipe.data
    (run_dir / RECIPE_FILE).write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
    if tr.threads:
        torch.set_num_threads(tr.threads)
    torch.manual_seed(tr.seed)
    teacher = teacher or load_teacher(recipe.teacher)
    if teacher.has_mlm_head:
        raise RecipeError(recipe.name, [
            "st_distill distils sentence embeddings: the teacher has an MLM head, so it is not a"
            " sentence encoder; compare it with the other baselines"
        ])  # fmt: skip
    device = pick_device(tr.device)
    model, tok = teacher.model.cpu().eval(), teacher.tokenizer
    corpus = Corpus(data, tok, tr.seed, tr.batch_size, tr.grad_accum)
    (run_dir / HELDOUT_FILE).write_text(json.dumps(corpus.heldout_texts))
    sequences = step_sequences(corpus, tr.steps)
    texts = training_texts(corpus, tr.steps, sequences)

    # the student: evenly spaced layers, the first k of every width (exactly the `slice` baseline)
    masks = masks_at_target(recipe, teacher, truncation_scores(teacher.shape))
    plan = PrunePlan.from_masks(masks, teacher.shape)
    (run_dir / PLAN_FILE).write_text(plan.to_json())
    st_files = sentence_transformers_files(teacher.source_dir)
    heldout = corpus.heldout
    with torch.no_grad():
        t_heldout = mean_pool(model(input_ids=heldout.input_ids,
                                    attention_mask=heldout.attention_mask).last_hidden_state,
                              heldout.attention_mask)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="st-distill-") as tmp:
        kind = device.type if device.type in ("cpu", "cuda") else "cpu"
        student, teacher_st = sentence_models(model, plan, tok, st_files, Path(tmp), kind,
                                              data.max_length)  # fmt: skip
        labels, explained = teacher_targets(teacher_st, student, texts, tr.seed)
        probe = slice(0, min(MSE_TEXTS, len(texts)))
        mse_before = embedding_mse(student, texts[probe], labels[probe])
        loss, trainer = fit(student, texts, labels, recipe, run_dir, (heldout, t_heldout),
                            Path(tmp) / "trainer", kind)  # fmt: skip
        mse_after = embedding_mse(student, texts[probe], labels[probe])
        slim_model = student[0].auto_model.cpu().eval()
        save_slim_model(slim_model, tok, st_files, run_dir / MODEL_DIR)
        reload_diff = reload_max_abs(student, run_dir / MODEL_DIR, corpus.heldout_texts,
                                     data.max_length)  # fmt: skip
    n_params = check_param_count(slim_model, plan.shape, teacher.vocab, teacher.has_mlm_head)
    record = {
        "recipe": "sentence-transformers examples/sentence_transformer/training/distillation",
        "loss": f"{type(loss).__module__}.{type(loss).__qualname__}",
        "trainer": f"{type(trainer).__module__}.{type(trainer).__qualname__}",
        "texts": len(texts),
        "max_length": data.max_length,
        "teacher_projection": "pca" if explained < 1.0 else None,
        "pca_explained_variance": explained,
        "embedding_mse": {"before": mse_before, "after": mse_after, "texts": probe.stop},
    }
    (run_dir / ST_DISTILL_FILE).write_text(json.dumps(record, indent=2))
    records = read_metrics(run_dir / METRICS_FILE)
    plot_run(records, run_dir / PLOT_FILE,
             f"{recipe.name} (st_distill): {teacher.shape.label()} -> {plan.shape.label()}")  # fmt: skip
    summary = RunSummary(
        recipe=recipe.name,
        teacher=teacher.name,
        teacher_shape=teacher.shape.to_dict(),
        student_shape=plan.shape.to_dict(),
        teacher_params=sum(p.numel() for p in model.parameters()),
        student_params=n_params,
        checks={
            "retokenized_mismatches": retokenized_mismatches(
                texts, sequences, student.tokenizer, data.max_length
            ),
            "st_reload_max_abs": reload_diff,
        },
        discrepancy=discrepancy_summary(records),
        quality=shipped_quality(run_dir / MODEL_DIR, teacher, corpus.quality_texts, data),
        steps=tr.steps,
        seconds=round(time.time() - started, 1),
        device=str(device),
    )
    write_summary(run_dir, summary)
    return RunResult(run_dir, summary.to_dict())


def sentence_models(model, plan: PrunePlan, tok, st_files, tmp: Path, kind: str, max_length: int):
    """The student (the teacher sliced by `plan`) and the teacher as sentence-transformers
    models, with the teacher's pooling and normalisation files."""
    from sentence_transformers import SentenceTransformer

    save_slim_model(slim(model, plan), tok, st_files, tmp / "student")
    save_slim_model(model, tok, st_files, tmp / "teacher")
    student = SentenceTransformer(str(tmp / "student"), device=kind)
    teacher_st = SentenceTransformer(str(tmp / "teacher"), device=kind)
    student.max_seq_length = teacher_st.max_seq_length = max_length
    return student, teacher_st


def teacher_targets(teacher_st, student, texts: list[str], seed: int) -> tuple[torch.Tensor, float]:
    """The teacher's embeddings of the training texts, the MSE targets: projected by PCA to the
    student's width where it is narrower (adds the documented Dense to `teacher_st`). Returns
    them and the variance the projection keeps (1.0 without one)."""
    explained = 1.0
    s_dim = student.get_embedding_dimension()
    if s_dim < teacher_st.get_embedding_dimension():
        dense, explained = down_projection(teacher_st, texts, s_dim, seed)
        teacher_st.add_module("dense", dense)
    labels = teacher_st.encode(texts, batch_size=ENCODE_BATCH, convert_to_numpy=True)
    return torch.as_tensor(labels), explained


def fit(student, texts: list[str], labels: torch.Tensor, recipe: Recipe, run_dir: Path,
        heldout: tuple, out: Path, kind: str):  # fmt: skip
    """sentence-transformers' trainer with its MSELoss, the recipe's optimiser settings and the
    texts in order; the held-out curve and the logged loss go to the run's metrics.jsonl.
    Returns the loss and the trainer."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer import losses

    tr = recipe.train
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out),
        max_steps=tr.steps,
        per_device_train_batch_size=tr.batch_size,
        gradient_accumulation_steps=tr.grad_accum,
        learning_rate=tr.lr,
        lr_scheduler_type="linear",
        warmup_steps=tr.warmup_steps,
        weight_decay=tr.weight_decay,
        adam_beta1=tr.adam_betas[0],
        adam_beta2=tr.adam_betas[1],
        adam_epsilon=tr.adam_eps,
        max_grad_norm=tr.max_grad_norm,
        seed=tr.seed,
        data_seed=tr.seed,
        use_cpu=kind == "cpu",
        batch_sampler=in_order,
        logging_steps=tr.log_every,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    dataset = Dataset.from_dict({"sentence": texts, "label": labels.tolist()})
    loss = losses.MSELoss(model=student)
    metrics = MetricsLog(run_dir, resume_step=0)
    curve = _curve_callback(student, *heldout, metrics, tr.eval_every, tr.steps)
    trainer = SentenceTransformerTrainer(model=student, args=args, train_dataset=dataset,
                                         loss=loss, callbacks=[curve])  # fmt: skip
    trainer.train()
    return loss, trainer


def reload_max_abs(student, model_dir: Path, texts: list[str], max_length: int) -> float:
    """Largest difference between the shipped model's embeddings, reloaded, and the trained
    student's."""
    from sentence_transformers import SentenceTransformer

    reloaded = SentenceTransformer(str(model_dir), device="cpu")
    reloaded.max_seq_length = max_length
    return float(
        (reloaded.encode(texts, convert_to_tensor=True).cpu()
         - student.encode(texts, convert_to_tensor=True).cpu()).abs().max()
    )  # fmt: skip


def _curve_callback(student, heldout, t_heldout, metrics: MetricsLog, every: int, steps: int):
    """A transformers TrainerCallback writing the run's curve to metrics.jsonl: the held-out
    discrepancy (the same quantity as every other run's) at step 0, every `every` steps and at
    the end, and the trainer's logged MSE loss."""
    from transformers import TrainerCallback

    class Curve(TrainerCallback):
        def _discrepancy(self, step: int) -> None:
            auto = student[0].auto_model
            was_training = auto.training
            auto.eval()
            with torch.no_grad():
                dev = next(auto.parameters()).device
                out = auto(input_ids=heldout.input_ids.to(dev),
                           attention_mask=heldout.attention_mask.to(dev))  # fmt: skip
                pooled = mean_pool(out.last_hidden_state.cpu(), heldout.attention_mask)
            auto.train(was_training)
            metrics.write({"step": step, "discrepancy": similarity_discrepancy(pooled, t_heldout),
                           "discrepancy_kind": "one_minus_similarity_spearman"})  # fmt: skip

        def on_train_begin(self, args, state, control, **kw):
            self._discrepancy(0)

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % every == 0 or state.global_step == steps:
                self._discrepancy(state.global_step)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                metrics.write({"step": state.global_step, "loss_mse": float(logs["loss"]),
                               "lr": float(logs.get("learning_rate", 0.0))})  # fmt: skip

    return Curve()
