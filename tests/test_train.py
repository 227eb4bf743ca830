"""Tier 3: the training program end to end on the tiny model, the GPT-2 code path, and bad input."""
import json
import os
import subprocess
import sys
from dataclasses import fields, replace

import pytest
import torch

import dpg_min as dm

# A run small enough for seconds on 2 CPU cores: the TINY preset with fewer, smaller steps.
SMALL = dict(dm.TINY, batch_size=64, forward_batch_size=64, steps=4, eval_interval=4, eval_samples=64,
             lambda_samples=1024, q_update_interval=2)


def small_config(tmp_path, **changes):
    return dm.Config(**{**SMALL, "model": "tiny", "out": str(tmp_path / "run"), **changes})


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def run(cfg, log=None):
    a, tokenizer = dm.load_lm("tiny")
    return dm.train(cfg, a, tokenizer, log=log if log is not None else (lambda s: None))


# -- the tiny model -----------------------------------------------------------------------------


def test_tiny_vocabulary_holds_every_task_word():
    vocab = dm.tiny_vocab()
    assert len(vocab) == len(set(vocab)) == 1000
    for words in dm.WORDLISTS.values():
        assert set(words) <= set(vocab)
    assert {"amazing", "WikiLeaks", *dm.FEMALE, *dm.MALE} <= set(vocab)
    assert "zebra" in dm.tiny_vocab(extra=["zebra"])


def test_tiny_base_rates_leave_every_feature_something_to_learn():
    """Each built-in feature fires in 0.5%-40% of samples of the tiny a (T = 20): not absent, not common."""
    a, tokenizer = dm.load_lm("tiny")
    torch.manual_seed(0)
    ids, _ = dm.sample(a, 4096, dm.TINY["seq_len"], bos_id=0, batch_size=1024)
    features = sorted({f for task in dm.TASKS.values() for f, _ in task if not f.startswith("sentiment:")})
    rates = dm.phi_matrix(features, tokenizer.batch_decode(ids[:, 1:])).mean(0)
    for name, rate in zip(features, rates.tolist()):
        assert 0.005 <= rate <= 0.40, (name, rate)


@pytest.mark.parametrize("task", ["female", "topics"])
def test_fit_lambdas_on_the_tiny_model_reaches_the_targets(task):
    """λ fitted on samples of a gives E_p φ = μ̄ within tolerance, and on fresh samples of a, too."""
    a, tokenizer = dm.load_lm("tiny")
    features, mu_bar = [f for f, _ in dm.TASKS[task]], [m for _, m in dm.TASKS[task]]
    torch.manual_seed(0)

    def phi_of_samples(n):
        ids, _ = dm.sample(a, n, 20, bos_id=0, batch_size=1024)
        return dm.phi_matrix(features, tokenizer.batch_decode(ids[:, 1:])).double()

    phi = phi_of_samples(4096)
    lam, mu_hat = dm.fit_lambdas(phi, torch.zeros(len(phi), dtype=torch.float64), mu_bar, tol=0.01)
    assert torch.linalg.vector_norm(mu_hat - torch.tensor(mu_bar, dtype=torch.float64)) < 0.01
    fresh = phi_of_samples(4096)                         # the fitted p, judged on other samples of a
    mu_fresh = torch.softmax(fresh @ lam, dim=0) @ fresh
    assert torch.allclose(mu_fresh, torch.tensor(mu_bar, dtype=torch.float64), atol=0.06), mu_fresh


# -- training -----------------------------------------------------------------------------------


def test_gdcpp_on_tiny_raises_E_phi(tmp_path):
    """A short GDC++ run on `amazing` raises E_π φ from its base rate (~2%) and saves everything."""
    cfg = small_config(tmp_path, batch_size=128, forward_batch_size=128, steps=30, eval_interval=30,
                       eval_samples=512, q_update_interval=10, baseline=True)
    pi, last = run(cfg)
    first, final = read_metrics(cfg.out)
    assert first["step"] == 0 and final["step"] == 30 and final == json.loads(json.dumps(last))
    assert first["E_pi_phi"][0] < 0.05 and final["E_pi_phi"][0] > 2 * first["E_pi_phi"][0] + 0.03
    assert final["kl_pi_a"] > 0.1                          # π moved away from a
    assert final["q_updates"] >= 1 and 0 < final["Z_hat"] < 0.1


