"""``mla-ref info`` prints the derived constants; errors exit with status 2 and a clear message."""

from __future__ import annotations

import json
import subprocess
import sys

from mla_ref.cli import main
from test_config import HF_V3


def test_info_deepseek_v3_prints_the_facts_sheet_constants(capsys):
    assert main(["info", "deepseek-v3"]) == 0
    text = capsys.readouterr().out
    for expected in ["qk_head_dim                192", "softmax scale without YaRN 0.07216878364870322",
                     "softmax scale with YaRN    0.1352337788608801", "softmax scale in use       0.1352337788608801",
                     "low = 10, high = 23", "dense layers               0-2", "MoE layers                 3-60",
                     "latent (absorbed MLA)            576        1152 B /       2304 B",
                     "naive MLA (per-head k, v)      40960       81920 B /     163840 B",
                     "70272 B per token"]:
        assert expected in text, expected
    assert text.count("e-") >= 32  # the 32-row frequency table


def test_info_reads_a_hugging_face_config_json(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(HF_V3, num_attention_heads=64, num_key_value_heads=64)))
    assert main(["info", str(path)]) == 0
    assert "heads                      64" in capsys.readouterr().out


def test_info_unknown_preset_is_a_clean_error(capsys):
    assert main(["info", "deepseek-v9"]) == 2
    assert "mla-ref: error: preset: unknown preset or missing file 'deepseek-v9'" in capsys.readouterr().err


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "mla_ref.cli", "info", "tiny-v2lite"], capture_output=True, text=True, check=True)
    assert "none (direct q_proj)" in result.stdout and "softmax scale in use" in result.stdout


def test_explain_prints_equation_shapes_source_and_pitfalls(capsys):
    assert main(["explain", "MLA.13"]) == 0
    text = capsys.readouterr().out
    assert "[2, 16, 128, 576]" in text and "mla_ref/mla.py:" in text and "pitfalls:" in text and "W_UK" in text
    assert main(["explain", "MOE.4", "--preset", "tiny"]) == 0
    assert "[32, 4]" in capsys.readouterr().out


def test_explain_unknown_step_lists_the_nearest(capsys):
    assert main(["explain", "MLA.31"]) == 2
    assert "nearest: ['MLA.3'" in capsys.readouterr().err


def test_parameter_counts_match_the_published_totals():
    """V3R: 671B total, 37B activated per token; README_WEIGHTS: the MTP module has 11.5B unique parameters."""
    from mla_ref.config import load_preset
    from mla_ref.info import parameter_counts
    counts = parameter_counts(load_preset("deepseek-v3"))
    assert abs(counts["main"] / 671e9 - 1) < 0.005
    assert abs(counts["active"] / 37e9 - 1) < 0.03
    assert abs(counts["mtp"] / 11.5e9 - 1) < 0.02
