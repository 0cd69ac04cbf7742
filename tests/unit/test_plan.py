"""lt_jax/plan.py: a plan's two kinds and what each refuses, the named plans, the JSON form and its refusals,
overrides, and the forms jitted code reads (shape, layers, prefill_layers)."""
import dataclasses
import json

import numpy as np
import pytest

from helpers import tiny_config
from lt_jax.attention import FULL, attention_mask
from lt_jax.errors import LtJaxError
from lt_jax.lazy import lazy_set
from lt_jax.plan import (DEFAULT_SINK, DEFAULT_WINDOW, PRESETS, LayerPlan, Plan, PlanShape, Selection,
                         default_protect, make_plan, num_lazy, override)

CFG = tiny_config(num_layers=6)  # 6 layers: lazy_fraction 0.5 makes 3 lazy


@pytest.mark.parametrize("plan, words", [
    # every plan
    (Plan(5), "is for 5 layers but the model has 6"),
    (Plan(6, sink=-1), "sink=-1, window=1020; need sink >= 0"),
    (Plan(6, window=0), "window=0; need sink >= 0 and window >= 1"),
    (Plan(6, prefill="lazy"), "prefill='lazy'; expected one of exact, hybrid"),
    # fixed
    (Plan(6, (0, 6)), "names lazy layer(s) [6] outside 0..5"),
    (Plan(6, (-1,)), "names lazy layer(s) [-1] outside 0..5"),
    (Plan(6, (2, 2)), "lists a lazy layer twice: [2, 2]"),
    (Plan(6, (1,), protect=(2,)), "protects layers [2]; protection needs a per-prompt selection"),
    # chosen per prompt
    (Plan(6, (1,), select_lazy=2), "selects 2 lazy layers per prompt; need 0..6 and no fixed lazy_layers"),
    (Plan(6, select_lazy=7), "selects 7 lazy layers per prompt; need 0..6"),
    (Plan(6, select_lazy=-1), "selects -1 lazy layers per prompt"),
    (Plan(6, select_lazy=3, prefill="hybrid"), "which must then be exact (got prefill='hybrid')"),
    (Plan(6, select_lazy=3, w_last=0), "w_last=0; need at least 1 query"),
    (Plan(6, select_lazy=3, protect=(6,)), "protects layers [6]; need distinct layers in 0..5"),
    (Plan(6, select_lazy=3, protect=(1, 1)), "protects layers [1, 1]; need distinct layers in 0..5"),
    (Plan(6, select_lazy=3, protect=(0, 1, 2, 3)), "protects 4 layers but keeps only 3 full"),
])
def test_validate_refuses_with_one_sentence_naming_the_value(plan, words):
    with pytest.raises(LtJaxError) as e:
        plan.validate(CFG, where="my plan")
    msg = str(e.value)
    assert msg.startswith("my plan ") and words in msg and msg.count(". ") == 0 and msg.endswith("."), msg


@pytest.mark.parametrize("plan", [Plan(6), Plan(6, (0, 5), sink=0, window=1, prefill="hybrid"),
                                  Plan(6, select_lazy=0), Plan(6, select_lazy=6, w_last=1),
                                  Plan(6, select_lazy=3, protect=(0, 1, 2))])
def test_validate_accepts_each_kind_at_its_bounds(plan):
    assert plan.validate(CFG) is plan


def test_the_two_kinds():
    fixed, chosen = Plan(6, (1, 4)), Plan(6, select_lazy=2, protect=(3,))
    assert not fixed.per_prompt and chosen.per_prompt
    assert fixed.lazy_count == 2 == chosen.lazy_count
    assert dataclasses.replace(chosen, select_lazy=None, protect=()).lazy_count == 0  # replace changes the kind
    assert not Plan.full(6).per_prompt and Plan.full(6) == Plan(6)


def test_choose_and_resolve():
    ratios = np.array([0.9, 0.1, 0.8, 0.95, 0.2, 0.7])
    fixed = Plan(6, (1, 4))
    assert fixed.choose(ratios) is fixed
    chosen = Plan(6, select_lazy=3, protect=(3,), sink=2, window=8, w_last=5, source="lt")
    got = chosen.choose(ratios)
    assert got == Plan(6, (0, 2, 5), sink=2, window=8, w_last=5, source="lt")  # 3 protected: its 0.95 loses
    assert got.lazy_layers == tuple(lazy_set(ratios, 3, np.isin(range(6), (3,))))
    assert not got.per_prompt and got.protect == ()
    assert Plan(6, select_lazy=3).choose(ratios).lazy_layers == (0, 2, 3)
    assert chosen.resolve([5, np.int64(1)]).lazy_layers == (1, 5)


