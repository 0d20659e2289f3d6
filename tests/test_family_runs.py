"""`compress run` end to end for every family other than BERT (which tiny-test.yaml runs): a tiny
random teacher of the family saved as a local model directory (the packaged WordPiece
vocabulary, the family's model inputs, sentence-transformers files), a recipe that prunes every
structure kind with progressive slimming, and the result registered in the zoo and verified."""

import json

import pytest
import torch
import yaml
from click.testing import CliRunner
from transformers import (
    AutoModel,
    AutoTokenizer,
    CamembertConfig,
    DistilBertConfig,
    MPNetConfig,
    RobertaConfig,
    XLMRobertaConfig,
)

from compressor.arch import architecture_for
from compressor.cli.main import main
from compressor.shapes import Shape
from compressor.zoo import store as zoo_store

BERT_LIKE = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                 intermediate_size=128, max_position_embeddings=66)  # fmt: skip
TEACHERS = {
    "roberta": lambda v: RobertaConfig(
        **BERT_LIKE, vocab_size=v, type_vocab_size=1, pad_token_id=0
    ),
    "xlm-roberta": lambda v: XLMRobertaConfig(
        **BERT_LIKE, vocab_size=v, type_vocab_size=1, pad_token_id=0
    ),
    "camembert": lambda v: CamembertConfig(
        **BERT_LIKE, vocab_size=v, type_vocab_size=1, pad_token_id=0
    ),
    "distilbert": lambda v: DistilBertConfig(
        dim=64, n_layers=3, n_heads=4, hidden_dim=128, max_position_embeddings=66, vocab_size=v
    ),
    "mpnet": lambda v: MPNetConfig(**BERT_LIKE, vocab_size=v),
}
# layers 3 -> 2, hidden 64 -> 32, heads 4 -> 2, FFN 128 -> 64. Not head dims: distill.py scores a
# progressively cut student at the teacher's head size (test_architectures cuts head dims)
TARGET = Shape(2, 32, 2, 16, 64)
ST_FILES = {
    "modules.json": [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
        {
            "idx": 2,
            "name": "2",
            "path": "2_Normalize",
            "type": "sentence_transformers.models.Normalize",
        },
    ],
    "sentence_bert_config.json": {"max_seq_length": 16, "do_lower_case": False},
    "1_Pooling/config.json": {"word_embedding_dimension": 64, "pooling_mode_mean_tokens": True},
}


def write_teacher(family: str, where, tokenizer) -> None:
    torch.manual_seed(0)
    model = AutoModel.from_config(TEACHERS[family](len(tokenizer)))
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(where)
    tokenizer.save_pretrained(where)
    if architecture_for(model).embeddings(model).token_type is None:
        cfg_file = where / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg_file.write_text(
            json.dumps({**cfg, "model_input_names": ["input_ids", "attention_mask"]})
        )
    for rel, content in ST_FILES.items():
        (where / rel).parent.mkdir(parents=True, exist_ok=True)
        (where / rel).write_text(json.dumps(content))
    (where / "2_Normalize").mkdir(exist_ok=True)


def recipe(family: str, teacher_dir) -> dict:
    return {
        "name": f"tiny-{family}",
        "teacher": {"source": "local", "id": str(teacher_dir)},
        "data": {"source": "wiki_summaries", "max_length": 16, "heldout": 4, "quality_texts": 8},
        "target": {"layers": TARGET.layers, "hidden": TARGET.hidden, "heads": TARGET.heads,
                   "ffn": TARGET.ffn},
        "pruning": {"structures": ["layers", "heads", "ffn", "hidden"],
                    "start_step": 0, "end_step": 4, "interval": 1, "probe_batches": 2,
                    "progressive_slim": True},
        "train": {"steps": 6, "batch_size": 2, "warmup_steps": 1, "seed": 0, "device": "cpu",
                  "log_every": 1, "eval_every": 2, "checkpoint_every": 2},
        "export": {"onnx": True, "batch_sizes": [1, 2], "seq_lengths": [8, 16]},
        "bench": {"enabled": False},
    }  # fmt: skip


@pytest.mark.parametrize("family", list(TEACHERS))
def test_compress_run_registers_a_stock_model_of_the_family(family, tmp_path, packaged_tokenizer):
    write_teacher(family, tmp_path / "teacher", packaged_tokenizer)
    path = tmp_path / f"tiny-{family}.yaml"
    path.write_text(yaml.safe_dump(recipe(family, tmp_path / "teacher")))
    check = CliRunner().invoke(main, ["recipe", "check", str(path)])
    assert check.exit_code == 0, check.output
    assert "3L-64H-4A-128I" in check.output and TARGET.label() in check.output
    zoo = tmp_path / "zoo"
    res = CliRunner().invoke(
        main, ["run", str(path), "--output", str(tmp_path / "runs"), "--zoo", str(zoo)]
    )
    assert res.exit_code == 0, res.output[-3000:]
    (entry,) = zoo_store.list_entries(zoo)
    assert f"registered in the zoo: {entry['id']}" in res.output
    assert zoo_store.verify(zoo, entry["id"])["passed"] is True

    (run_dir,) = (tmp_path / "runs").glob(f"tiny-{family}*/*")
    model = AutoModel.from_pretrained(run_dir / "model")
    assert model.config.model_type == family
    assert Shape.of_config(model.config) == TARGET
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["checks"]["masked_vs_slim_max_abs"] <= 1e-4
    assert summary["export"]["verify"]["model.onnx"]["passed"] is True
    # the sentence-transformers graph (pooling + normalisation), checked against
    # sentence-transformers' own embedding of the shipped model
    assert summary["export"]["verify"]["model/onnx/model.onnx"]["passed"] is True
    # the user's conventions: the tokenizer's inputs and the sentence-transformers layout
    tok = AutoTokenizer.from_pretrained(run_dir / "model")
    assert (
        tok.model_input_names
        == AutoTokenizer.from_pretrained(tmp_path / "teacher").model_input_names
    )
    pooling = json.loads((run_dir / "model" / "1_Pooling" / "config.json").read_text())
    assert pooling["word_embedding_dimension"] == TARGET.hidden
