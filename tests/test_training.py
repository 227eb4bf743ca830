"""Training end to end on the tiny model, in-process: each method learns, logs the same metrics,
saves π; gradient accumulation; the edge cases (Ẑ = 0, NaN and overflow stops, λ that cannot be
fitted); a GPT-2 with the real vocabulary and context through the same code as --model gpt2."""
import json
import math
import os

import pytest
import torch

import dpg_min as dm


def first_and_last(read_metrics, out):
    rows = read_metrics(out)
    return rows[0], rows[-1]


# -- the four methods (one session run each, see conftest.METHOD_RUNS: `politics`, 10 steps of
# B = 64) ------------------------------------------------------------------------------------------


def test_gdcpp_raises_E_phi_on_tiny(method_runs, read_metrics):
    run = method_runs["gdcpp"]
    first, final = first_and_last(read_metrics, run["out"])
    assert run["lines"][0].startswith("GDC++ on list:politics")
    assert (first["step"], final["step"], final["samples"]) == (0, 10, 640)
    assert final == json.loads(json.dumps(run["m"]))            # train returns the last line
    assert final["E_pi_phi"][0] >= first["E_pi_phi"][0] + 0.08   # ~0.18 → ~0.33
    # π moved away from a
    assert final["kl_pi_a"] > 0.1 and first["kl_pi_a"] == pytest.approx(0, abs=1e-6)
    assert 0 < final["Z_hat"] < 1


@pytest.mark.parametrize("name", ["gdc", "gdcpp"])
def test_dpg_replaces_q_by_pi_exactly_when_pi_is_closer_to_p(method_runs, read_metrics, name):
    """Algorithm 1 lines 7-10, at the q-check of step 10: q ← π iff KL̂(p‖π) < KL̂(p‖q), so the
    saved q is the saved π exactly then; q_updated says q changed since the last line (here: at
    step 5 or 10)."""
    first, final = first_and_last(read_metrics, method_runs[name]["out"])
    assert first["q_updated"] is False and first["q_updates"] == 0
    ckpt = torch.load(os.path.join(method_runs[name]["out"], "checkpoint.pt"), weights_only=False)
    replaced_now = final["kl_p_pi"] < final["kl_p_q"]
    assert all(torch.equal(ckpt["q"][k], v) for k, v in ckpt["pi"].items()) == replaced_now
    assert final["q_updated"] >= replaced_now and final["q_updates"] >= final["q_updated"]
    assert ckpt["s"]["q_updates"] == final["q_updates"] <= 2


def test_gdc_learns_too_but_differs_from_gdcpp(method_runs, read_metrics):
    gdc = method_runs["gdc"]
    gdcpp = method_runs["gdcpp"]
    first, final = first_and_last(read_metrics, gdc["out"])
    assert gdc["lines"][0].startswith("GDC on") and final["E_pi_phi"][0] > first["E_pi_phi"][0]
    # GDC: A = P/q, no baseline
    assert final["mean_A"] == pytest.approx(final["mean_P_q"], rel=1e-12)
    w1 = gdc["pi"].transformer.wte.weight
    w2 = gdcpp["pi"].transformer.wte.weight
    assert torch.isfinite(w1).all() and torch.isfinite(w2).all() and not torch.equal(w1, w2)
    assert read_metrics(gdc["out"])[-1]["mean_A"] != read_metrics(gdcpp["out"])[-1]["mean_A"]


def test_reinforce_raises_E_phi_and_never_replaces_q(method_runs, read_metrics, lm):
    """REINFORCE (R = φ minus the batch mean) samples π; q stays a, so its rounds estimate
    D_KL(p‖π) by importance sampling from a."""
    run = method_runs["reinforce"]
    first, final = first_and_last(read_metrics, run["out"])
    assert run["lines"][0].startswith("Reinforce-baseline on")
    assert final["E_pi_phi"][0] >= first["E_pi_phi"][0] + 0.08 and final["q_updates"] == 0
    assert first["kl_p_pi"] == pytest.approx(first["kl_p_q"], rel=1e-5)   # π = q = a at step 0
    q = torch.load(os.path.join(run["out"], "checkpoint.pt"), weights_only=False)["q"]
    assert all(torch.equal(q[k], v) for k, v in lm[0].state_dict().items())
    assert final["mean_P_q"] is None and final["mean_Zpi_q"] is None      # Fig. 2's parts are DPG's


