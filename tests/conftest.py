"""Shared fixtures. Compilation dominates small tests on this 2-core CPU, so models, conversions and jitted
functions are built once per session and shared."""
from __future__ import annotations

import os

# The test extra brings libtpu (TPU ahead-of-time compilation, tests/integration/test_tpu_aot.py): keep jax, here and in every
# subprocess a test starts, on the CPU (without this jax probes for a TPU at start and prints libtpu's errors).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import helpers  # noqa: E402 (its compile counter listens from before the first test compiles)

REPO = Path(__file__).resolve().parents[1]
PROMPT_LEN = 320  # >= 300 tokens, and longer than the Mistral window below
VOCAB = 300
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, attn_implementation="eager")


def tiny_hf_model(family: str, seed: int = 0):
    """A tiny random transformers model of one family, every weight (norms, biases) randomized."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)
    torch.manual_seed(seed)
    if family == "llama":  # GQA + llama3 rope scaling (original context shorter than the prompt)
        m = LlamaForCausalLM(LlamaConfig(**TINY, rope_parameters=dict(
            rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=64)))
    elif family == "llama_linear":  # written below in the old top-level rope_theta / rope_scaling form
        m = LlamaForCausalLM(LlamaConfig(**TINY, rope_parameters=dict(rope_type="linear", rope_theta=500.0,
                                                                      factor=2.0)))
    elif family == "mistral":  # native sliding window shorter than the prompt
        m = MistralForCausalLM(MistralConfig(**TINY, sliding_window=100))
    elif family == "qwen2":  # q/k/v bias, tied embeddings
        m = Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=True))
    else:
        raise ValueError(family)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def save_hf(model, out: Path, fmt: str) -> Path:
    """Saves in one of: safetensors, sharded_safetensors, bin, sharded_bin (transformers 5 writes only
    safetensors, so the torch formats are written as older transformers wrote them)."""
    out.mkdir(parents=True)
    if fmt in ("safetensors", "sharded_safetensors"):
        model.save_pretrained(out, max_shard_size="100KB" if fmt == "sharded_safetensors" else "50GB")
    else:
        model.config.save_pretrained(out)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        if fmt == "bin":
            torch.save(state, out / "pytorch_model.bin")
        else:
            names = list(state)
            halves = [names[: len(names) // 2], names[len(names) // 2:]]
            weight_map = {}
            for k, part in enumerate(halves):
                fname = f"pytorch_model-{k + 1:05d}-of-00002.bin"
                torch.save({n: state[n] for n in part}, out / fname)
                weight_map.update(dict.fromkeys(part, fname))
            (out / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    if model.config.model_type == "llama" and model.config.rope_parameters["rope_type"] == "linear":
        cfg = json.loads((out / "config.json").read_text())
        rope = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rope["rope_theta"]
        cfg["rope_scaling"] = {"type": "linear", "factor": rope["factor"]}
        (out / "config.json").write_text(json.dumps(cfg))
    return out


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids).long()).logits.float().numpy()


@pytest.fixture(scope="session")
def prompt_ids() -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, (2, PROMPT_LEN)).astype(np.int32)


@pytest.fixture(scope="session")
def tiny_models():
    """family -> (transformers model, its fp32 logits on prompt_ids): the independent reference."""
    cache = {}

    def get(family, ids):
        if family not in cache:
            m = tiny_hf_model(family)
            cache[family] = (m, hf_logits(m, ids))
        return cache[family]
    return get


@pytest.fixture(scope="session")
def assets() -> dict:
    """Real weights and essays, fetched through the same script CI and users call (idempotent)."""
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "fetch_assets.py"), "--json"],
                         capture_output=True, text=True, env=os.environ)
    if run.returncode != 0:
        pytest.fail(f"scripts/fetch_assets.py failed:\n{run.stderr[-2000:]}")
    return json.loads(run.stdout)


@pytest.fixture(scope="session")
def tiny_lt(tiny_models, prompt_ids, tmp_path_factory):
    """family -> lt_jax.Model converted from the tiny transformers model (no tokenizer)."""
    import lt_jax
    cache = {}

    def get(family):
        if family not in cache:
            model, _ = tiny_models(family, prompt_ids)
            cache[family] = lt_jax.load(save_hf(model, tmp_path_factory.mktemp(family) / "hf", "safetensors"))
        return cache[family]
    return get


@pytest.fixture(scope="session")
def tiny_chat(assets, tmp_path_factory):
    """A 4-layer random llama with SmolLM2's vocabulary, tokenizer and chat template, saved as an HF dir. Its
    weights are scaled up so attention is peaked and what a layer sees decides its output: full and streaming
    plans give different answers on a few hundred tokens (with the default small init every plan generated the
    same tokens, so a broken eviction could not show)."""
    import shutil
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                      tie_word_embeddings=True, eos_token_id=2, bos_token_id=1))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" not in name:
                p.mul_(TINY_CHAT_SCALE)
    out = tmp_path_factory.mktemp("tiny_chat") / "hf"
    hf.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (Path(assets["smollm2_hf"]) / name).exists():
            shutil.copy(Path(assets["smollm2_hf"]) / name, out / name)
    return out


TINY_CHAT_SCALE = 8.0


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_models, prompt_ids, tmp_path_factory):
    """The tiny llama converted through the CLI into an lt-jax checkpoint (no tokenizer)."""
    from lt_jax.cli import main
    hf = save_hf(tiny_models("llama", prompt_ids)[0], tmp_path_factory.mktemp("gen") / "hf", "safetensors")
    out = hf.parent / "ckpt"
    assert main(["convert", str(hf), str(out)]) == 0
    return out


def sigkill_when(proc, ready, timeout: float = 300) -> bool:
    """SIGKILL `proc` (a subprocess.Popen) as soon as `ready()` holds, polling; waits for it to end. True if it
    was killed (rather than ending on its own first)."""
    import signal
    import time
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ready():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    return proc.returncode == -signal.SIGKILL


def last_json(stdout: str) -> dict:
    """The last JSON object line of a process's stdout (gloo, JAX's CPU collectives, prints its own lines there)."""
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


@pytest.fixture(scope="session")
def deep(tmp_path_factory):
    """(transformers model, lt_jax model): a tiny llama with 6 layers, GQA 4/2, every weight perturbed; shared by
    test_lazy and test_retrieval_aware (one load, one set of compilations)."""
    import lt_jax
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(3)
    hf = LlamaForCausalLM(LlamaConfig(**{**TINY, "num_hidden_layers": helpers.LAYERS})).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return hf, lt_jax.load(save_hf(hf, tmp_path_factory.mktemp("deep") / "hf", "safetensors"))
