"""lt_jax/config.py: Hugging Face config.json parsing per family (both rope forms), the round trips, and the
refusals, each one sentence naming the value and the file. Against transformers' models built from these
configs: tests/integration/test_convert.py and test_parity.py."""
import pytest

from lt_jax.config import Config, Rope
from lt_jax.errors import LtJaxError

BASE = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5, hidden_act="silu",
            bos_token_id=1, eos_token_id=2)
LLAMA3 = dict(BASE, model_type="llama", tie_word_embeddings=True, rope_parameters=dict(
    rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
    original_max_position_embeddings=8192))
LINEAR_OLD_FORM = dict(BASE, model_type="llama", rope_theta=500.0, rope_scaling={"type": "linear", "factor": 2.0})
MISTRAL = dict(BASE, model_type="mistral", sliding_window=100, head_dim=32, eos_token_id=[2, 7])
QWEN2 = dict(BASE, model_type="qwen2", use_sliding_window=False, sliding_window=4096, rope_theta=1e6)


def test_each_family():
    llama = Config.from_hf(LLAMA3)
    assert (llama.arch, llama.dim, llama.ffn_dim, llama.num_layers, llama.num_heads, llama.num_kv_heads) == (
        "llama", 64, 96, 3, 4, 2)
    assert llama.head_dim == 16 and llama.norm_eps == 1e-5 and llama.tie_embeddings and not llama.qkv_bias
    assert llama.rope == Rope(500000.0, "llama3", 8.0, 1.0, 4.0, 8192) and llama.sliding_window is None
    assert (llama.bos_token_id, llama.eos_token_ids, llama.dtype) == (1, (2,), "float32")
    assert Config.from_hf(LINEAR_OLD_FORM).rope == Rope(theta=500.0, type="linear", factor=2.0)
    mistral = Config.from_hf(MISTRAL, dtype="bfloat16")
    assert mistral.sliding_window == 100 and mistral.head_dim == 32 and mistral.eos_token_ids == (2, 7)
    assert mistral.rope == Rope() and not mistral.tie_embeddings and mistral.dtype == "bfloat16"
    qwen = Config.from_hf(QWEN2)
    assert qwen.qkv_bias and qwen.sliding_window is None and qwen.rope == Rope(theta=1e6)  # window unused: off
    no_kv = Config.from_hf({k: v for k, v in LLAMA3.items() if k != "num_key_value_heads"})
    assert no_kv.num_kv_heads == 4  # absent: multi-head attention
    assert Config.from_hf(dict(LLAMA3, eos_token_id=None)).eos_token_ids == ()


@pytest.mark.parametrize("hf", [LLAMA3, LINEAR_OLD_FORM, MISTRAL, QWEN2])
def test_round_trips(hf, tmp_path):
    cfg = Config.from_hf(hf)
    assert Config.from_hf(cfg.to_hf()) == cfg
    (tmp_path / "config.json").write_text(cfg.to_json())
    assert Config.from_json(tmp_path / "config.json") == cfg
    assert hash(cfg) == hash(Config.from_hf(hf))  # jit takes it as a static argument
    assert cfg.replace(num_layers=5).num_layers == 5 and cfg.num_layers == 3


@pytest.mark.parametrize("hf, words", [
    (dict(LLAMA3, model_type="gpt2"), "unsupported model_type 'gpt2' in my/config.json (supported: llama, "
                                      "mistral, qwen2)"),
    ({k: v for k, v in LLAMA3.items() if k != "model_type"}, "unsupported model_type None"),
    (dict(LLAMA3, hidden_act="gelu"), "unsupported hidden_act 'gelu' in my/config.json (only 'silu')"),
    (dict(LLAMA3, attention_bias=True), "llama with attention_bias/mlp_bias is not supported (my/config.json)"),
    (dict(LLAMA3, mlp_bias=True), "llama with attention_bias/mlp_bias"),
    (dict(QWEN2, use_sliding_window=True), "qwen2 with use_sliding_window=true is not supported"),
    (dict(LLAMA3, rope_parameters=dict(rope_type="yarn", factor=4.0)), "unsupported rope type 'yarn' in "
                                                                       "my/config.json"),
    (dict(LINEAR_OLD_FORM, rope_scaling={"type": "dynamic", "factor": 2.0}), "unsupported rope type 'dynamic'"),
    (dict(LLAMA3, num_key_value_heads=3), "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
])
def test_refusals_name_the_value_and_the_file(hf, words):
    with pytest.raises(LtJaxError) as e:
        Config.from_hf(hf, source="my/config.json")
    assert words in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)


def test_unknown_dtype():
    with pytest.raises(LtJaxError, match="dtype 'float16' is not one of float32, bfloat16"):
        Config.from_hf(LLAMA3, dtype="float16")
