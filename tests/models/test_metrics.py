import math

import numpy as np
import pytest

from models.baselines import predict_decayed, predict_markov
from models.metrics import evaluate, top_k_indices
from models.sequences import split_bounds


def test_single_label_hand_computed():
    p = np.array([[0.5, 0.2, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]])
    y = np.array([[1.0, 0, 0, 0], [1.0, 0, 0, 0]])
    m = evaluate(p, y)
    assert m["ce"] == pytest.approx((-math.log(0.5) - math.log(0.1)) / 2)
    assert m["top3_mass"] == pytest.approx(0.5)  # first: 1 in top-3; second: category 0 is 4th
    assert m["precision@3"] == pytest.approx((1 / 3 + 0) / 2)
    assert m["recall@3"] == pytest.approx(0.5)
    assert m["f1@3"] == pytest.approx((2 * (1 / 3) * 1 / (1 / 3 + 1)) / 2)  # 0.25
    assert m["accuracy@1"] == pytest.approx(0.5)


def test_multi_label_hand_computed():
    p = np.array([[0.4, 0.3, 0.2, 0.1, 0.0]])
    y = np.array([[0.5, 0, 0, 0, 0.5]])  # categories {0, 4}; p_4 = 0 is clipped at 1e-9
    m = evaluate(p, y)
    assert m["ce"] == pytest.approx(-0.5 * math.log(0.4) - 0.5 * math.log(1e-9))
    assert m["top3_mass"] == pytest.approx(0.5)
    assert m["precision@3"] == pytest.approx(1 / 3)
    assert m["recall@3"] == pytest.approx(0.5)
    assert m["f1@3"] == pytest.approx(2 * (1 / 3) * 0.5 / (1 / 3 + 0.5))  # 0.4
    assert m["accuracy@1"] == 1.0


def test_ties_and_empty():
    assert top_k_indices(np.array([[0.25, 0.25, 0.25, 0.25]]), 3).tolist() == [[0, 1, 2]]
    assert all(math.isnan(v) for v in evaluate(np.zeros((0, 3)), np.zeros((0, 3))).values())


def test_protocol_split_bounds():
    assert split_bounds(10) == (8, 9)  # train j=1..7, val j=8, test j=9
    assert split_bounds(20) == (16, 18)
    assert split_bounds(25) == (20, 22)
    assert split_bounds(1) == (0, 0)


def test_decayed_histogram_and_markov_formulas():
    pop = np.array([0.5, 0.5])
    hist = [np.array([[0.0, 0.0], [1.0, 0.0], [0.5, 1.0]])]  # d = 0.5
    p = predict_decayed(hist, pop, weight=1.0)[0]
    assert p[0].tolist() == [0.5, 0.5]
    assert p[1] == pytest.approx([(1 + 0.5) / 2, 0.5 / 2])
    assert p[2] == pytest.approx([(0.5 + 0.5) / 2.5, (1 + 0.5) / 2.5])

    class Seqs:  # the two attributes predict_markov uses
        users = ("u",)

        @staticmethod
        def y(u):
            return np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)

    counts = np.array([[0.0, 3.0], [1.0, 1.0]])
    p = predict_markov(Seqs, counts, pop, alpha=1.0)[0]
    assert p[1] == pytest.approx([0.5 / 4, 3.5 / 4])
