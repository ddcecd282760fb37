"""The checker's rarer paths, each in this process: Ctrl-C in the middle of a run, a case or a selection without the
profile asked for, an adapter file that is a copy of a module already imported from elsewhere, and the diagnosis of
RoPE dims in the other layout."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from mla_ref.config import load_preset
from mla_ref.conformance import reference_adapter as ref
from mla_ref.conformance.check import CheckInterrupted, check, load_adapter, run_case
from mla_ref.conformance.diagnose import signature
from mla_ref.conformance.selection import require_runnable
from mla_ref.errors import InputError
from mla_ref.golden.generate import default_golden_dir
from mla_ref.golden.manifest import read_manifest

KERNEL_CASE = "mla.core.paged/tiny/bs16-seed0"


def test_ctrl_c_during_a_case_keeps_the_report_of_the_cases_before_it():
    calls = []

    def core(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return ref.latent_attention_core(*args)
    with pytest.raises(CheckInterrupted) as interrupted:
        check(types.SimpleNamespace(latent_attention_core=core), "fp32", "mla.core")
    assert isinstance(interrupted.value, KeyboardInterrupt)  # Ctrl-C still ends whatever called check
    total = len([case_id for case_id in read_manifest(default_golden_dir() / "manifest.yaml")["cases"]
                 if case_id.startswith("mla.core")])
    assert total > 3 and interrupted.value.total == total
    assert str(interrupted.value) == f"interrupted after 2 of {total} cases"
    assert [case.status for case in interrupted.value.report.cases] == ["pass", "pass"]


def test_a_case_without_the_profile_is_skipped_saying_so():
    directory = default_golden_dir()
    entry = read_manifest(directory / "manifest.yaml")["cases"][KERNEL_CASE]
    entry = dict(entry, profiles={name: value for name, value in entry["profiles"].items() if name != "tf32"})
    result = run_case(ref, directory, KERNEL_CASE, entry, "tf32")
    assert (result.status, result.reason) == ("skip", "case has no tf32 profile")


def test_a_selection_whose_runnable_cases_lack_the_profile_checks_nothing_and_is_refused():
    cases = {"moe.route/a": {"entry_point": "moe_route", "profiles": {"fp32": {}}},
             "mla.core/b": {"entry_point": "latent_attention_core", "profiles": {"bf16": {}}}}
    only_routing = types.SimpleNamespace(moe_route=ref.moe_route)
    with pytest.raises(InputError, match=r"^profile: none of the 1 selected cases the adapter can run has a 'bf16' profile "
                                         r"\(GOLDEN.select\)$"):
        require_runnable(only_routing, "routing_adapter", cases, list(cases), "bf16")
    require_runnable(only_routing, "routing_adapter", cases, list(cases), "fp32")  # the case it can run has fp32: no error


def test_an_adapter_file_that_copies_an_imported_module_is_refused(tmp_path, monkeypatch):
    """``mla_ref/conformance/reference_adapter.py`` in another tree is not the module ``import`` gives: say so, never run the other."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # the loader puts the copy's root on sys.path
    package = tmp_path / "mla_ref" / "conformance"
    package.mkdir(parents=True)
    for folder in (package, package.parent):
        (folder / "__init__.py").write_text("", encoding="utf-8")
    copy = package / "reference_adapter.py"
    copy.write_text(open(ref.__file__, encoding="utf-8").read() + "\n# edited in this copy\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"^adapter: .*reference_adapter\.py is the module mla_ref\.conformance\.reference_adapter, "
                                         r"but .* is imported from .* \(another copy\): install this checkout"):
        load_adapter(str(copy))


@pytest.mark.parametrize("order", ["half-layout", "interleaved"])
def test_rope_dims_in_the_other_layout_are_named_a_layout_mix_up(order):
    """ROPE.7: interleaved pairs (0, 1), (2, 3), ... against halves [0, 2, ..., 1, 3, ...]; built here, not from rope.py."""
    config = load_preset("tiny")
    rope = config.qk_rope_head_dim
    halves = np.concatenate([np.arange(0, rope, 2), np.arange(1, rope, 2)])
    truth = np.random.default_rng(0).standard_normal((2, 3, rope))
    candidate = truth[..., halves] if order == "half-layout" else truth[..., np.argsort(halves)]
    assert signature("k_pe", candidate, truth, config) == [
        f"k_pe equals the truth with its rope dims in {order} order: RoPE layout (interleaved vs half) mix-up"]
    assert signature("k_pe", truth, truth, config) == []
    assert signature("k_pe", truth[..., ::-1], truth, config) == []  # another permutation is not a layout mix-up
