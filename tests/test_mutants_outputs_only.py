"""The torch mutant zoo from outputs alone: with every intermediate stripped, how many mutants are rejected and named.

Most kernel authors return outputs only, so the diagnosis (mla_ref/conformance/diagnose.py)
must work without the ``STEP/name`` intermediates. Each mutant of tests/mutants/catalogue.yaml
runs at fp32 with its intermediates dropped; per level (kernel, layer, model) the test prints
how many mutants some case of that level rejects, how many of those get a name ("matches the
reference with this bug", a constant ratio or a layout signature) and which name, and how many
get "no known pattern". A name is only given 4x closer than the truth, so a wrong one is rare;
the printed table is the record. Needs PyTorch; slow.
"""

from __future__ import annotations

import functools
import types

import pytest

torch = pytest.importorskip("torch")

from mla_ref.conformance import check as check_module  # noqa: E402
from mla_ref.conformance.check import check  # noqa: E402
from mla_ref.conformance.protocol import entry_points  # noqa: E402
from mutants import mutate  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.slow]

PROFILE = "fp32"
LEVELS = ("kernel", "layer", "model")


CATALOGUE_NAMES = {  # mutant -> what its diagnosis must say first in some case it fails (the bug classes of issue 13)
    "missing_mscale_squared": "softmax scale without the YaRN m^2",
    "mscale_instead_of_mscale_all_dim": "softmax m read from mscale",
    "rope_amplitude_ignored": "cos/sin amplitude",
    "yarn_frequencies_missing": "YaRN frequencies not interpolated",
    "core_scale_576": "576^-0.5",
    "sparse_decode_scale_576": "576^-0.5",
    "sparse_prefill_scale_576": "576^-0.5",
    "sparse_lse_base_2": "LSE in base 2",
    "sparse_minus_one_attended": "-1 padding attended",
    "sparse_page_major_indices": "page-major",
    "absorbed_scale_576": "the latent row width",
    "causal_mask_off_by_one": "causal mask off by one (-1)",
    "causal_mask_top_left": "aligned top-left",
    "kv_norm_missing": "kv_a_layernorm skipped",
    "kv_norm_over_rope_part": "kv norm taken over [latent | rope]",
    "rope_layout_swapped": "RoPE pairs in the other layout",
    "lse_base_2": "LSE in base 2",
    "bias_ignored": "e_score_correction_bias ignored",
    "bias_in_the_weights": "e_score_correction_bias added to the routing weights",
    "no_renormalisation": "not renormalised",
    "routed_scale_missing": "routed_scaling_factor missing",
    "routed_scale_twice": "routed_scaling_factor applied twice",
    "group_max_instead_of_top2_sum": "the other group score rule",
    "group_top2_sum_for_v2": "the other group score rule",
    "mtp_concat_hidden_first": "MTP concat order swapped",
    "mtp_pre_norm_hidden": "mtp_hidden_source",
    "k_pe_per_head": "k_pe not shared across heads",
    "mtp_hnorm_missing": "MTP hnorm skipped",
    "mtp_enorm_missing": "MTP enorm skipped",
    "mtp_token_shift_off_by_one": "depth k embeds t_{i+k-1}",
    "mtp_token_shift_twice": "depth k embeds t_{i+k+1}",
    "mtp_norms_swapped": "MTP hnorm and enorm swapped",
    "cache_scales_read_as_bf16": "FP8 cache scales read as bf16",
    "cache_codes_read_as_fnuz": "FP8 cache codes read as e4m3fnuz",
    "cache_scales_fnuz_normalised": "FP8 cache scales doubled",
    "cache_rope_quantised": "FP8 cache rope part quantised",
    "cache_scales_reversed": "FP8 cache scales applied in reverse order",
    "cache_scales_after_rope": "FP8 cache scales read after the rope part",
    "dsa_index_cache_codes_read_as_fnuz": "indexer K cache codes read as e4m3fnuz",
    "dsa_index_cache_scale_fnuz_range": "indexer K cache scales from the FNUZ range",
    "dsa_index_cache_interleaved": "indexer K cache record token-interleaved",
}


def outputs_only(module) -> types.SimpleNamespace:
    """The adapter with every returned intermediate (``STEP/name``) dropped."""
    def stripped(function):
        def call(*args, **kwargs):
            return {name: value for name, value in function(*args, **kwargs).items() if "/" not in name}
        return call
    return types.SimpleNamespace(**{point: stripped(getattr(module, point)) for point in entry_points() if hasattr(module, point)})


@functools.lru_cache(maxsize=None)
def outputs_only_report(name: str | None):
    entry = None if name is None else mutate.mutant(name)
    return check(outputs_only(mutate.load(entry, "float32")), profile=PROFILE, select=(entry or {}).get("reaches"))


def named(diagnosis: list[str]) -> list[str]:
    return [text for text in diagnosis if not text.startswith("no known pattern")]


@pytest.fixture(scope="module", autouse=True)
def _manifest_parsed_once():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(check_module, "read_manifest", functools.lru_cache(maxsize=None)(check_module.read_manifest))
        yield
    torch.set_num_threads(threads)


def test_the_unpatched_adapter_passes_from_outputs_alone():
    report = outputs_only_report(None)
    assert report.ok, report.table()


def test_named_and_rejected_per_level_from_outputs_alone(capsys):
    """Per level: mutants rejected, named, "no known pattern"; a rejected case always says one or the other."""
    counts = {level: {"rejected": 0, "named": 0, "no known pattern": 0} for level in LEVELS}
    rows, silent = [], []
    for entry in (entry for entry in mutate.catalogue() if entry.get("profile") != "fp8"):  # FP8 mutants: fp8 profile only
        report = outputs_only_report(entry["name"])
        for level in LEVELS:
            failed = [case for case in report.cases if case.level == level and case.status == "fail"]
            if not failed:
                continue
            counts[level]["rejected"] += 1
            names = [text for case in failed for text in named(case.diagnosis)]
            counts[level]["named" if names else "no known pattern"] += 1
            silent += [f"{entry['name']}: {case.case_id}" for case in failed if not case.diagnosis and not case.reason.startswith("adapter raised")]
            rows.append(f"{entry['name']:38s} {level:7s} {len(failed):3d} cases  {names[0][:110] if names else 'no known pattern'}")
    with capsys.disabled():
        print(f"\nmutant zoo from outputs alone ({PROFILE}): mutant, level, failing cases, first name given")
        print("\n".join(rows))
        for level, count in counts.items():
            print(f"{level}: {count['rejected']} mutants rejected, {count['named']} named, {count['no known pattern']} no known pattern")
    assert not silent, f"failing cases with neither a name nor 'no known pattern': {silent}"


@pytest.mark.parametrize("mutant, name", sorted(CATALOGUE_NAMES.items()))
def test_catalogue_bug_is_named_first_from_outputs_alone(mutant, name):
    failed = [case for case in outputs_only_report(mutant).cases if case.status == "fail"]
    assert any(case.diagnosis and name in case.diagnosis[0] for case in failed), [(case.case_id, case.diagnosis[:1]) for case in failed]
