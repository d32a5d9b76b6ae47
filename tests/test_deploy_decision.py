"""The deploy decision and the statistics behind it, on constructed numbers (no model runs)."""
from __future__ import annotations

import numpy as np
import pytest

from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.deploy import candidates
from scarlet_deploy.runtime.deploy.decide import Contender, choose
from scarlet_deploy.runtime.deploy.gates import Gates, verify
from scarlet_deploy.runtime.deploy.stats import mcnemar, proportion


def c(name, precision, order, passed, rounds):
    return Contender(name, precision, order, passed, list(rounds))


def test_fastest_passing_candidate_wins():
    d = choose([c("ort", "fp32", 0, True, [100, 101, 99]), c("ov-bf16", "bf16", 2, True, [180, 185, 179]),
                c("ort-int8", "int8", 4, True, [150, 152, 149])])
    assert d.chosen == "ov-bf16" and d.fastest == "ov-bf16"
    assert d.why["ort"].startswith("slower") and d.why["ort-int8"].startswith("slower")


def test_a_failing_candidate_never_wins_however_fast():
    d = choose([c("ort", "fp32", 0, True, [100, 100, 100]), c("ov-int8", "int8", 5, False, [400, 400, 400])])
    assert d.chosen == "ort"
    assert d.why["ov-int8"] == "failed its gates"


def test_noise_tie_goes_to_the_simpler_candidate():
    # INT8 is faster in two rounds of three, slower in one: within the run's noise of bf16
    d = choose([c("ov-bf16", "bf16", 2, True, [180, 170, 190]), c("ov-int8", "int8", 5, True, [185, 175, 186])])
    assert d.fastest == "ov-int8"
    assert d.chosen == "ov-bf16"
    assert "within noise" in d.why["ov-int8"] and "more complex" in d.why["ov-int8"]


def test_faster_in_every_round_beats_the_simpler_one():
    d = choose([c("ov-bf16", "bf16", 2, True, [180, 170, 190]), c("ov-int8", "int8", 5, True, [181, 171, 191])])
    assert d.chosen == "ov-int8"


def test_same_tier_tie_goes_to_the_earlier_candidate():
    d = choose([c("ort", "fp32", 0, True, [100, 98, 103]), c("ov", "fp32", 1, True, [101, 99, 100])])
    assert d.chosen == "ort"


def test_nothing_passes_nothing_chosen():
    d = choose([c("ort", "fp32", 0, False, [100, 100])])
    assert d.chosen is None and d.why["ort"] == "failed its gates"


def test_mcnemar_exact_on_constructed_counts():
    before = np.array([True] * 10 + [False] * 2 + [True] * 50)
    after = np.array([False] * 10 + [True] * 2 + [True] * 50)
    m = mcnemar(before, after)
    assert (m.lost, m.gained) == (10, 2)
    # two-sided exact binomial: 2 * P(X <= 2 | n=12, p=1/2) = 2 * (1 + 12 + 66) / 4096
    assert m.p_value == pytest.approx(2 * 79 / 4096)
    assert m.drop_points == pytest.approx(100 * 8 / 62)
    same = mcnemar(before, before)
    assert same.p_value == 1.0 and same.drop_points == 0
    two_of_500 = mcnemar(np.ones(500, bool), np.r_[np.zeros(2, bool), np.ones(498, bool)])
    assert two_of_500.p_value == pytest.approx(0.5)  # two images in five hundred: noise


def test_wilson_interval():
    p = proportion(272, 272)
    assert p.value == 100.0 and p.high == pytest.approx(100.0) and 98 < p.low < 99
    q = proportion(50, 100)
    assert q.low == pytest.approx(40.38, abs=0.02) and q.high == pytest.approx(59.62, abs=0.02)


def _logits(n=200, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 10)).astype(np.float32) * 3


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_logits_fail_every_gate(bad):
    ref = _logits()
    out = ref.copy()
    out[3, 1] = bad
    v = verify(ref, out, None, "int8", Gates(min_agreement=0.0), trained=True)
    assert not v.passed and "non-finite" in v.failed[0] and v.agreement is None


def test_top1_drop_within_noise_does_not_fail():
    ref = _logits()
    labels = ref.argmax(1)
    out = ref.copy()
    out[:2] = out[:2][:, ::-1]  # two images change their top-1: 1 point lost of 200, p = 0.5
    v = verify(ref, out, labels, "int8", Gates(min_agreement=90.0, max_top1_drop=0.5), trained=True)
    assert v.passed and v.top1_change.lost == 2 and "within noise" in v.notes[0]


def test_real_top1_drop_fails():
    ref = _logits()
    labels = ref.argmax(1)
    out = ref.copy()
    out[:20] = out[:20][:, ::-1]
    v = verify(ref, out, labels, "int8", Gates(min_agreement=80.0, max_top1_drop=0.5), trained=True)
    assert not v.passed and "more than noise" in v.failed[0]


def test_seeded_weights_are_gated_on_agreement_only():
    ref = _logits()
    labels = ref.argmax(1)
    out = ref.copy()
    out[:20] = out[:20][:, ::-1]
    v = verify(ref, out, labels, "int8", Gates(min_agreement=80.0, max_top1_drop=0.5), trained=False)
    assert v.passed and v.top1 is None and "seeded" in v.notes[0]


def test_fp32_must_reproduce_the_logits():
    ref = _logits()
    v = verify(ref, ref * 1.01, None, "fp32", Gates(), trained=True)
    assert not v.passed and "FP32" in v.failed[0]
    assert verify(ref, ref * 1.01, None, "bf16", Gates(), trained=True).passed


def test_unknown_backend_is_refused_with_the_choices():
    with pytest.raises(ScarletError, match="ort-int8"):
        candidates.select(["ort", "onnx-turbo"])
