"""The graders' measure: a catalogue of plausible student mistakes, each of which must be rejected.

Every entry is `(script, grading command, old snippet, new snippet, what the mistake is)`. The
old snippet occurs exactly once in the script; replacing it with the new one gives code that still
runs and keeps every shape right, but is wrong. The grading command is one of the exercise
commands listed in the script's docstring (`Exercises`). For each entry this program copies the
repository to a temporary folder, applies the mistake there, runs the command and prints

    rejected   the command failed: the tests caught the mistake (what a teacher needs)
    ACCEPTED   the command passed: a plausible wrong answer gets full marks (a missing test)
    stale      the old snippet is not in the script exactly once, the command is not in the
               script's Exercises, it selects no test, or it fails on the unchanged code

and last `wrong answers rejected K/N`; it exits non-zero when any entry is accepted or stale.

With `--blank` it checks the other promise of the course instead: for every re-implement exercise
in EXERCISES, blanking its functions (body replaced by `raise NotImplementedError`) makes its own
grading command fail, keeps the test file collectable, and fails no test that another exercise of
the same script grades with (tests of the whole model, such as the smoke run, may fail).

    python tests/wrong_answers.py                 # the whole catalogue (about 2 jobs at a time)
    python tests/wrong_answers.py --only mae      # one script's entries
    python tests/wrong_answers.py --blank         # the blanking check
"""
import argparse, ast, os, re, shlex, shutil, subprocess, sys, tempfile, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (script, grading command, old snippet, new snippet, what the mistake is)
WRONG = []

# (script, functions to blank, grading command): the re-implement exercises
EXERCISES = []

# while the course is being written, each script's entries may sit in tests/wa_<script>.py
for _f in sorted((ROOT / "tests").glob("wa_*.py")):
    _ns = {}
    exec(compile(_f.read_text(), str(_f), "exec"), _ns)
    WRONG += _ns.get("WRONG", [])
    EXERCISES += _ns.get("EXERCISES", [])

# ------------------------------------------------------------------ the machinery


def _copy_repo(dst):
    """The scripts, tests and pytest.ini: what a grading command reads (no runs/, no .git)."""
    for p in ROOT.iterdir():
        if p.suffix == ".py" or p.name == "pytest.ini":
            shutil.copy2(p, dst / p.name)
    shutil.copytree(ROOT / "tests", dst / "tests",
                    ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache"))


def _argv(command, extra=()):
    argv = shlex.split(command)
    if argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    return argv + list(extra)


def _env(jobs):
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env["PYTEST_ADDOPTS"] = "-x -q -p no:cacheprovider"
    if jobs > 1:  # one thread per job: two jobs on two cores, not four threads fighting
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run(command, cwd, jobs, timeout, extra=()):
    try:
        r = subprocess.run(_argv(command, extra), cwd=cwd, env=_env(jobs), capture_output=True,
                           text=True, timeout=timeout)
        return r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired:
        return "timeout", ""


def _script_text(script):
    return (ROOT / f"{script}.py").read_text()


def _stale_reason(script, command, old):
    text = _script_text(script)
    n = text.count(old)
    if n != 1:
        return f"old snippet found {n} times in {script}.py"
    doc = ast.get_docstring(ast.parse(text)) or ""
    if command not in doc:
        return f"command not in {script}.py's docstring: {command}"
    return None


def _clean_check(commands, jobs, timeout):
    """Each distinct grading command must select tests and pass on the unchanged code."""
    bad = {}
    with tempfile.TemporaryDirectory() as tmp:
        _copy_repo(Path(tmp))
        def one(cmd):
            rc, out = _run(cmd, tmp, jobs, timeout)
            if rc == 5:
                return cmd, "selects no test"
            if rc != 0:
                return cmd, f"fails on the unchanged code (exit {rc})"
            return cmd, None
        with ThreadPoolExecutor(jobs) as pool:
            for cmd, why in pool.map(one, sorted(commands)):
                if why:
                    bad[cmd] = why
    return bad


def check_wrong(entries, jobs, timeout):
    bad_cmds = _clean_check({e[1] for e in entries}, jobs, timeout)

    def one(entry):
        script, command, old, new, what = entry
        why = _stale_reason(script, command, old) or bad_cmds.get(command)
        if why:
            return "stale", entry, why
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            _copy_repo(tmp)
            path = tmp / f"{script}.py"
            path.write_text(path.read_text().replace(old, new, 1))
            rc, out = _run(command, tmp, jobs, timeout)
        if rc == "timeout":
            return "rejected", entry, "timed out"
        if rc == 5:
            return "stale", entry, "the mistake makes the command select no test"
        return ("ACCEPTED" if rc == 0 else "rejected"), entry, ""

    t0, counts = time.time(), {"rejected": 0, "ACCEPTED": 0, "stale": 0}
    with ThreadPoolExecutor(jobs) as pool:
        for verdict, (script, command, old, new, what), why in pool.map(one, entries):
            counts[verdict] += 1
            print(f"{verdict:9s} {script:9s} {what}" + (f"  [{why}]" if why else ""), flush=True)
    n = len(entries)
    print(f"({time.time() - t0:.0f} s)")
    print(f"wrong answers rejected {counts['rejected']}/{n}")
    return counts["rejected"] == n


# ---- blanking: a re-implement exercise's functions replaced by `raise NotImplementedError`

def blank(text, names):
    """The source with each named function's (or Class.method's) body replaced by a raise."""
    tree, lines = ast.parse(text), text.split("\n")
    spans = []
    def visit(body, prefix):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and prefix + node.name in names:
                first = node.body[0]
                keep_doc = isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) \
                    and isinstance(first.value.value, str)
                start = node.body[1].lineno if keep_doc and len(node.body) > 1 else (
                    first.end_lineno + 1 if keep_doc else first.lineno)
                indent = " " * first.col_offset
                spans.append((start, node.end_lineno, indent, prefix + node.name))
            elif isinstance(node, ast.ClassDef):
                visit(node.body, prefix + node.name + ".")
    visit(tree.body, "")
    missing = set(names) - {s[3] for s in spans}
    if missing:
        raise KeyError(", ".join(sorted(missing)))
    for start, end, indent, name in sorted(spans, reverse=True):
        lines[start - 1:end] = [f'{indent}raise NotImplementedError("exercise: {name}")']
    return "\n".join(lines)


