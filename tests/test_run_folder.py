"""The run folder survives anything: real processes killed during its first, a checkpoint's and
the final write resume to the uninterrupted run; one run per folder; --resume checks what it
continues; a full disk, Ctrl-C and a π broken by its last update stop with one line."""
import json
import os
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import dpg_min as dm

RUN = ["--model", "tiny", "--task", "politics", "--baseline", "--steps", "4", "--eval-interval",
       "1", "--save-interval", "2", "--q-update-interval", "2", "--batch-size", "16",
       "--forward-batch-size", "16", "--eval-samples", "16", "--seq-len", "8",
       "--diversity-samples", "16"]

# The processes below are real ones, killed for real: `children` (conftest.py) forks them.


def main_killed_at(name, n, flags):
    """In the child: dpg_min.main(FLAGS), SIGKILLed at the N-th rename onto OUT/NAME, once the
    file's new version is written whole under its temporary name: the last moment before the write
    takes effect."""
    replace = os.replace
    seen = []

    def replace_or_die(src, dst):
        seen.append(os.path.basename(dst) == name)
        if sum(seen) == n and seen[-1]:
            os.kill(os.getpid(), signal.SIGKILL)
        replace(src, dst)
    os.replace = replace_or_die
    dm.main(flags)


def main_logged(flags, err):
    """In the child: dpg_min.main(FLAGS), its stderr into the file ERR, its stdout to nowhere."""
    os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT), 2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    dm.main(flags)


def hold_lock(out, holding):
    """In the child: OUT's lock taken, `holding` set, then a minute's sleep."""
    dm.lock_folder(out)
    holding.set()
    time.sleep(60)


@pytest.fixture
def run_killed(children):
    """run_killed(NAME, N, FLAGS): main_killed_at in a child, which must die of its SIGKILL."""
    def run(name, n, flags):
        child = children.Process(target=main_killed_at, args=(name, n, flags))
        child.start()
        child.join()
        assert child.exitcode == -signal.SIGKILL
    return run


