"""Issue 5, numerical safety: weights that overflow are stopped on, never stepped with."""
import math
import os

import pytest
import torch

import dpg_min as dm
from test_train import read_metrics, run, small_config

F64 = dict(dtype=torch.float64)


@pytest.mark.parametrize("baseline", [False, True])
def test_log_ratios_of_plus_minus_1000_give_inf_or_zero_never_nan(baseline):
    """exp(−1000) is exactly 0, the right limit; exp(+1000) overflows float64 to +inf, which
    `check_finite` then refuses, naming the quantity."""
    logp_q = torch.tensor([-10.0, -10.0], **F64)
    log_P = logp_q + torch.tensor([-1000.0, 1000.0], **F64)
    A = dm.dpg_advantage(logp_q, logp_q, log_P, 0.5, baseline)
    assert A[0].item() == pytest.approx(-0.5 if baseline else 0.0, abs=1e-15)   # P/q → 0; minus Z·π/q
    assert A[1].item() == math.inf and not torch.isnan(A).any()
    with pytest.raises(dm.NotFinite, match="step 7: advantage A is infinite"):
        dm.check_finite(7, **{"advantage A": A})
    dm.check_finite(7, ok=A[:1])                               # finite: nothing happens


@pytest.mark.parametrize("method", ["dpg", "reinforce", "ziegler"])
def test_an_overflowing_weight_stops_the_run_before_anything_is_kept(tmp_path, monkeypatch, method):
    """log P shifted by +1000 nats: every weight P/q > 0 is +inf, and so is Ẑ in the first round that meets
    the constraint. The run stops there, naming Ẑ, before any update, metrics line or checkpoint holds it."""
    log_P_of = dm.log_P_of
    monkeypatch.setattr(dm, "log_P_of", lambda logp_a, phi, lam=None: log_P_of(logp_a, phi, lam) + 1000)
    a, tokenizer = dm.load_lm("tiny")
    cfg = small_config(tmp_path, method=method, baseline=True)
    with pytest.raises(dm.NotFinite, match=r"^step \d+: Ẑ of this round is infinite"):
        dm.train(cfg, a, tokenizer, log=lambda s: None)
    rows = read_metrics(cfg.out) if os.path.exists(os.path.join(cfg.out, "metrics.jsonl")) else []
    states = [torch.load(os.path.join(cfg.out, f"checkpoint-{s}", "state.pt"), weights_only=False)
              for s in dm.checkpoints(cfg.out)]
    assert all(r["Z_hat"] == 0 for r in rows) and all(s["Z_hat"] == 0 for s in states)


@pytest.mark.parametrize("method", ["dpg", "reinforce", "ziegler"])
def test_a_nan_gradient_stops_the_run_before_the_update(tmp_path, monkeypatch, method):
    """log π turns NaN once training starts: each method stops at step 1, naming its loss or gradient,
    and π is still a (no NaN reached its weights); checkpoint-0 is kept."""
    monkeypatch.setattr(dm, "token_logprobs", _nan_after_first_call(dm.token_logprobs))
    a, tokenizer = dm.load_lm("tiny")
    cfg = small_config(tmp_path, method=method, baseline=True)
    with pytest.raises(dm.NotFinite, match=r"^step 1: .* is NaN"):
        dm.train(cfg, a, tokenizer, log=lambda s: None)
    assert [m["step"] for m in read_metrics(cfg.out)] == [0] and dm.checkpoints(cfg.out) == [0]


def _nan_after_first_call(token_logprobs):
    """token_logprobs whose outputs turn NaN once training starts (to test the guard for RL methods)."""
    calls = {"n": 0}

    def wrapped(model, ids, v_head=None):
        out = token_logprobs(model, ids, v_head)
        if torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()):
            calls["n"] += 1
            lp = out[0] if isinstance(out, tuple) else out
            lp = lp * float("nan")
            return (lp, out[1]) if isinstance(out, tuple) else lp
        return out
    return wrapped


def test_weights_of_minus_1000_nats_give_Z_zero_and_a_clean_run(tmp_path, monkeypatch):
    log_P_of = dm.log_P_of
    monkeypatch.setattr(dm, "log_P_of", lambda logp_a, phi, lam=None: log_P_of(logp_a, phi, lam) - 1000)
    lines = []
    cfg = small_config(tmp_path, baseline=True)
    pi, _ = run(cfg, log=lines.append)
    assert any("no sample of q has P(x) > 0" in line for line in lines)
    assert all(m["Z_hat"] == 0 for m in read_metrics(cfg.out))
    assert all(torch.isfinite(p).all() for p in pi.parameters())


def test_the_program_stops_with_one_line_and_status_1_and_resume_goes_on(tmp_path, monkeypatch, capsys):
    """The stop keeps the last good checkpoint (step 0) and says so; once the cause is gone (here: the
    patch is undone; in life: perhaps a smaller --lr), --resume finishes the run."""
    out = str(tmp_path / "run")
    monkeypatch.setattr(dm, "token_logprobs", _nan_after_first_call(dm.token_logprobs))
    with pytest.raises(SystemExit) as exit_info:
        dm.main(["--model", "tiny", "--steps", "2", "--batch-size", "16", "--eval-samples", "16",
                 "--baseline", "--out", out])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and len(err.splitlines()) == 1
    assert err.startswith("dpg_min.py: stopped: step 1:") and "--lr" in err
    assert err.endswith(f"last good checkpoint is {out}/checkpoint-0: go on with --resume {out}")
    monkeypatch.undo()
    dm.main(["--resume", out, "--lr", "1e-4"])
    assert [m["step"] for m in read_metrics(out)] == [0, 2] and dm.checkpoints(out) == [2]
