"""Meshes and processes: the rules table, every family on 8 simulated CPU devices against one device (in a
subprocess, tests/mesh_worker.py, so this process keeps its one device), and `lt-jax eval` split across two real
`jax.distributed` processes on localhost."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from conftest import REPO, last_json, sigkill_when
from lt_jax import sharding
from lt_jax.cli import main
from lt_jax.errors import LtJaxError
from lt_jax.params import param_specs

MODEL_AXIS = {"vocab", "q_heads", "kv_heads", "ffn"}  # what the default rules split over `model`


def expected_fraction(axes: tuple, shape: tuple, mesh: dict) -> float:
    """The rules written out by hand: the one `model`-mapped axis of a leaf is split if `model` divides it."""
    for axis, dim in zip(axes, shape):
        if axis in MODEL_AXIS:
            return 1 / mesh["model"] if dim % mesh["model"] == 0 else 1.0
    return 1.0


@pytest.fixture(scope="module")
def smollm2_config(assets):
    from pathlib import Path
    from checkpoints_conv import read_hf_config
    return read_hf_config(Path(assets["smollm2_hf"]))


@pytest.mark.parametrize("model_size", [2, 4, 8])
def test_heads_that_do_not_divide_are_replicated(smollm2_config, model_size):
    """SmolLM2: 9 query heads, 3 KV heads. On model=2/4/8 attention stays whole (replicated), the MLP (F=1536)
    and the vocabulary (49152) are split; the cache's KV heads are replicated too."""
    cfg = smollm2_config
    assert (cfg.num_heads, cfg.num_kv_heads) == (9, 3)
    mesh = AbstractMesh((2, model_size), ("data", "model"))
    specs = param_specs(cfg)
    layers = specs["layers"]
    # specs in jit's form: trailing replicated dims dropped
    assert sharding.spec_for(mesh, layers["qkv_proj"].axes, layers["qkv_proj"].shape) == PartitionSpec()
    assert sharding.spec_for(mesh, layers["o_proj"].axes, layers["o_proj"].shape) == PartitionSpec()
    assert sharding.spec_for(mesh, layers["gate_up_proj"].axes, layers["gate_up_proj"].shape) == PartitionSpec(
        None, None, "model")
    assert sharding.spec_for(mesh, specs["embed"].axes, specs["embed"].shape) == PartitionSpec("model")
    described = sharding.describe(cfg, mesh)
    assert described["layers/qkv_proj"]["replicated_not_dividing"] == ["kv_heads"]
    assert described["layers/o_proj"]["replicated_not_dividing"] == ["q_heads"]
    assert described["layers/down_proj"]["replicated_not_dividing"] == []
    cache_k = sharding.spec_for(mesh, sharding.CACHE_AXES["full_k"], (4, 3, 64, 4096))
    assert cache_k == PartitionSpec("data")
    assert sharding.spec_for(mesh, sharding.CACHE_AXES["full_k"], (3, 3, 64, 4096)) == PartitionSpec(
        )  # 3 rows on data=2: replicated, not an error


def test_rules_are_overridable_and_skip_missing_axes(smollm2_config):
    mesh = AbstractMesh((2, 2), ("fsdp", "model"))
    embed = ("vocab", "embed")
    assert sharding.spec_for(mesh, embed, (49152, 576)) == PartitionSpec("model", "fsdp")
    assert sharding.spec_for(mesh, embed, (49152, 576), rules=(("ffn", "model"),)) == PartitionSpec()
    no_fsdp = AbstractMesh((4,), ("model",))  # the fsdp rule names an axis this mesh lacks: skipped
    assert sharding.spec_for(no_fsdp, embed, (49152, 576)) == PartitionSpec("model")


@pytest.mark.parametrize("spec, message", [
    ("data=2,model=4", "needs 8 devices; there are 1"),
    ("data=2;model=4", "is not AXIS=SIZE"),
    ("data=0", "is not AXIS=SIZE"),
    ("data=-1,model=-1", "only one axis may have size -1"),
    ("data=2,data=1", "is not AXIS=SIZE"),
])
def test_bad_mesh_is_one_sentence(spec, message):
    with pytest.raises(LtJaxError, match=message) as bad:
        sharding.make_mesh(spec)
    if "devices" in message:  # CPU devices: the flag that simulates more is named
        assert "--xla_force_host_platform_device_count=8" in str(bad.value)