def test_gdc_without_baseline_runs_and_differs_from_gdcpp(tmp_path):
    gdc, _ = run(small_config(tmp_path / "gdc", baseline=False))
    gdcpp, _ = run(small_config(tmp_path / "gdcpp", baseline=True))
    for m in read_metrics(tmp_path / "gdc" / "run") + read_metrics(tmp_path / "gdcpp" / "run"):
        assert all(v is not None for v in (m["kl_pi_a"], m["Z_hat"], *m["E_pi_phi"]))
    w1, w2 = gdc.transformer.wte.weight, gdcpp.transformer.wte.weight
    assert torch.isfinite(w1).all() and torch.isfinite(w2).all() and not torch.equal(w1, w2)


@pytest.mark.parametrize("baseline", [False, True])
def test_reinforce_on_tiny_raises_E_phi_and_keeps_q_at_a(tmp_path, baseline):
    """REINFORCE (R = φ, optionally minus the batch mean) on `amazing`: E_π φ rises; q is never replaced,
    so its rounds estimate D_KL(p‖π) by importance sampling from a."""
    cfg = small_config(tmp_path, method="reinforce", baseline=baseline, batch_size=128, forward_batch_size=128,
                       steps=20, eval_interval=20, eval_samples=256, q_update_interval=5)
    lines = []
    run(cfg, log=lines.append)
    first, final = read_metrics(cfg.out)
    assert lines[0].startswith("Reinforce-baseline on" if baseline else "Reinforce on")
    assert final["E_pi_phi"][0] > 2 * first["E_pi_phi"][0] + 0.03 and final["q_updates"] == 0
    assert first["kl_p_pi"] == pytest.approx(first["kl_p_q"], rel=1e-5)   # π = q = a at step 0


@pytest.mark.parametrize("task", ["female", "hybrid-sports"])
def test_distributional_tasks_fit_lambda_and_train(tmp_path, task):
    lines = []
    run(small_config(tmp_path, task=task, baseline=True), log=lines.append)
    assert any(line.startswith("λ = ") for line in lines)         # λ is printed before training
    final = read_metrics(small_config(tmp_path).out)[-1]
    assert len(final["E_pi_phi"]) == len(dm.TASKS[task]) and final["kl_p_pi"] is not None


def test_saved_policy_reloads_with_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    cfg = small_config(tmp_path, baseline=True)
    pi, _ = run(cfg)
    again = AutoModelForCausalLM.from_pretrained(cfg.out).eval()
    tokenizer = AutoTokenizer.from_pretrained(cfg.out)
    ids = torch.cat([torch.zeros(3, 1, dtype=torch.long), torch.randint(2, 1000, (3, 8))], dim=1)
    with torch.no_grad():
        assert torch.allclose(dm.sequence_logprob(again, ids), dm.sequence_logprob(pi, ids))
    assert tokenizer.decode([2]) == dm.tiny_vocab()[0]
    assert again.config.dpg_min["task"] == "amazing" and again.config.dpg_min["baseline"] is True


def test_gradient_accumulation_gives_the_full_batch_gradient(tmp_path):
    """Chunks of f samples, each weighted by its share of B, give the gradient of one chunk of B.

    The same seed draws the same batch in both runs; π keeps the last step's gradient in .grad.
    (We compare gradients, not weights: Adam's first step is about lr·sign(g), which rounding can flip
    for the many near-zero entries of g.)
    """
    one, _ = run(small_config(tmp_path / "one", steps=1, forward_batch_size=64))
    four, _ = run(small_config(tmp_path / "four", steps=1, forward_batch_size=16))
    g1 = torch.cat([p.grad.flatten() for p in one.parameters()])
    g4 = torch.cat([p.grad.flatten() for p in four.parameters()])
    assert g1.abs().max() > 0 and torch.allclose(g1, g4, rtol=1e-4, atol=1e-5 * g1.abs().max().item())


def test_a_round_with_no_positive_sample_gives_Z_zero_and_no_nan(tmp_path):
    """A word the model cannot produce: Ẑ = 0, the log says so, q is kept and nothing is NaN."""
    lines = []
    cfg = small_config(tmp_path, word="absent", baseline=True)
    pi, _ = run(cfg, log=lines.append)                     # load_lm("tiny") without the word: P = 0
    assert any("no sample of q has P(x) > 0" in line for line in lines)
    final = read_metrics(cfg.out)[-1]
    assert final["Z_hat"] == 0 and final["q_updates"] == 0 and final["kl_p_pi"] is None
    assert all(torch.isfinite(p).all() for p in pi.parameters())


