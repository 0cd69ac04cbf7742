"""`lt-jax convert` / `export` / `ppl` and `lt_jax.load`, end to end through the CLI entry point, plus bad input:
one clear sentence, non-zero exit, no partial output."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import lt_jax
from checkpoints_conv import load_checkpoint
from conftest import hf_logits, save_hf
from lt_jax.cli import main


def run_cli(capsys, *argv):
    capsys.readouterr()  # drop what fixtures printed
    code = main([*map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def qwen_hf(tiny_models, prompt_ids, tmp_path_factory):
    """A tiny Qwen2 (bias + tied embeddings) saved as sharded safetensors, and its reference logits."""
    model, ref = tiny_models("qwen2", prompt_ids)
    return model, ref, save_hf(model, tmp_path_factory.mktemp("qwen") / "hf", "sharded_safetensors")


@pytest.fixture(scope="module")
def converted(qwen_hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "ckpt"
    assert main(["convert", str(qwen_hf[2]), str(out)]) == 0
    return out


def test_convert_then_load_gives_transformers_logits(qwen_hf, converted, prompt_ids):
    _, ref, _ = qwen_hf
    model = lt_jax.load(converted)
    ours = model.logits(prompt_ids)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-4
    cfg, params = load_checkpoint(converted)
    assert cfg.arch == "qwen2" and "lm_head" not in params and params["layers"]["qkv_bias"].shape == (3, 2, 4, 16)


def test_checkpoint_in_the_unfused_layout_is_fused_at_read_time(qwen_hf, converted, prompt_ids, tmp_path):
    """A checkpoint written by lt-jax 0.1 (q/k/v/o/gate/up/down unfused and stored [in..., out...], transcribed
    here from transformers' own tensors) still loads: fused at read time, the same logits bit for bit as a fresh
    conversion."""
    import orbax.checkpoint as ocp
    hf, _, _ = qwen_hf
    cfg, _ = load_checkpoint(converted)
    D, N, K, H = cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    stack = lambda name, f=lambda a: a: np.stack([f(sd[f"model.layers.{i}.{name}"])  # noqa: E731
                                                  for i in range(cfg.num_layers)])
    layers = {"attn_norm": stack("input_layernorm.weight"), "mlp_norm": stack("post_attention_layernorm.weight"),
              "q": stack("self_attn.q_proj.weight", lambda w: w.T.reshape(D, N, H)),
              "k": stack("self_attn.k_proj.weight", lambda w: w.T.reshape(D, K, H)),
              "v": stack("self_attn.v_proj.weight", lambda w: w.T.reshape(D, K, H)),
              "o": stack("self_attn.o_proj.weight", lambda w: w.T.reshape(N, H, D)),
              "q_bias": stack("self_attn.q_proj.bias", lambda b: b.reshape(N, H)),
              "k_bias": stack("self_attn.k_proj.bias", lambda b: b.reshape(K, H)),
              "v_bias": stack("self_attn.v_proj.bias", lambda b: b.reshape(K, H)),
              "gate": stack("mlp.gate_proj.weight", np.transpose), "up": stack("mlp.up_proj.weight", np.transpose),
              "down": stack("mlp.down_proj.weight", np.transpose)}
    old = tmp_path / "old"
    old.mkdir()
    (old / "lt_config.json").write_text((converted / "lt_config.json").read_text())
    ocp.PyTreeCheckpointer().save((old / "params").absolute(), {
        "embed": sd["model.embed_tokens.weight"], "final_norm": sd["model.norm.weight"], "layers": layers})
    np.testing.assert_array_equal(lt_jax.load(old).logits(prompt_ids[:1]),
                                  lt_jax.load(converted).logits(prompt_ids[:1]))


def test_load_hf_dir_in_memory_equals_converted(qwen_hf, converted, prompt_ids):
    a = lt_jax.load(qwen_hf[2]).logits(prompt_ids[:1])
    b = lt_jax.load(converted).logits(prompt_ids[:1])
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shard_bytes", [None, 40_000])
def test_export_round_trip_identical_logits(qwen_hf, converted, prompt_ids, tmp_path, shard_bytes):
    from transformers import AutoModelForCausalLM
    from checkpoints_conv import export
    model, _, _ = qwen_hf
    out = tmp_path / "exported"
    if shard_bytes is None:
        assert main(["export", str(converted), str(out)]) == 0
        assert (out / "model.safetensors").exists()
    else:
        export(converted, out, max_shard_bytes=shard_bytes)
        assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    np.testing.assert_array_equal(hf_logits(back, prompt_ids), hf_logits(model, prompt_ids))


def test_bf16_conversion(qwen_hf, tmp_path, prompt_ids):
    out = tmp_path / "bf16"
    assert main(["convert", str(qwen_hf[2]), str(out), "--dtype", "bfloat16"]) == 0
    cfg, params = load_checkpoint(out)
    assert cfg.dtype == "bfloat16" and params["embed"].dtype.name == "bfloat16"
    ours = lt_jax.load(out).logits(prompt_ids[:1])
    # bf16 weights and activations: a loose, stated tolerance relative to the logit scale.
    assert np.abs(ours - qwen_hf[1][:1]).max() <= 0.05 * np.abs(qwen_hf[1]).max()


def test_ppl_json_from_ids_file(converted, prompt_ids, tmp_path, capsys, qwen_hf):
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text(" ".join(map(str, prompt_ids[0])))
    code, out, _ = run_cli(capsys, "ppl", converted, "--ids-file", ids_file, "--max-tokens", 200, "--json")
    assert code == 0
    got = json.loads(out)
    logits = torch.from_numpy(qwen_hf[1][0, :199])
    nll = torch.nn.functional.cross_entropy(logits, torch.from_numpy(prompt_ids[0, 1:200]).long())
    assert got["tokens"] == 199
    assert abs(got["nll"] - float(nll)) <= 1e-5 and abs(got["ppl"] / float(torch.exp(nll)) - 1) <= 1e-5


# ---- bad input -----------------------------------------------------------------------------------------

def assert_clean_failure(capsys, argv, out_dir, *words):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("lt-jax convert: error:"), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not out_dir.exists()
    if out_dir.parent.is_dir():
        assert not any(p.name.startswith(f".{out_dir.name}.tmp") for p in out_dir.parent.iterdir())


def test_missing_shard(qwen_hf, tmp_path, capsys):
    import shutil
    src = tmp_path / "hf"
    shutil.copytree(qwen_hf[2], src)
    victim = sorted(src.glob("model-*.safetensors"))[-1]
    victim.unlink()
    assert_clean_failure(capsys, ["convert", src, tmp_path / "out"], tmp_path / "out", victim.name, "missing")


def test_truncated_safetensors(tiny_models, prompt_ids, tmp_path, capsys):
    src = save_hf(tiny_models("llama", prompt_ids)[0], tmp_path / "hf", "safetensors")
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert_clean_failure(capsys, ["convert", src, tmp_path / "out"], tmp_path / "out", "truncated", str(f))


def test_corrupt_bin(tiny_models, prompt_ids, tmp_path, capsys):
    src = save_hf(tiny_models("llama", prompt_ids)[0], tmp_path / "hf", "bin")
    (src / "pytorch_model.bin").write_bytes(b"not a pickle")
    assert_clean_failure(capsys, ["convert", src, tmp_path / "out"], tmp_path / "out", "pytorch_model.bin")


def test_unknown_model_type(qwen_hf, tmp_path, capsys):
    import shutil
    src = tmp_path / "hf"
    shutil.copytree(qwen_hf[2], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (src / "config.json").write_text(json.dumps(cfg))
    assert_clean_failure(capsys, ["convert", src, tmp_path / "out"], tmp_path / "out", "'gpt2'", "model_type")


def test_unknown_rope_type(qwen_hf, tmp_path, capsys):
    import shutil
    src = tmp_path / "hf"
    shutil.copytree(qwen_hf[2], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (src / "config.json").write_text(json.dumps(cfg))
    assert_clean_failure(capsys, ["convert", src, tmp_path / "out"], tmp_path / "out", "'yarn'")


def test_shapes_disagree_with_config(qwen_hf, tmp_path, capsys):
    import shutil
    src = tmp_path / "hf"
    shutil.copytree(qwen_hf[2], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (src / "config.json").write_text(json.dumps(cfg))
    assert_clean_failure(capsys, ["convert", src, tmp_path / "out"], tmp_path / "out", "mlp.", "implies", "128")


def test_unwritable_out_dir(qwen_hf, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert_clean_failure(capsys, ["convert", qwen_hf[2], blocker / "out"], blocker / "out", str(blocker),
                         "not an existing directory")
    existing = tmp_path / "exists"
    existing.mkdir()
    code, _, err = run_cli(capsys, "convert", qwen_hf[2], existing)
    assert code == 2 and err.startswith(f"lt-jax convert: error: output directory {existing} already exists")
    assert list(existing.iterdir()) == []


def test_interrupted_conversion_leaves_nothing(qwen_hf, tmp_path, monkeypatch):
    """A failure after writing has started (here: inside the checkpoint writer) removes the partial output."""
    import orbax.checkpoint as ocp

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(ocp.Checkpointer, "save", boom)
    from checkpoints_conv import convert
    with pytest.raises(OSError):
        convert(qwen_hf[2], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # a process start (~16 s); a real process's non-zero exit: test_cli's test_ctrl_c_ends_in_one_line
def test_real_command_exits_nonzero(tmp_path):
    run = subprocess.run([sys.executable, "-m", "lt_jax.cli", "convert", str(tmp_path / "nope"), str(tmp_path / "o")],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "nope" in run.stderr and not (tmp_path / "o").exists()


def test_ppl_bad_inputs(converted, tmp_path, capsys):
    code, _, err = run_cli(capsys, "ppl", converted, "--text-file", tmp_path / "missing.txt")
    assert code == 2 and "missing.txt" in err
    ids = tmp_path / "ids.txt"
    ids.write_text("1 2 99999")
    code, _, err = run_cli(capsys, "ppl", converted, "--ids-file", ids)
    assert code == 2 and "0..299" in err and "99999" in err
    ids.write_text("1 two 3")
    code, _, err = run_cli(capsys, "ppl", converted, "--ids-file", ids)
    assert code == 2 and str(ids) in err
    code, _, err = run_cli(capsys, "ppl", converted, "--text-file", ids)  # no tokenizer in a tiny checkpoint
    assert code == 2 and "tokenizer" in err


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_bf16_source_checkpoint(fmt, tmp_path, prompt_ids):
    """bf16 tensors on disk (read without torch for safetensors) convert to the fp32 model transformers sees."""
    from conftest import tiny_hf_model
    model = tiny_hf_model("llama")
    with torch.no_grad():  # the reference: fp32 model holding exactly the bf16-representable weights
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    ref = hf_logits(model, prompt_ids)
    # (not model.to(bfloat16): that would also round transformers' rotary inv_freq buffer)
    src = save_hf(tiny_hf_model("llama").to(torch.bfloat16), tmp_path / "hf", fmt)
    ours = lt_jax.load(src).logits(prompt_ids)
    assert np.abs(ours - ref).max() <= 1e-4