@pytest.mark.parametrize("spec, lazy", [("full", ()), ("streaming", (0, 1, 2, 3, 4, 5)), ("first", (0, 1, 2)),
                                        ("last", (3, 4, 5))])
def test_named_fixed_plans(spec, lazy):
    plan = make_plan(spec, CFG)
    assert plan == Plan(6, lazy, source=spec) and (plan.sink, plan.window) == (DEFAULT_SINK, DEFAULT_WINDOW)


def test_random_plan_is_seeded_and_lighttransfer_is_chosen_per_prompt():
    a = make_plan("random:3", CFG, lazy_fraction=0.34)
    assert a == make_plan("random:3", CFG, lazy_fraction=0.34) and len(a.lazy_layers) == num_lazy(6, 0.34) == 2
    assert make_plan("random", CFG) == dataclasses.replace(make_plan("random:0", CFG), source="random")
    assert len({make_plan(f"random:{s}", CFG).lazy_layers for s in range(8)}) > 1
    lt = make_plan("lighttransfer", CFG, lazy_fraction=0.34, w_last=7)
    assert lt.per_prompt and (lt.select_lazy, lt.lazy_layers, lt.w_last) == (2, (), 7)
    assert lt.source == "lighttransfer:0.34"


def test_budget_rule_and_default_protection():
    assert [num_lazy(30, f) for f in (0, 0.25, 0.5, 0.75, 1)] == [0, 8, 15, 23, 30]  # floor(rho L + 0.5)
    assert default_protect(30, 15) == 6 and default_protect(30, 27) == 3 and default_protect(4, 2) == 1


@pytest.mark.parametrize("call, words", [
    (lambda: make_plan("sideways", CFG), "unknown plan 'sideways'"),
    (lambda: make_plan("random:x", CFG), "the seed after 'random:' must be an integer"),
    (lambda: make_plan("last", CFG, lazy_fraction=1.5), "lazy_fraction=1.5 is outside [0, 1]"),
    (lambda: make_plan("last", CFG, preset="wide"), "unknown stream preset 'wide' (known: lighttrans-code)"),
    (lambda: make_plan("retrieval-aware", CFG), "needs a calibration; run `lt-jax calibrate MODEL` first"),
    (lambda: make_plan("lighttransfer", CFG, prefill="hybrid"), "must then be exact"),
    (lambda: make_plan("lighttransfer", CFG, w_last=0), "w_last=0"),
    (lambda: make_plan("lighttransfer", CFG).layers(CFG), "resolve it on the prompt"),
    (lambda: make_plan("streaming", CFG, window=0), "window=0"),
])
def test_make_plan_refusals(call, words):
    with pytest.raises(LtJaxError) as e:
        call()
    assert words in str(e.value), str(e.value)


def test_override_and_preset():
    plan = make_plan("last", CFG, sink=2, window=8, prefill="hybrid")
    assert (plan.sink, plan.window, plan.prefill) == (2, 8, "hybrid")
    assert override(plan) == plan
    coded = override(plan, preset="lighttrans-code")
    assert (coded.sink, coded.window) == PRESETS["lighttrans-code"] == (129, 1025)
    assert (override(plan, preset="lighttrans-code", sink=7).sink, override(plan, preset="lighttrans-code",
            window=9).window) == (7, 9)  # a flag wins over the preset
    assert override(make_plan("lighttransfer", CFG), w_last=3).w_last == 3


def test_lighttrans_code_preset_equals_released_training_mask():
    """The released code's `(q>=k and q-k<=1024) or (q>=128 and k<=128)`, transcribed as written."""
    q = np.arange(1600)[:, None]
    k = np.arange(1600)[None, :]
    released = ((q >= k) & (q - k <= 1024)) | ((q >= 128) & (k <= 128))
    S, W = PRESETS["lighttrans-code"]  # what --stream-preset lighttrans-code sets
    ours = np.asarray(attention_mask(np.arange(1600)[None], np.arange(1600)[None], S, W))[0]
    np.testing.assert_array_equal(ours, released)


@pytest.mark.parametrize("plan", [Plan(6, (0, 4), sink=2, window=8, prefill="hybrid", source="mine"),
                                  Plan(6, select_lazy=3, w_last=5, source="lighttransfer:0.5"),
                                  Plan(6, select_lazy=2, protect=(1, 3), source="retrieval-aware")])
