import math

import pytest

from litgpt_ext.train.schedules import Schedule, warmup_steps_for


def close(a, b):
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15)


def test_cosine_warmup_peak_mid_end():
    s = Schedule("cosine", peak_lr=1.0, min_lr=0.1, end_step=110, warmup_steps=10)
    assert s(0) == 0.0 and close(s(5), 0.5) and close(s(10), 1.0)
    assert close(s(60), 0.1 + 0.5 * 0.9)  # half way through the cosine
    assert close(s(110), 0.1) and close(s(500), 0.1)
    assert all(s(i) >= s(i + 1) for i in range(10, 120))


def test_cosine_follows_the_horizon_not_a_constant():
    short = Schedule("cosine", 1.0, 0.0, end_step=20)
    long = Schedule("cosine", 1.0, 0.0, end_step=200)
    assert close(short(10), 0.5) and close(long(100), 0.5) and long(10) > 0.99


def test_wsd_stable_then_linear_decay():
    s = Schedule("wsd", peak_lr=2.0, min_lr=0.2, end_step=100, warmup_steps=10, stable_steps=50)
    assert close(s(5), 1.0) and close(s(10), 2.0) and close(s(59), 2.0) and close(s(60), 2.0)
    assert close(s(80), 1.1)  # half way 60 -> 100
    assert close(s(100), 0.2) and close(s(150), 0.2)
    never = Schedule("wsd", 2.0, 0.2, end_step=100, warmup_steps=10)  # no stable_steps: no decay
    assert close(never(99), 2.0)


def test_decay_from_resumed_lr():
    s = Schedule("decay", peak_lr=3.0, min_lr=0.0, end_step=150, start_step=50, start_lr=1.0)
    assert close(s(50), 1.0) and close(s(100), 0.5) and close(s(150), 0.0) and close(s(10), 1.0)
    assert close(Schedule("decay", 3.0, 0.0, end_step=10)(5), 1.5)  # fresh run: from the peak


def test_constant_and_rewarmup_cosine():
    c = Schedule("constant", 1.0, 0.0, end_step=100, warmup_steps=4)
    assert close(c(2), 0.5) and close(c(4), 1.0) and close(c(99), 1.0)
    r = Schedule("rewarmup_cosine", peak_lr=1.0, min_lr=0.2, end_step=120, warmup_steps=10, start_step=100)
    assert close(r(100), 0.2) and close(r(105), 0.6) and close(r(110), 1.0)
    assert close(r(115), 0.2 + 0.5 * 0.8) and close(r(120), 0.2)


def test_pure_and_validated():
    s = Schedule("cosine", 1.0, 0.1, end_step=50, warmup_steps=5)
    lrs = [s(i) for i in range(60)]
    assert lrs == [Schedule("cosine", 1.0, 0.1, end_step=50, warmup_steps=5)(i) for i in reversed(range(60))][::-1]
    assert lrs[5] == 1.0 and lrs[50:] == [0.1] * 10  # a function of the step alone: no state between calls
    with pytest.raises(ValueError, match="unknown lr_scheduler 'cosin'.*cosine, wsd, decay"):
        Schedule("cosin", 1.0, 0.1, end_step=50)


def test_warmup_steps_for():
    assert warmup_steps_for("cosine", 200, None, 0.05) == 10
    assert warmup_steps_for("cosine", 200, 7, None) == 7
    assert warmup_steps_for("decay", 200, 7, None) == 0
    assert warmup_steps_for("wsd", 200, None, None) == 0
