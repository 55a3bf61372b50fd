"""A model's config.json and the shape in it: reading the file ('default' is the bundled SmolLM2-135M, a Hub id the
cached or the catalog's copy), the families we know, the sizes the estimate needs, the linear layers LoRA targets.
No bytes are counted here (memory.py does).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_engine.protocol.errors import model_config_error
from qlora_engine.protocol.model_ref import HubRef, parse_hub_ref
from qlora_engine.resources import resources_dir

DEFAULT_CONTEXT_LENGTH = 32768  # when config.json gives no max_position_embeddings


@dataclass(frozen=True)
class Family:
    """What config.json doesn't say about a family but its modelling code does."""

    tied_default: bool  # tie_word_embeddings when config.json leaves it out
    norms_per_layer: int = 2
    qk_norm: bool = False  # RMSNorm on each head's query and key (Qwen3)
    attention_bias: bool = False  # q/k/v projections with a bias (Qwen2)
    fused_projections: bool = False  # qkv_proj and gate_up_proj instead of separate layers (Phi-3)
    eager_attention: bool = False  # transformers has no SDPA path for it: attention scores are materialized


KNOWN_FAMILIES = {
    "llama": Family(tied_default=False),
    "mistral": Family(tied_default=False),
    "qwen2": Family(tied_default=False, attention_bias=True),
    "qwen3": Family(tied_default=False, qk_norm=True),
    "gemma": Family(tied_default=True),
    "gemma2": Family(tied_default=True, norms_per_layer=4, eager_attention=True),
    "gemma3_text": Family(tied_default=True, norms_per_layer=4, qk_norm=True),
    "phi3": Family(tied_default=False, fused_projections=True),
}
LLAMA_LIKE = KNOWN_FAMILIES["llama"]

# config.json key for each size the estimate needs, with the names other families use for it.
REQUIRED_FIELDS = {
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "num_attention_heads": ("num_attention_heads", "n_head"),
    "intermediate_size": ("intermediate_size", "n_inner", "ffn_dim"),
    "vocab_size": ("vocab_size",),
}


@dataclass(frozen=True)
class LinearShape:
    """One nn.Linear of a decoder layer: quantized to 4-bit, and a LoRA target when selected."""

    name: str
    in_features: int
    out_features: int
    copies: int = 1  # mixture-of-experts: one per expert

    @property
    def params(self) -> int:
        return self.in_features * self.out_features * self.copies


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    family: Family
    final_logit_softcapping: bool
    attn_logit_softcapping: bool
    num_experts: int
    experts_per_token: int
    max_position_embeddings: int

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def is_gqa(self) -> bool:
        return self.num_kv_heads < self.num_heads

    def decoder_linears(self) -> list[LinearShape]:
        """The linear layers of one decoder layer, named as in the model's modules."""
        h, inter, experts = self.hidden_size, self.intermediate_size, self.num_experts
        if self.family.fused_projections:
            attention = [LinearShape("qkv_proj", h, self.q_width + 2 * self.kv_width)]
            mlp = [LinearShape("gate_up_proj", h, 2 * inter, experts)]
        else:
            attention = [LinearShape("q_proj", h, self.q_width), LinearShape("k_proj", h, self.kv_width),
                         LinearShape("v_proj", h, self.kv_width)]
            mlp = [LinearShape("gate_proj", h, inter, experts), LinearShape("up_proj", h, inter, experts)]
        return [*attention, LinearShape("o_proj", self.q_width, h), *mlp, LinearShape("down_proj", inter, h, experts)]


def _required_int(config: dict[str, Any], name: str) -> int:
    for key in REQUIRED_FIELDS[name]:
        value = config.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise model_config_error(f"config.json field '{key}' is {value!r}: expected a positive whole number",
                                         "Check the file: it may be damaged or hand-edited.")
            return value
    raise model_config_error(
        f"config.json has no '{name}' field: the memory estimate needs it",
        "Use the model's own config.json from Hugging Face. For a gated model, accept its license on the model "
        "page and download again: a failed download can leave an error page or an empty file instead.")


def _text_decoder_config(config: dict[str, Any], reasons: list[str]) -> dict[str, Any]:
    """Multimodal configs keep the language model's sizes under text_config."""
    if "hidden_size" in config or not isinstance(config.get("text_config"), dict):
        return config
    reasons.append("multimodal model: only the text decoder is counted, not its vision or audio tower")
    outer = {key: config[key] for key in ("model_type", "tie_word_embeddings") if key in config}
    return {**outer, **config["text_config"]}


