"""Issue 23's faster training step computes what the step computed before: the MLM head only
where the loss reads it (the same loss values), vectorised masking and collation (the same
batches, bit for bit, for the same random generator); the logged MFU's FLOPs; checkpoints written
on a background thread."""

from __future__ import annotations

import errno
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

from compressor import checkpoint
from compressor.checkpoint import Checkpoint, CheckpointWriter, load_checkpoint
from compressor.data import Batch, collate, mask_tokens
from compressor.errors import StorageError
from compressor.flops import forward_flops
from compressor.losses import HiddenMaps, StudentLoss
from compressor.prune.masks import Masks, prune_to, zero_pruned_weights
from compressor.recipe import DistillSpec
from compressor.shapes import Shape
from compressor.train.state import TrainingState, make_student
from compressor.train.throughput import Throughput
from tests.helpers import small_recipe, tiny_teacher

TEXTS = [
    "the cat sat on the mat and looked around the room",
    "a short one",
    "distillation of transformers by pruning them a little at a time",
    "",
]


# ---- the references: the implementations before issue 23, kept as they were -----------------


def reference_collate(seqs, pad: int) -> Batch:
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), pad, dtype=torch.long)
    att = torch.zeros((len(seqs), longest), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        att[i, : len(s)] = 1
    return Batch(ids, att)


def reference_mask_tokens(batch: Batch, tokenizer, probability: float, generator) -> Batch:
    ids = batch.input_ids.clone()
    special = torch.tensor(
        [
            tokenizer.get_special_tokens_mask(row, already_has_special_tokens=True)
            for row in ids.tolist()
        ],
        dtype=torch.bool,
    )
    can = batch.attention_mask.bool() & ~special
    chosen = (torch.rand(ids.shape, generator=generator) < probability) & can
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    roll = torch.rand(ids.shape, generator=generator)
    ids[chosen & (roll < 0.8)] = tokenizer.mask_token_id
    rand_pos = chosen & (roll >= 0.8) & (roll < 0.9)
    ids[rand_pos] = torch.randint(len(tokenizer), ids.shape, generator=generator)[rand_pos]
    return Batch(ids, batch.attention_mask, labels)


# ---- masking and collation ------------------------------------------------------------------


def token_rows(tokenizer, n: int, seed: int) -> list[list[int]]:
    """`n` tokenised texts of random lengths (special tokens, a [MASK] and [PAD] inside some)."""
    rng = np.random.default_rng(seed)
    rows = [tokenizer(TEXTS[int(rng.integers(len(TEXTS)))])["input_ids"] for _ in range(n)]
    rows[0] = rows[0] + [tokenizer.mask_token_id, tokenizer.pad_token_id, tokenizer.sep_token_id]
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_collate_equals_the_row_by_row_collate(packaged_tokenizer, seed):
    rows = token_rows(packaged_tokenizer, 7, seed)
    packed = np.arange(5 * 16, dtype=np.int32).reshape(5, 16)  # equal rows, as data.pack gives
    for seqs in (rows, list(packed), [rows[1]]):
        got, want = collate(seqs, 0), reference_collate(seqs, 0)
        assert torch.equal(got.input_ids, want.input_ids)
        assert torch.equal(got.attention_mask, want.attention_mask)
        assert got.input_ids.dtype == want.input_ids.dtype == torch.long
        assert got.attention_mask.dtype == want.attention_mask.dtype


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_mask_tokens_equals_the_per_row_tokenizer_masking(packaged_tokenizer, seed):
    batch = collate(token_rows(packaged_tokenizer, 9, seed), packaged_tokenizer.pad_token_id)
    for probability in (0.15, 0.6):
        g_new, g_old = (torch.Generator().manual_seed(seed) for _ in range(2))
        got = mask_tokens(batch, packaged_tokenizer, probability, g_new)
        want = reference_mask_tokens(batch, packaged_tokenizer, probability, g_old)
        assert torch.equal(got.input_ids, want.input_ids)
        assert torch.equal(got.labels, want.labels)
        assert torch.equal(got.attention_mask, want.attention_mask)
        assert torch.equal(g_new.get_state(), g_old.get_state())  # the same draws, no more
        flat = (want.labels != -100).flatten().nonzero().flatten()
        assert torch.equal(got.label_index, flat)
        assert int((got.labels != -100).sum()) > 0  # something was masked: a real comparison


# ---- the MLM head at the label positions only -------------------------------------------------


def mlm_setup(tokenizer, pruned: bool):
    teacher = tiny_teacher(tokenizer, mlm=True)
    student = make_student(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    masks = Masks.full(teacher.shape)
    if pruned:  # the masked LayerNorm of the head over part of the hidden dims
        s = teacher.shape
        narrower = Shape(layers=s.layers, hidden=s.hidden // 2, heads=s.heads,
                         head_dim=s.head_dim, ffn=s.ffn // 2)  # fmt: skip
        scores = {k: torch.rand(v.shape) for k, v in masks.__dict__.items()}
        masks = prune_to(masks, scores, narrower)
        zero_pruned_weights(student, masks)
    maps = HiddenMaps(teacher.shape.layers + 1, teacher.shape.hidden)
    fade = torch.nn.Parameter(masks.fade.clone())
    return teacher, StudentLoss(student, maps, fade, True), replace(masks, fade=fade)


@pytest.mark.parametrize("pruned", [False, True])
def test_logits_only_at_the_labels_give_the_loss_values_of_logits_everywhere(
    packaged_tokenizer, pruned
):
    tok = packaged_tokenizer
    teacher, loss, masks = mlm_setup(tok, pruned)
    batch = collate(token_rows(tok, 5, 0), tok.pad_token_id)
    batch = mask_tokens(batch, tok, 0.3, torch.Generator().manual_seed(0))
    d = DistillSpec(mlm=1.0, prediction=1.0, hidden=1.0, attention=1.0, temperature=2.0)
    n = int((batch.labels != -100).sum())

    def run(b: Batch):
        loss.zero_grad()
        t = teacher.encode(b, logits_at=b.label_index)
        out = loss(d, t, masks, b)
        sum(out.values()).backward()
        grads = {k: p.grad.clone() for k, p in loss.named_parameters() if p.grad is not None}
        return t.logits.shape, {k: v.detach() for k, v in out.items()}, grads

    shape, new, new_grads = run(batch)
    old_shape, old, old_grads = run(replace(batch, label_index=None))
    assert shape == (n, tok.vocab_size) and old_shape == (*batch.input_ids.shape, tok.vocab_size)
    assert set(new) == set(old) == {"hidden", "attention", "prediction", "mlm"}
    for k in new:  # the same rows in the same order: measured bit for bit on this CPU
        torch.testing.assert_close(new[k], old[k], rtol=1e-6, atol=0)
    # the head's weight gradients sum over N rows instead of B x T rows (the others' zeros):
    # the same terms, summed in another order
    assert set(new_grads) == set(old_grads)
    for k in new_grads:
        torch.testing.assert_close(new_grads[k], old_grads[k], rtol=1e-5, atol=1e-7)


# ---- the FLOPs the logged MFU counts ----------------------------------------------------------


def test_throughput_counts_what_the_hardware_computes(packaged_tokenizer):
    """The student at its tensors' widths (the teacher's while masked, whatever the masks keep)
    and the MLM head at the positions it runs at (the labels' with `label_index`, every
    position without)."""
    full = Shape(layers=4, hidden=64, heads=4, head_dim=16, ffn=128)
    vocab = packaged_tokenizer.vocab_size
    batch = collate(token_rows(packaged_tokenizer, 6, 1), packaged_tokenizer.pad_token_id)
    masked = mask_tokens(batch, packaged_tokenizer, 0.3, torch.Generator().manual_seed(0))
    n, t = batch.input_ids.shape
    at = int((masked.labels != -100).sum())
    assert 0 < at < n * t
    for b, positions in ((masked, at), (batch, n * t)):
        meter = Throughput(full, vocab, torch.device("cpu"))
        shapes = [meter.add(b)]
        assert shapes == [(n, t, positions)]
        meter.add_flops(shapes, full)
        encoder = 4 * forward_flops(full, t)  # teacher forward, student forward and backward
        maps = 3 * (full.layers + 1) * 2 * t * full.hidden * full.hidden
        head = 2 * t * full.hidden * (full.hidden + vocab)
        assert meter.flops == pytest.approx(
            n * (encoder + maps) + 4 * head * positions / t, rel=1e-6
        )
        assert meter.tokens == int(batch.attention_mask.sum())


# ---- checkpoints written in the background --------------------------------------------------


def a_checkpoint(step: int, weight: torch.Tensor) -> Checkpoint:
    return Checkpoint(step=step, student={"w": {"dense": weight}}, maps={}, optimizer={},
                      masks={}, importance=None, layers_chosen=False, noise_floor=None,
                      torch_rng=torch.get_rng_state())  # fmt: skip


def test_a_background_checkpoint_is_the_state_as_it_was_handed_over(tmp_path, monkeypatch):
    """`save` returns while the write is still going; the training thread may then change the
    tensors it handed over; what lands on disk is the state at `save`, checksummed."""
    release, real = threading.Event(), checkpoint.write_payload

    def slow(f, payload):
        assert release.wait(10)
        real(f, payload)

    monkeypatch.setattr(checkpoint, "write_payload", slow)
    writer, weight = CheckpointWriter(), torch.arange(6.0)
    writer.save(tmp_path, a_checkpoint(3, weight))
    assert writer.thread.is_alive() and load_checkpoint(tmp_path) is None  # not yet written
    weight.add_(100)  # the next training step
    release.set()
    writer.wait()
    loaded = load_checkpoint(tmp_path, warn=pytest.fail)
    assert loaded.step == 3 and torch.equal(loaded.student["w"]["dense"], torch.arange(6.0))


def test_a_failed_background_write_is_raised_by_the_next_save(tmp_path, monkeypatch):
    writer = CheckpointWriter()
    writer.save(tmp_path, a_checkpoint(1, torch.ones(2)))
    writer.wait()

    def full(f, payload):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_payload", full)
    writer.save(tmp_path, a_checkpoint(2, torch.ones(2)))  # fails on its thread
    with pytest.raises(StorageError, match="the disk is full"):
        writer.save(tmp_path, a_checkpoint(3, torch.ones(2)))
    assert load_checkpoint(tmp_path, warn=pytest.fail).step == 1
    assert not list(tmp_path.glob("*.tmp"))


# ---- widths known on the host ---------------------------------------------------------------


def test_the_widths_known_on_the_host_are_the_masks_widths(packaged_tokenizer):
    """Through pruning, layer fading and a resume (the loop reads them every step)."""
    teacher = tiny_teacher(packaged_tokenizer, num_hidden_layers=4)
    recipe = small_recipe()
    cpu = torch.device("cpu")
    state = TrainingState.start(recipe, teacher.shape, make_student(teacher), cpu)
    assert state.widths() == state.final_masks().widths() == teacher.shape
    s = teacher.shape
    narrower = Shape(layers=s.layers, hidden=s.hidden // 2, heads=s.heads - 1,
                     head_dim=s.head_dim // 2, ffn=s.ffn // 2)  # fmt: skip
    scores = {k: torch.rand(v.shape) for k, v in state.masks.__dict__.items()}
    pruned = prune_to(state.masks, scores, narrower)
    state.set_masks(replace(pruned, layers=torch.tensor([True, False, True, False])))
    for fade in (1.0, 0.4, 0.0):
        state.fade_layers(fade)
        assert state.widths() == state.final_masks().widths()
    assert state.widths().layers == 2 and state.widths().hidden == s.hidden // 2
    ckpt = Checkpoint(step=3, **state.stored(True), layers_chosen=True, noise_floor=None,
                      torch_rng=torch.get_rng_state())  # fmt: skip
    resumed = TrainingState.start(recipe, teacher.shape, make_student(teacher), cpu)
    resumed.restore(ckpt, cpu)
    assert resumed.widths() == resumed.final_masks().widths() == state.widths()
