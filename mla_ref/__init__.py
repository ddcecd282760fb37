"""mla-ref: the NumPy reference for DeepSeek MLA, DeepSeek-MoE routing and MTP (see spec/)."""

from .balance import bias_update, expert_load, sequence_balance_loss, v2_balance_losses
from .cache import Fp8LatentCache, LatentCache, NaiveCache, PagedLatentCache
from .config import ModelConfig, load_config, load_preset, preset_names
from .dispatch import DispatchPlan, dispatch_plan
from .dsa import IndexerResult, SparseCache, indexer_forward
from .errors import CacheError, ConfigError, GoldenError, InputError, MlaRefError, ShapeError, SpecError, Unsupported, WeightError
from .mla import MLAResult, latent_attention_core, mla_forward
from .model import GenerationResult, ModelCache, ModelResult, greedy_generate, model_forward
from .moe import FFNResult, Routing, ffn_forward, needed_expert_weight_names, route
from .mtp import MTPLosses, mtp_losses, mtp_module
from .spec import spec_version
from .speculative import DraftContext, Drafter, MTPDrafter, SpeculativeResult, speculative_generate
from .trace import Trace
from .weights import attention_weight_shapes, generate_attention_weights, generate_weights, weight_shapes

__version__ = "0.1.0"

__all__ = [
    "DispatchPlan", "FFNResult", "GoldenError", "Routing", "bias_update", "dispatch_plan", "expert_load", "ffn_forward",
    "needed_expert_weight_names", "route", "sequence_balance_loss", "v2_balance_losses",
    "CacheError", "ConfigError", "Fp8LatentCache", "InputError", "LatentCache", "MLAResult", "MlaRefError", "ModelConfig", "NaiveCache",
    "PagedLatentCache", "ShapeError", "SpecError", "Trace", "Unsupported", "WeightError", "attention_weight_shapes",
    "generate_attention_weights", "generate_weights", "latent_attention_core", "load_config", "load_preset",
    "mla_forward", "preset_names", "spec_version", "weight_shapes",
    "DraftContext", "Drafter", "GenerationResult", "MTPDrafter", "MTPLosses", "ModelCache", "ModelResult",
    "SpeculativeResult", "greedy_generate", "model_forward", "mtp_losses", "mtp_module", "speculative_generate",
    "IndexerResult", "SparseCache", "indexer_forward",
]