def test_json_round_trip(plan, tmp_path):
    text = plan.to_json()
    d = json.loads(text)
    assert ("select_lazy" in d) == plan.per_prompt and ("protect" in d) == bool(plan.protect)
    assert Plan.from_text(text, CFG, "json") == plan
    (tmp_path / "p.json").write_text(text)
    assert Plan.from_json(tmp_path / "p.json", CFG) == plan
    assert make_plan(str(tmp_path / "p.json"), CFG, window=9) == dataclasses.replace(plan, window=9)


def test_json_defaults_and_source():
    plan = Plan.from_text('{"num_layers": 6, "lazy_layers": [4, 1]}', CFG, "json", source="here")
    assert plan == Plan(6, (1, 4), source="here")  # sorted; S, W, prefill, w_last default
    assert Plan.from_text('{"num_layers": 6, "lazy_layers": []}', CFG, "json").source == "stored"


@pytest.mark.parametrize("text, words", [
    ("{", "cannot read plan file p.json: Expecting property name"),
    ("[3, [0]]", "plan file p.json is not a plan: it is not a JSON object (a plan has num_layers and lazy_layers)"),
    ('{"lazy_layers": [0]}', "is not a plan: it has no 'num_layers' field"),
    ('{"probe": "retrieval"}', "it has no 'num_layers' or 'lazy_layers' field"),
    ('{"num_layers": 6, "lazy_layers": [1.7]}', "a lazy layer must be a whole number, got 1.7"),
    ('{"num_layers": 6, "lazy_layers": [1], "sink": "4"}', "sink must be a whole number, got '4'"),
    ('{"num_layers": true, "lazy_layers": []}', "num_layers must be a whole number, got True"),
    ('{"num_layers": 6, "lazy_layers": 3}', "cannot read plan file p.json: 'int' object is not iterable"),
    ('{"num_layers": 6, "lazy_layers": [], "select_lazy": 2.5}', "select_lazy must be a whole number"),
    ('{"num_layers": 6, "lazy_layers": [], "protect": [1]}', "protection needs a per-prompt selection"),
    ('{"num_layers": 6, "lazy_layers": [0, 7]}', "plan file p.json names lazy layer(s) [7] outside 0..5"),
    ('{"num_layers": 30, "lazy_layers": [0]}', "plan file p.json is for 30 layers but the model has 6"),
])
def test_from_text_refusals_name_the_file_and_value(text, words):
    with pytest.raises(LtJaxError) as e:
        Plan.from_text(text, CFG, "plan file p.json")
    assert words in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)


def test_from_json_of_a_missing_file(tmp_path):
    with pytest.raises(LtJaxError, match="cannot read plan file .*nothing.json"):
        Plan.from_json(tmp_path / "nothing.json", CFG)


def test_shape_never_names_which_layers():
    a, b = Plan(6, (0, 1), sink=2, window=8), Plan(6, (3, 5), sink=2, window=8)
    assert a.shape == b.shape == PlanShape(2, 2, 8, "exact", False, 32)
    chosen = Plan(6, select_lazy=2, sink=2, window=8, w_last=5, protect=(1,))
    assert chosen.shape == PlanShape(2, 2, 8, "exact", True, 5) != a.shape
    assert chosen.shape.decoding == a.shape.decoding == dataclasses.replace(a, prefill="hybrid").shape.decoding
    assert hash(a.shape) == hash(b.shape)


@pytest.mark.parametrize("native", [None, 100])
def test_layers_slots_sinks_and_windows(native):
    cfg = CFG.replace(sliding_window=native)
    layers = Plan(6, (1, 2, 5), sink=2, window=8).layers(cfg)
    assert isinstance(layers, LayerPlan) and layers.lazy_layers == (1, 2, 5)
    np.testing.assert_array_equal(layers.is_lazy, [0, 1, 1, 0, 0, 1])
    np.testing.assert_array_equal(layers.slot, [0, 0, 1, 1, 2, 2])  # rings and full slots in layer order
    np.testing.assert_array_equal(layers.sink, [0, 2, 2, 0, 0, 2])
    full = native or FULL  # a full layer keeps the model's own window
    np.testing.assert_array_equal(layers.window, [full, 8, 8, full, full, 8])
    assert Plan(6, (1, 2, 5)).prefill_layers(cfg).lazy_layers == (1, 2, 5)


def test_prefill_layers_of_a_selection_is_its_protection():
    got = Plan(6, select_lazy=2, protect=(0, 4)).prefill_layers(CFG)
    assert isinstance(got, Selection)
    np.testing.assert_array_equal(got.protected, [1, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(Plan(6, select_lazy=2).prefill_layers(CFG).protected, np.zeros(6, bool))
