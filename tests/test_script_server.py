"""The tests' ScriptServer (tests/script_server.py) runs a script as `python script.py` does: same output, exit status,
working directory, argv, sys.path[0], environment and atexit handlers, for each way a script can end."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ScriptServer

PROBE = """import atexit, json, os, sys
atexit.register(lambda: print("atexit ran"))
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "name": __name__, "path0": sys.path[0],
                  "probe": os.environ.get("PROBE"), "main": sys.modules["__main__"].__dict__.get("MARK")}))
MARK = 1
mode = sys.argv[1]
if mode == "raise":
    raise ValueError("boom")
if mode == "message":
    sys.exit("error: a message")
if mode == "code":
    sys.exit(3)
"""


@pytest.mark.parametrize("mode", ["ok", "raise", "message", "code"])
def test_a_forked_run_is_a_run_of_its_own(mode, tmp_path, monkeypatch):
    (tmp_path / "lib").mkdir()
    script = tmp_path / "lib" / "probe.py"
    script.write_text(PROBE)
    monkeypatch.setenv("PROBE", "from the test")
    real = subprocess.run([sys.executable, str(script), mode, "b c"], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ))
    forked = ScriptServer.run(str(script), [mode, "b c"], tmp_path, dict(os.environ), timeout=60)
    assert forked.returncode == real.returncode == {"ok": 0, "raise": 1, "message": 1, "code": 3}[mode]
    assert forked.stdout == real.stdout
    seen = json.loads(forked.stdout.splitlines()[0])
    assert seen == {"argv": [str(script), mode, "b c"], "cwd": str(tmp_path), "name": "__main__",
                    "path0": str(tmp_path / "lib"), "probe": "from the test", "main": None}
    assert forked.stdout.splitlines()[-1] == "atexit ran"
    assert forked.stderr.splitlines()[-1:] == real.stderr.splitlines()[-1:]  # the error's line ("Traceback" above)
    assert ("Traceback" in forked.stderr) == ("Traceback" in real.stderr) == (mode == "raise")


def test_a_hung_run_times_out(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text("import time\ntime.sleep(600)\n")
    with pytest.raises(subprocess.TimeoutExpired):
        ScriptServer.run(str(script), [], tmp_path, dict(os.environ), timeout=2)
    (tmp_path / "ok.py").write_text("print('next')\n")  # the server goes on with the next run
    assert ScriptServer.run(str(tmp_path / "ok.py"), [], tmp_path, dict(os.environ), timeout=60).stdout == "next\n"
