"""Static model configuration, read from and written back to Hugging Face `config.json`.

Axis letters used across the package (docs/design.md §2): B batch, T query time, S key time, N query heads,
K kv heads, G = N/K, H head dim, D model dim, F ffn dim, V vocab, L layers.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from lt_jax.errors import LtJaxError

ARCHS = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Rope:
    """RoPE frequencies: HF's `default`, `linear` and `llama3` rope types."""
    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only


@dataclasses.dataclass(frozen=True)
class Config:
    """Hashable, so jit can take it as a static argument."""
    arch: str
    vocab_size: int
    dim: int
    ffn_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    rope: Rope
    max_position_embeddings: int
    tie_embeddings: bool
    qkv_bias: bool
    sliding_window: int | None = None  # Mistral's native window (W counts the query itself); None = full
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "float32"  # dtype of the params and of the activations

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise LtJaxError(f"num_attention_heads={self.num_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_kv_heads}.")
        if self.dtype not in DTYPES:
            raise LtJaxError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}.")

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    # ---- HF config.json <-> Config -------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json", dtype: str = "float32") -> "Config":
        """Build from an HF config dict; `source` names the file in error messages."""
        arch = hf.get("model_type")
        if arch not in ARCHS:
            raise LtJaxError(f"unsupported model_type {arch!r} in {source} (supported: {', '.join(ARCHS)}).")
        if hf.get("hidden_act", "silu") != "silu":
            raise LtJaxError(f"unsupported hidden_act {hf['hidden_act']!r} in {source} (only 'silu').")
        if arch == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
            raise LtJaxError(f"llama with attention_bias/mlp_bias is not supported ({source}).")
        window = None
        if arch == "mistral":
            window = hf.get("sliding_window")
        if arch == "qwen2" and hf.get("use_sliding_window"):
            raise LtJaxError(f"qwen2 with use_sliding_window=true is not supported ({source}).")
        eos = hf.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        num_heads = hf["num_attention_heads"]
        return cls(
            arch=arch,
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            ffn_dim=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope=_rope_from_hf(hf, source),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2",
            sliding_window=window,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos,
            dtype=dtype,
        )

    def to_hf(self) -> dict:
        """An HF config dict that transformers loads as the same model."""
        archs = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
        rope = {"rope_type": self.rope.type, "rope_theta": self.rope.theta}
        if self.rope.type in ("linear", "llama3"):
            rope["factor"] = self.rope.factor
        if self.rope.type == "llama3":
            rope.update(low_freq_factor=self.rope.low_freq_factor, high_freq_factor=self.rope.high_freq_factor,
                        original_max_position_embeddings=self.rope.original_max_position_embeddings)
        hf = {
            "model_type": self.arch, "architectures": [archs[self.arch]],
            "vocab_size": self.vocab_size, "hidden_size": self.dim, "intermediate_size": self.ffn_dim,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim, "hidden_act": "silu",
            "rms_norm_eps": self.norm_eps, "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_embeddings, "rope_parameters": rope, "rope_theta": self.rope.theta,
            "dtype": self.dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
        }
        if self.arch == "llama":
            hf.update(attention_bias=False, mlp_bias=False)
        if self.arch == "mistral":
            hf["sliding_window"] = self.sliding_window
        if self.arch == "qwen2":
            hf["use_sliding_window"] = False
        return hf

    # ---- our own file ----------------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, path: Path) -> "Config":
        d = json.loads(Path(path).read_text())
        d["rope"] = Rope(**d["rope"])
        d["eos_token_ids"] = tuple(d["eos_token_ids"])
        return cls(**d)


def _rope_from_hf(hf: dict, source: str) -> Rope:
    # transformers 5 nests everything in `rope_parameters`; older files use `rope_theta` + `rope_scaling`.
    params = dict(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise LtJaxError(f"unsupported rope type {kind!r} in {source} (supported: {', '.join(ROPE_TYPES)}).")
    rope = Rope(theta=float(theta), type=kind)
    if kind in ("linear", "llama3"):
        rope = dataclasses.replace(rope, factor=float(params["factor"]))
    if kind == "llama3":
        rope = dataclasses.replace(
            rope, low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]))
    return rope
