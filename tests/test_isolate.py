"""``--isolate`` (mla_ref/conformance/isolate.py): one adapter call in a child process, and how each way it can go wrong is told.

Each test makes one tiny call (``moe_route`` with a 2 x 3 ``hidden``); the adapter's behaviour is
picked by the call's config, so one adapter file serves every test. A hang, a crash and an exit
need a real child process (about half a second each); what the child does once it runs (load the
adapter, call it, write outputs or the error) runs in this process, through the same files, for
speed. A child process returning outputs that the checker judges is
test_checker_trust.py::test_isolated_outputs_are_judged_as_in_process_ones; the whole check run
through hostile kernels (a hang with a 10 s limit among passing cases) is the slow
test_checker_trust.py::test_isolation_turns_a_hang_a_crash_and_an_exit_into_failed_cases.
"""

from __future__ import annotations

import math
import textwrap
import types

import numpy as np
import pytest

from mla_ref.conformance import isolate, reference_adapter
from mla_ref.conformance.check import load_adapter
from mla_ref.conformance.isolate import STDERR_TAIL, ConvertedOutputs, IsolatedFailure, adapter_reference, isolated_caller
from mla_ref.errors import InputError

ADAPTER = textwrap.dedent("""
    import os
    import signal
    import sys
    import time

    import numpy as np

    def moe_route(config, weights, hidden):
        behaviour = config["behaviour"]
        if behaviour == "hang":
            time.sleep(60)
        if behaviour == "crash":
            print("kernel: illegal memory access", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGSEGV)
        if behaviour == "exit":
            print("x" * 3000 + " last words", file=sys.stderr, flush=True)
            os._exit(3)
        if behaviour == "raise":
            raise ValueError("no kernel for this shape")
        if behaviour == "sys.exit":
            sys.exit(2)
        if behaviour == "list":
            return [hidden]
        return {"doubled": hidden * 2, "scale": config["scale"], "weight_sum": weights["gate.weight"].sum(),
                "half": hidden.astype(np.float16), "ragged": [[1.0], [2.0, 3.0]]}
""")
HIDDEN = np.arange(6, dtype=np.float32).reshape(2, 3)


@pytest.fixture(scope="module")
def adapter_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("isolate") / "hostile_adapter.py"
    path.write_text(ADAPTER, encoding="utf-8")
    return str(path)


@pytest.fixture
def child_in_this_process(monkeypatch):
    """The child's work (isolate.child on the call's folder) done in this process instead of a new one."""
    monkeypatch.setattr(isolate, "_run_child", lambda adapter, work, limit: isolate.child(adapter, work))


def run_isolated(adapter_path: str, behaviour: str, timeout: float = 60.0) -> ConvertedOutputs:
    entry = {"entry_point": "moe_route", "args": {}, "config": {"behaviour": behaviour, "scale": 0.5}}
    case = {"input": {"hidden": HIDDEN}, "weight": {"gate.weight": np.ones((4, 3))}}
    return isolated_caller(adapter_path, timeout)(None, entry, case)


def test_outputs_come_back_converted_with_their_dtypes_and_the_unconvertible_named(adapter_path, child_in_this_process):
    outputs = run_isolated(adapter_path, "ok")
    assert isinstance(outputs, ConvertedOutputs)
    np.testing.assert_array_equal(outputs["doubled"], HIDDEN * 2)  # the inputs crossed to the child unchanged
    assert outputs["doubled"].dtype == np.float32 and outputs["half"].dtype == np.float16
    assert float(outputs["scale"]) == 0.5 and float(outputs["weight_sum"]) == 12.0  # the config and the weights did too
    assert outputs.source_dtypes == {"doubled": "float32", "scale": "float", "weight_sum": "float64", "half": "float16"}
    assert set(outputs) == {"doubled", "scale", "weight_sum", "half"}
    assert list(outputs.unconvertible) == ["ragged"] and outputs.unconvertible["ragged"].startswith("ValueError: a ragged nested list")


