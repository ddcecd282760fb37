"""``pytest --pyargs mla_ref.conformance`` (the README's plug-in entry) run as a user runs it: on the reference adapter,
on a broken adapter, and on a broken golden folder, each in its own pytest process."""

from __future__ import annotations

import os
import subprocess
import sys

from mla_ref.golden.generate import default_golden_dir
from mla_ref.golden.manifest import read_manifest

BROKEN = '''
from mla_ref.conformance import reference_adapter as ref

def latent_attention_core(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal):
    result = ref.latent_attention_core(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal)
    return {"out": result["out"], "lse": result["lse"] * 1.01}
'''


def run_suite(tmp_path, adapter: str, **environment: str) -> tuple[int, str]:
    env = {**os.environ, "MLA_REF_ADAPTER": adapter, **environment}
    env.pop("PYTEST_ADDOPTS", None)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--pyargs", "mla_ref.conformance"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr


def selected(pattern: str) -> list[str]:
    return [case_id for case_id in read_manifest(default_golden_dir() / "manifest.yaml")["cases"] if pattern in case_id]


def test_the_reference_adapter_passes_every_selected_case(tmp_path):
    status, output = run_suite(tmp_path, "mla_ref.conformance.reference_adapter", MLA_REF_SELECT="mla.core.paged", MLA_REF_PROFILE="bf16")
    # the cases and test_the_selection_checks_something
    assert status == 0 and f"{len(selected('mla.core.paged')) + 1} passed in" in output, output


def test_a_broken_adapter_fails_its_cases_with_the_diagnosis_and_the_repro(tmp_path):
    (tmp_path / "broken_adapter.py").write_text(BROKEN, encoding="utf-8")
    path = os.pathsep.join([str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])])
    status, output = run_suite(tmp_path, "broken_adapter", MLA_REF_SELECT="tiny/bs", MLA_REF_PROFILE="bf16", PYTHONPATH=path)
    assert status == 1 and f"{len(selected('tiny/bs'))} failed" in output, output
    assert "lse is 1.0100 x the truth" in output and "mla-ref check broken_adapter --profile bf16 --select" in output, output


def test_a_missing_manifest_or_an_empty_selection_is_an_error_not_an_empty_run(tmp_path):
    status, output = run_suite(tmp_path, "mla_ref.conformance.reference_adapter", MLA_REF_GOLDEN_DIR=str(tmp_path))
    assert status == 1 and "manifest is missing" in output and "1 failed" in output, output
    status, output = run_suite(tmp_path, "mla_ref.conformance.reference_adapter", MLA_REF_SELECT="no.such.case")
    assert status == 1 and "no.such.case" in output and "1 failed" in output, output
