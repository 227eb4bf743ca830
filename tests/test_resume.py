"""Checkpoints (one file, OUT/checkpoint.pt, written atomically), exact resume after a kill or a
crash, determinism, --resume with new --lr/--steps, damaged and finished runs, --overwrite and
fresh output folders."""
import json
import os
import signal
import threading
import time

import pytest
import torch

import dpg_min as dm

# Metrics every step, checkpoints at steps 0, 5 and 10: a kill after step 6 is logged must replay
# steps 6-10.
KILLED = ["--model", "tiny", "--task", "politics", "--baseline", "--steps", "10",
          "--eval-interval", "1", "--save-interval", "5", "--q-update-interval", "2",
          "--batch-size", "16", "--forward-batch-size", "16", "--eval-samples", "16",
          "--seq-len", "8", "--diversity-samples", "16"]
# In-process crashes: metrics every step, checkpoints at 0, 3 and 6; the crash comes as step 5 is
# printed, after step 4's line was written: --resume must drop it and replay steps 4 and 5.
CRASHED = dict(steps=6, save_interval=3, q_update_interval=2)


def checkpoint_step(out):
    return torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["s"]["step"]


def main_exit(args, capsys):
    """dm.main(args) that must exit: (status, stderr)."""
    with pytest.raises(SystemExit) as info:
        dm.main(args)
    return info.value.code, capsys.readouterr().err.strip()


def test_a_run_killed_with_sigkill_between_checkpoints_resumes_to_the_uninterrupted_log(
        tmp_path, run_tiny, read_metrics, without_seconds, children):
    killed = str(tmp_path / "killed")
    victim = children.Process(target=dm.main, args=(KILLED + ["--out", killed],))
    victim.start()
    metrics = os.path.join(killed, "metrics.jsonl")
    done = threading.Event()

    def kill_after_step_6():                # polls while the reference trains in this process
        deadline = time.time() + 120
        while victim.is_alive() and time.time() < deadline:
            # steps 0-6 logged
            if os.path.exists(metrics) and open(metrics).read().count("\n") >= 7:
                victim.kill()
                break
            time.sleep(0.005)
        done.set()
    threading.Thread(target=kill_after_step_6, daemon=True).start()
    whole = dm.parse_config(KILLED + ["--out", str(tmp_path / "whole")])
    run_tiny(whole)
    done.wait(130)
    victim.join()
    assert victim.exitcode == -signal.SIGKILL
    assert checkpoint_step(killed) == 5, "killed too late: the run had saved past step 5"
    assert len(read_metrics(killed)) >= 7 and not os.path.exists(killed + "/checkpoint.pt.tmp")
    dm.main(["--resume", killed])
    rows = read_metrics(killed)
    assert [r["step"] for r in rows] == list(range(11))        # no line missing, none twice
    assert without_seconds(rows) == without_seconds(read_metrics(whole.out))
    assert checkpoint_step(killed) == checkpoint_step(whole.out) == 10


@pytest.mark.parametrize("changes", [
    dict(method="ziegler", batch_size=16, ppo_minibatch=8),    # value head and β
    dict(task="female", baseline=True),                        # λ
    dict(method="reinforce", baseline=True),
])
def test_a_crash_at_a_step_resumes_exactly(small_config, run_tiny, read_metrics, without_seconds,
                                           capsys, changes):
    """In-process: the run dies as it prints step 5 (two lines after the checkpoint of step 3) and
    leaves a half-written checkpoint.pt.tmp behind; --resume reproduces the uninterrupted run line
    for line, λ included."""
    changes = {"task": "politics", **CRASHED, **changes}
    whole = small_config("whole", **changes)
    cfg = small_config("crashed", **changes)
    _, last, _ = run_tiny(whole)

    def die_at_step_5(line):
        if line.startswith("step 5/"):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_tiny(cfg, log=die_at_step_5)
    assert checkpoint_step(cfg.out) == 3 and len(read_metrics(cfg.out)) == 5
    with open(os.path.join(cfg.out, "checkpoint.pt.tmp"), "wb") as f:        # killed while saving
        f.write(b"half a checkpoint")
    capsys.readouterr()
    dm.main(["--resume", cfg.out])
    assert f"resumed from {cfg.out}/checkpoint.pt at step 3" in capsys.readouterr().out
    assert without_seconds(read_metrics(cfg.out)) == without_seconds(read_metrics(whole.out))
    ours, theirs = (torch.load(os.path.join(o, "checkpoint.pt"), weights_only=False)
                    for o in (cfg.out, whole.out))
    assert torch.equal(ours["lam"], theirs["lam"])
    assert ours["s"]["beta"] == theirs["s"]["beta"] and ours["s"]["step"] == 6
    assert sorted(os.listdir(cfg.out)) == sorted(os.listdir(whole.out))       # the .tmp is gone


def test_the_same_seed_gives_identical_metrics_and_another_seed_does_not(small_config, run_tiny,
                                                                         read_metrics,
                                                                         without_seconds):
    rows = []
    for name, seed in (("one", 12), ("two", 12), ("three", 13)):
        cfg = small_config(name, task="politics", seed=seed)
        run_tiny(cfg)
        rows.append(without_seconds(read_metrics(cfg.out)))
    assert rows[0] == rows[1] and rows[0] != rows[2]


