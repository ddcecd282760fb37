"""examples/hf_adapter.py (Hugging Face transformers' DeepSeek modules) through the checker: accepted in fp32 and
bf16, eager and sdpa attention, apart from the cases it declares unsupported; a broken variant rejected.

Slow (~20 s per mode on 2 cores) and skipped without transformers; the slow CI step installs the pinned
transformers==5.25.0. Run with ``pytest -m transformers``.

No waiver: before spec 0.4.0 the checker rejected HF on the yarn prefill cases and the long decode in fp32 (the
emulation built the RoPE table in float64, HF in float32 as every engine does: now rope_table: fp32), on
moe.route.ties in every mode (torch.topk breaks exact ties at another index than "lower index wins": now
TOLERANCE.4) and on model.greedy in bf16 with sdpa (a greedy step decided by a top-2 margin below one bf16 unit).
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers")

from mla_ref.conformance.check import check, load_adapter  # noqa: E402
from mla_ref.golden.cases import case_config, case_definitions  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.transformers]

# Entry points HF has no counterpart of: the FlashMLA kernel contract, the training rules, the EP plan, MTP.
UNSUPPORTED_ENTRY_POINTS = {"latent_attention_core", "moe_balance", "dispatch_plan", "mtp_forward", "mtp_draft", "speculative_decode"}


@pytest.fixture
def hf_adapter():
    module = load_adapter(str(Path(__file__).resolve().parents[1] / "examples" / "hf_adapter.py"))
    yield module
    module.configure()


@pytest.mark.parametrize("dtype, profile", [("float32", "fp32"), ("bfloat16", "bf16")])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_transformers_is_accepted_apart_from_declared_unsupported_cases(hf_adapter, dtype, profile, attention):
    hf_adapter.configure(dtype, attention)
    report = check(hf_adapter, profile)
    assert report.ok, report.table()
    extensions = {definition["id"] for definition in case_definitions() if definition.get("extension")}
    extensions |= {definition["id"] for definition in case_definitions() if case_config(definition).sparse_attention}  # DSA: dense classes
    unsupported = [case for case in report.cases if case.status == "unsupported"]
    assert all(case.reason.startswith("transformers 5.25.0: ") for case in unsupported)
    surprising = [case.case_id for case in unsupported if case.entry_point not in UNSUPPORTED_ENTRY_POINTS and case.case_id not in extensions]
    assert not surprising, f"declared unsupported although HF can express them: {surprising}"
    layer_and_model = [case for case in report.cases if case.entry_point in ("mla_prefill", "mla_extend", "moe_route", "moe_layer",
                                                                          "model_logits", "greedy_decode")]
    assert sum(case.status == "pass" for case in layer_and_model) >= 15, report.table()


def test_transformers_with_the_wrong_rope_layout_is_rejected(hf_adapter):
    """HF's rope_interleave = False on interleaved checkpoints (facts: 'wrong for the released checkpoints')."""
    original = hf_adapter._hf_config

    def half_layout(cfg, family, **options):
        return original(dict(cfg, rope_layout="half"), family, **options)

    hf_adapter._hf_config = half_layout
    try:
        report = check(hf_adapter, "fp32", "mla.prefill/tiny/")
    finally:
        hf_adapter._hf_config = original
    assert report.cases[0].status == "fail", report.table()