def main_exit(args, capsys):
    """dm.main(args) that must exit: (status, stderr)."""
    with pytest.raises(SystemExit) as info:
        dm.main(args)
    return info.value.code, capsys.readouterr().err.strip()


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The uninterrupted run of RUN."""
    out = str(tmp_path_factory.mktemp("whole") / "run")
    dm.main(RUN + ["--out", out])
    return out


@pytest.mark.parametrize("name, n", [
    ("metrics.jsonl", 1),           # the first write, config.json, landed; the log's did not
    ("checkpoint.pt", 2),           # during the checkpoint of step 2
    ("model.safetensors", 1),       # during the final save, once the run had finished
])
def test_a_kill_at_any_write_then_resume_gives_the_uninterrupted_run(tmp_path, whole, read_metrics,
                                                                     run_killed,
                                                                     without_seconds, name, n):
    out = str(tmp_path / "run")
    run_killed(name, n, RUN + ["--out", out])
    assert [f for f in os.listdir(out) if f.endswith(".tmp")]          # the write it was killed in
    dm.main(["--resume", out])
    assert without_seconds(read_metrics(out)) == without_seconds(read_metrics(whole))
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    pi = AutoModelForCausalLM.from_pretrained(out)
    theirs = AutoModelForCausalLM.from_pretrained(whole)
    assert all(torch.equal(p, q) for p, q in zip(pi.parameters(), theirs.parameters()))


def test_a_kill_before_the_first_write_lands_leaves_no_run_and_the_command_starts_again(
        tmp_path, whole, read_metrics, without_seconds, capsys, run_killed):
    out = str(tmp_path / "run")
    run_killed("config.json", 1, RUN + ["--out", out])
    assert os.listdir(out) == ["config.json.tmp"]
    code, err = main_exit(["--resume", out], capsys)
    assert code == 2 and "no dpg_min run there (no config.json)" in err
    dm.main(RUN + ["--out", out])                                   # the leftover is ignored
    assert without_seconds(read_metrics(out)) == without_seconds(read_metrics(whole))


def test_a_kill_as_resume_rewrites_config_json_leaves_the_old_one_whole(tmp_path, whole,
                                                                        read_metrics,
                                                                        without_seconds,
                                                                        run_killed):
    """A run of 2 steps, resumed to 4: killed as the resume replaces config.json, then resumed
    again, it ends as the 4-step run (steps 0-2 are the same in both)."""
    out = str(tmp_path / "run")
    dm.main(RUN + ["--steps", "2", "--out", out])
    run_killed("config.json", 1, ["--resume", out, "--steps", "4"])
    assert json.load(open(os.path.join(out, "config.json")))["dpg_min"]["steps"] == 2
    dm.main(["--resume", out, "--steps", "4"])
    assert without_seconds(read_metrics(out)) == without_seconds(read_metrics(whole))


def test_a_kill_in_the_final_save_of_a_resumed_run_is_not_taken_for_its_earlier_pi(tmp_path,
                                                                                    whole,
                                                                                    run_killed):
    """The π of step 2 is on disk when the resume to step 4 is killed as it moves in its own π:
    --resume must write the π of step 4, not call the run finished."""
    out = str(tmp_path / "run")
    dm.main(RUN + ["--steps", "2", "--out", out])
    run_killed("model.safetensors", 1, ["--resume", out, "--steps", "4"])
    dm.main(["--resume", out, "--steps", "4"])
    pi = AutoModelForCausalLM.from_pretrained(out)
    theirs = AutoModelForCausalLM.from_pretrained(whole)
    assert all(torch.equal(p, q) for p, q in zip(pi.parameters(), theirs.parameters()))


def test_a_folder_that_a_live_run_holds_is_refused_and_a_killed_runs_lock_never_blocks(
        finished, capsys, files_of, children):
    out = str(finished)
    holding = children.Event()
    holder = children.Process(target=hold_lock, args=(out, holding))
    holder.start()
    assert holding.wait(60)                                         # it holds the lock
    before = files_of(out)
    for args in (RUN + ["--out", out], ["--resume", out, "--steps", "6"],
                 RUN + ["--out", out, "--overwrite"]):
        code, err = main_exit(args, capsys)
        assert code == 2 and "is in use by a run that is still going" in err
    assert files_of(out) == before
    holder.kill()
    holder.join()
    dm.main(["--resume", out, "--steps", "6"])
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["s"]["step"] == 6


def test_two_runs_started_into_one_new_folder_give_one_run_and_one_refusal(tmp_path,
                                                                           read_metrics,
                                                                           children):
    out = str(tmp_path / "run")
    errs = [str(tmp_path / f"err{i}") for i in range(2)]
    runs = [children.Process(target=main_logged, args=(RUN + ["--out", out], err)) for err in errs]
    for child in runs:
        child.start()
    for child in runs:
        child.join()
    results = sorted((child.exitcode, Path(err).read_text()) for child, err in zip(runs, errs))
    assert [code for code, _ in results] == [0, 2], results
    assert ("is in use by a run that is still going" in results[1][1]
            or "already exists and is not an empty directory" in results[1][1])
    assert [r["step"] for r in read_metrics(out)] == [0, 1, 2, 3, 4]


@pytest.fixture
def finished(tmp_path, whole):
    """A copy of the uninterrupted run, to damage."""
    return shutil.copytree(whole, tmp_path / "copy")


def cut_log(out):
    (out / "metrics.jsonl").write_text('{"step": 0}\n')


def delete_log(out):
    (out / "metrics.jsonl").unlink()


def edit_batch_size(out):
    config = json.loads((out / "config.json").read_text())
    config["dpg_min"]["batch_size"] = 32
    (out / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("damage, message", [
    (cut_log, "metrics.jsonl holds 12 bytes, fewer than the"),
    (delete_log, "metrics.jsonl holds 0 bytes"),
    (edit_batch_size, "checkpoint.pt is not of the run that config.json describes"),
])
def test_resume_refuses_what_it_cannot_continue_in_one_line_changing_nothing(finished, files_of,
                                                                             capsys, damage,
                                                                             message):
    damage(finished)
    before = files_of(finished)
    code, err = main_exit(["--resume", str(finished), "--steps", "6"], capsys)
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert files_of(finished) == before


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path, finished, files_of, capsys):
    other = str(tmp_path / "other")
    dm.main(RUN + ["--out", other, "--seed", "13"])
    shutil.copy(os.path.join(other, "checkpoint.pt"), finished / "checkpoint.pt")
    before = files_of(finished)
    code, err = main_exit(["--resume", str(finished), "--steps", "6"], capsys)
    assert code == 2 and "checkpoint.pt is not of the run that config.json describes" in err
    assert files_of(finished) == before


def test_resume_refuses_an_edited_word_list(tmp_path, files_of, capsys):
    words = tmp_path / "words.txt"
    words.write_text("zebra\nokapi\n")
    out = str(tmp_path / "run")
    dm.main(["--model", "tiny", "--wordlist", str(words), "--steps", "2", "--batch-size", "16",
             "--eval-samples", "16", "--seq-len", "8", "--out", out])
    words.write_text("zebra\nokapi\ngiraffe\n")
    before = files_of(out)
    code, err = main_exit(["--resume", out, "--steps", "4"], capsys)
    assert code == 2 and "the task's words changed since the run started" in err
    assert files_of(out) == before


def test_a_run_with_config_but_no_checkpoint_resumes_from_step_0(tmp_path, whole, read_metrics,
                                                                  without_seconds):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(os.path.join(whole, "config.json"), out)
    (out / "metrics.jsonl").write_text('{"step": 0, "half a li')
    dm.main(["--resume", str(out)])
    assert without_seconds(read_metrics(out)) == without_seconds(read_metrics(whole))


@pytest.fixture
def small_disk(tmp_path):
    """A real filesystem of 3 MiB, a tmpfs mounted on tmp_path/disk (mounting needs root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; test_a_write_past_the_file_size_limit... runs")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=True)     # the run may map a file


def remount(disk, options):
    subprocess.run(["mount", "-o", f"remount,{options}", str(disk)], check=True)


def test_a_real_full_disk_is_one_line_keeps_no_partial_file_and_the_run_resumes(
        small_disk, whole, files_of, read_metrics, without_seconds, capsys):
    """The checkpoint of step 1 (2.7 MB, beside step 0's 1.4 MB) does not fit in 3 MiB: torch.save
    fails as it writes, which it reports as a RuntimeError. Then a read-only disk, then room."""
    out = str(small_disk / "run")
    code, err = main_exit(RUN + ["--save-interval", "1", "--out", out], capsys)
    assert code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith(f"dpg_min.py: stopped: cannot write {out}/checkpoint.pt ([Errno 28] No "
                          f"space left on device). Its last good checkpoint is {out}/checkpoint")
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "config.json", "metrics.jsonl"]
    assert shutil.disk_usage(small_disk).free > 1.5e6             # its partial file is gone
    remount(small_disk, "ro")
    before = files_of(out)
    code, err = main_exit(["--resume", out], capsys)
    assert code == 2 and "cannot be written" in err and files_of(out) == before
    remount(small_disk, "rw,size=64m")
    dm.main(["--resume", out])
    assert without_seconds(read_metrics(out)) == without_seconds(read_metrics(whole))


