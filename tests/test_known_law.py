"""The known-law yardstick's exact figures: entropy rate, the scores of exact samples, impossible transitions."""
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'benchmarks'))
import known_law  # noqa: E402


def test_entropy_rate_of_a_two_state_chain_is_its_closed_form():
    # Two states: stay with probability 1 - a (resp. 1 - b). pi = (b, a) / (a + b), H = sum pi_i h(p_i).
    a, b = 0.3, 0.8
    P = np.array([[1 - a, a], [b, 1 - b]])
    h = lambda p: -(p * math.log(p) + (1 - p) * math.log(1 - p))
    expected = (b * h(a) + a * h(b)) / (a + b)
    assert np.allclose(known_law.stationary(P), [b / (a + b), a / (a + b)])
    assert math.isclose(known_law.entropy_rate(P), expected, rel_tol=1e-12)


def test_chain_shape_and_determinism():
    P = known_law.make_chain(seed=0, n_words=32, frac_deterministic=0.5, branching=3)
    assert np.allclose(P.sum(-1), 1)
    successors = (P > 0).sum(-1)
    assert (successors == 1).sum() == 16 and (successors == 3).sum() == 16
    assert np.array_equal(P, known_law.make_chain(0, 32, 0.5, 3))     # the seed fixes the law
    pi = known_law.stationary(P)
    assert np.allclose(pi @ P, pi) and (pi > 0).all()                 # irreducible: every state visited


def test_exact_samples_score_the_entropy_rate():
    P = known_law.make_chain(seed=1, n_words=32, frac_deterministic=0.5, branching=4)
    rows = known_law.sample_chain(P, 200, 200, np.random.default_rng(0)).tolist()
    r = known_law.score(known_law.transitions(rows), P, smooth=1e-3)
    H = known_law.entropy_rate(P)
    assert r['impossible'] == 0
    assert abs(r['nll'] - H) < 0.03                      # 39,800 transitions: the standard error is ~0.005
    assert 0 <= r['kl_hat'] < 0.01                       # the plug-in bias only: ~(free parameters) / 2N


def test_an_impossible_transition_is_counted_and_breaks_restart_the_chain():
    P = np.array([[0.0, 1.0], [0.5, 0.5]])
    rows = [[0, 1, 1, 0], [0, 0, -1, 1, 0]]             # 0 -> 0 is impossible; -1 is a break
    pairs = known_law.transitions(rows)
    assert pairs == [(0, 1), (1, 1), (1, 0), (0, 0), (1, 0)]
    r = known_law.score(pairs, P, smooth=1e-3)
    assert r['transitions'] == 5 and math.isclose(r['impossible'], 1 / 5)
    law = 0.999 * P + 0.0005
    expected = -(np.log(law[0, 1]) + np.log(law[1, 1]) + 2 * np.log(law[1, 0]) + np.log(law[0, 0])) / 5
    assert math.isclose(r['nll'], expected)
    assert r['kl_hat'] >= 0


def test_words_are_distinct_lowercase_letters():
    words = known_law.make_words(128, np.random.default_rng(0))
    assert len(set(words)) == 128 and all(w.isalpha() and w.islower() for w in words)