def model_shape(config: dict[str, Any]) -> tuple[ModelShape, list[str]]:
    """The sizes the estimate needs, and the reasons it is only approximate (empty for a known family)."""
    reasons: list[str] = []
    config = _text_decoder_config(config, reasons)
    model_type = str(config.get("model_type") or "")
    family = KNOWN_FAMILIES.get(model_type)
    if family is None:
        family = LLAMA_LIKE
        named = f"architecture '{model_type}'" if model_type else "a config.json without model_type"
        reasons.append(f"{named} is not one the estimate models; it is treated as a Llama-style decoder")
    sizes = {name: _required_int(config, name) for name in REQUIRED_FIELDS}
    hidden, heads = sizes["hidden_size"], sizes["num_attention_heads"]
    tied = config.get("tie_word_embeddings")
    if tied is None and model_type not in KNOWN_FAMILIES:
        tied = False  # the larger assumption: a separate lm_head
        reasons.append("tie_word_embeddings is not set: a separate lm_head is assumed")
    experts = int(config.get("num_local_experts") or config.get("num_experts") or 1)
    if experts > 1:
        reasons.append(f"mixture of {experts} experts: every expert's MLP is counted as a dense one")
    shape = ModelShape(
        model_type=model_type or "unknown", hidden_size=hidden, intermediate_size=sizes["intermediate_size"],
        num_layers=sizes["num_hidden_layers"], num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads), vocab_size=sizes["vocab_size"],
        tied_embeddings=bool(family.tied_default if tied is None else tied),
        family=dataclasses.replace(family, attention_bias=bool(config.get("attention_bias", family.attention_bias))),
        final_logit_softcapping=bool(config.get("final_logit_softcapping")),
        attn_logit_softcapping=bool(config.get("attn_logit_softcapping")), num_experts=experts,
        experts_per_token=int(config.get("num_experts_per_tok") or 1) if experts > 1 else 1,
        max_position_embeddings=int(config.get("max_position_embeddings") or DEFAULT_CONTEXT_LENGTH))
    return shape, reasons


def targeted_linears(shape: ModelShape, target_modules: str) -> list[LinearShape]:
    """The linear layers that get LoRA adapters: every one for 'all-linear', else those named."""
    linears = shape.decoder_linears()
    if target_modules.strip() == "all-linear":
        return linears
    wanted = {name.strip() for name in target_modules.split(",") if name.strip()}
    chosen = [linear for linear in linears if linear.name in wanted]
    if not chosen:
        names = ", ".join(linear.name for linear in linears)
        raise model_config_error(f"target_modules '{target_modules}' names no linear layer of this model",
                                 f"Use 'all-linear' or some of: {names}.")
    return chosen


SMOLLM2_135M_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576, "initializer_range": 0.041666666666666664,
    "intermediate_size": 1536, "is_llama_config": True, "max_position_embeddings": 8192, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
    "pad_token_id": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_interleaved": False,
    "rope_scaling": None, "rope_theta": 100000, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 49152,
}


def load_model_config(path_or_dir: str | Path) -> dict[str, Any]:
    """A model's config.json as a dict: pass the model folder or the file itself."""
    path = Path(path_or_dir).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".gguf":
        raise model_config_error(f"{path}: the estimate reads config.json, not .gguf files",
                                 "Import the .gguf once (qlora-studio model-info FILE) and pass the imported folder.")
    if not path.is_file():
        raise model_config_error(f"{path}: no such file",
                                 "Pass a Hugging Face model folder (with config.json), its config.json, or 'default'.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise model_config_error(f"{path}: not valid JSON ({exc})",
                                 "Download config.json again; for a gated model, accept its license first (a failed "
                                 "download can save an error page instead).") from exc
    if not isinstance(config, dict):
        raise model_config_error(f"{path}: expected a JSON object of model settings, got a {type(config).__name__}")
    return config


def resolve_model_config(model: str) -> dict[str, Any]:
    """'default' is the bundled SmolLM2-135M-Instruct; a Hub id is read from the HF cache, else from the catalog's
    shipped copy (no download here); anything else is a folder or a config.json."""
    if model in ("", "default"):
        return dict(SMOLLM2_135M_CONFIG)
    ref = parse_hub_ref(model)
    if ref is not None:
        return hub_model_config(ref)
    return load_model_config(model)


def catalog_models() -> list[dict[str, Any]]:
    """resources/catalog.json's rows: name, hub_id, config (a file in model_configs/), published_params, gated,
    license."""
    return json.loads((resources_dir() / "catalog.json").read_text(encoding="utf-8"))["models"]


def shipped_config(entry: dict[str, Any]) -> dict[str, Any]:
    return load_model_config(resources_dir() / "model_configs" / f"{entry['config']}.json")


def hub_model_config(ref: HubRef) -> dict[str, Any]:
    """A Hub model's config.json: the HF cache's copy at that revision, else the catalog's, without the network."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(ref.repo_id, "config.json", revision=ref.revision_or_main)
    if isinstance(cached, str):
        return load_model_config(cached)
    entry = next((e for e in catalog_models() if e["hub_id"].lower() == ref.repo_id.lower()), None)
    if entry is not None:
        return shipped_config(entry)
    raise model_config_error(f"{ref}: its config.json is not in the HF cache (and it is not in the catalog)",
                             f"Download it first: qlora-studio pull {ref} (or pick it on the Model page).")
