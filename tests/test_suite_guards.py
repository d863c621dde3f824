"""The test suite's own guards (tests/conftest.py, pyproject's pytest options): a test that
leaves a child process running fails by name, and a hanging test ends the run."""

from __future__ import annotations

from pathlib import Path

pytest_plugins = ["pytester"]

LEAKS_A_CHILD = '''
import multiprocessing, time

def test_starts_a_worker_and_forgets_it():
    p = multiprocessing.Process(target=time.sleep, args=(120,), daemon=True, name="forgotten")
    p.start()

def test_starts_a_worker_and_joins_it():
    p = multiprocessing.Process(target=time.sleep, args=(0.1,), daemon=True)
    p.start()
    p.join()
'''


def test_a_child_process_left_running_fails_its_test(pytester):
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_leak=LEAKS_A_CHILD)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_starts_a_worker_and_forgets_it*",
                                 "*the test left 1 child process(es) running: forgotten (pid *)*"])


def test_a_hanging_test_ends_the_run_with_its_stack(pytester):
    pytester.makepyfile(test_hang='''
import threading


def test_waits_forever():
    threading.Event().wait()
''')
    ini = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    ini = ini[ini.index("[tool.pytest.ini_options]"):].replace('testpaths = ["tests"]', "")
    assert "\ntimeout = 600\n" in ini  # the project's limit, shortened here to 2 s
    pytester.makefile(".toml", pyproject=ini.replace("\ntimeout = 600\n", "\ntimeout = 2\n"))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    assert result.ret != 0
    result.stdout.fnmatch_lines(["timeout method: thread"])
    result.stdout.fnmatch_lines(["*+ Timeout +*", "*, in test_waits_forever"])