def test_one_device_mesh_and_cli_flag(tiny_ckpt, capsys):
    assert dict(sharding.make_mesh("data=-1,model=1").shape) == {"data": 1, "model": 1}
    capsys.readouterr()
    assert main(["generate", str(tiny_ckpt), "--ids", "1 2 3", "--max-new-tokens", "2", "--mesh", "data=4",
                 "--json"]) == 2
    err = capsys.readouterr().err
    assert "mesh 'data=4' needs 4 devices; there are 1" in err and err.count("\n") == 1
    assert main(["generate", str(tiny_ckpt), "--ids", "1 2 3", "--max-new-tokens", "2", "--mesh", "data=1",
                 "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["ids"]) == 2


def _mesh_results(tmp_path, wanted=()):
    run = subprocess.run([sys.executable, str(REPO / "tests" / "mesh_worker.py"), str(tmp_path), *wanted],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return last_json(run.stdout)


def _check_mesh_results(result, cfg):
    # every leaf's logical axes (a config with every optional leaf: qkv bias, an untied head)
    specs = param_specs(cfg.replace(qkv_bias=True, tie_embeddings=False))
    axes_of = {**{k: s.axes for k, s in specs.items() if k != "layers"},
               **{k: s.axes[1:] for k, s in specs["layers"].items()}}
    assert result["devices"] == 8
    checked = 0
    for family, meshes in result.items():
        if family == "devices":
            continue
        for spec, r in meshes.items():
            where = f"{family} on {spec}"
            mesh = r["mesh"]
            # within 1e-5 of one device on the logits' scale (the tiny models' are below 2: 1e-5 absolute)
            assert r["max_abs_logits_diff"] <= 1e-5 * max(1.0, r["max_abs_logits"]), where
            assert r["greedy_equal"], where
            assert r["lazy_layers"] == r["lazy_layers_one_device"], where
            assert r["max_abs_ratio_diff"] <= 1e-6, where
            assert r["new_compilations"] == [0, 0], where  # another prompt set, another choice: no compile
            assert r["cache_donated"], where
            assert r["train_loss_rel_diff"] <= 1e-6 and r["train_grad_max_rel_diff"] <= 1e-5, where  # training
            # KV heads copied up to `model` where it splits the query heads finer (the tiny families' 4 / 2 on
            # model=4; not SmolLM2's 9 / 3): the formula's bytes times the copies, split over model
            held = r["cache_kv_heads"]
            assert held == (mesh["model"] if family != "smollm2" and mesh["model"] == 4 else r["num_kv_heads"]), where
            split = (mesh["data"] if 8 % mesh["data"] == 0 else 1) * (
                mesh["model"] if held % mesh["model"] == 0 else 1)
            assert r["cache_bytes_per_device"] == [r["cache_bytes_formula"] * held // r["num_kv_heads"] // split], \
                where
            for name, w in r["weights"].items():
                axes = axes_of[name.split("/")[-1]]
                assert w["devices"] == 8, (where, name)
                assert w["fractions"] == [expected_fraction(axes, w["shape"], mesh)], (where, name, w)
            checked += 1
    return checked


@pytest.fixture(scope="module")
def on_mesh(tmp_path_factory):
    """One worker run (one process start, one set of compilations) for the default suite's mesh tests."""
    wanted = [f"llama:{m}" for m in ("data=8,model=1", "data=2,model=4", "data=1,model=8", "data=4,model=2")]
    return _mesh_results(tmp_path_factory.mktemp("mesh"), [*wanted, "mistral:data=2,model=4",
                                                           "qwen2:data=4,model=2", "--train", "--cli"])


@pytest.mark.slow  # one 8-device worker (~2 min); specs: tests/unit/test_sharding.py, a mesh run: test_serving's two-process test
def test_meshes_match_one_device(on_mesh, smollm2_config):
    """Llama (GQA) on all four meshes, Mistral and Qwen2 on one each: logits, greedy ids, lighttransfer's choice,
    compile counts, cache donation, cache bytes and weight fractions per device."""
    assert _check_mesh_results({k: v for k, v in on_mesh.items() if k not in ("train", "cli")},
                               smollm2_config) == 6


@pytest.mark.slow
def test_every_family_on_every_mesh(tmp_path, smollm2_config):
    assert _check_mesh_results(_mesh_results(tmp_path), smollm2_config) == 12


@pytest.mark.slow
def test_smollm2_on_a_mesh_its_heads_do_not_divide(tmp_path, smollm2_config):
    """The real model (9 query, 3 KV heads) on data=2,model=4: attention replicated, no shape error, one device's
    logits, greedy ids and lazy layers. One mesh: each worker loads and trains the real model (~3 min, ~14 GB of
    host RAM); model=2 and model=8 divide neither head count either, and every family runs on every mesh in
    `test_every_family_on_every_mesh`."""
    assert _check_mesh_results(_mesh_results(tmp_path, ["smollm2:data=2,model=4"]), smollm2_config) == 1


@pytest.mark.slow  # one 8-device worker (~2 min); specs: tests/unit/test_sharding.py, a mesh run: test_serving's two-process test
def test_train_on_a_mesh(on_mesh):
    """`lt-jax train`'s loop on data=4,model=2: the logged losses of 3 steps equal one device's, and the donated
    state keeps one compilation of the step (its counters are put on the mesh, its specs in jit's form)."""
    result = on_mesh["train"]
    one, mesh = result["one_device"], result["mesh"]
    assert len(one["losses"]) == 3 and one["losses"][0] != one["losses"][2]
    for a, b in zip(mesh["losses"], one["losses"]):
        assert abs(a - b) <= 1e-5 * abs(b)
    assert mesh["step_compilations"] == one["step_compilations"] == 1


@pytest.mark.slow  # one 8-device worker (~2 min); specs: tests/unit/test_sharding.py, a mesh run: test_serving's two-process test
def test_every_model_command_takes_a_mesh(on_mesh):
    """ppl, generate, identify, bench and train with --mesh data=2,model=4 exit 0 and give one device's results."""
    cli = on_mesh["cli"]
    assert {name: [r["code"] for r in runs.values()] for name, runs in cli.items()} == {
        name: [0, 0] for name in ("ppl", "generate", "identify", "bench", "train")}
    one, mesh = ({name: runs[where]["result"] for name, runs in cli.items()} for where in ("one_device", "mesh"))
    assert abs(mesh["ppl"]["ppl"] / one["ppl"]["ppl"] - 1) <= 1e-5
    assert mesh["generate"]["ids"] == one["generate"]["ids"] and len(one["generate"]["ids"]) == 6
    assert mesh["identify"]["lazy_layers"] == one["identify"]["lazy_layers"]
    assert abs(mesh["train"]["final_loss"] / one["train"]["final_loss"] - 1) <= 1e-5
    assert [r["method"] for r in mesh["bench"]["records"]] == [r["method"] for r in one["bench"]["records"]]
    assert [r["kv_bytes"] for r in mesh["bench"]["records"]] == [r["kv_bytes"] for r in one["bench"]["records"]]


# ---- two processes ------------------------------------------------------------------------------------------

EVAL_ARGS = ["--task", "niah", "--lengths", "300,400", "--depths", "0.2,0.8", "--samples", "2", "--sink", "4",
             "--window", "64", "--max-new-tokens", "4", "--methods", "full,lighttransfer,streaming"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start_processes(model, out, port, mesh="data=8,model=1"):
    env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS="--xla_force_host_platform_device_count=4")
    return [subprocess.Popen([sys.executable, "-m", "lt_jax.cli", "eval", str(model), "--out", str(out), "--json",
                              *EVAL_ARGS, "--mesh", mesh, "--coordinator", f"localhost:{port}",
                              "--num-processes", "2", "--process-id", str(i)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]


def _rows(path):
    return {(r["example"], r["method"]): (r["answer"], r["score"], r["lazy_layers"])
            for r in map(json.loads, path.read_text().splitlines())}


@pytest.mark.slow  # two processes; test_serving's two-process CLI test stays in the default suite
def test_eval_on_two_processes(tiny_chat, tmp_path, capsys):
    """Two jax.distributed processes of 4 CPU devices each: the same rows and summary as one process; a process
    killed mid-run, both rerun: nothing lost, nothing doubled, no part file left."""
    single = tmp_path / "one.jsonl"
    capsys.readouterr()
    assert main(["eval", str(tiny_chat), "--out", str(single), "--json", *EVAL_ARGS]) == 0
    reference = json.loads(capsys.readouterr().out)
    total = 2 * 2 * 2 * 3

    out = tmp_path / "two.jsonl"
    procs = _start_processes(tiny_chat, out, _free_port())
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    summaries = [last_json(o)["summary"] for o, _ in outputs]
    assert summaries == [reference["summary"]] * 2
    lines = out.read_text().splitlines()
    assert len(lines) == total and _rows(out) == _rows(single)
    assert [json.loads(line)["example"] for line in lines] == [
        json.loads(line)["example"] for line in single.read_text().splitlines()]  # one process's order
    assert not list(tmp_path.glob("two.jsonl.part-*")) and (tmp_path / "two.jsonl.meta.json").exists()

    killed = tmp_path / "killed.jsonl"
    procs = _start_processes(tiny_chat, killed, _free_port())
    part = tmp_path / "killed.jsonl.part-1-of-2"
    assert sigkill_when(procs[1], lambda: part.exists() and len(part.read_text().splitlines()) >= 3), \
        "process 1 was not killed mid-run"
    procs[0].kill()  # its peer is gone: the job is over (it would wait at the barrier)
    procs[0].wait()
    assert not killed.exists() or not killed.read_text()
    kept = len(part.read_text().splitlines())
    assert 3 <= kept < total // 2
    procs = _start_processes(tiny_chat, killed, _free_port())
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert last_json(outputs[0][0])["summary"] == reference["summary"]
    lines = killed.read_text().splitlines()
    assert len(lines) == total and _rows(killed) == _rows(single)
    assert not list(tmp_path.glob("killed.jsonl.part-*"))


def test_model_axis_across_processes_is_refused(tiny_chat, tmp_path):
    """model=8 over two processes of 4 devices: each process would need the other's devices for every example; both
    exit 2 with one sentence saying to keep `model` within a host, and nothing is written."""
    out = tmp_path / "r.jsonl"
    procs = _start_processes(tiny_chat, out, _free_port(), mesh="data=1,model=8")
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [2, 2]
    for _, err in outputs:
        message = [line for line in err.splitlines() if line.startswith("lt-jax eval: error:")]
        assert len(message) == 1 and "spans several processes; keep those axes within one host" in message[0], err
    assert not out.exists() and not list(tmp_path.glob("r.jsonl.part-*"))


def test_processes_flags_go_together(tiny_chat, tmp_path, capsys):
    capsys.readouterr()
    assert main(["eval", str(tiny_chat), "--out", str(tmp_path / "x.jsonl"), *EVAL_ARGS, "--num-processes",
                 "2"]) == 2
    err = capsys.readouterr().err
    assert "--coordinator HOST:PORT, --num-processes N and --process-id I go together" in err
    assert err.count("\n") == 1 and not (tmp_path / "x.jsonl").exists()
    auto = subprocess.run([sys.executable, "-m", "lt_jax.cli", "eval", str(tiny_chat), "--out",
                           str(tmp_path / "x.jsonl"), *EVAL_ARGS, "--coordinator", "auto"], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert auto.returncode == 2 and "--coordinator auto: JAX detects no cluster here" in auto.stderr
    assert auto.stderr.count("\n") == 1, auto.stderr
    assert not (tmp_path / "x.jsonl").exists() and jax.process_count() == 1
