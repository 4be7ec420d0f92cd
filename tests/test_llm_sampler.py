"""Sampler: each filter against its hand formula, seeded reproducibility, empirical frequencies (its cost per token
is measured by benchmarks/llm.py, beside llama.cpp's sampler)."""
import math

import numpy as np
import pytest

from edgert.errors import InvalidArgumentError, ShapeError
from edgert.llm.sampler import Sampler

# an empirical frequency may sit this many binomial standard deviations from its probability
FREQ_SIGMAS = 5.0


def softmax(x):
    e = np.exp(np.asarray(x, dtype=np.float64) - np.max(x))
    return e / e.sum()


def dist(s: Sampler, logits, history=()):
    idx, p = s.candidates(np.asarray(logits, dtype=np.float32), history)
    return dict(zip(idx.tolist(), p.tolist()))


def test_greedy_is_argmax_lowest_id_on_ties():
    s = Sampler(temperature=0)
    assert s.sample(np.array([0.0, 3.0, 1.0, 3.0], dtype=np.float32), []) == 1
    x = np.random.default_rng(1).standard_normal(49152).astype(np.float32)
    assert s.sample(x, []) == int(np.argmax(x))


def test_top_k_1_is_always_argmax():
    x = np.random.default_rng(2).standard_normal(1000).astype(np.float32)
    s = Sampler(temperature=1.5, top_k=1, top_p=1.0, min_p=0.0, seed=0)
    assert {s.sample(x, []) for _ in range(200)} == {int(np.argmax(x))}


def test_top_k_keeps_k_largest_with_softmax_weights():
    x = np.array([1.0, 5.0, 3.0, 4.0, 2.0, 0.0], dtype=np.float32)
    d = dist(Sampler(temperature=1.0, top_k=3, top_p=1.0, min_p=0.0), x)
    assert list(d) == [1, 3, 2]
    np.testing.assert_allclose(list(d.values()), softmax([5.0, 4.0, 3.0]), rtol=1e-9)


def test_top_p_cuts_exactly_the_tail():
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    x = np.log(p).astype(np.float32)
    # cumulative 0.5, 0.7, 0.85, 0.95, 1.0: keep through the first token reaching top_p
    for top_p, kept in [(0.5, 1), (0.6, 2), (0.7, 2), (0.71, 3), (0.9, 4), (0.96, 5), (1.0, 5)]:
        d = dist(Sampler(temperature=1.0, top_k=0, top_p=top_p, min_p=0.0), x)
        assert list(d) == list(range(kept)), top_p
        np.testing.assert_allclose(list(d.values()), p[:kept] / p[:kept].sum(), rtol=1e-6)


def test_top_p_normalises_over_top_k_survivors():
    p = np.array([0.4, 0.3, 0.2, 0.1])
    x = np.log(p).astype(np.float32)
    # after top_k=2: 0.4/0.7, 0.3/0.7 -> top_p 0.5 keeps only the first
    assert list(dist(Sampler(temperature=1.0, top_k=2, top_p=0.5, min_p=0.0), x)) == [0]
    assert list(dist(Sampler(temperature=1.0, top_k=2, top_p=0.6, min_p=0.0), x)) == [0, 1]


def test_min_p_cutoff():
    p = np.array([0.5, 0.3, 0.1, 0.06, 0.04, 0.001])  # no value on a cutoff boundary
    x = np.log(p).astype(np.float32)
    # keep p >= min_p * p_max
    assert list(dist(Sampler(temperature=1.0, top_k=0, top_p=1.0, min_p=0.1), x)) == [0, 1, 2, 3]
    assert list(dist(Sampler(temperature=1.0, top_k=0, top_p=1.0, min_p=0.5), x)) == [0, 1]
    assert list(dist(Sampler(temperature=1.0, top_k=0, top_p=1.0, min_p=0.99), x)) == [0]