def test_a_folder_that_refuses_renames_and_deletions_is_one_line_and_loses_nothing(
        finished, files_of, read_metrics, capsys):
    """A real file system that lets files be made and written but not renamed or deleted (ext4's
    append-only attribute, chattr +a, as root): resume's first write, config.json, cannot land,
    and its *.tmp cannot be cleared either; --overwrite cannot empty it. One line, exit 1, every
    file as it was."""
    out = str(finished)
    before = files_of(out)
    if os.geteuid() != 0 or subprocess.run(["chattr", "+a", out], capture_output=True).returncode:
        pytest.skip("chattr +a needs root and a file system that has the attribute (ext4)")
    try:
        code, err = main_exit(["--resume", out, "--steps", "6"], capsys)
        # and --overwrite, whose first deletion fails
        overwrite = main_exit(RUN + ["--out", out, "--overwrite"], capsys)
    finally:
        subprocess.run(["chattr", "-a", out], check=True)
    assert overwrite[0] == 1 and overwrite[1].splitlines() == [overwrite[1]]
    assert overwrite[1].startswith(f"dpg_min.py: stopped: cannot clear {out} ([Errno 1] "
                                   f"Operation not permitted")
    assert code == 1 and err.splitlines() == [err], err
    assert err.startswith(f"dpg_min.py: stopped: cannot write {out}/config.json ([Errno 1] "
                          f"Operation not permitted")
    assert err.endswith(f"Its last good checkpoint is {out}/checkpoint.pt: go on with --resume "
                        f"{out}")
    after = files_of(out)
    assert {name: after[name] for name in before} == before
    dm.main(["--resume", out, "--steps", "6"])          # the folder allows renames again
    assert [r["step"] for r in read_metrics(out)][-1] == 6
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]


