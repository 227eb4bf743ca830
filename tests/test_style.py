"""The density rules of a readable reference (issue 18), held by `ast` and `tokenize` over every
Python file of the project, and the two programs' line budgets."""
import ast
import glob
import io
import os
import tokenize

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(os.path.relpath(p, ROOT) for pattern in ("*.py", "tests/*.py", "figures/*.py")
               for p in glob.glob(os.path.join(ROOT, pattern)))
# Issue 18 asked 900 for dpg_min.py; at these density rules, with every capability kept, it
# measured 1,040, and issues 19-21 (the run folder, torchrun, linear Self-BLEU, phase times) took
# it to 1,358.
# Issue 27 settled the size: the whole file within 1,440 (today's capabilities plus about 40 lines
# each for issues 28 and 29), and Part I, the method, a reader's path through the paper, within 700.
BUDGETS = {"dpg_min.py": 1440, "toy_exact.py": 700}
PART_II = "# === Part II: running it ==="       # the one line that ends Part I
PART_I_BUDGET = 700
MAX_PARAMS = {"dpg_min.py": 6}
PACKED = (ast.Tuple, ast.BoolOp, ast.IfExp,                     # written as statements, these pack
          ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)   # side effects in one line


def names_in(node):
    """The names that an expression reads or a target writes."""
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def allowed_lambdas(tree):
    """Lambdas passed straight to a call as a callback (LambdaLR's, a key=), never to dict()."""
    ok = set()
    for call in ast.walk(tree):
        to_dict = isinstance(call, ast.Call) and ast.unparse(call.func) == "dict"
        if isinstance(call, ast.Call) and not to_dict:
            ok |= {id(x) for x in call.args + [k.value for k in call.keywords]}
    return ok


def parallel_assignment_problem(node):
    """Why a tuple assignment is packing, or None. Allowed: a call's tuple return, UPPERCASE shape
    constants and a swap; never a target that is read on the right."""
    target = node.targets[0]
    value = node.value
    if not isinstance(target, ast.Tuple):
        return None
    written = names_in(target)
    read = names_in(value)
    if isinstance(value, ast.Tuple) and sorted(map(ast.unparse, value.elts)) == sorted(
            map(ast.unparse, target.elts)):
        return None                                                     # a swap
    if written & read:
        return f"a target is read on the right ({', '.join(sorted(written & read))})"
    constants = all(isinstance(t, ast.Name) and t.id.isupper() for t in target.elts)
    if isinstance(value, ast.Tuple) and not constants:
        return "unrelated values packed into one assignment"
    return None


def problems(name, root=ROOT):
    """Every breach of the rules in one file, as 'file:line: what' strings."""
    with open(os.path.join(root, name), encoding="utf-8") as f:
        source = f.read()
    lines = source.splitlines()
    tree = ast.parse(source)
    found = []
    for i, line in enumerate(lines, 1):
        if len(line) > 100:
            found.append(f"{name}:{i}: {len(line)} characters")
    # tokenize sees the statement separators that ast does not keep
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.OP and tok.string == ";":
            found.append(f"{name}:{tok.start[0]}: ';' joins two statements")
    lambdas_ok = allowed_lambdas(tree)
    for node in ast.walk(tree):
        where = f"{name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.stmt) and lines[node.lineno - 1][:node.col_offset].strip():
            found.append(f"{where}: a statement that does not start its line")
        if isinstance(node, ast.Expr) and isinstance(node.value, PACKED):
            found.append(f"{where}: a side effect written as an expression")
        if isinstance(node, ast.NamedExpr):
            found.append(f"{where}: walrus")
        if isinstance(node, ast.Lambda) and id(node) not in lambdas_ok:
            found.append(f"{where}: a lambda bound to a name or stored")
        if isinstance(node, ast.Lambda) and isinstance(node.body, ast.Tuple):
            found.append(f"{where}: a lambda packing side effects in a tuple")
        if isinstance(node, ast.Assign) and parallel_assignment_problem(node):
            found.append(f"{where}: {parallel_assignment_problem(node)}")
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and name in MAX_PARAMS:
            args = node.args
            n = len(args.posonlyargs + args.args + args.kwonlyargs)
            n += bool(args.vararg) + bool(args.kwarg)
            if n > MAX_PARAMS[name]:
                found.append(f"{where}: {node.name} takes {n} parameters")
    return found


def test_the_files_are_found():
    assert {"dpg_min.py", "toy_exact.py", "tests/test_style.py", "figures/plot.py"} <= set(FILES)


@pytest.mark.parametrize("name", FILES)
def test_every_line_reads_as_one_statement_of_at_most_100_characters(name):
    assert problems(name) == []


@pytest.mark.parametrize("name, most", BUDGETS.items())
def test_the_programs_stay_within_their_budget(name, most):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        assert len(f.read().splitlines()) <= most


def test_the_checker_catches_each_kind_of_packing(tmp_path):
    """Each rule on a file that breaks it once, so that the clean result above means something."""
    bad = ["x = 1; y = 2", "if x: y = 1", "f(), g()", "x and f()", "f() if x else None",
           "[f(i) for i in x]", "(y := 3)", "h = lambda v: v", "d = dict(k=lambda: 1)",
           "a, b = b + 1, 2", "a, b = 1, 2", "z = '" + "w" * 100 + "'"]
    for i, line in enumerate(bad):
        (tmp_path / f"bad{i}.py").write_text(line + "\n")
        assert problems(f"bad{i}.py", tmp_path), line
    good = ["B, T, K = 1, 2, 3", "a, b = b, a", "ids, logp = sample(x)",
            "s = sorted(x, key=lambda v: -v)"]
    (tmp_path / "good.py").write_text("\n".join(good) + "\n")
    assert problems("good.py", tmp_path) == []


def test_dpg_min_is_the_method_then_the_tool():
    """Part I (up to the one marker line) is the method, within its budget, and reads without Part
    II: no Part II constant or type appears in it, only Part II functions that it calls."""
    with open(os.path.join(ROOT, "dpg_min.py"), encoding="utf-8") as f:
        source = f.read()
    lines = source.splitlines()
    assert lines.count(PART_II) == 1
    marker = lines.index(PART_II) + 1
    assert marker - 1 <= PART_I_BUDGET
    tree = ast.parse(source)
    later = {}                                      # Part II's top-level names: kind by name
    for node in tree.body:
        if node.lineno > marker and isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            later[node.name] = "function" if isinstance(node, ast.FunctionDef) else "class"
        if node.lineno > marker and isinstance(node, ast.Assign):
            later.update({t.id: "constant" for t in node.targets if isinstance(t, ast.Name)})
    called = set()
    named = set()
    for node in tree.body:
        if node.lineno > marker:
            continue
        local = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)
                 and isinstance(n.ctx, ast.Store)}
        for sub in ast.walk(node):
            if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Name):
                called.add(sub.func.id)
            if isinstance(sub, ast.Name) and sub.id in later and sub.id not in local:
                named.add(sub.id)
    assert {n for n in named if later[n] != "function" or n not in called} == set()
    assert {"train", "sample", "q_check", "dpg_loss"} <= {
        n.name for n in tree.body if n.lineno < marker and isinstance(n, ast.FunctionDef)}