def test_ziegler_raises_E_phi_and_adapts_beta(method_runs, read_metrics):
    """PPO with the KL penalty: E_π φ rises, and β falls while KL(π‖a) is under its target."""
    run = method_runs["ziegler"]
    first, final = first_and_last(read_metrics, run["out"])
    assert run["lines"][0].startswith("Ziegler on")
    assert final["E_pi_phi"][0] >= first["E_pi_phi"][0] + 0.08 and final["q_updates"] == 0
    assert first["beta"] == 0.2 and final["beta"] < 0.2 and final["kl_pi_a"] < run["cfg"].kl_target
    assert final["mean_abs_A"] > 0 and final["var_A"] > 0
    ckpt = torch.load(os.path.join(run["out"], "checkpoint.pt"), weights_only=False)
    assert ckpt["v_head"]["weight"].shape == (1, run["pi"].config.hidden_size)


def test_every_method_logs_the_same_metric_keys_with_var_G_on_request(method_runs, read_metrics):
    keys = None
    for name, run in method_runs.items():
        first, final = first_and_last(read_metrics, run["out"])
        keys = keys or set(first)
        assert set(first) == set(final) == keys, name
        assert final["var_G"] > 0 and final["var_A"] >= 0 and 0 < final["ess_P_q"] <= 1, name
        # nothing trained at step 0
        assert first["var_G"] is None and first["mean_abs_A"] is None, name
        assert (final["beta"] is None) == (name != "ziegler"), name
    assert {"E_pi_phi", "kl_p_pi", "kl_pi_a", "tvd_p_pi", "kl_p_q", "kl_p_pi_on_pi",
            "tvd_p_pi_on_pi", "Z_hat", "mean_A", "var_G", "self_bleu_5", "distinct_1", "q_updates",
            "beta", "mean_P_q", "mean_Zpi_q", *dm.TIMES} <= keys


def test_every_row_says_where_the_time_went_and_the_run_ends_with_the_split(method_runs,
                                                                           read_metrics):
    for name, run in method_runs.items():
        rows = read_metrics(run["out"])
        for before, row in zip([dict(samples=0, seconds=0.0)] + rows, rows):
            phases = [row[f"seconds_{phase}"] for phase in dm.PHASES]
            assert min(phases) >= 0 and sum(phases) <= row["seconds"] - before["seconds"] + 0.1
            wall = max(row["seconds"] - before["seconds"], 0.1)
            trained = row["samples"] - before["samples"]
            assert row["samples_per_second"] == round(trained / wall, 1)
        assert rows[-1]["seconds_update"] > 0 and rows[-1]["seconds_q_check"] > 0, name
        # the last row's phases cover most of the time since the previous row
        assert sum(rows[-1][f"seconds_{p}"] for p in dm.PHASES) > 0.5 * (rows[-1]["seconds"] -
                                                                         rows[-2]["seconds"])
        assert run["lines"][-2].startswith("time: sampling "), run["lines"][-2]


