"""The warm runner the end-to-end tests start scripts with gives what ``python script.py`` gives.

The oracle is a fresh interpreter (``cold=True``): for each probe script, the warm fork's exit
code, stdout and stderr must equal the cold run's, so a test that passes warm would pass as
the user runs the script.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from warm_python import SCRIPT_ENV, run_python

PROBE = textwrap.dedent(
    """\
    import os, sys
    from pathlib import Path

    print("preloaded", "trl" in sys.modules, file=sys.stderr)  # the warm fork's imports
    print("name", __name__)
    print("argv", sys.argv[1:])
    print("cwd", Path.cwd().name)
    print("path0", Path(sys.path[0]).name)
    print("file", Path(__file__).name)
    print("probe", os.environ.get("PROBE_VALUE"))
    import helper  # beside the script: found through sys.path[0], as `python probe.py` does
    print("helper", helper.VALUE)
    sys.stdout.flush()
    print("to stderr", file=sys.stderr)
    mode = sys.argv[1]
    if mode == "exit-3":
        sys.exit(3)
    if mode == "exit-text":
        sys.exit("stopped: a message")
    if mode == "raise":
        raise ValueError("boom")
    """
)


@pytest.mark.parametrize("mode", ["ok", "exit-3", "exit-text", "raise"])
def test_a_warm_run_matches_a_fresh_interpreter(tmp_path: Path, mode: str) -> None:
    # Whatever the other tests in this worker imported first (imports may set variables in
    # this process's environment, which every script's environment copies): import it all.
    import deepspeed  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    scripts, elsewhere = tmp_path / "scripts", tmp_path / "elsewhere"
    scripts.mkdir()
    elsewhere.mkdir()
    (scripts / "probe.py").write_text(PROBE, encoding="utf-8")
    (scripts / "helper.py").write_text("VALUE = 42\n", encoding="utf-8")
    env = {**os.environ, **SCRIPT_ENV, "PROBE_VALUE": "seen"}

    warm = run_python(scripts / "probe.py", mode, cwd=elsewhere, env=env)
    cold = run_python(scripts / "probe.py", mode, cwd=elsewhere, env=env, cold=True)

    assert (warm.returncode, warm.stdout) == (cold.returncode, cold.stdout)
    # Tracebacks name the frames that ran the script; the last lines are the error itself.
    assert warm.stderr.splitlines()[-1:] == cold.stderr.splitlines()[-1:]
    assert "preloaded True" in warm.stderr and "preloaded False" in cold.stderr
    assert "name __main__" in warm.stdout and "helper 42" in warm.stdout
    assert warm.returncode == {"ok": 0, "exit-3": 3, "exit-text": 1, "raise": 1}[mode]
