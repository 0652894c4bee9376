"""Stage health check (eval/health.py): verdicts on synthetic loss logs and on corrupted toy clips."""

import math

import torch

from framecast.eval import health as Hm
from framecast.eval import toy as T
from framecast.stages import STAGES


def rows(values, key="model/loss"):
    return [{"step": i, key: v} for i, v in enumerate(values)]


def status(checks):
    return {c.name: c.status for c in checks}


def test_loss_trends():
    down = [1.0 / (1 + i) for i in range(50)]
    assert status(Hm.loss_checks(rows(down), STAGES["stage0"].loss_rule, from_scratch=True)) == {"model/loss": "OK"}
    flat = [0.1] * 50
    assert status(Hm.loss_checks(rows(flat), STAGES["stage0"].loss_rule, from_scratch=True)) == {"model/loss": "FAIL"}  # learnt nothing
    assert status(Hm.loss_checks(rows(flat), STAGES["cd"].loss_rule, from_scratch=False)) == {"model/loss": "OK"}
    # learnt within the first fifth, then at its floor (Breakout's Stage 0: 1.94 -> 0.37 by step 300 of 1500)
    fast = [2.0 - 1.6 * min(1.0, i / 5) for i in range(150)]  # the first fifth averages 0.53: not halved
    assert status(Hm.loss_checks(rows(fast), STAGES["stage0"].loss_rule, from_scratch=True)) == {"model/loss": "OK"}
    assert status(Hm.loss_checks(rows([2.0] * 5 + [1.2] * 145), STAGES["stage0"].loss_rule, True)) == {
        "model/loss": "FAIL"}  # fell by less than half from its start
    up = [0.1 * (1 + i / 10) for i in range(50)]
    assert status(Hm.loss_checks(rows(up), STAGES["stage1"].loss_rule, from_scratch=False)) == {"model/loss": "FAIL"}
    assert status(Hm.loss_checks(rows(down[:10] + [math.nan]), STAGES["ode"].loss_rule, False)) == {"model/loss": "FAIL"}
    assert status(Hm.loss_checks([{"step": 1}], STAGES["ode"].loss_rule, False)) == {"losses": "FAIL"}


def test_cd_loss_may_rise_from_its_near_zero_start_but_not_blow_up():
    """Causal CD starts from the teacher (the quickstart's log: 1.05e-4 -> 1.28e-4): a rise within 3x is OK under
    its `stable` rule, the same log under `no_rise` would FAIL; a blow-up or a NaN FAILs."""
    rule = STAGES["cd"].loss_rule
    assert rule.kind == "stable"
    mild = [1.05e-4 * (1 + 0.25 * i / 49) for i in range(50)]
    assert status(Hm.loss_checks(rows(mild), rule, from_scratch=False)) == {"model/loss": "OK"}
    assert status(Hm.loss_checks(rows(mild), STAGES["stage1"].loss_rule, from_scratch=False)) == {"model/loss": "FAIL"}
    blow = [1e-4 * 1.1 ** i for i in range(50)]
    assert status(Hm.loss_checks(rows(blow), rule, from_scratch=False)) == {"model/loss": "FAIL"}
    assert status(Hm.loss_checks(rows(mild[:10] + [math.inf]), rule, from_scratch=False)) == {"model/loss": "FAIL"}


def test_dmd_checks_only_the_critic_for_blow_up():
    log = [{"model/loss": 5.0 * (i % 3), "critic/loss": 0.2} for i in range(30)]
    assert status(Hm.loss_checks(log, STAGES["dmd"].loss_rule, False)) == {"critic/loss": "OK"}
    log = [{"model/loss": 1.0, "critic/loss": 0.2 * 1.2 ** i} for i in range(30)]
    assert status(Hm.loss_checks(log, STAGES["dmd"].loss_rule, False)) == {"critic/loss": "FAIL"}


def test_sample_verdicts_on_corrupted_clips(one_thread):
    v, caps = T.real_clips(16, 8, 32, 32, seed=3)
    real = T.clip_metrics(v, caps)
    assert {c.status for c in Hm.sample_checks(real, None)} == {"OK"}
    frozen = status(Hm.sample_checks(T.clip_metrics(T.freeze(v), caps), None))
    assert frozen["moves"] == "FAIL" and frozen["not noise"] == "OK"
    noisy = status(Hm.sample_checks(T.clip_metrics(T.noise(v, torch.Generator().manual_seed(0)), caps), None))
    assert noisy["not noise"] == "FAIL" and noisy["objects present"] == "FAIL"
    blank = status(Hm.sample_checks(T.clip_metrics(torch.full_like(v, -1.0), caps), None))
    assert blank["objects present"] == "FAIL"
    # a distilled stage that lost its init's motion is flagged as a regression
    regressed = status(Hm.sample_checks({**real, "dynamic_degree": 0.5}, real))
    assert regressed["dynamic_degree vs init"] == "WARN" and regressed["fidelity vs init"] == "OK"


def test_health_round_trips_and_summarises():
    h = Hm.Health("cd", [Hm.Check("a", "OK", "x"), Hm.Check("b", "WARN", "y")], {"fidelity": 0.5}, "ck")
    assert h.status == "WARN" and "[WARN] b: y" in h.summary()
    again = Hm.Health.from_json(h.to_json())
    assert again.to_json() == h.to_json()
    assert Hm.Health("x", [Hm.Check("a", "FAIL", "")]).status == "FAIL"
