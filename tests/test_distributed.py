"""Many processes, one run: `torchrun --nproc_per_node 2` on CPU (gloo) gives the one-process run
for every method, process 0 alone prints and writes, bad input stops every process with one line,
and a checkpoint resumes on any number of processes, after a killed process too."""
import contextlib
import io
import json
import os
import subprocess
import sys

import pytest

import dpg_min as dm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]         # the `torchrun` command

# Process r runs dpg_min.main(ARGS) for each ARGS of the JSON list argv[1] and prints its exit
# status. With argv[2] = "R N", process R SIGKILLs itself at its N-th call of `score`. First, the
# samples of 2 processes, gathered, are the samples of one.
HELPER = """
import json, os, signal, sys, torch
import dpg_min as dm
dm.start_processes()
r = dm.RANK
a = dm.load_lm("tiny")[0]
torch.manual_seed(0)
two = dm.sample(a, 32, 6, 0, chunk=8)                      # each process samples 16 rows
dm.RANK, dm.WORLD_SIZE = 0, 1                               # as if alone
torch.manual_seed(0)
one = dm.sample(a, 32, 6, 0, chunk=32)
dm.RANK, dm.WORLD_SIZE = r, 2
equal = all(torch.equal(x, y) for x, y in zip(two, one))
print(f"rank {r} samples equal {equal}\\n", end="", flush=True)   # one write: stdout is shared
if len(sys.argv) > 2:
    kill_rank, kill_at = map(int, sys.argv[2].split())
    score = dm.score
    calls = []
    def score_or_die(*args):
        calls.append(1)
        if r == kill_rank and len(calls) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return score(*args)
    dm.score = score_or_die
for args in json.loads(sys.argv[1]):
    try:
        dm.main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    print(f"rank {r} exit {code}\\n", end="", flush=True)
"""

RUN = ["--model", "tiny", "--task", "politics", "--steps", "4", "--eval-interval", "1",
       "--save-interval", "2", "--q-update-interval", "2", "--batch-size", "32",
       "--forward-batch-size", "32", "--eval-samples", "32", "--seq-len", "8",
       "--diversity-samples", "16", "--grad-var-interval", "2", "--grad-var-samples", "4"]
METHODS = dict(gdcpp=["--baseline"], gdc=[], reinforce=["--method", "reinforce", "--baseline"],
               ziegler=["--method", "ziegler", "--ppo-minibatch", "8"])
# With forward chunks of B/N rows, each process's gradient is one chunk's, and 2 processes sum the
# two chunks as one process does: the same floats.
EXACT = ["--baseline", "--forward-batch-size", "16"]
TOLERANCE = 1e-4    # relative (absolute 1e-5), on every number of metrics.jsonl: float sums in
                    # another order