def test_full_size_gpt2_runs_one_training_step(tmp_path, monkeypatch):
    """GPT2Config() (124M parameters, random weights) through the same functions as --model gpt2.
    Checkpoints (π and q, 1 GB each time) are left out: test_resume covers them, on any model alike."""
    monkeypatch.setattr(dm, "save_checkpoint", lambda *args: None)
    from transformers import GPT2Config, GPT2LMHeadModel
    words = dm.tiny_vocab() + [f"w{i}" for i in range(50257 - 2 - 1000)]
    _, tokenizer = dm.build_tiny(words)                    # a word-level tokenizer with GPT-2's 50257 ids
    torch.manual_seed(0)
    a = GPT2LMHeadModel(GPT2Config())
    assert a.config.vocab_size == len(tokenizer) == 50257
    # A random model almost never says "amazing"; a list of all our words fires on nearly every sample,
    # so P = a·φ > 0 and GDC's advantage P/q is not zero (GDC++'s would be, with π = q at step 1).
    path = tmp_path / "words.txt"
    path.write_text("\n".join(words))
    cfg = dm.Config(model="gpt2", batch_size=2, forward_batch_size=1, seq_len=5, steps=1, lr=1e-3,
                    q_update_interval=1, eval_interval=1, eval_samples=2, out=str(tmp_path / "run"),
                    wordlist=str(path), baseline=False)
    pi, _ = dm.train(cfg, a, tokenizer, log=lambda s: None)
    assert [m["step"] for m in read_metrics(cfg.out)] == [0, 1]
    assert not torch.equal(pi.lm_head.weight, a.lm_head.weight)           # one step was taken
    assert os.path.exists(os.path.join(cfg.out, "model.safetensors"))


# -- command line and bad input -----------------------------------------------------------------


def test_every_config_field_has_a_flag_and_tiny_presets_yield_to_flags(tmp_path):
    cfg = dm.parse_config(["--model", "tiny", "--lr", "0.5", "--out", str(tmp_path / "o")])
    assert cfg.lr == 0.5 and cfg.batch_size == dm.TINY["batch_size"] and cfg.seq_len == dm.TINY["seq_len"]
    cfg = dm.parse_config(["--out", str(tmp_path / "o")])
    assert cfg == replace(dm.Config(), out=str(tmp_path / "o"))        # the paper's defaults
    help_text = subprocess.run([sys.executable, "dpg_min.py", "--help"], capture_output=True, text=True,
                               env={**os.environ, "COLUMNS": "500"}).stdout        # one line per flag
    for f in fields(dm.Config):
        assert "--" + f.name.replace("_", "-") in help_text
    for task in dm.TASKS:
        assert task in help_text


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


