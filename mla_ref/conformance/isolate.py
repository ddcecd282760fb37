"""``mla-ref check --isolate``: each adapter call in a child process, so a hang or a crash fails one case.

The parent writes the call's arguments to a temporary folder (``args.npz`` without pickles,
``call.json``), runs ``python -m mla_ref.conformance.isolate ADAPTER FOLDER`` with a time
limit, and reads back ``outputs.npz`` and ``result.json``. A child that times out, dies on a
signal (a segfault, an illegal memory access that kills the process) or exits without a
result fails its case with the tail of its stderr; the next case starts a fresh process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import InputError
from .arrays import as_array
from .protocol import call, parameters

STDERR_TAIL = 2000  # characters of a failed child's stderr kept in the case's reason
DEFAULT_TIMEOUT = 600.0


class IsolatedFailure(Exception):
    """The child process did not return outputs; the message says why (raised, timed out, crashed)."""


class ConvertedOutputs(dict):
    """Outputs already converted to NumPy in the child, with the dtype names they came in and why others could not be."""

    def __init__(self, arrays: Mapping[str, np.ndarray], source_dtypes: Mapping[str, str], unconvertible: Mapping[str, str]):
        super().__init__(arrays)
        self.source_dtypes = dict(source_dtypes)
        self.unconvertible = dict(unconvertible)


def adapter_reference(adapter: Any) -> str:
    """What a child process loads the adapter from: its name or path (an adapter object cannot cross a process)."""
    if isinstance(adapter, str):
        return adapter
    if isinstance(adapter, types.ModuleType):
        file = getattr(adapter, "__file__", None)
        if adapter.__name__.startswith("mla_ref_adapter_") and file:  # loaded from a path by load_adapter
            return file
        return adapter.__name__
    raise InputError("adapter", f"--isolate needs an adapter given by module name or path, got a {type(adapter).__name__} object",
                     "GOLDEN.isolate")


def isolated_caller(adapter: str, timeout: float | None):
    """A drop-in for the checker's in-process call: same arguments, outputs computed in a child process."""
    limit = DEFAULT_TIMEOUT if timeout is None else float(timeout)
    if not limit > 0:
        raise InputError("timeout", f"expected a positive number of seconds, got {timeout!r}", "GOLDEN.isolate")

    def run(module, entry: dict, case: dict) -> ConvertedOutputs:
        arrays = {f"input:{name}": value for name, value in case["input"].items()}
        arrays.update({f"weight:{name}": value for name, value in case["weight"].items()})
        with tempfile.TemporaryDirectory(prefix="mla-ref-isolate-") as folder:
            work = Path(folder)
            np.savez(work / "args.npz", **arrays)
            (work / "call.json").write_text(json.dumps({"entry_point": entry["entry_point"], "args": entry["args"],
                                                        "config": entry["config"]}), encoding="utf-8")
            _run_child(adapter, work, limit)
            return _read_result(work)
    return run


def _run_child(adapter: str, work: Path, limit: float) -> None:
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), *sys.path]))
    process = subprocess.Popen([sys.executable, "-m", "mla_ref.conformance.isolate", adapter, str(work)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=environment, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        _, stderr = process.communicate()
        raise IsolatedFailure(f"adapter timed out after {limit:g} s (--timeout){_tail(stderr)}") from None
    if (work / "result.json").is_file():
        return
    if process.returncode < 0:
        name = signal.Signals(-process.returncode).name if -process.returncode in signal.valid_signals() else str(-process.returncode)
        raise IsolatedFailure(f"adapter process killed by signal {name} (a crash inside the adapter){_tail(stderr)}")
    raise IsolatedFailure(f"adapter process exited with status {process.returncode} without returning outputs{_tail(stderr)}")


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _tail(stderr: bytes) -> str:
    text = stderr.decode("utf-8", "replace").strip()
    if not text:
        return ""
    return "; stderr: " + ("..." + text[-STDERR_TAIL:] if len(text) > STDERR_TAIL else text)


def _read_result(work: Path) -> ConvertedOutputs:
    result = json.loads((work / "result.json").read_text(encoding="utf-8"))
    if "error" in result:
        raise IsolatedFailure(result["error"])
    with np.load(work / "outputs.npz", allow_pickle=False) as stored:
        arrays = {name: stored[key] for key, name in result["names"].items()}
    return ConvertedOutputs(arrays, result["source_dtypes"], result["unconvertible"])


def child(adapter_name: str, work: Path) -> None:
    """In the child: load the adapter, call the entry point, write the converted outputs (or the exception) to ``work``."""
    from .check import adapter_failure, load_adapter
    request = json.loads((work / "call.json").read_text(encoding="utf-8"))
    with np.load(work / "args.npz", allow_pickle=False) as stored:
        arrays = {key: stored[key] for key in stored.files}
    available = {name.partition(":")[2]: value for name, value in arrays.items() if name.startswith("input:")}
    available.update(request["args"])
    available["config"] = request["config"]
    available["weights"] = {name.partition(":")[2]: value for name, value in arrays.items() if name.startswith("weight:")}
    entry_point = request["entry_point"]
    try:
        module = load_adapter(adapter_name)
        produced = call(getattr(module, entry_point), entry_point, {name: available[name] for name in parameters(entry_point)})
    except (Exception, SystemExit) as error:  # noqa: BLE001 - reported as the case's failure
        _write(work, {"error": adapter_failure(error)})
        return
    if not isinstance(produced, Mapping):
        _write(work, {"error": f"adapter returned {type(produced).__name__}, expected a dict of arrays"})
        return
    converted, names, source_dtypes, unconvertible = {}, {}, {}, {}
    for index, (name, value) in enumerate(produced.items()):
        try:
            array, source_dtypes[str(name)] = as_array(value)
        except Exception as error:  # noqa: BLE001 - one bad output fails the case, in the parent
            unconvertible[str(name)] = f"{type(error).__name__}: {error}"
            continue
        converted[f"output{index}"], names[f"output{index}"] = array, str(name)
    np.savez(work / "outputs.npz", **converted)
    _write(work, {"names": names, "source_dtypes": source_dtypes, "unconvertible": unconvertible})


def _write(work: Path, result: dict) -> None:
    (work / "result.json").write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    child(sys.argv[1], Path(sys.argv[2]))