def test_saved_policy_reloads_with_from_pretrained(method_runs, lm):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    run = method_runs["gdcpp"]
    again = AutoModelForCausalLM.from_pretrained(run["out"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(run["out"])
    ids = torch.cat([torch.zeros(3, 1, dtype=torch.long), torch.randint(2, 1000, (3, 8))], dim=1)
    with torch.no_grad():
        assert torch.allclose(dm.sequence_logprob(again, ids), dm.sequence_logprob(run["pi"], ids))
        assert not torch.allclose(dm.sequence_logprob(again, ids), dm.sequence_logprob(lm[0], ids))
    assert tokenizer.decode([2]) == dm.tiny_vocab()[0]
    assert again.config.dpg_min["task"] == "politics" and again.config.dpg_min["baseline"] is True


# -- smaller runs ---------------------------------------------------------------------------------


def test_ppo_update_starts_at_ratio_one_steps_once_per_minibatch_and_adapts_beta(monkeypatch, lm):
    """π_old is π at the start of the update, so the first minibatch has ρ = 1; after Adam steps ρ
    moves. ppo_epochs × B / ppo_minibatch steps in all, and β moves toward its KL target (here:
    down, π = a)."""
    a = lm[0]
    pi = dm.build_tiny(dm.tiny_vocab())[0].requires_grad_(True)
    v_head = torch.nn.Linear(pi.config.hidden_size, 1)
    ratios = []
    policy_loss = dm.ppo_policy_loss

    def recording_policy_loss(*args):
        loss, ratio = policy_loss(*args)
        ratios.append(ratio.detach())
        return loss, ratio

    monkeypatch.setattr(dm, "ppo_policy_loss", recording_policy_loss)
    torch.manual_seed(0)
    ids, logp = dm.sample(pi, 32, 6, 0)
    log_P = torch.where(torch.arange(32) % 3 == 0, logp,
                        torch.tensor(-math.inf, dtype=torch.float64))
    cfg = dm.Config(ppo_epochs=2, ppo_minibatch=8, forward_batch_size=16, kl_beta=0.2)
    opt = torch.optim.Adam(list(pi.parameters()) + list(v_head.parameters()), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    models = dm.Models(a, None, pi, v_head, opt, sched)
    A, beta, var_G = dm.ppo_update(models, ids, log_P, 0.2, cfg, step=1)
    assert A.shape == (32, 6) and len(ratios) == 2 * 32 // 8 == sched.last_epoch
    assert torch.allclose(ratios[0], torch.ones_like(ratios[0]), atol=1e-5)
    assert (ratios[-1] - 1).abs().max() > 1e-3
    assert beta == pytest.approx(dm.adaptive_beta(0.2, 0.0, cfg.kl_target, cfg.kl_horizon, 32),
                                 rel=1e-4)
    assert beta < 0.2 and var_G is None                 # no Var(G) unless asked for


def test_a_sentiment_task_trains_with_the_tiny_classifier(small_config, run_tiny, read_metrics):
    """Task 6 through train: the classifier is loaded by name, and its label is the feature."""
    cfg = small_config(task="negative", classifier="tiny", baseline=True)
    _, _, lines = run_tiny(cfg)
    final = read_metrics(cfg.out)[-1]
    assert lines[0].startswith("GDC++ on sentiment:negative") and final["step"] == 2
    assert 0 < final["E_pi_phi"][0] < 1 and final["Z_hat"] > 0


@pytest.mark.parametrize("task", ["female", "hybrid-sports"])
def test_distributional_tasks_fit_lambda_for_the_soft_features_and_train(small_config, run_tiny,
                                                                         read_metrics, task):
    cfg = small_config(task=task, baseline=True)
    _, _, lines = run_tiny(cfg)
    fit = [i for i, line in enumerate(lines) if line.startswith("λ = ")]
    step_0 = [i for i, line in enumerate(lines) if line.startswith("step 0/")]
    assert len(fit) == 1 and fit[0] < step_0[0]
    assert "for μ̄ = 0.5" in lines[fit[0]] and not any(line.startswith("warning") for line in lines)
    final = read_metrics(cfg.out)[-1]
    assert len(final["E_pi_phi"]) == len(dm.TASKS[task])
    assert final["kl_p_pi"] is not None and final["var_G"] is None
    lam = torch.load(os.path.join(cfg.out, "checkpoint.pt"), weights_only=False)["lam"]
    assert lam.shape == (1,) and lam.item() > 1            # one soft feature, rare in a: λ > 0


def assert_same_metrics(rows, others):
    """The same metrics lines up to rounding (floats to 1e-4), wall-clock time aside."""
    assert len(rows) == len(others) > 1
    for row, other in zip(rows, others):
        assert row.keys() == other.keys()
        for k, v in row.items():
            if isinstance(v, float) and k not in dm.TIMES:
                assert other[k] == pytest.approx(v, rel=1e-4, abs=1e-7), (row["step"], k)
            elif k not in dm.TIMES:
                assert other[k] == v, (row["step"], k)


def test_gradient_accumulation_over_chunks_gives_the_full_batch_gradient(small_config, run_tiny,
                                                                          read_metrics):
    """Chunks of f samples, each weighted by its share of B, give the gradient of one chunk of B;
    π keeps the last step's gradient in .grad."""
    runs = [run_tiny(small_config(f"f{f}", task="politics", batch_size=64, forward_batch_size=f,
                                  steps=1, eval_samples=32))
            for f in (64, 16)]
    g64, g16 = (torch.cat([p.grad.flatten() for p in pi.parameters()]) for pi, _, _ in runs)
    assert g64.abs().max() > 0
    assert torch.allclose(g64, g16, rtol=1e-4, atol=1e-5 * g64.abs().max().item())
    assert_same_metrics(*(read_metrics(small_config(f"f{f}").out) for f in (64, 16)))


def test_forward_batch_size_changes_no_metric(small_config, run_tiny, read_metrics):
    for f in (64, 16):
        run_tiny(small_config(f"f{f}", task="politics", batch_size=64, forward_batch_size=f,
                              steps=1, eval_samples=32))
    assert_same_metrics(*(read_metrics(small_config(f"f{f}").out) for f in (64, 16)))


def test_a_round_with_no_positive_sample_gives_Z_zero_and_no_nan(small_config, run_tiny,
                                                                  read_metrics):
    """A word the tiny model cannot produce: Ẑ = 0, the log says so, q is kept and nothing is
    NaN."""
    cfg = small_config(word="absent", baseline=True)   # load_lm("tiny") without the word: P = 0
    pi, _, lines = run_tiny(cfg)
    assert any("no sample of q has P(x) > 0 among 16" in line for line in lines)
    for row in read_metrics(cfg.out):
        assert row["Z_hat"] == 0 and row["q_updates"] == 0
        assert row["kl_p_pi"] is None and row["tvd_p_pi"] is None
        assert row["step"] == 0 or (row["mean_A"] == 0 and row["mean_abs_A"] == 0)
    assert all(torch.isfinite(p).all() for p in pi.parameters())


# -- stops: NaN and overflow before any update, bad λ --------------------------------------------


def _nan_once_training(token_logprobs, seen):
    """token_logprobs whose output turns NaN when a gradient is wanted (training), recording the
    model."""
    def wrapped(model, ids, v_head=None):
        out = token_logprobs(model, ids, v_head)
        if torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()):
            seen.append(model)
            return (out[0] * math.nan, out[1]) if isinstance(out, tuple) else out * math.nan
        return out
    return wrapped


@pytest.mark.parametrize("method, baseline, quantity", [
    ("dpg", True, "advantage A"),
    ("dpg", False, "gradient norm"),
    ("reinforce", True, "gradient norm"),
    ("ziegler", False, "PPO gradient"),
])
def test_a_nan_stops_the_run_before_the_update(small_config, run_tiny, read_metrics, monkeypatch,
                                               lm, method, baseline, quantity):
    """log π turns NaN in training: each method stops at step 1, naming its quantity; π is still a
    (no NaN reached its weights), and the checkpoint and the log end at step 0."""
    seen = []
    monkeypatch.setattr(dm, "token_logprobs", _nan_once_training(dm.token_logprobs, seen))
    cfg = small_config(task="politics", method=method, baseline=baseline)
    with pytest.raises(dm.NotFinite, match=f"^step 1: {quantity} is NaN, so π was not updated"):
        run_tiny(cfg)
    assert seen and all(torch.equal(p, q) for p, q in zip(seen[0].parameters(), lm[0].parameters()))
    assert [r["step"] for r in read_metrics(cfg.out)] == [0]
    assert torch.load(os.path.join(cfg.out, "checkpoint.pt"), weights_only=False)["s"]["step"] == 0


@pytest.mark.parametrize("method", ["dpg", "reinforce", "ziegler"])
def test_an_overflowing_weight_stops_the_run_before_anything_is_kept(small_config, run_tiny,
                                                                     monkeypatch, method):
    """log P shifted by +1000 nats: every P/q > 0 is +inf, and so is Ẑ in the first round, at step
    0: the run stops there, naming Ẑ, before any metrics line or checkpoint holds it."""
    log_P_of = dm.log_P_of

    def shifted_log_P_of(logp_a, phi, mu_bar, lam):
        return log_P_of(logp_a, phi, mu_bar, lam) + 1000

    monkeypatch.setattr(dm, "log_P_of", shifted_log_P_of)
    cfg = small_config(task="politics", method=method, baseline=True, batch_size=64,
                       forward_batch_size=64)
    with pytest.raises(dm.NotFinite, match=r"^step 0: Ẑ of this round is infinite"):
        run_tiny(cfg)
    assert sorted(os.listdir(cfg.out)) == ["config.json", "metrics.jsonl"]
    assert os.path.getsize(os.path.join(cfg.out, "metrics.jsonl")) == 0


def test_a_lambda_fit_short_of_its_targets_is_bad_input_before_anything_is_written(
        small_config, run_tiny, monkeypatch):
    """When λ's fit ends with ‖μ̄ − μ̂‖ ≥ --lambda-tol, p is not the EBM asked for: BadInput."""
    fit = dm.fit_lambdas

    def short_fit(*args):
        lam, mu = fit(*args)
        return lam, mu - 0.3

    monkeypatch.setattr(dm, "fit_lambdas", short_fit)
    cfg = small_config(task="female", steps=1)
    with pytest.raises(dm.BadInput, match="λ did not bring E_p φ within --lambda-tol 0.01 of μ̄"):
        run_tiny(cfg)
    assert not os.path.exists(cfg.out)


def test_a_feature_that_never_fires_is_bad_input_before_anything_is_written(small_config, run_tiny):
    """λ cannot reach μ̄ = 0.5 for a word the model never produces: BadInput, and no output
    folder."""
    cfg = small_config(word="absent", moments="0.5")
    with pytest.raises(dm.BadInput, match=r"fitting λ on 1024 samples of a \(--lambda-samples\): "
                                          r"feature 0 never fires"):
        run_tiny(cfg)
    assert not os.path.exists(cfg.out)


# -- GPT-2 size -----------------------------------------------------------------------------------


def test_a_gpt2_with_the_real_vocabulary_and_context_runs_one_training_step(tmp_path):
    """GPT2Config's vocabulary (50257) and context (1024), one layer of width 256 (the full
    124M-parameter model takes 15-20 s here), through the same functions as --model gpt2, with a
    word-level tokenizer of 50257 ids."""
    from transformers import GPT2Config, GPT2LMHeadModel
    words = dm.tiny_vocab() + [f"w{i}" for i in range(50257 - 2 - 1000)]
    _, tokenizer = dm.build_tiny(words, n_layer=1, n_embd=8, n_head=1)
    torch.manual_seed(0)
    a = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=256, n_head=4)).eval()
    assert a.config.vocab_size == len(tokenizer) == 50257 and a.config.n_positions == 1024
    # A random model almost never says "amazing"; a list of all our words fires on nearly every
    # sample, so P = a·φ > 0 and GDC's advantage P/q is not zero (GDC++'s would be, with π = q at
    # step 1).
    path = tmp_path / "words.txt"
    path.write_text("\n".join(words))
    cfg = dm.Config(model="gpt2", batch_size=2, forward_batch_size=2, seq_len=5, steps=1, lr=1e-3,
                    q_update_interval=1, eval_interval=1, eval_samples=2, diversity_samples=2,
                    out=str(tmp_path / "run"), wordlist=str(path))
    pi, m = dm.train(cfg, dm.load_task(cfg), a, tokenizer, log=lambda line: None)
    assert m["step"] == 1 and m["Z_hat"] > 0 and math.isfinite(m["kl_pi_a"])
    assert not torch.equal(pi.lm_head.weight, a.lm_head.weight)           # one step was taken
    saved = {"model.safetensors", "config.json", "checkpoint.pt", "metrics.jsonl"}
    assert saved <= set(os.listdir(cfg.out))