def torchrun(tmp_path, runs, kill=None):
    """`torchrun --standalone --nproc_per_node 2` of HELPER: (exit status, stdout, stderr)."""
    helper = tmp_path / "helper.py"
    helper.write_text(HELPER)
    argv = TORCHRUN + ["--standalone", "--nproc_per_node", "2", str(helper), json.dumps(runs)]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    result = subprocess.run(argv + ([kill] if kill else []), cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert "rank 0 samples equal True" in result.stdout, result.stderr
    assert "rank 1 samples equal True" in result.stdout, result.stderr
    return result.returncode, result.stdout, result.stderr


def assert_close(rows, expected):
    """The same steps and metrics, to TOLERANCE; the texts of the step lines are compared apart."""
    assert [r["step"] for r in rows] == [r["step"] for r in expected]
    for row, other in zip(rows, expected):
        for key, value in row.items():
            if key in dm.TIMES or other[key] is None or isinstance(other[key], bool):
                assert value == other[key] or key in dm.TIMES, (row["step"], key)
            else:
                expected_value = pytest.approx(other[key], rel=TOLERANCE, abs=1e-5)
                assert value == expected_value, (row["step"], key)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """One torchrun of 2 processes for the module: two bad inputs, the four methods, GDC++ with
    chunks of B/2, a new run of 2 steps and the resume to 4 of a one-process run; and their
    one-process counterparts."""
    root = tmp_path_factory.mktemp("distributed")
    (root / "taken").mkdir()
    (root / "taken" / "notes.txt").write_text("mine")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for name, extra in METHODS.items():
            dm.main(RUN + extra + ["--out", str(root / f"one-{name}")])
        dm.main(RUN + ["--steps", "2", "--out", str(root / "one-then-two")])
        dm.main(RUN + EXACT + ["--out", str(root / "one-exact")])
    runs = [RUN + ["--batch-size", "33", "--out", str(root / "odd")],  # every process sees it
            RUN + ["--out", str(root / "taken")]]                   # process 0 alone checks OUT
    runs += [RUN + extra + ["--out", str(root / f"two-{name}")] for name, extra in METHODS.items()]
    runs += [RUN + EXACT + ["--out", str(root / "two-exact")],
             RUN + ["--steps", "2", "--out", str(root / "two-then-one")],
             ["--resume", str(root / "one-then-two"), "--steps", "4"]]
    code, stdout, stderr = torchrun(root, runs)
    return dict(root=root, code=code, stdout=stdout, stderr=stderr, printed=printed.getvalue())


def test_two_processes_give_the_one_process_run_for_every_method(launched, read_metrics):
    root = launched["root"]
    assert launched["code"] == 0
    for name in METHODS:
        two = root / f"two-{name}"
        assert_close(read_metrics(two), read_metrics(root / f"one-{name}"))
        assert sorted(os.listdir(two)) == sorted(os.listdir(root / f"one-{name}"))  # 1 wrote none
    # one printout: each step line once, and π's samples at every step as one process drew them
    texts = [line for line in launched["stdout"].splitlines() if line.startswith("    ")]
    one = [line for line in launched["printed"].splitlines() if line.startswith("    ")]
    assert len(texts[:4 * 5 * 3]) == 4 * 5 * 3 and texts[:4 * 5 * 3] == one[:4 * 5 * 3]
    assert launched["stdout"].count("saved π") == 7


def test_with_forward_chunks_of_b_over_n_two_processes_write_the_same_log_bit_for_bit(
        launched, read_metrics, without_seconds):
    root = launched["root"]
    assert without_seconds(read_metrics(root / "two-exact")) == without_seconds(
        read_metrics(root / "one-exact"))


def test_bad_input_stops_every_process_with_one_line(launched):
    stdout = launched["stdout"]
    stderr = launched["stderr"]
    taken = str(launched["root"] / "taken")
    assert stdout.count("rank 0 exit 2") == 2 and stdout.count("rank 1 exit 2") == 2
    assert stderr.splitlines() == [
        "dpg_min.py: error: --batch-size 33 is not divisible by the 2 processes: each samples an "
        "equal share",
        f"dpg_min.py: error: --out {taken!r} already exists and is not an empty directory; choose "
        f"a new one, or --resume {taken} to continue its run, or --overwrite to replace it"]
    assert not (launched["root"] / "odd").exists()
    assert os.listdir(launched["root"] / "taken") == ["notes.txt"]


def test_a_checkpoint_resumes_on_any_number_of_processes(launched, read_metrics):
    root = launched["root"]
    dm.main(["--resume", str(root / "two-then-one"), "--steps", "4"])
    for out in ("two-then-one", "one-then-two"):
        assert_close(read_metrics(root / out), read_metrics(root / "one-gdc"))   # = RUN


def test_a_killed_process_then_resume_gives_the_uninterrupted_run(launched, tmp_path,
                                                                  read_metrics):
    """Process 1 is SIGKILLed at its 9th scoring, in step 3 (after the checkpoint of step 2):
    process 0 stops with one line (the rest of stderr is torchrun's report), and --resume, here on
    one process, ends as the whole run."""
    out = str(tmp_path / "killed")
    code, stdout, stderr = torchrun(tmp_path, [RUN + ["--out", out]], kill="1 9")
    assert code != 0 and "rank 0 exit 1" in stdout
    ours = [line for line in stderr.splitlines() if line.startswith("dpg_min.py:")]
    assert len(ours) == 1 and "[rank0]" not in stderr, stderr
    assert ours[0].startswith("dpg_min.py: stopped: process 0 of 2 lost the others")
    assert ours[0].endswith(f"Its last good checkpoint is {out}/checkpoint.pt: go on with "
                            f"--resume {out}")
    assert [r["step"] for r in read_metrics(out)][-1] < 4
    assert dm.read_checkpoint(out)["s"]["step"] == 2
    dm.main(["--resume", out])
    assert_close(read_metrics(out), read_metrics(launched["root"] / "one-gdc"))
