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
                             ("MQA, 1 KV head of 192 + 128", config.qk_head_dim + config.v_head_dim),
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
    """A step's tensor shape per token: the leading [batch, seq] or [batch, keys] axes dropped."""
    step = step_by_id(step_id)
    shape = {**step["inputs"], **step["outputs"]}[name]
    return "x".join(str(size) for size in evaluate_shape(shape, symbols)[2:])


def mla_dataflow(path: Path) -> None:
    """Boxes and arrows of MLA.1-MLA.16 with per-token shapes of DeepSeek-V3: the naive (prefill) and absorbed (decode) forms."""
    config = load_preset("deepseek-v3")
    symbols = {**config.symbols(), "batch": 1, "seq": 1, "keys": 1, "expanded": 1}
    heads, latent, rope = config.num_attention_heads, config.kv_lora_rank, config.qk_rope_head_dim

    def shape(step_id: str, name: str) -> str:
        return _shape(step_id, name, symbols)

    boxes = {  # key: (x, y, width, height, text)
        "hidden": (3.3, 6.0, 3.0, 0.9, f"hidden h\n{config.hidden_size}"),
        "c_q": (0.0, 4.6, 3.0, 0.9, f"MLA.1 c_q = RMSNorm(h Wq_a)\n{shape('MLA.1', 'c_q')}"),
        "latent": (3.3, 4.6, 3.0, 0.9, f"MLA.3 kv_latent = RMSNorm(c_kv)\n{shape('MLA.3', 'kv_latent')}"),
        "rope": (6.6, 4.6, 3.3, 0.9, f"MLA.3-4 k_pe = RoPE(k_pe_raw)\n{shape('MLA.4', 'k_pe')}, one per token, shared by heads"),
        "q": (0.0, 3.2, 3.0, 0.9, f"MLA.2, MLA.4 q_nope | RoPE(q_pe)\n{shape('MLA.2', 'q_nope')} | {shape('MLA.2', 'q_pe_raw')}"),
        "cache": (3.3, 3.2, 3.0, 0.9, f"MLA.5 cache row [kv_latent | k_pe]\n{shape('MLA.5', 'rows')} values per token per layer"),
        "kv": (6.6, 3.2, 3.3, 0.9, f"MLA.6 expand each cached row:\nk_nope | value = {shape('MLA.6', 'k_nope')} | {shape('MLA.6', 'value')}; k_pe as is"),
        "absorbed": (0.0, 1.4, 4.8, 1.25,
                     f"absorbed form (decode), MLA.13-16\n"
                     f"q_latent = [q_nope W_UK | q_pe]: {shape('MLA.13', 'q_latent')}\n"
                     f"MQA over the L cache rows: {heads} query heads, one shared\n"
                     f"key head ({latent + rope} wide) and value head (its first {latent});\n"
                     f"out {shape('MLA.15', 'out_latent')}, x W_UV -> {shape('MLA.16', 'attn')}"),
        "naive": (5.1, 1.4, 4.8, 1.25,
                  f"naive form (prefill), MLA.7-11\n"
                  f"per head [q_nope ; q_pe] . [k_nope ; k_pe]\n"
                  f"({config.qk_head_dim} wide, {heads} key heads), x {config.qk_head_dim}^-0.5 m^2,\n"
                  f"causal softmax, P V -> {shape('MLA.11', 'attn')}"),
        "out": (3.3, 0.0, 3.3, 0.9, f"MLA.12 concat heads, o_proj\n{shape('MLA.12', 'output')}"),
    }
    figure, axes = plt.subplots(figsize=(11, 7.4))
    tops, bottoms = {}, {}
    for key, (x, y, width, height, text) in boxes.items():
        colour = {"cache": "#fde9c8", "absorbed": "#e3f1dc"}.get(key, "#dde8f7")
        axes.add_patch(FancyBboxPatch((x, y), width, height, boxstyle="round,pad=0.05", facecolor=colour, edgecolor="#33557a"))
        axes.text(x + width / 2, y + height / 2, text, ha="center", va="center", fontsize=8.5)
        tops[key], bottoms[key] = (x + width / 2, y + height + 0.05), (x + width / 2, y - 0.05)
    arrows = (("hidden", "c_q"), ("hidden", "latent"), ("hidden", "rope"), ("c_q", "q"), ("latent", "cache"), ("rope", "cache"),
              ("cache", "kv"), ("q", "absorbed"), ("cache", "absorbed"), ("q", "naive"), ("kv", "naive"),
              ("absorbed", "out"), ("naive", "out"))
    for start, end in arrows:
        x0, y0 = bottoms[start]
        x1, y1 = tops[end]
        if (start, end) == ("cache", "kv"):  # the expansion reads the cached latent sideways
            (x0, y0), (x1, y1) = (6.35, 3.65), (6.55, 3.65)
        elif (start, end) == ("cache", "absorbed"):
            x1 = x0
        elif (start, end) == ("q", "naive"):
            x0, x1 = 2.6, 5.8
        axes.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=12, color="#33557a"))
    axes.text(0.0, 7.25, "MLA data flow at DeepSeek-V3 size: shapes per token (spec/mla.yaml), L = cached tokens",
              fontsize=11, weight="bold")
    axes.set_xlim(-0.3, 10.2)
    axes.set_ylim(-0.2, 7.6)
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
