"""Retrieval-aware selection: the probes' attention against transformers' own probabilities, a layer forced to
copy scoring highest under both probes, the calibration file, the selection's invariants (protected layers
never lazy, exact lazy count, the P + 1 bound in XLA's buffer plan, no recompilation across prompts or
calibrations), eval's offline choice equal to the prefill's, and bad input."""
import dataclasses
import json
from functools import partial

import numpy as np
import pytest
import torch

from lt_jax import probes
from lt_jax.calibration import Calibration, default_path
from lt_jax.errors import LtJaxError
from lt_jax.inference import Sampling
from lt_jax.lazy import lazy_set, top_lazy
from lt_jax.plan import Plan, make_plan

from helpers import LAYERS, SINK, W, W_LAST, lighttransfer_prefill, prefill_peak

SPAN = 40  # the forced head attends DELTA = SPAN - 1 tokens back: the induction target of a SPAN-token block
FORCED = (1, 0)  # (layer, query head)


def fake_calibration(scores_by_layer, heads: int = 4) -> Calibration:
    scores = np.zeros((len(scores_by_layer), heads))
    scores[:, heads - 1] = scores_by_layer  # a layer's score is its best head's, not the mean
    return Calibration("retrieval", tuple(map(tuple, scores)), {"model": "test"})


def test_attention_on_equals_transformers_probabilities(tiny_models, tiny_lt, prompt_ids):
    """hit and mass for chosen queries/targets, from transformers' eager softmax (fp32), on a prompt left padded
    into its bucket (200 -> 256 columns)."""
    hf, _ = tiny_models("qwen2", prompt_ids)
    model = tiny_lt("qwen2")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 300, 200).tolist()
    queries = [3, 120, 150, 199]
    targets = rng.random((4, 200)) < 0.3
    hit, mass = probes.probe_row(model, ids, queries, targets)
    with torch.no_grad():
        att = hf(torch.tensor([ids]), output_attentions=True).attentions
    probs = np.stack([a[0].double().numpy()[:, queries] for a in att])  # [L, N, Q, T]
    want_mass = np.sum(probs * targets[None, None], axis=-1)
    want_hit = np.take_along_axis(np.broadcast_to(targets, probs.shape), probs.argmax(-1)[..., None], -1)[..., 0]
    assert np.abs(mass - want_mass).max() <= 1e-5
    np.testing.assert_array_equal(hit, want_hit)