@pytest.mark.parametrize("behaviour, expected", [
    ("raise", "adapter raised ValueError: no kernel for this shape (at hostile_adapter.py:"),
    ("sys.exit", "adapter called sys.exit(2) (raised SystemExit): an adapter returns its outputs, it never exits"),
    ("list", "adapter returned list, expected a dict of arrays"),
])
def test_an_adapter_that_raises_exits_or_returns_no_dict_fails_saying_which(adapter_path, child_in_this_process, behaviour,
                                                                           expected):
    with pytest.raises(IsolatedFailure) as failure:
        run_isolated(adapter_path, behaviour)
    assert expected in str(failure.value)


@pytest.mark.parametrize("behaviour, expected", [
    ("hang", "adapter timed out after 0.5 s (--timeout)"),
    ("crash", "adapter process killed by signal SIGSEGV (a crash inside the adapter); stderr: kernel: illegal memory access"),
])
def test_a_hang_and_a_crash_of_the_child_fail_saying_which(adapter_path, behaviour, expected):
    with pytest.raises(IsolatedFailure) as failure:
        run_isolated(adapter_path, behaviour, timeout=0.5 if behaviour == "hang" else 60.0)
    assert expected in str(failure.value)


def test_a_child_that_exits_without_outputs_keeps_the_tail_of_its_stderr(adapter_path):
    with pytest.raises(IsolatedFailure) as failure:
        run_isolated(adapter_path, "exit")
    message = str(failure.value)
    assert message.startswith("adapter process exited with status 3 without returning outputs; stderr: ...")
    stderr = message.partition("; stderr: ...")[2]
    assert stderr.endswith(" last words") and len(stderr) == STDERR_TAIL  # the last STDERR_TAIL characters, not the first


@pytest.mark.parametrize("timeout", [0, -1.0, math.nan], ids=["zero", "negative", "nan"])
def test_a_timeout_that_is_not_a_positive_number_is_refused(timeout):
    with pytest.raises(InputError, match=r"timeout: expected a positive number of seconds, got .* \(GOLDEN.isolate\)"):
        isolated_caller("mla_ref.conformance.reference_adapter", timeout)


def test_the_child_loads_the_adapter_by_the_name_or_path_it_was_given(adapter_path):
    assert adapter_reference("my_adapter:ADAPTER") == "my_adapter:ADAPTER"
    assert adapter_reference(reference_adapter) == "mla_ref.conformance.reference_adapter"
    assert adapter_reference(load_adapter(adapter_path)) == adapter_path  # a file loaded by path: the child loads the file
    with pytest.raises(InputError, match=r"adapter: --isolate needs an adapter given by module name or path, got a "
                                         r"SimpleNamespace object \(GOLDEN.isolate\)"):
        adapter_reference(types.SimpleNamespace(moe_route=reference_adapter.moe_route))


def test_an_isolated_failure_is_the_case_reason_as_it_is_not_wrapped_as_an_exception_of_the_adapter():
    """run_case reports a child's failure (crash, timeout, exit) in the words isolate.py chose, once."""
    from mla_ref.conformance.check import load_case, run_case
    from mla_ref.golden.generate import default_golden_dir
    from mla_ref.golden.manifest import read_manifest
    case_id = "moe.route.v3/tiny/seed0"
    entry = read_manifest(default_golden_dir() / "manifest.yaml")["cases"][case_id]
    message = "adapter process killed by signal SIGSEGV (a crash inside the adapter); stderr: kernel: illegal memory access"

    def crashed(module, entry, case):
        raise IsolatedFailure(message)
    result = run_case(reference_adapter, default_golden_dir(), case_id, entry, "fp32", caller=crashed,
                      case=load_case(default_golden_dir(), entry))
    assert (result.status, result.reason) == ("fail", message)