def test_min_p_then_top_p_match_sequential_reference():
    rng = np.random.default_rng(3)
    for _ in range(50):
        x = (rng.standard_normal(300) * 2).astype(np.float32)
        top_k, top_p, min_p, temp = int(rng.integers(0, 60)), float(rng.uniform(0.3, 1.0)), \
            float(rng.uniform(0, 0.3)), float(rng.uniform(0.2, 2.0))
        got = dist(Sampler(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p), x)
        # reference: the chain written out step by step
        order = np.argsort(-x.astype(np.float64), kind="stable")
        if top_k:
            order = order[:top_k]
        lg = x[order].astype(np.float64)
        if top_p < 1.0:
            cum = np.cumsum(softmax(lg))
            keep = next(i for i, c in enumerate(cum) if c >= top_p or i == len(cum) - 1) + 1
            order, lg = order[:keep], lg[:keep]
        if min_p > 0:
            m = lg >= lg[0] + math.log(min_p)
            order, lg = order[m], lg[m]
        want = dict(zip(order.tolist(), softmax(lg / temp).tolist()))
        assert list(got) == list(want)
        np.testing.assert_allclose(list(got.values()), list(want.values()), rtol=1e-6)


def test_temperature_scales_after_cuts():
    x = np.array([2.0, 1.0, 0.0], dtype=np.float32)
    d = dist(Sampler(temperature=0.5, top_k=0, top_p=1.0, min_p=0.0), x)
    np.testing.assert_allclose(list(d.values()), softmax(x / 0.5), rtol=1e-6)


def test_repeat_penalty_formula():
    x = np.array([2.0, -2.0, 1.0, -1.0, 0.5], dtype=np.float32)
    s = Sampler(repeat_penalty=1.5, repeat_last_n=3)
    got = s.apply_penalty(x, [4, 0, 1, 3, 1])  # window: last three = 1, 3, 1 -> ids {1, 3}
    np.testing.assert_array_equal(got, np.array([2.0, -3.0, 1.0, -1.5, 0.5], dtype=np.float32))
    np.testing.assert_array_equal(x, [2.0, -2.0, 1.0, -1.0, 0.5])  # caller's logits untouched
    # whole history when the window covers it; positive logits divided
    got = Sampler(repeat_penalty=2.0, repeat_last_n=64).apply_penalty(x, [0, 2])
    np.testing.assert_array_equal(got, np.array([1.0, -2.0, 0.5, -1.0, 0.5], dtype=np.float32))
    np.testing.assert_array_equal(Sampler(repeat_penalty=1.0).apply_penalty(x, [0, 1]), x)


def test_repeat_penalty_changes_greedy_choice():
    x = np.array([3.0, 2.5, 0.0], dtype=np.float32)
    assert Sampler(temperature=0, repeat_penalty=1.3).sample(x, [0]) == 1
    assert Sampler(temperature=0, repeat_penalty=1.1).sample(x, [0]) == 0


def test_seeded_reproducibility():
    x = np.random.default_rng(4).standard_normal(49152).astype(np.float32) * 2
    a = Sampler(temperature=1.0, seed=123)
    b = Sampler(temperature=1.0, seed=123)
    sa = [a.sample(x, []) for _ in range(300)]
    assert sa == [b.sample(x, []) for _ in range(300)]
    c = Sampler(temperature=1.0, seed=124)
    assert sa != [c.sample(x, []) for _ in range(300)]
    a.reseed(123)
    assert [a.sample(x, []) for _ in range(300)] == sa


def test_empirical_frequencies_follow_the_distribution():
    x = np.array([1.0, 0.5, 0.0, -0.5, -1.0, -3.0], dtype=np.float32)
    n = 40000
    for kw in [dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),
               dict(temperature=0.7, top_k=4, top_p=1.0, min_p=0.0),
               dict(temperature=1.3, top_k=0, top_p=0.8, min_p=0.0),
               dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.3)]:
        s = Sampler(seed=99, **kw)
        want = np.zeros(len(x))
        idx, p = s.candidates(x)
        want[idx] = p
        counts = np.bincount([s.sample(x, []) for _ in range(n)], minlength=len(x))
        freq = counts / n
        sigma = np.sqrt(want * (1 - want) / n)
        assert np.all(np.abs(freq - want) <= FREQ_SIGMAS * sigma + 1e-12), (kw, freq, want)
        assert np.all(counts[want == 0] == 0)


def test_masked_logits_never_drawn():
    x = np.full(10, -np.inf, dtype=np.float32)
    x[7] = 0.0
    x[3] = 0.1
    s = Sampler(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=5)
    assert {s.sample(x, []) for _ in range(200)} <= {3, 7}
    with pytest.raises(InvalidArgumentError, match="-inf"):
        s.sample(np.full(4, -np.inf, dtype=np.float32), [])