@pytest.fixture(scope="module")
def forced(tmp_path_factory):
    """A tiny qwen2 whose layer 1, query head 0 attends DELTA tokens back whatever the tokens: its query and key
    are constant biases (weights zeroed) whose RoPE phases line up only at relative distance DELTA."""
    import lt_jax
    from conftest import save_hf, tiny_hf_model
    hf = tiny_hf_model("qwen2", seed=5)
    layer, head = FORCED
    H = hf.config.hidden_size // hf.config.num_attention_heads
    theta = hf.config.rope_parameters["rope_theta"]
    freq = theta ** (-np.arange(0, H, 2) / H)
    attn = hf.model.layers[layer].self_attn
    with torch.no_grad():
        attn.q_proj.weight[head * H:(head + 1) * H] = 0
        attn.q_proj.bias[head * H:(head + 1) * H] = torch.tensor(np.r_[np.full(H // 2, 60.0), np.zeros(H // 2)])
        kv = head // (hf.config.num_attention_heads // hf.config.num_key_value_heads)
        attn.k_proj.weight[kv * H:(kv + 1) * H] = 0
        phase = (SPAN - 1) * freq  # q . k = 60 sum_f cos(freq_f (i - j - DELTA)): largest at i - j = DELTA
        attn.k_proj.bias[kv * H:(kv + 1) * H] = torch.tensor(np.r_[np.cos(phase), np.sin(phase)])
    return lt_jax.load(save_hf(hf, tmp_path_factory.mktemp("forced") / "hf", "safetensors"))


def test_a_layer_forced_to_copy_scores_highest_under_both_probes(forced):
    cfg = forced.config
    found = probes.induction_scores(forced, span=SPAN, samples=2, queries=16, progress=False)
    scores = found["head_scores"]
    assert scores.shape == (cfg.num_layers, cfg.num_heads)
    assert scores[FORCED] > 0.9
    assert np.delete(scores.ravel(), np.ravel_multi_index(FORCED, scores.shape)).max() < 0.5 * scores[FORCED]

    # retrieval: a 5-token "number" placed so that the token each answer step emits lies DELTA before the query
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, 300, 120).tolist()
    answer = rng.integers(0, 300, 5).tolist()
    start = len(prompt) - 1 - (SPAN - 1)  # the query predicting answer[j] sits at len(prompt) - 1 + j
    prompt[start:start + 5] = answer
    needle = np.zeros(len(prompt), bool)
    needle[start:start + 5] = True
    hits, count = probes.retrieval_sample(forced, prompt, answer, needle)
    assert count == 5 and hits[FORCED] == 5
    assert hits.sum() - hits[FORCED] < 5 * 3  # others hit only by chance
    cal = Calibration("induction", tuple(map(tuple, scores)), {})
    assert cal.protected(1) == (FORCED[0],)
    assert cal.layer_scores[FORCED[0]] == scores[FORCED[0]].max()


def test_calibration_file_round_trip_and_bad_files(tmp_path, forced):
    cal = fake_calibration([0.1, 0.9, 0.2])
    path = cal.save(tmp_path / "c.json")
    again = Calibration.load(path)
    assert again.head_scores == cal.head_scores and again.protected(2) == (1, 2)
    assert json.loads(path.read_text())["layer_scores"] == [0.1, 0.9, 0.2]
    for text, words in [("{", "cannot read calibration file"), ('{"probe": "x", "head_scores": []}', "non-empty"),
                        ('{"probe": "x", "head_scores": [[1], [1, 2]]}', "non-empty")]:
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(LtJaxError, match=words):
            Calibration.load(tmp_path / "bad.json")
    with pytest.raises(LtJaxError, match="calibrate this model"):
        cal.check(forced.config.replace(num_layers=5), "c.json")


def test_protected_layers_are_never_lazy_and_the_count_is_exact(deep):
    """The selecting prefill with protection equals the selection rule (`lazy_set`, `Plan.choose`: ratio less 2 if
    protected); protecting the layers lighttransfer would make lazy moves them to full, the count unchanged."""
    _, model = deep
    cfg = model.config
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 300, n).astype(np.int32) for n in (90, 71)]
    _, _, layers, ratios = lighttransfer_prefill(model, prompts, 0.5, 100)
    chosen = np.flatnonzero(np.asarray(layers.is_lazy))
    mean = np.asarray(ratios).mean(axis=(1, 2))
    for protect in [tuple(chosen[:2]), tuple(chosen), (0,)]:
        plan = Plan(LAYERS, select_lazy=3, sink=SINK, window=W, w_last=W_LAST, protect=protect).validate(cfg)
        _, _, got, got_ratios = lighttransfer_prefill(model, prompts, 0.5, 100, plan=plan)
        lazy = np.flatnonzero(np.asarray(got.is_lazy))
        assert len(lazy) == 3 and not set(lazy) & set(protect)
        np.testing.assert_array_equal(np.asarray(got_ratios), np.asarray(ratios))  # ratios are reported as is
        protected = np.isin(np.arange(LAYERS), protect)
        np.testing.assert_array_equal(lazy, lazy_set(mean, 3, protected))
        assert plan.choose(mean).lazy_layers == tuple(lazy)
        index = np.asarray(got.slot)
        assert sorted(index[lazy]) == [0, 1, 2] and sorted(np.delete(index, lazy)) == [0, 1, 2]


def test_protection_keeps_the_p_plus_one_bound_and_compiles_once(deep):
    """XLA's buffer plan of a protecting prefill is the lighttransfer one's (P + 1 full caches at most), and
    another prompt, another protected set or another calibration adds no compilation."""
    from test_inference import CompileCounter
    _, model = deep
    cfg, B, T, M = model.config, 2, 128, 8192

    peak = partial(prefill_peak, model, batch=B, length=T, max_len=M)

    lt = make_plan("lighttransfer", cfg, lazy_fraction=0.5, sink=SINK, window=W)
    ra = make_plan("retrieval-aware", cfg, lazy_fraction=0.5, sink=SINK, window=W, protect=2,
                   calibration=fake_calibration([0, 0.5, 0, 0.9, 0, 0]))
    assert ra.protect == (1, 3) and ra.shape == lt.shape
    layer_bytes = 2 * B * cfg.num_kv_heads * M * cfg.head_dim * 4
    assert abs(peak(ra) - peak(lt)) < layer_bytes / 8

    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, 300, 50 + i).astype(np.int32) for i in range(3)]
    other = make_plan("retrieval-aware", cfg, lazy_fraction=0.5, sink=SINK, window=W, protect=2,
                      calibration=fake_calibration([0.9, 0, 0, 0, 0, 0.7]))
    model.generate([prompts[0]], plan=ra, max_new_tokens=4, stop_ids=[])
    counter = CompileCounter()
    for plan, prompt in [(ra, prompts[1]), (other, prompts[2]), (lt, prompts[0])]:
        got = model.generate([prompt], plan=plan, max_new_tokens=4, stop_ids=[])[0]
        assert not set(got["plan"].lazy_layers) & set(plan.protect)
        assert len(got["plan"].lazy_layers) == 3 and len(got["lazy_ratios"]) == LAYERS
    assert counter.count == 0, "a prompt, a calibration or lighttransfer itself recompiled"


