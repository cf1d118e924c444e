"""Run emitted scripts in forks of an interpreter that has already imported the training stack.

Every end-to-end test runs a generated ``train.py`` (or a shim around it) as its own process.
Importing torch, transformers, peft, trl, datasets and bitsandbytes takes about 7 CPU-seconds
on the 2-core CI machine, more than training a tiny model for two steps, and the suite starts
some sixty such processes. Here one server process per pytest worker imports the stack once
and ``fork()``s a child per script: the child changes directory, takes the request's
environment and ``sys.argv``, sends stdout / stderr to files and runs the script with
``runpy.run_path(..., run_name="__main__")``, so the script runs unchanged, in its own process
and with a fresh module namespace (a missing import in the script still fails).

What a fork cannot reproduce is what the stack did at import time: environment variables that
a library reads when it is imported (``HF_HUB_OFFLINE``, ``TQDM_DISABLE``, ``OMP_*``, ...).
The server starts with :data:`SERVER_ENV`; a request whose environment differs from it in a
variable with one of :data:`IMPORT_TIME_PREFIXES` runs cold, as ``python script.py`` in a fresh
interpreter, and so does any request with ``cold=True`` (each end-to-end module keeps at least
one cold run, so the real start-up path stays tested).
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

# Variables the server's libraries read when they are imported: a request that changes one of
# these cannot reuse the warm imports.
IMPORT_TIME_PREFIXES = (
    "HF_",
    "HUGGINGFACE",
    "TRANSFORMERS",
    "DATASETS",
    "ACCELERATE",
    "TOKENIZERS",
    "TQDM",
    "TORCH",
    "PYTORCH",
    "CUDA",
    "OMP_",
    "MKL_",
    "BNB_",
    "PYTHON",
)

# Variables with an import-time prefix that the stack reads only at run time, which a test
# process may have picked up from an import after the server started: deepspeed's
# ``__init__`` sets PYTORCH_NVML_BASED_CUDA_CHECK, which torch reads at each CUDA check.
READ_AT_RUN_TIME = frozenset({"PYTORCH_NVML_BASED_CUDA_CHECK"})

# The environment every end-to-end test gives its scripts: the hub offline, no progress bars.
SCRIPT_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
SERVER_ENV = {**os.environ, **SCRIPT_ENV}

SERVER_CODE = r"""
import atexit, json, os, runpy, sys, traceback

# The stack every emitted script imports (trl's trainers are lazy attributes: touch them).
import torch, transformers, peft, trl, datasets, accelerate, bitsandbytes  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: F401
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer  # noqa: F401

protocol_out = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # stray prints of the server never reach the pipe
protocol_out.write(json.dumps(dict(os.environ)) + "\n")  # what the imports left set


def child(request):
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    os.dup2(os.open(request["stdout"], flags), 1)
    os.dup2(os.open(request["stderr"], flags), 2)
    argv = request["argv"]
    sys.argv = list(argv)
    sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))  # as `python script.py` sets it
    code = 0
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


for line in sys.stdin:
    request = json.loads(line)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        child(request)
    protocol_out.write(json.dumps({"pid": pid}) + "\n")
    _, status = os.waitpid(pid, 0)
    protocol_out.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
"""


class _Server:
    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVER_CODE],
            env=SERVER_ENV,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        atexit.register(self.close)
        assert self.process.stdout is not None
        # The environment after the imports: they set some variables themselves (torch's
        # inductor cache folder), which a request may carry without needing a cold start.
        self.imported_env: dict[str, str] = json.loads(self.process.stdout.readline())

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            self.process.wait(timeout=30)

    def _reply(self, deadline_s: float) -> dict[str, int]:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], deadline_s)
        if not ready:
            raise TimeoutError
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the warm Python server died")
        reply: dict[str, int] = json.loads(line)
        return reply

    def run(
        self, argv: list[str], cwd: Path, env: dict[str, str], timeout_s: float
    ) -> subprocess.CompletedProcess[str]:
        assert self.process.stdin is not None
        with tempfile.TemporaryDirectory() as folder:
            stdout, stderr = Path(folder, "stdout"), Path(folder, "stderr")
            request = {
                "argv": argv,
                "cwd": str(cwd),
                "env": env,
                "stdout": str(stdout),
                "stderr": str(stderr),
            }
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            pid = self._reply(30)["pid"]
            try:
                returncode = self._reply(timeout_s)["returncode"]
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                self._reply(30)
                raise subprocess.TimeoutExpired(argv, timeout_s) from None
            return subprocess.CompletedProcess(
                argv,
                returncode,
                stdout.read_text(encoding="utf-8", errors="replace"),
                stderr.read_text(encoding="utf-8", errors="replace"),
            )


_server: _Server | None = None


def _needs_cold_start(env: dict[str, str], imported_env: dict[str, str]) -> bool:
    """Whether ``env`` differs from the server's in a variable read at import time (one the
    server's own imports set, to the same value, does not count)."""
    keys = env.keys() | SERVER_ENV.keys() | imported_env.keys()
    changed = {
        key
        for key in keys
        if env.get(key) != SERVER_ENV.get(key) and env.get(key) != imported_env.get(key)
    }
    return any(key.startswith(IMPORT_TIME_PREFIXES) for key in changed - READ_AT_RUN_TIME)


def run_python(
    *args: str | Path,
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout_s: float = 600,
    cold: bool = False,
) -> subprocess.CompletedProcess[str]:
    """``python ARGS...`` in ``cwd`` with ``env`` (default: this process's environment plus
    :data:`SCRIPT_ENV`), output captured as text, never raising on a non-zero exit: the same
    result as ``subprocess.run([sys.executable, *args], ...)``, from a warm fork unless the
    environment or ``cold`` asks for a fresh interpreter."""
    global _server
    argv = [str(arg) for arg in args]
    environment = dict(SERVER_ENV if env is None else env)
    if not cold and (_server is None or _server.process.poll() is not None):
        _server = _Server()
    if cold or _server is None or _needs_cold_start(environment, _server.imported_env):
        return subprocess.run(
            [sys.executable, *argv],
            cwd=cwd,
            env=environment,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    return _server.run(argv, cwd, environment, timeout_s)
