"""Loss-guided calibration and the fixed plans it feeds (issue 24): the nll probe's per-layer score against a direct
computation (two forwards, the dense brute-force mask on the unpadded row, NLL in float64 on the host), a
loss-guided plan through its calibration file, the periodic rule's layers, and bad input. A tiny random llama
(tests/helpers.py `tiny_config`), weights scaled up so attention is peaked and a window changes the answer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config
from lt_jax import calibration, probes
from lt_jax.api import Model
from lt_jax.calibration import Calibration
from lt_jax.errors import LtJaxError
from lt_jax.model import default_positions, forward_masked
from lt_jax.params import ParamSpec, param_specs
from lt_jax.plan import Plan, default_protect, make_plan

CFG = tiny_config()  # 4 layers
SINK, WINDOW = 2, 8
TOL = 2e-6  # float32 NLLs of ~4 nats (an ulp: 5e-7); measured 1.2e-7


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    rng = np.random.default_rng(0)  # on the host: init_params' jitted random draws compile for seconds
    params = jax.tree.map(lambda s: np.ones(s.shape, np.float32) if s.init == "ones" else  # layers: peaked
                          rng.normal(0, 0.4 if s.axes[0] == "layers" else 0.02, s.shape).astype(np.float32),
                          param_specs(CFG), is_leaf=lambda x: isinstance(x, ParamSpec))
    return Model(CFG, params, path=tmp_path_factory.mktemp("tiny"))


def rows_of(lengths, answer: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, CFG.vocab_size, n).tolist(), n - answer) for n in lengths]


def direct_answer_nll(model, ids, start, plan) -> float:
    tokens = jnp.asarray([ids], jnp.int32)
    logits = np.asarray(forward_masked(model.params, tokens, default_positions(tokens), plan.layers(CFG), CFG),
                        np.float64)[0]
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return float(-np.mean([logp[t - 1, ids[t]] for t in range(start, len(ids))]))


def test_nll_score_equals_two_forwards_per_layer(model):
    """Rows of different lengths (right padded to one bucket by the probe): each layer's score is the mean over
    rows of NLL(layer i alone streams) - NLL(all full) on the answer tokens, within TOL; and the scores differ
    between layers by far more than TOL, so a wrong layer or plan would show."""
    rows = rows_of([40, 64])
    got = probes.nll_scores(model, rows, SINK, WINDOW, progress=False)
    full = [direct_answer_nll(model, ids, start, Plan.full(CFG.num_layers)) for ids, start in rows]
    want = [np.mean([direct_answer_nll(model, ids, start, Plan(CFG.num_layers, (i,), SINK, WINDOW)) - f
                     for (ids, start), f in zip(rows, full)]) for i in range(CFG.num_layers)]
    assert got["head_scores"].shape == (CFG.num_layers, 1)
    assert np.abs(got["head_scores"][:, 0] - want).max() <= TOL
    assert abs(got["full_answer_nll"] - np.mean(full)) <= TOL
    assert np.ptp(want) > 100 * TOL
    assert got["forwards"] == len(rows) * (CFG.num_layers + 1)


def test_the_joint_check_streams_the_loss_guided_set_together(model):
    """`joint`: the lowest-scored layers of a lazy fraction streaming together, against two direct forwards, and
    the sum of their single-layer scores beside it."""
    rows = rows_of([40, 64])
    got = probes.nll_scores(model, rows, SINK, WINDOW, progress=False, joint=(0.25, 0.5))
    scores = got["head_scores"][:, 0]
    assert got["forwards"] == len(rows) * (CFG.num_layers + 2 + 1)
    for check, count in zip(got["joint"], (1, 2)):
        lazy = tuple(int(i) for i in np.argsort(scores, kind="stable")[:count])
        assert check["layers"] == sorted(lazy)
        want = np.mean([direct_answer_nll(model, ids, start, Plan(CFG.num_layers, lazy, SINK, WINDOW)) -
                        direct_answer_nll(model, ids, start, Plan.full(CFG.num_layers)) for ids, start in rows])
        assert abs(check["joint"] - want) <= TOL
        assert abs(check["additive"] - scores[list(lazy)].sum()) <= 1e-6


def test_loss_guided_plan_round_trips_through_its_calibration_file(model, tmp_path):
    """The file next to the checkpoint (format 2, one column) is what `loss-guided` and `retrieval-aware:nll`
    read: the first streams the lowest-scored layers, the second protects the highest."""
    scores = [0.3, -0.01, 0.9, 0.02]
    cal = Calibration("nll", tuple((s,) for s in scores), {"model": "test"})
    path = cal.save(calibration.default_path(model.path, "nll"))
    again = Calibration.load(path)
    assert again == Calibration("nll", cal.head_scores, {"model": "test"})
    np.testing.assert_array_equal(again.layer_scores, scores)
    plan = model.plan("loss-guided", lazy_fraction=0.5)
    assert plan.lazy_layers == (1, 3) and plan.select_lazy is None and plan.source == "loss-guided:nll:0.5"
    assert model.plan(f"loss-guided:{path}", lazy_fraction=0.25).lazy_layers == (1,)
    assert model.plan("loss-guided", lazy_fraction=0.75, sink=SINK, window=WINDOW).lazy_layers == (0, 1, 3)
    aware = model.plan("retrieval-aware:nll", lazy_fraction=0.5)
    assert aware.protect == (2,) and default_protect(4, 2) == 1


# (L, lazy fraction, offset) -> the lazy layers of (k L) // n + offset mod L, n = floor(f L + 0.5)
PERIODIC = [(4, 0.5, 0, (0, 2)), (4, 0.5, 1, (1, 3)), (6, 0.5, 0, (0, 2, 4)), (12, 5 / 6, 0, tuple(range(5)) +
            tuple(range(6, 11))), (30, 0.25, 0, (0, 3, 7, 11, 15, 18, 22, 26)), (8, 0.75, 2, (0, 2, 3, 4, 6, 7)),
            (5, 0.5, 0, (0, 1, 3)), (4, 0.0, 0, ()), (4, 1.0, 3, (0, 1, 2, 3))]


@pytest.mark.parametrize("layers,fraction,offset,want", PERIODIC)
def test_periodic_picks_evenly_spaced_layers(layers, fraction, offset, want):
    plan = make_plan(f"periodic:{offset}", tiny_config(num_layers=layers), lazy_fraction=fraction)
    assert plan.lazy_layers == want


def test_bad_input_is_one_sentence(model, tmp_path):
    cases = [
        (lambda: make_plan("periodic:x", CFG), "offset after 'periodic:' must be a layer index in 0..3"),
        (lambda: make_plan("periodic:4", CFG), "offset after 'periodic:' must be a layer index in 0..3"),
        (lambda: make_plan("loss-guided", CFG), "run `lt-jax calibrate MODEL --probe nll` first"),
        (lambda: make_plan("gemma", CFG), "unknown plan 'gemma'.*periodic.*loss-guided"),
        (lambda: model.plan("loss-guided:induction"), "calibrate MODEL --probe induction"),
        (lambda: model.plan("loss-guided:bogus"), "loss-guided:bogus: 'bogus' is neither a probe"),
        (lambda: Calibration("nll", ((1.0, 2.0),) * 4, {}).check(CFG, "c.json"), r"are \(4, 1\)"),
        (lambda: probes.answer_nll(model, [([1, 2, 3], 0)], [Plan.full(4)], progress=False), "row 0"),
    ]
    (tmp_path / "new.json").write_text('{"format": 3, "probe": "nll", "head_scores": [[1]]}')
    cases.append((lambda: Calibration.load(tmp_path / "new.json"), "format 3; this lt-jax reads formats 1..2"))
    for call, words in cases:
        with pytest.raises(LtJaxError, match=words):
            call()
    from lt_jax.cli.main import build_parser
    with pytest.raises(Exception, match="argument --probe: invalid choice: 'bogus'"):
        build_parser().parse_args(["calibrate", "m", "--probe", "bogus"])


def test_greedy_selection_adds_the_layer_that_costs_least_with_those_chosen(model):
    """`nll-greedy`: each step's set and its NLL increase against direct forwards (dense mask, float64), and the
    layer taken is the cheapest of all candidates given the set (exhaustive greedy, every candidate measured
    directly, equals the lazy search here); the scores rank the chosen layers first, in order; given the single
    scores of an nll calibration, the same choice with fewer forwards."""
    rows, L = rows_of([40, 64]), CFG.num_layers
    got = probes.nll_greedy(model, rows, SINK, WINDOW, count=3, progress=False)
    full = [direct_answer_nll(model, ids, start, Plan.full(L)) for ids, start in rows]

    def increase(lazy):
        return np.mean([direct_answer_nll(model, ids, start, Plan(L, tuple(sorted(lazy)), SINK, WINDOW)) - f
                        for (ids, start), f in zip(rows, full)])
    chosen = []
    for step in got["steps"]:
        costs = {i: increase(chosen + [i]) for i in range(L) if i not in chosen}
        assert step["layer"] == min(costs, key=lambda i: (costs[i], i))
        before = increase(chosen) if chosen else 0.0
        chosen.append(step["layer"])
        assert abs(step["set_increase"] - costs[step["layer"]]) <= TOL
        assert abs(step["increase"] - (costs[step["layer"]] - before)) <= 2 * TOL
    assert got["order"] == chosen and len(chosen) == 3
    cal = Calibration("nll-greedy", tuple((float(s),) for s in got["head_scores"][:, 0]), {})
    assert [cal.lowest(n) for n in (1, 2, 3)] == [tuple(sorted(chosen[:n])) for n in (1, 2, 3)]
    again = probes.nll_greedy(model, rows, SINK, WINDOW, count=3, singles=np.asarray(got["single_scores"]),
                              progress=False)
    assert again["order"] == chosen and again["forwards"] == got["forwards"] - len(rows) * L
    with pytest.raises(LtJaxError, match="chooses 1..3 lazy layers of 4; got 4"):
        probes.nll_greedy(model, rows, SINK, WINDOW, count=4, progress=False)
