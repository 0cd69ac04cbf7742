"""Logit parity against transformers' torch models in fp32 (max abs difference <= 1e-4), for each family and
each checkpoint format, on prompts of PROMPT_LEN >= 300 tokens."""
import numpy as np
import pytest

from checkpoints_conv import read_hf_config, read_hf_params
from conftest import PROMPT_LEN, save_hf
from lt_jax.model import default_positions, forward

FP32_TOL = 1e-4
FORMATS = ["safetensors", "sharded_safetensors", "bin", "sharded_bin"]


def our_logits(hf_dir, ids):
    cfg = read_hf_config(hf_dir)
    params = read_hf_params(hf_dir, cfg)
    return cfg, np.asarray(forward(params, ids, default_positions(ids), cfg))


@pytest.mark.parametrize("family", ["llama", "llama_linear", "mistral", "qwen2"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_logits_match_transformers(family, fmt, tiny_models, prompt_ids, tmp_path):
    model, ref = tiny_models(family, prompt_ids)
    cfg, ours = our_logits(save_hf(model, tmp_path / "hf", fmt), prompt_ids)
    assert ours.shape == ref.shape == (2, PROMPT_LEN, cfg.vocab_size)
    err = np.abs(ours - ref).max()
    assert err <= FP32_TOL, f"{family}/{fmt}: max abs logit difference {err:.2e}"


def test_configs_read_as_intended(tiny_models, prompt_ids, tmp_path):
    """The features the parity tests claim to cover are really switched on."""
    seen = {}
    for family in ["llama", "llama_linear", "mistral", "qwen2"]:
        seen[family] = read_hf_config(save_hf(tiny_models(family, prompt_ids)[0], tmp_path / family, "safetensors"))
    assert seen["llama"].rope.type == "llama3" and seen["llama"].num_kv_heads < seen["llama"].num_heads
    assert seen["llama_linear"].rope.type == "linear" and seen["llama_linear"].rope.theta == 500.0
    assert seen["mistral"].sliding_window == 100 < PROMPT_LEN
    assert seen["qwen2"].qkv_bias and seen["qwen2"].tie_embeddings


def test_rope_scaling_and_window_change_the_logits(tiny_models, prompt_ids, tmp_path):
    """Guards against a parity that holds only because a feature is a no-op on these prompts."""
    import dataclasses
    from lt_jax.config import Rope
    for family, change in [("llama", dict(rope=Rope(theta=10000.0))), ("mistral", dict(sliding_window=None))]:
        hf_dir = save_hf(tiny_models(family, prompt_ids)[0], tmp_path / family, "safetensors")
        cfg = read_hf_config(hf_dir)
        params = read_hf_params(hf_dir, cfg)
        plain = dataclasses.replace(cfg, **change)
        ids = prompt_ids[:1]
        a = np.asarray(forward(params, ids, default_positions(ids), cfg))
        b = np.asarray(forward(params, ids, default_positions(ids), plain))
        assert np.abs(a - b).max() > 1e-2, family


def test_left_padded_batch_equals_each_row_alone(tiny_models, prompt_ids, tmp_path):
    """Rows of unequal length, left padded (position -1): each row's logits equal the row run alone, so
    padding never leaks into attention, and positions start at 0 at each row's first real token."""
    hf_dir = save_hf(tiny_models("mistral", prompt_ids)[0], tmp_path / "hf", "safetensors")
    cfg = read_hf_config(hf_dir)
    params = read_hf_params(hf_dir, cfg)
    lengths = [PROMPT_LEN, PROMPT_LEN - 37]
    tokens = prompt_ids.copy()
    positions = np.asarray(default_positions(tokens)).copy()
    pad = PROMPT_LEN - lengths[1]
    tokens[1, :pad] = 0
    positions[1, :pad] = -1
    positions[1, pad:] = np.arange(lengths[1])
    batched = np.asarray(forward(params, tokens, positions, cfg))
    alone = prompt_ids[1:, pad:]
    single = np.asarray(forward(params, alone, default_positions(alone), cfg))
    assert np.isfinite(batched).all()
    assert np.abs(batched[1, pad:] - single[0]).max() <= 1e-5


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_long_prompts_take_the_tiled_path_and_still_match_transformers(family, tiny_models, tmp_path):
    """Past TILED_FROM tokens attention runs flash-style over key blocks; a 2300-token left-padded batch (not a
    multiple of the key block) against transformers, Mistral's window included."""
    import torch
    from lt_jax.attention import TILED_FROM
    model, _ = tiny_models(family, np.zeros((1, 1), np.int32))
    T = TILED_FROM + 252
    ids = np.random.default_rng(5).integers(0, model.config.vocab_size, (2, T)).astype(np.int32)
    cfg = read_hf_config(save_hf(model, tmp_path / "hf", "safetensors"))
    params = read_hf_params(tmp_path / "hf", cfg)
    positions = np.tile(np.arange(T, dtype=np.int32), (2, 1))
    positions[1, :300], positions[1, 300:] = -1, np.arange(T - 300)  # row 1: 300 tokens of left padding
    ours = np.asarray(forward(params, ids, positions, cfg))
    with torch.no_grad():
        mask = torch.from_numpy(positions >= 0).long()
        ref = model(torch.from_numpy(ids).long(), attention_mask=mask,
                    position_ids=torch.from_numpy(np.maximum(positions, 0)).long()).logits.numpy()
    err = max(np.abs(ours[0] - ref[0]).max(), np.abs(ours[1, 300:] - ref[1, 300:]).max())
    assert err <= FP32_TOL, f"{family}: max abs logit difference {err:.2e}"


@pytest.mark.parametrize("sink,window", [(3, 50), (0, 40), (129, 60)])
def test_streaming_equals_transformers_under_a_mask_built_by_loops(sink, window, tiny_models, prompt_ids, tiny_lt):
    """An independent reference for streaming attention: transformers' own llama (eager) under a 4D mask built
    by explicit loops over the rule (not our mask function), against every layer streaming in lt-jax, through
    the no-cache forward and through the cached path (hybrid prefill of 150 tokens, then 50 decode steps)."""
    import torch
    from lt_jax.plan import Plan
    hf, _ = tiny_models("llama", prompt_ids)
    T = 200
    ids = prompt_ids[:1, :T]
    allowed = np.zeros((T, T), bool)
    for q in range(T):
        for k in range(q + 1):
            allowed[q, k] = k < sink or q - k < window
    mask = torch.where(torch.from_numpy(allowed), 0.0, torch.finfo(torch.float32).min)[None, None]
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids).long(), attention_mask=mask).logits.float().numpy()[0]
    with torch.no_grad():
        causal = hf(torch.from_numpy(ids).long()).logits.float().numpy()[0]
    assert np.abs(ref - causal).max() > 1e-2  # the mask really streams
    model = tiny_lt("llama")
    streaming = Plan(3, (0, 1, 2), sink=sink, window=window, prefill="hybrid")
    assert np.abs(model.logits(ids, plan=streaming)[0] - ref).max() <= FP32_TOL
    done = model.prefill([list(ids[0, :150])], streaming, max_len=T)
    steps = []
    from lt_jax.inference import decode_step
    for t in range(150, T):  # teacher-forced decode through the cache, one token at a time
        logits, done.cache = decode_step(model.params, np.asarray(ids[:, t]), done.cache, done.layers,
                                         model.config, streaming.shape.decoding)
        steps.append(np.asarray(logits[0]))
    assert np.abs(np.asarray(done.logits[0]) - ref[149]).max() <= FP32_TOL
    assert np.abs(np.stack(steps) - ref[150:T]).max() <= FP32_TOL