def test_eval_offline_choice_equals_the_prefill(deep):
    _, model = deep
    cfg = model.config
    plan = make_plan("retrieval-aware", cfg, lazy_fraction=0.5, sink=SINK, window=W, w_last=W_LAST, protect=2,
                     calibration=fake_calibration([0.3, 0, 0.8, 0, 0, 0.1]))
    prompt = np.random.default_rng(3).integers(0, 300, 80).astype(np.int32)
    done = model.prefill([prompt], plan)
    assert plan.choose(done.ratios[0]).lazy_layers == done.plan.lazy_layers
    assert not set(done.plan.lazy_layers) & {0, 2}


def test_generate_from_a_measuring_prefill_keeps_the_protection(deep):
    """A retrieval-aware plan decoded through `generate_from` from an all-full measuring prefill chooses what the
    plan's own prefill chooses (`Plan.choose`, which eval uses): the protected layers stay full. The calibration
    protects the two layers of highest ratio, which plain `top_lazy` of the ratios would make lazy."""
    _, model = deep
    cfg = model.config
    prompt = np.random.default_rng(5).integers(0, 300, 80).astype(np.int32)
    measure = Plan(LAYERS, sink=SINK, window=W, w_last=W_LAST, select_lazy=0).validate(cfg)
    shared = model.prefill([prompt], measure, 128)
    ratios = shared.ratios[0]
    top = top_lazy(ratios, 2)
    scores = np.zeros(LAYERS)
    scores[top] = 1.0
    plan = make_plan("retrieval-aware", cfg, lazy_fraction=0.5, sink=SINK, window=W, w_last=W_LAST, protect=2,
                     calibration=fake_calibration(scores))
    assert plan.protect == tuple(top)
    own = model.prefill([prompt], plan, 128).plan.lazy_layers
    assert not set(own) & set(top) and plan.choose(ratios).lazy_layers == own
    got = model.generate_from(shared, plan, Sampling(2, stop_ids=()))[0]["plan"]
    assert got.lazy_layers == own
    other = dataclasses.replace(plan, window=W + 1)  # ratios of another window: not what the prefill measured
    with pytest.raises(LtJaxError, match="window"):
        model.generate_from(shared, other, Sampling(2, stop_ids=()))


def test_plan_and_calibration_errors(deep, tmp_path):
    _, model = deep
    cfg = model.config
    with pytest.raises(LtJaxError, match="lt-jax calibrate MODEL --probe retrieval"):
        model.plan("retrieval-aware")  # no calibration next to this model
    with pytest.raises(LtJaxError, match="lt-jax calibrate MODEL --probe induction"):
        model.plan("retrieval-aware:induction")
    cal = fake_calibration([0, 0.5, 0, 0.9, 0, 0])
    with pytest.raises(LtJaxError, match="--protect 4 must lie in 0..3"):
        make_plan("retrieval-aware", cfg, lazy_fraction=0.5, protect=4, calibration=cal)
    wrong = cal.save(tmp_path / "three.json")
    (tmp_path / "three.json").write_text(json.dumps({**json.loads(wrong.read_text()), "head_scores": [[1.0]] * 3}))
    with pytest.raises(LtJaxError, match=r"holds scores for \(3, 1\)"):
        model.plan(f"retrieval-aware:{tmp_path / 'three.json'}")
    # found next to the checkpoint once saved there; the plan JSON keeps what it protects
    cal.save(default_path(model.path, "retrieval"))
    try:
        plan = model.plan("retrieval-aware", protect=2)
        assert plan.protect == (1, 3) and Plan.from_text(plan.to_json(), cfg, "json") == plan
    finally:
        default_path(model.path, "retrieval").unlink()


