"""Issue 5: checkpoints, exact resume after a kill, determinism, --overwrite and fresh output folders."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import dpg_min as dm
from test_train import read_metrics, run, small_config

# Checkpoints every 3 steps, metrics every step: a kill after step 5 must replay steps 4 and 5.
RESUMABLE = dict(steps=8, eval_interval=1, save_interval=3, q_update_interval=2, batch_size=32,
                 forward_batch_size=32, eval_samples=32, seq_len=10)
ARGS = ["--model", "tiny", "--baseline"] + [a for k, v in RESUMABLE.items() for a in ("--" + k.replace("_", "-"), str(v))]


def without_seconds(rows):
    """Metrics rows minus wall-clock time, the one field that may differ between equal runs."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def files_of(folder):
    """{relative path: bytes} of every file under folder, to show that nothing was changed."""
    return {os.path.relpath(os.path.join(d, n), folder): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(folder) for n in names}


def test_a_run_killed_with_sigkill_and_resumed_logs_what_an_uninterrupted_run_logs(tmp_path):
    def start(*args):
        return subprocess.Popen([sys.executable, "dpg_min.py", *args], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    reference = start(*ARGS, "--out", whole)
    victim = start(*ARGS, "--out", killed)
    metrics = os.path.join(killed, "metrics.jsonl")
    deadline = time.time() + 120
    while not (os.path.exists(metrics) and open(metrics).read().count("\n") >= 6):    # steps 0-5 logged
        assert victim.poll() is None and time.time() < deadline, victim.stderr.read()
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert reference.wait() == 0, reference.stderr.read()
    assert dm.checkpoints(killed) == [3]                    # the kill came before checkpoint-6
    resumed = subprocess.run([sys.executable, "dpg_min.py", "--resume", killed], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    rows = read_metrics(killed)
    assert [r["step"] for r in rows] == list(range(9))      # no line missing, none twice
    assert without_seconds(rows) == without_seconds(read_metrics(whole))
    assert dm.checkpoints(killed) == dm.checkpoints(whole) == [8]


@pytest.mark.parametrize("changes", [dict(method="ziegler", baseline=True),           # value head and β
                                     dict(task="female"),                            # λ
                                     dict(method="reinforce", baseline=True)])
def test_a_crash_at_any_step_resumes_exactly(tmp_path, changes):
    """In-process: the run dies when it logs step 4 (after checkpoint-3), and again leaves a half-written
    checkpoint behind; --resume still reproduces the uninterrupted run line for line."""
    cfg = small_config(tmp_path, **{**RESUMABLE, **changes})
    whole = small_config(tmp_path, **{**RESUMABLE, **changes}, out=str(tmp_path / "whole"))
    _, last = run(whole)

    def die_at_step_4(line):
        if line.startswith("step 4/"):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run(cfg, log=die_at_step_4)
    os.makedirs(os.path.join(cfg.out, "checkpoint-6.tmp", "pi"))              # killed while saving
    open(os.path.join(cfg.out, "checkpoint-6.tmp", "state.pt"), "w").write("half")
    assert dm.checkpoints(cfg.out) == [3]
    lines = []
    _, resumed_last = run(dm.parse_config(["--resume", cfg.out]), log=lines.append)
    assert lines[1] == f"resumed from {cfg.out}/checkpoint-3"
    assert without_seconds(read_metrics(cfg.out)) == without_seconds(read_metrics(whole.out))
    assert without_seconds([resumed_last]) == without_seconds([last])
    assert sorted(os.listdir(cfg.out)) == sorted(os.listdir(whole.out))       # the .tmp is gone


def test_the_same_seed_gives_identical_metrics_and_another_seed_does_not(tmp_path):
    rows = []
    for name, seed in (("one", 12), ("two", 12), ("three", 13)):
        cfg = small_config(tmp_path, seed=seed, steps=2, eval_interval=1, eval_samples=32, out=str(tmp_path / name))
        run(cfg)
        rows.append(without_seconds(read_metrics(cfg.out)))
    assert rows[0] == rows[1] and rows[0] != rows[2]


def test_resume_with_a_smaller_learning_rate_changes_only_the_future(tmp_path):
    cfg = small_config(tmp_path, **{**RESUMABLE, "steps": 3})
    run(cfg)
    more = dm.parse_config(["--resume", cfg.out, "--steps", "6", "--lr", "1e-5"])
    assert (more.lr, more.steps, more.batch_size) == (1e-5, 6, RESUMABLE["batch_size"])
    before = read_metrics(cfg.out)
    run(more)
    after = read_metrics(cfg.out)
    assert after[:4] == before and [r["step"] for r in after] == list(range(7))
    assert json.load(open(os.path.join(cfg.out, "config.json")))["dpg_min"]["lr"] == 1e-5
    assert dm.checkpoints(cfg.out) == [6]


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "64"], "--batch-size 64 contradicts the run's 32"),
    (["--task", "female"], "--task female contradicts"),
    (["--out", "elsewhere"], "--out elsewhere contradicts"),
    (["--overwrite"], "--resume and --overwrite: choose one"),
    (["--steps", "3"], "has finished its 3 steps"),
    (["--lr", "0"], "--lr must be positive"),
])
def test_resume_refuses_contradicting_flags_and_changes_nothing(tmp_path, capsys, args, message):
    cfg = small_config(tmp_path, **{**RESUMABLE, "steps": 3})
    run(cfg)
    before = files_of(cfg.out)
    with pytest.raises(SystemExit) as exit_info:
        dm.main(["--resume", cfg.out] + args)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and message in err and len(err.splitlines()) == 1, err
    assert files_of(cfg.out) == before


def test_overwrite_replaces_a_run_but_never_a_folder_that_is_not_one(tmp_path, capsys):
    cfg = small_config(tmp_path, **{**RESUMABLE, "steps": 2})
    run(cfg)
    (tmp_path / "run" / "stale.txt").write_text("from the old run\n")
    cfg = dm.parse_config(ARGS + ["--steps", "1", "--out", cfg.out, "--overwrite"])
    run(cfg)
    assert [r["step"] for r in read_metrics(cfg.out)] == [0, 1] and not (tmp_path / "run" / "stale.txt").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious\n")
    with pytest.raises(SystemExit) as exit_info:
        dm.main(ARGS + ["--out", str(tmp_path / "mine"), "--overwrite"])
    assert exit_info.value.code == 2 and "holds no dpg_min run" in capsys.readouterr().err
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious\n"


def test_each_run_without_out_gets_a_new_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = dm.parse_config(["--model", "tiny"])
    os.makedirs(first.out)
    open(os.path.join(first.out, "metrics.jsonl"), "w").close()
    second = dm.parse_config(["--model", "tiny"])
    assert first.out.startswith(os.path.join("runs", "amazing-gdc-tiny-")) and second.out != first.out