# Every bad input of issue 5, and more. EMPTY stands for an empty file, NOCKPT for a run with no checkpoint.
@pytest.mark.parametrize("args, message", [
    (["--task", "nope"], "unknown task 'nope'"),
    (["--method", "ppo"], "use dpg, reinforce or ziegler"),
    (["--model", "/no/such/model"], "use --model tiny"),
    (["--moments", "1.5"], "must lie in [0, 1]"),
    (["--moments", "-0.1"], "must lie in [0, 1]"),
    (["--moments", "0.5,0.5"], "one per feature"),
    (["--moments", "half"], "numbers separated by commas"),
    (["--wordlist", "/no/such/file.txt"], "cannot read --wordlist"),
    (["--wordlist", "EMPTY", "--moments", "0.5"], "found no words"),
    (["--word", "two words"], "one word"),
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--batch-size", "-5"], "--batch-size must be a positive integer"),
    (["--batch-size", "many"], "invalid int value"),
    (["--method", "ziegler", "--batch-size", "100"], "not divisible by --ppo-minibatch 32"),
    (["--forward-batch-size", "0"], "--forward-batch-size must be a positive integer"),
    (["--samples", "0"], "--samples must be a positive integer"),
    (["--samples", "-1"], "--samples must be a positive integer"),
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--lr", "0"], "--lr must be positive"),
    (["--lr=-1e-5"], "--lr must be positive"),
    (["--lr", "nan"], "--lr must be positive"),
    (["--seq-len", "0"], "--seq-len must be a positive integer"),
    (["--model", "tiny", "--seq-len", "500"], "too long"),
    (["--kl-beta", "0"], "--kl-beta must be positive"),
    (["--kl-target", "-6"], "--kl-target must be positive"),
    (["--ppo-minibatch", "0"], "--ppo-minibatch must be a positive integer"),
    (["--save-interval", "0"], "--save-interval must be a positive integer"),
    (["--grad-var-interval", "-1"], "--grad-var-interval must be 0 (never) or positive"),
    pytest.param(["--device", "cuda"], "CUDA is not available here", marks=NO_CUDA),
    (["--method", "reinforce", "--task", "female"], "needs a pointwise task"),
    (["--method", "reinforce", "--moments", "0.5"], "needs a pointwise task"),
    (["--method", "ziegler", "--task", "topics"], "needs a pointwise task"),
    (["--model", "tiny", "--task", "positive", "--classifier", "/no/such/clf"], "use --classifier tiny"),
    (["--resume", "/no/such/run"], "no dpg_min run there"),
    (["--resume", "NOCKPT"], "has no checkpoint yet"),
])
@pytest.mark.parametrize("where", ["new", "--overwrite"])
def test_bad_input_exits_2_with_one_line_and_changes_nothing(tmp_path, capsys, args, message, where):
    """Each bad input: one line, exit 2, no traceback; a new OUT is not created, and an earlier run in OUT
    is left byte for byte even with --overwrite (which deletes only once training really starts)."""
    (tmp_path / "empty.txt").write_text("# no words, only a comment\n")
    (tmp_path / "nockpt").mkdir()
    (tmp_path / "nockpt" / "config.json").write_text('{"dpg_min": {"model": "tiny"}}')
    args = [{"EMPTY": str(tmp_path / "empty.txt"), "NOCKPT": str(tmp_path / "nockpt")}.get(a, a) for a in args]
    out = tmp_path / "run"
    if where == "--overwrite" and "--resume" not in args:
        out.mkdir()
        (out / "config.json").write_text('{"dpg_min": {}}')
        (out / "metrics.jsonl").write_text("precious\n")
        args = args + ["--overwrite"]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exit_info:
        dm.main(args + (["--out", str(out)] if "--resume" not in args else []))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and message in err and len(err.splitlines()) == 1, err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_an_output_directory_that_cannot_be_created_is_bad_input(tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder\n")
    with pytest.raises(SystemExit) as exit_info:
        dm.main(["--model", "tiny", "--out", str(tmp_path / "a_file" / "run")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "is not a writable directory" in err and len(err.splitlines()) == 1
    assert (tmp_path / "a_file").read_text() == "not a folder\n"


def test_an_existing_output_directory_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("precious\n")
    with pytest.raises(SystemExit) as exit_info:
        dm.main(["--model", "tiny", "--out", str(out)])
    assert exit_info.value.code == 2 and "already exists" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == "precious\n"


def test_custom_word_list_file_is_read_lowercased(tmp_path):
    path = tmp_path / "animals.txt"
    path.write_text("# my list\nZebra\n\n  okapi  \n")
    cfg = dm.parse_config(["--wordlist", str(path), "--moments", "0.5", "--out", str(tmp_path / "o")])
    features, mu_bar, wordlists = dm.task_features(cfg)
    assert features == [f"list:{path}"] and mu_bar == [0.5] and wordlists[str(path)] == ("zebra", "okapi")
    assert dm.feature(features[0], "a Zebra ran", wordlists) == 1.0


def test_the_program_prints_no_traceback_on_bad_input():
    result = subprocess.run([sys.executable, "dpg_min.py", "--task", "nope", "--model", "tiny"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]


def test_a_feature_that_never_fires_stops_before_writing(tmp_path):
    """λ cannot reach μ̄ = 0.5 for a word the model never produces: BadInput, and no output directory."""
    cfg = small_config(tmp_path, word="absent", moments="0.5")
    with pytest.raises(dm.BadInput, match="never fires"):
        run(cfg)                                           # load_lm("tiny") without the word
    assert not os.path.exists(cfg.out)


def test_target_moments_out_of_reach_are_reported_and_training_goes_on(tmp_path, monkeypatch):
    """When λ's fit ends ‖μ̄ − μ̂‖ ≥ --lambda-tol (say, μ̄ outside what the samples of a can reach), the run
    says so in one line and trains on with the closest λ found."""
    fit = dm.fit_lambdas
    monkeypatch.setattr(dm, "fit_lambdas", lambda *args: (lambda lam, mu: (lam, mu - 0.3))(*fit(*args)))
    lines = []
    run(small_config(tmp_path, task="female", steps=1), log=lines.append)
    assert "warning: λ did not reach the targets within --lambda-tol 0.01; training goes on" in lines
    assert lines[-1].startswith("saved π to")


def test_the_command_line_runs_end_to_end(tmp_path):
    """`python dpg_min.py ... --model tiny` with a custom word: exit 0, metrics, config and model saved."""
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "dpg_min.py", "--model", "tiny", "--word", "zebra", "--baseline",
                             "--steps", "2", "--batch-size", "16", "--eval-interval", "1", "--eval-samples", "16",
                             "--q-update-interval", "1", "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert [m["step"] for m in read_metrics(out)] == [0, 1, 2]
    config = json.loads((out / "config.json").read_text())["dpg_min"]
    assert config["word"] == "zebra" and config["seq_len"] == dm.TINY["seq_len"]
    assert (out / "model.safetensors").exists() and "step 2/2" in result.stdout