def test_calibrate_and_eval_from_the_cli(tiny_chat, tmp_path, capsys):
    """`lt-jax calibrate` writes the file (with provenance) and its plot; `lt-jax eval` runs retrieval-aware from
    it beside lighttransfer with per-method options, and its rows never make a protected layer lazy; w_last=1
    rows choose from the last query's ratios."""
    from lt_jax.cli import main
    import lt_jax
    cal, plot = tmp_path / "cal.json", tmp_path / "cal.png"
    assert main(["calibrate", str(tiny_chat), "--probe", "induction", "--span", "64", "--samples", "2", "--queries",
                 "8", "--out", str(cal), "--plot", str(plot), "--json"]) == 0
    record = json.loads(cal.read_text())
    assert record["probe"] == "induction" and len(record["layer_scores"]) == 4
    assert record["provenance"]["settings"]["span"] == 64 and plot.read_bytes()[:4] == b"\x89PNG"
    protected = Calibration.load(cal).protected(1)
    out = tmp_path / "rows.jsonl"
    methods = (f"full,lighttransfer,retrieval-aware:{cal}@protect=1,lighttransfer@w_last=1,"
               "lighttransfer@sink=8@window=32")
    assert main(["eval", str(tiny_chat), "--task", "passkey", "--lengths", "300", "--depths", "0.5", "--samples",
                 "2", "--sink", "4", "--window", "64", "--max-new-tokens", "3", "--out", str(out), "--json",
                 "--methods", methods]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 10
    model = lt_jax.load(tiny_chat)
    from lt_jax.eval.evaluate import Retrieval
    task = Retrieval("passkey", [300], [0.5], 2, max_new_tokens=3)
    for example in task.examples(model):
        mine = {r["method"]: r for r in rows if r["example"] == example.id}
        ra = mine[f"retrieval-aware:{cal}@protect=1"]
        assert len(ra["lazy_layers"]) == 2 and not set(ra["lazy_layers"]) & set(protected)
        w1 = model.lazy_ratios(example.ids, sink=4, window=64, w_last=1)
        assert mine["lighttransfer@w_last=1"]["lazy_layers"] == list(top_lazy(w1, 2))
        np.testing.assert_allclose(mine["lighttransfer@w_last=1"]["ratios"], w1, atol=1e-5)
        # its own sink and window: its ratios measured with them, and its answer decoded with them
        own = mine["lighttransfer@sink=8@window=32"]
        s8 = model.lazy_ratios(example.ids, sink=8, window=32)
        assert own["lazy_layers"] == list(top_lazy(s8, 2))
        np.testing.assert_allclose(own["ratios"], s8, atol=1e-5)
        fixed = model.plan("lighttransfer", sink=8, window=32).resolve(own["lazy_layers"])
        assert own["answer"] == model.decode(model.generate([example.ids], plan=fixed, max_new_tokens=3)[0]["ids"])


def test_calibrate_never_overwrites_a_file_that_is_not_a_calibration(tiny_chat, tmp_path, capsys):
    from lt_jax.cli import main
    mine = tmp_path / "notes.json"
    mine.write_text("my own notes")
    capsys.readouterr()
    assert main(["calibrate", str(tiny_chat), "--probe", "induction", "--span", "64", "--out", str(mine)]) == 2
    assert "exists and is not a calibration file" in capsys.readouterr().err
    assert mine.read_text() == "my own notes"
    fake_calibration([0.1, 0.2, 0.3, 0.4]).save(tmp_path / "old.json")  # an earlier calibration is replaced
    assert main(["calibrate", str(tiny_chat), "--probe", "induction", "--span", "64", "--samples", "1", "--queries",
                 "4", "--out", str(tmp_path / "old.json"), "--json"]) == 0
    assert Calibration.load(tmp_path / "old.json").probe == "induction"


@pytest.mark.parametrize("argv, message", [
    (["calibrate", "--probe", "retrieval", "--lengths", "300", "--samples", "1"],
     "answered none of the 1 calibration needles"),
    (["calibrate", "--probe", "retrieval", "--lengths", "9999"], "--lengths 9999 exceeds the model's context"),
    (["calibrate", "--probe", "induction", "--span", "2000"], "--span 2000 must be at least 2"),
    (["calibrate", "--probe", "gate"], "argument --probe: invalid choice"),
    (["calibrate", "--out", "/no/such/dir/c.json"], "cannot write --out /no/such/dir/c.json"),
    (["calibrate", "--haystack", "/no/such.txt"], "cannot read text file /no/such.txt"),
    (["eval", "--task", "passkey", "--methods", "lighttransfer@bogus=1"], "'bogus=1' is not OPTION=VALUE"),
    (["eval", "--task", "passkey", "--methods", "retrieval-aware"], "run `lt-jax calibrate MODEL --probe retrieval`"),
    (["generate", "--plan", "retrieval-aware:induction", "--prompt", "hi"],
     "run `lt-jax calibrate MODEL --probe induction`"),
])
def test_bad_input_is_one_sentence_and_writes_nothing(tiny_chat, tmp_path, capsys, argv, message):
    from lt_jax.cli import main
    command, *rest = argv
    out = [] if "--out" in rest or command == "generate" else ["--out", str(tmp_path / "x.json")]
    capsys.readouterr()
    assert main([command, str(tiny_chat), *rest, *out]) == 2
    err = capsys.readouterr().err
    assert message in err.splitlines()[-1] and err.count("error") == 1, err  # above it, at most a progress bar
    assert not list(tmp_path.iterdir())
    assert not default_path(tiny_chat, "retrieval").exists() and not default_path(tiny_chat, "induction").exists()