def main_limited(flags, err, most):
    """In the child: main_logged(FLAGS, ERR) where no file may grow past MOST bytes
    (RLIMIT_FSIZE): a write past it fails with EFBIG, as Python ignores SIGXFSZ."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (most, resource.RLIM_INFINITY))
    main_logged(flags, err)


def no_pi(out):
    """A finished run whose π is not saved yet: only the final save's writes are left."""
    os.remove(os.path.join(out, "model.safetensors"))
    return 100_000, "pi.tmp", []


def near_full_log(out):
    """A finished run resumed for 2 more steps, the log allowed 100 more bytes: its next line."""
    return os.path.getsize(os.path.join(out, "metrics.jsonl")) + 100, "metrics.jsonl", ["--steps",
                                                                                    "6"]


@pytest.mark.parametrize("most, written", [(1000, "config.json"), (100_000, "checkpoint.pt")])
def test_a_write_past_the_file_size_limit_stops_a_new_run_in_one_line_and_leaves_nothing(
        tmp_path, children, most, written):
    out = str(tmp_path / "run")
    err = str(tmp_path / "err")
    child = children.Process(target=main_limited, args=(RUN + ["--out", out], err, most))
    child.start()
    child.join()
    assert child.exitcode == 1
    assert Path(err).read_text() == (f"dpg_min.py: stopped: cannot write {out}/{written} ([Errno "
                                     f"27] File too large)\n")
    assert os.listdir(tmp_path) == ["err"]                  # no checkpoint yet: no run kept


@pytest.mark.parametrize("prepare", [no_pi, near_full_log])
def test_a_write_past_the_file_size_limit_stops_a_resumed_run_in_one_line_and_it_resumes(
        finished, tmp_path, children, prepare, read_metrics):
    out = str(finished)
    most, written, steps = prepare(out)
    err = str(tmp_path / "err")
    child = children.Process(target=main_limited, args=(["--resume", out, *steps], err, most))
    child.start()
    child.join()
    assert child.exitcode == 1
    line, rest = Path(err).read_text().split("\n", 1)        # safetensors: "os error 27"
    assert not rest and line.startswith(f"dpg_min.py: stopped: cannot write {out}/{written} (")
    assert "File too large" in line
    assert line.endswith(f". Its last good checkpoint is {out}/checkpoint.pt: go on with --resume "
                         f"{out}")
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]
    dm.main(["--resume", out, *steps])
    assert [r["step"] for r in read_metrics(out)][-1] == int(steps[-1] if steps else 4)
    assert AutoModelForCausalLM.from_pretrained(out) is not None


def test_ctrl_c_is_one_line_that_names_resume(tmp_path, capsys, monkeypatch, read_metrics):
    out = str(tmp_path / "run")
    print_line = dm.print_line

    def ctrl_c_at_step_3(line):
        if line.startswith("step 3/"):
            raise KeyboardInterrupt
        print_line(line)
    monkeypatch.setattr(dm, "print_line", ctrl_c_at_step_3)
    code, err = main_exit(RUN + ["--out", out], capsys)
    assert code == 130 and err == (f"dpg_min.py: interrupted. Its last good checkpoint is "
                                   f"{out}/checkpoint.pt: go on with --resume {out}")
    monkeypatch.undo()
    dm.main(["--resume", out])
    assert [r["step"] for r in read_metrics(out)] == [0, 1, 2, 3, 4]