def test_generate_on_the_saved_policy_samples_as_training_did(method_runs, monkeypatch):
    """The saved generation_config makes `generate` sample π's own softmax (no top-k 50, no top-p),
    T tokens after BOS, and an EOS does not stop a row: every step's scores are the raw logits."""
    from transformers import AutoModelForCausalLM
    run = method_runs["gdcpp"]
    pi = AutoModelForCausalLM.from_pretrained(run["out"]).eval()
    config = pi.generation_config
    assert (config.do_sample, config.top_k, config.top_p) == (True, 0, 1.0)
    assert config.max_new_tokens == run["cfg"].seq_len and config.bos_token_id == 0
    multinomial = torch.multinomial
    calls = []

    def eos_first(probs, num_samples, **kwargs):
        calls.append(probs)
        if len(calls) == 1:                     # every row draws EOS (id 0) first
            return torch.zeros(len(probs), num_samples, dtype=torch.long)
        return multinomial(probs, num_samples, **kwargs)

    monkeypatch.setattr(torch, "multinomial", eos_first)
    torch.manual_seed(0)
    out = pi.generate(num_return_sequences=4, output_scores=True, output_logits=True,
                      return_dict_in_generate=True)
    T = run["cfg"].seq_len
    assert out.sequences.shape == (4, T + 1) and (out.sequences[:, 0] == 0).all()
    assert (out.sequences[:, 1] == 0).all() and (out.sequences[:, 2:] != 0).any()   # went on
    assert len(out.scores) == T == len(calls)
    assert all(torch.equal(s, logits) for s, logits in zip(out.scores, out.logits))


def test_a_q_check_with_few_effective_samples_is_flagged_in_the_step_line(small_config, run_tiny,
                                                                          method_runs,
                                                                          read_metrics):
    """amazing at B = 16, K = 1: the round's 16 samples hold few with P > 0, and the step line
    says so; politics at K·B = 320 (base rate ~18%) has enough, and says nothing."""
    _, _, lines = run_tiny(small_config(task="amazing", steps=1))
    step_lines = [line for line in lines if "E_π φ" in line]
    assert all(line.split("\n")[0].endswith("effective samples of q)") for line in step_lines)
    run = method_runs["gdcpp"]
    assert read_metrics(run["out"])[0]["ess_P_q"] * 320 > dm.FEW_EFFECTIVE
    assert not any("effective samples" in line for line in run["lines"])