@pytest.mark.parametrize("cut", [dict(top_p=0.0), dict(min_p=1.0)])
def test_top_p_0_and_min_p_1_keep_only_the_most_probable_token(cut):
    """llama.cpp's meanings: top_p 0 keeps one token (it keeps at least min_keep=1), min_p 1 keeps p >= p_max. At
    any temperature every draw is then greedy's choice."""
    rng = np.random.default_rng(0)
    for seed in range(20):
        x = rng.standard_normal(300).astype(np.float32) * 2
        greedy = Sampler(temperature=0.0).sample(x, [])
        assert greedy == int(np.argmax(x))
        s = Sampler(temperature=1.5, top_k=0, **{"top_p": 1.0, "min_p": 0.0, **cut}, seed=seed)
        assert [s.sample(x, []) for _ in range(10)] == [greedy] * 10


@pytest.mark.parametrize("kw", [
    dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_k=-1), dict(top_k=2.5), dict(top_p=-0.1),
    dict(top_p=1.1), dict(min_p=1.1), dict(min_p=-0.1), dict(repeat_penalty=0.0), dict(repeat_penalty=-1.0),
    dict(seed=-1), dict(seed="x"), dict(repeat_last_n=-1), dict(temperature=True),
])
def test_argument_validation(kw):
    with pytest.raises(InvalidArgumentError):
        Sampler(**kw)


def test_logits_validation():
    s = Sampler()
    with pytest.raises(ShapeError):
        s.sample(np.zeros((2, 3), dtype=np.float32), [])
    with pytest.raises(ShapeError):
        s.sample(np.zeros(0, dtype=np.float32), [])
    with pytest.raises(InvalidArgumentError):
        s.sample(np.array([1, 2, 3]), [])
    with pytest.raises(InvalidArgumentError, match="NaN"):
        s.sample(np.array([1.0, np.nan], dtype=np.float32), [])
    with pytest.raises(InvalidArgumentError, match="history"):
        Sampler(repeat_penalty=1.1).sample(np.zeros(4, dtype=np.float32), [4])


def test_default_settings_on_a_real_vocab_draw_from_the_penalised_head():
    """49152 logits, the chat defaults plus a repeat penalty over 64 history ids: every draw is one of the 40
    largest penalised logits (the formula applied here in float64), and the candidates' probabilities are the
    tempered softmax of the head that min_p and top_p leave (both cut on the untempered top-k probabilities)."""
    x = (np.random.default_rng(6).standard_normal(49152) * 3).astype(np.float32)
    history = np.argsort(-x)[5:69].tolist()  # 64 ids among the largest logits: the penalty reorders the head
    s = Sampler(repeat_penalty=1.1, seed=0)
    pen = x.astype(np.float64)
    h = np.array(history)
    pen[h] = np.where(pen[h] > 0, pen[h] / 1.1, pen[h] * 1.1)
    head = set(np.argsort(-pen, kind="stable")[:40].tolist())
    assert {s.sample(x, history) for _ in range(300)} <= head
    top = np.sort(pen)[::-1][:40]
    p = softmax(top)  # the cuts see the untempered top-k probabilities
    p = p[p >= 0.05 * p[0]]
    n = int(np.argmax(np.cumsum(p) >= 0.95)) + 1
    got = dist(s, x, history)
    assert len(got) == n and sorted(got.values(), reverse=True) == pytest.approx(softmax(top[:n] / 0.8), rel=1e-6)



def test_a_tiny_repeat_penalty_boosts_without_overflowing():
    """repeat_penalty=1e-40 divided a positive logit to +inf: 'every logit is -inf (or the best is +inf)', a 500
    from the server. The boosted logit is now the largest float32: that token is the most likely, nothing fails."""
    import warnings

    logits = np.array([1.0, 5.0, -2.0, 3.0], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's overflow warning leaked too
        s = Sampler(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1e-40, seed=1)
        x = s.apply_penalty(logits, [0, 2])
        assert np.isfinite(x).all() and x[0] == np.finfo(np.float32).max and -1e-30 < x[2] <= 0
        assert {s.sample(logits, [0, 2]) for _ in range(20)} == {0}
        assert Sampler(temperature=0.0, repeat_penalty=1e-40).sample(logits, [0]) == 0