def test_an_update_that_breaks_pi_never_reaches_a_checkpoint(tmp_path, capsys, monkeypatch,
                                                             read_metrics):
    """Adam's step at step 2 leaves a NaN in π's weights: the run stops before the checkpoint of
    step 2, so that of step 0 is the last good one, and resuming (the cause gone) finishes."""
    out = str(tmp_path / "run")
    step = torch.optim.Adam.step
    calls = []

    def poisoned(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            self.param_groups[0]["params"][0].data.fill_(float("nan"))
        return result
    monkeypatch.setattr(torch.optim.Adam, "step", poisoned)
    code, err = main_exit(RUN + ["--out", out], capsys)
    assert code == 1 and err.startswith("dpg_min.py: stopped: step 2: π's log-probabilities are")
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert ckpt["s"]["step"] == 0
    assert all(torch.isfinite(p).all() for p in ckpt["pi"].values())
    monkeypatch.undo()
    dm.main(["--resume", out, "--lr", "1e-4"])
    assert [r["step"] for r in read_metrics(out)] == [0, 1, 2, 3, 4]


def test_overwrite_refuses_a_symbolic_link(tmp_path, whole, capsys, files_of):
    link = tmp_path / "link"
    link.symlink_to(whole)
    before = files_of(whole)
    code, err = main_exit(RUN + ["--out", str(link), "--overwrite"], capsys)
    assert code == 2 and "is a symbolic link, left alone" in err
    assert files_of(whole) == before


def test_samples_is_never_ignored(tmp_path):
    tiny = dm.parse_config(["--model", "tiny", "--samples", "256", "--out", str(tmp_path / "a")])
    assert tiny.steps is None and dm.n_steps_of(tiny, [1.0]) == 2       # the preset's 240 yields
    out = tmp_path / "b"
    out.mkdir()
    saved = dict(model="tiny", steps=240, batch_size=128)
    (out / "config.json").write_text(json.dumps({"dpg_min": saved}))
    resumed = dm.parse_config(["--resume", str(out), "--samples", "512"])
    assert resumed.steps is None and dm.n_steps_of(resumed, [1.0]) == 4


def test_a_run_of_relative_paths_resumes_from_any_folder(tmp_path, monkeypatch, read_metrics):
    """--model and --wordlist relative to where the run started: config.json holds them absolute,
    so --resume works from another folder."""
    start = tmp_path / "start"
    model, tokenizer = dm.build_tiny(dm.tiny_vocab(["zebra", "okapi"]))
    model.save_pretrained(start / "lm")
    tokenizer.save_pretrained(start / "lm")
    (start / "words.txt").write_text("zebra\nokapi\n")
    monkeypatch.chdir(start)
    dm.main(["--model", "lm", "--wordlist", "words.txt", *RUN[4:], "--steps", "2", "--out", "run"])
    saved = json.loads((start / "run" / "config.json").read_text())["dpg_min"]
    assert (saved["model"], saved["wordlist"]) == (str(start / "lm"), str(start / "words.txt"))
    monkeypatch.chdir(tmp_path)
    dm.main(["--resume", "start/run", "--steps", "4"])
    assert [r["step"] for r in read_metrics(start / "run")] == [0, 1, 2, 3, 4]


def test_resume_while_the_run_still_fits_lambda_says_the_folder_is_in_use(tmp_path, children,
                                                                          capsys):
    """A new run holds OUT from its start, but writes config.json only once λ is fitted."""
    out = tmp_path / "run"
    fitting = ["--model", "tiny", "--task", "female", "--lambda-samples", "400000", "--out",
               str(out)]
    child = children.Process(target=main_logged, args=(fitting, str(tmp_path / "err")))
    child.start()
    for _ in range(600):
        if out.exists():
            break
        time.sleep(0.1)
    time.sleep(1)                               # between making OUT and locking it: a moment
    code, err = main_exit(["--resume", str(out)], capsys)
    still_fitting = not (out / "config.json").exists()
    child.kill()
    child.join()
    assert still_fitting
    assert code == 2 and err == (f"dpg_min.py: error: {str(out)!r} is in use by a run that is "
                                 f"still going; wait for it to end, or choose another folder")
