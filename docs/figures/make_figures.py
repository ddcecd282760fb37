"""Make the figures of docs/ from the code's own numbers: ``python docs/figures/make_figures.py [OUT_DIR]``.

Needs matplotlib (an optional docs dependency: ``pip install matplotlib``). Writes
``cache_vs_context.png`` and ``mla_dataflow.png``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

from mla_ref.config import cache_values_per_token, load_preset  # noqa: E402
from mla_ref.spec import evaluate_shape, step_by_id  # noqa: E402

FIGURES = ("cache_vs_context.png", "mla_dataflow.png")


def cache_vs_context(path: Path) -> None:
    """Whole-model KV cache in GiB (bf16, all layers) against context length at DeepSeek-V3 shapes."""
    config = load_preset("deepseek-v3")
    values = cache_values_per_token(config)
    contexts = [2 ** k for k in range(10, 18)]
    figure, axes = plt.subplots(figsize=(7, 4.2))
    for label, per_token in ((f"MHA, {config.num_attention_heads} KV heads of 192 + 128", values["mha"]),
                             ("GQA, 8 KV heads of 192 + 128", values["gqa8"]),
                             ("MLA latent, 512 + 64 per token", values["latent"])):
        gib = [per_token * 2 * config.num_hidden_layers * length / 2 ** 30 for length in contexts]
        axes.plot(contexts, gib, marker="o", label=f"{label} ({per_token} values)")
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("context length (tokens)")
    axes.set_ylabel("KV cache per sequence, GiB (bf16, 61 layers)")
    axes.set_title("DeepSeek-V3 KV cache per sequence (mla_ref.config.cache_values_per_token)", fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _shape(step_id: str, name: str, symbols: dict) -> str:
    step = step_by_id(step_id)
    shape = {**step["inputs"], **step["outputs"]}[name]
    return "x".join(str(size) for size in evaluate_shape(shape, symbols)[1:])


def mla_dataflow(path: Path) -> None:
    """Boxes and arrows of MLA.1-MLA.12 with the per-token shapes of DeepSeek-V3 (batch 1, seq 1, keys 4096)."""
    config = load_preset("deepseek-v3")
    symbols = {**config.symbols(), "batch": 1, "seq": 1, "keys": 4096, "expanded": 4096}
    boxes = {  # key: (x, y, width, text)
        "hidden": (3.3, 6.0, 3.0, f"hidden\n{config.hidden_size}"),
        "c_q": (0.0, 4.6, 3.0, f"MLA.1 c_q = RMSNorm(x Wq_a)\n{_shape('MLA.1', 'c_q', symbols)}"),
        "latent": (3.3, 4.6, 3.0, f"MLA.3 kv_latent = RMSNorm(c_kv)\n{_shape('MLA.3', 'kv_latent', symbols)}"),
        "rope": (6.6, 4.6, 3.0, f"MLA.3-4 k_pe = RoPE(k_pe_raw)\n{_shape('MLA.4', 'k_pe', symbols)}, shared by heads"),
        "q": (0.0, 3.2, 3.0, f"MLA.2, MLA.4 q_nope | RoPE(q_pe)\n{_shape('MLA.2', 'q_nope', symbols)} | {_shape('MLA.2', 'q_pe_raw', symbols)}"),
        "kv": (3.3, 3.2, 3.0, f"MLA.6 k_nope | value per head\n{_shape('MLA.6', 'k_nope', symbols)} | {_shape('MLA.6', 'value', symbols)}"),
        "cache": (6.6, 3.2, 3.0, f"MLA.5 latent cache row\n[kv_latent | k_pe] = {_shape('MLA.5', 'rows', symbols)} per token"),
        "scores": (0.0, 1.8, 9.6, "MLA.7-11  q = [q_nope ; q_pe], k = [k_nope ; k_pe]  ->  logits x 192^-0.5 m^2  ->  causal softmax  ->  P V"),
        "out": (3.3, 0.4, 3.0, f"MLA.12 concat heads, o_proj\n{_shape('MLA.12', 'output', symbols)}"),
    }
    figure, axes = plt.subplots(figsize=(11, 6.8))
    tops, bottoms = {}, {}
    for key, (x, y, width, text) in boxes.items():
        colour = "#fde9c8" if key == "cache" else "#dde8f7"
        axes.add_patch(FancyBboxPatch((x, y), width, 0.9, boxstyle="round,pad=0.05", facecolor=colour, edgecolor="#33557a"))
        axes.text(x + width / 2, y + 0.45, text, ha="center", va="center", fontsize=8.5)
        tops[key], bottoms[key] = (x + width / 2, y + 0.95), (x + width / 2, y - 0.05)
    tops["scores"] = None
    for start, end in (("hidden", "c_q"), ("hidden", "latent"), ("hidden", "rope"), ("c_q", "q"), ("latent", "kv"),
                       ("rope", "cache"), ("latent", "cache"), ("q", "scores"), ("kv", "scores"), ("cache", "scores"), ("scores", "out")):
        x0, y0 = bottoms[start]
        x1, y1 = (x0, 2.75) if end == "scores" else tops[end]
        axes.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=12, color="#33557a"))
    axes.text(0.0, 7.2, "MLA data flow at DeepSeek-V3 size (per token; shapes from spec/mla.yaml)", fontsize=11, weight="bold")
    axes.text(6.7, 0.55, "absorbed decode: fold W_UK into q (MLA.13),\nattend over the cache rows (MLA.14-15),\nfold W_UV into the output (MLA.16)",
              fontsize=8.5, style="italic")
    axes.set_xlim(-0.3, 10.0)
    axes.set_ylim(0.0, 7.6)
    axes.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cache_vs_context(out / FIGURES[0])
    mla_dataflow(out / FIGURES[1])


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