def _failing_tests(command, cwd, jobs, timeout):
    env = _env(jobs)
    env["PYTEST_ADDOPTS"] = "-p no:cacheprovider -rfE"
    try:
        r = subprocess.run(_argv(command), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, set()
    failed = set(re.findall(r"^(?:FAILED|ERROR) (\S+)", r.stdout, re.M))
    return r.returncode, {f.split(" ")[0] for f in failed}


def _selected(command, cwd, jobs, timeout):
    env = _env(jobs)
    env["PYTEST_ADDOPTS"] = "-p no:cacheprovider"  # with pytest.ini's -q: one node id a line
    r = subprocess.run(_argv(command, ["--collect-only"]), cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=timeout)
    return {line.strip() for line in r.stdout.splitlines() if "::" in line}


def check_blank(exercises, jobs, timeout):
    """Blanking one exercise must fail its own command and no test that another exercise grades
    with (tests outside every exercise, the smoke run say, may fail: they use the whole model)."""
    with tempfile.TemporaryDirectory() as tmp:
        _copy_repo(Path(tmp))
        with ThreadPoolExecutor(jobs) as pool:
            selected = dict(zip(range(len(exercises)),
                                pool.map(lambda ex: _selected(ex[2], tmp, jobs, timeout), exercises)))

    def one(i):
        script, names, command = exercises[i]
        own = selected[i]
        others = set().union(*[selected[j] for j, e in enumerate(exercises) if e[0] == script and j != i])
        if not own:
            return "stale", exercises[i], "the command selects no test"
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            _copy_repo(tmp)
            path = tmp / f"{script}.py"
            try:
                path.write_text(blank(path.read_text(), names))
            except KeyError as e:
                return "stale", exercises[i], f"no function {e} in {script}.py"
            rc, _ = _failing_tests(command, tmp, jobs, timeout)
            if rc == 0:
                return "BAD", exercises[i], "the blanked functions pass their own grading command"
            rc, failed = _failing_tests(f"python -m pytest tests/test_{script}.py", tmp, jobs, timeout)
            if rc is None:
                return "BAD", exercises[i], "the test file timed out"
            if rc not in (0, 1):
                return "BAD", exercises[i], f"the test file did not run (exit {rc}): collection broke"
            broken = sorted((failed & others) - own)
            if broken:
                return "BAD", exercises[i], "breaks other exercises' tests: " + ", ".join(broken)
        n_own = len(failed & own)
        return "ok", exercises[i], f"{n_own} of its {len(own)} tests fail, {len(failed) - n_own} outside any exercise"

    good, t0 = 0, time.time()
    with ThreadPoolExecutor(jobs) as pool:
        for verdict, (script, names, command), why in pool.map(one, range(len(exercises))):
            good += verdict == "ok"
            print(f"{verdict:6s} {script:9s} {', '.join(names)}  [{why}]", flush=True)
    print(f"({time.time() - t0:.0f} s)")
    print(f"blanked exercises isolated {good}/{len(exercises)}")
    return good == len(exercises)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=None, help="one script's entries (e.g. mae)")
    p.add_argument("--blank", action="store_true", help="check that blanked exercises fail only their own tests")
    p.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    p.add_argument("--timeout", type=float, default=600)
    a = p.parse_args(argv)
    if a.blank:
        exs = [e for e in EXERCISES if a.only in (None, e[0])]
        ok = check_blank(exs, a.jobs, a.timeout)
    else:
        entries = [e for e in WRONG if a.only in (None, e[0])]
        if not entries:
            sys.exit(f"error: no wrong answers for {a.only!r}")
        ok = check_wrong(entries, a.jobs, a.timeout)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