def test_resume_with_new_steps_and_lr_changes_only_the_future(small_config, run_tiny, read_metrics,
                                                              capsys):
    cfg = small_config(task="politics", steps=3)
    run_tiny(cfg)
    before = read_metrics(cfg.out)
    more = dm.parse_config(["--resume", cfg.out, "--steps", "6", "--lr", "1e-5"])
    assert (more.lr, more.steps, more.batch_size, more.task) == (1e-5, 6, 16, "politics")
    dm.main(["--resume", cfg.out, "--steps", "6", "--lr", "1e-5"])
    after = read_metrics(cfg.out)
    assert after[:4] == before and [r["step"] for r in after] == list(range(7))
    saved = json.load(open(os.path.join(cfg.out, "config.json")))["dpg_min"]
    assert (saved["lr"], saved["steps"]) == (1e-5, 6)
    ckpt = torch.load(os.path.join(cfg.out, "checkpoint.pt"), weights_only=False)
    assert ckpt["s"]["step"] == 6 and ckpt["opt"]["param_groups"][0]["lr"] == 1e-5


def test_a_damaged_checkpoint_is_one_line_exit_2_and_changes_nothing(small_config, run_tiny,
                                                                     files_of, capsys):
    cfg = small_config(task="politics")
    run_tiny(cfg)
    path = os.path.join(cfg.out, "checkpoint.pt")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    before = files_of(cfg.out)
    code, err = main_exit(["--resume", cfg.out, "--steps", "4"], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "checkpoint.pt is damaged" in err and "--overwrite" in err
    assert files_of(cfg.out) == before


def test_resuming_a_finished_run_is_exit_2_and_changes_nothing(small_config, run_tiny, files_of,
                                                               capsys):
    cfg = small_config(task="politics")
    run_tiny(cfg)
    before = files_of(cfg.out)
    code, err = main_exit(["--resume", cfg.out], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "has finished its 2 steps; give --steps above 2" in err
    assert files_of(cfg.out) == before


def test_a_nan_stop_is_one_line_exit_1_naming_the_checkpoint_and_resume_goes_on(tmp_path,
                                                                                 read_metrics,
                                                                                 monkeypatch,
                                                                                 capsys):
    """The stop keeps the last good checkpoint (step 0) and says so; once the cause is gone (here:
    the patch is undone; in life: perhaps a smaller --lr), --resume finishes the run."""
    out = str(tmp_path / "run")
    token_logprobs = dm.token_logprobs

    def nan_in_pis_pass(model, ids, v_head=None):
        logp = token_logprobs(model, ids, v_head)
        pis_pass = torch.is_grad_enabled() and next(model.parameters()).requires_grad
        return logp * (float("nan") if pis_pass else 1.0)

    monkeypatch.setattr(dm, "token_logprobs", nan_in_pis_pass)
    code, err = main_exit(["--model", "tiny", "--task", "politics", "--steps", "2",
                           "--batch-size", "16", "--eval-samples", "16", "--seq-len", "8",
                           "--baseline", "--out", out], capsys)
    assert code == 1 and len(err.splitlines()) == 1
    assert err.startswith("dpg_min.py: stopped: step 1:") and "--lr" in err
    assert err.endswith(
        f"Its last good checkpoint is {out}/checkpoint.pt: go on with --resume {out}")
    monkeypatch.undo()
    dm.main(["--resume", out, "--lr", "1e-4"])
    assert [m["step"] for m in read_metrics(out)] == [0, 2] and checkpoint_step(out) == 2


def test_overwrite_replaces_a_run_but_never_a_folder_that_is_not_one(small_config, run_tiny,
                                                                     read_metrics, files_of,
                                                                     tmp_path, capsys):
    """--overwrite replaces a run's own files, and refuses a folder that holds anything else: a
    user's notes.txt in it stops the overwrite, which deleted it before (issue 28)."""
    cfg = small_config(task="politics")
    run_tiny(cfg)
    again = ["--model", "tiny", "--task", "politics", "--steps", "1", "--batch-size", "16",
             "--eval-samples", "16", "--seq-len", "8", "--out", cfg.out, "--overwrite"]
    (tmp_path / "run" / "notes.txt").write_text("mine, not the run's\n")
    before = files_of(tmp_path / "run")
    code, err = main_exit(again, capsys)
    assert code == 2 and "holds 'notes.txt', which no run writes, so it is left alone" in err
    assert files_of(tmp_path / "run") == before
    (tmp_path / "run" / "notes.txt").unlink()
    dm.main(again)
    assert [r["step"] for r in read_metrics(cfg.out)] == [0, 1]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious\n")
    code, err = main_exit(["--model", "tiny", "--out", str(tmp_path / "mine"), "--overwrite"],
                          capsys)
    assert code == 2 and "holds no dpg_min run (no config.json), so it is left alone" in err
    assert files_of(tmp_path / "mine") == {"thesis.tex": b"precious\n"}


def test_each_run_without_out_gets_a_new_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = dm.parse_config(["--model", "tiny"])
    os.makedirs(first.out)
    open(os.path.join(first.out, "metrics.jsonl"), "w").close()
    second = dm.parse_config(["--model", "tiny"])
    assert first.out.startswith(os.path.join("runs", "amazing-gdc-tiny-"))
    assert second.out != first.out
    assert dm.parse_config(["--model", "tiny", "--word", "zebra", "--baseline"]).out.startswith(
        os.path.join("runs", "custom-gdc++-tiny-"))


def test_bad_input_leaves_no_folder_behind_not_even_a_parent(tmp_path, monkeypatch, capsys):
    """A new run refused once OUT is made and locked (here: no such model) removes OUT and the
    folders it made above it, runs/ too; a folder that was there stays (issue 28)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "kept").mkdir()
    for out in (["--out", str(tmp_path / "a" / "b" / "c" / "run")],
                ["--out", str(tmp_path / "kept" / "d" / "run")], []):
        code, err = main_exit(["--model", "/no/such/model", *out], capsys)
        assert code == 2 and "cannot load --model '/no/such/model'" in err
    assert sorted(os.listdir(tmp_path)) == ["kept"] and os.listdir(tmp_path / "kept") == []
