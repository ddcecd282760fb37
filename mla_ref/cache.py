"""Caches for cached decode: plumbing, not math (spec/mla.yaml MLA.18, MLA.19).

* :class:`LatentCache` — contiguous rows ``[latent | k_pe]`` of width
  ``kv_lora_rank + qk_rope_head_dim`` per token (the absorbed form's cache, MLA.5).
* :class:`PagedLatentCache` — the same rows in a block pool ``[num_blocks, block_size, 1,
  width]`` addressed through a block table (FlashMLA / vLLM layout).
* :class:`Fp8LatentCache` — the rows as FP8 records (spec/fp8.yaml FP8.12: 656 bytes per token
  for V3.2), quantised when appended, dequantised when read.
* :class:`NaiveCache` — full per-head keys ``[nope | rope]`` and values.

Caches are immutable values: ``append`` returns a new cache, so an old one is a
snapshot (rolling back is keeping the old object, or :meth:`truncate`). Every cache has
``lengths [batch]``: how many positions of each sequence it holds (positions 0 .. length-1).

Appending does not copy what is cached: caches made by ``empty`` or ``append`` share their
buffer with spare room, and an append writes in place when no other cache sharing the buffer
has written past its lengths (a decode chain); otherwise (appending to an older snapshot or
a truncated cache, or to a cache built directly from arrays) it copies first. An old cache
only reads positions below its own lengths, which in-place appends never touch.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import numpy.typing as npt

from .config import ModelConfig
from .checks import check_allocation
from .errors import CacheError, ShapeError, shown
from .fp8_cache import check_record_dims, check_scale_rule, decode_latent_record, encode_latent_record, record_width


def config_fingerprint(config: ModelConfig) -> str:
    """Identifies the fields that decide what a cache row means (widths and RoPE)."""
    fields = ("num_attention_heads", "rms_norm_eps", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
              "rope_theta", "rope_scaling_type", "rope_factor", "original_max_position_embeddings", "beta_fast",
              "beta_slow", "mscale", "mscale_all_dim", "yarn_truncate", "yarn_activation", "max_seq_len", "rope_layout")
    text = repr([getattr(config, name) for name in fields])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _lengths(lengths, batch: int, name: str) -> np.ndarray:
    values = np.asarray(lengths)
    if values.shape != (batch,) or values.dtype.kind not in "iu":
        raise CacheError(name, f"expected an integer array of shape [{batch}], got {values.dtype} {list(values.shape)}", "MLA.18")
    if (values < 0).any():
        raise CacheError(name, f"expected lengths >= 0, got {values.tolist()}", "MLA.18")
    return values.astype(np.int64)


class _Written:
    """Per sequence, one past the last position any cache sharing a buffer has written (copy-on-write bookkeeping)."""

    def __init__(self, lengths: np.ndarray) -> None:
        self.upto = lengths.copy()

    def can_extend(self, lengths: np.ndarray, query_lengths: np.ndarray) -> bool:
        """Whether writing after ``lengths`` overwrites nothing another cache may read."""
        return bool(((query_lengths == 0) | (lengths >= self.upto)).all())

    def extend(self, lengths: np.ndarray) -> "_Written":
        np.maximum(self.upto, lengths, out=self.upto)
        return self


def _shared(cache, written: "_Written | None"):
    """``cache`` with its buffer's bookkeeping attached (None: the buffer may be someone else's; append copies)."""
    object.__setattr__(cache, "_written", written)
    return cache


def _in_place(cache, query_lengths: np.ndarray) -> bool:
    """Whether ``cache.append`` may write into the buffer it shares (else it copies first)."""
    return cache._written is not None and cache._written.can_extend(cache.lengths, query_lengths)


def _capacity(grown: int, capacity: int) -> int:
    """The capacity of a copied buffer: the same if ``grown`` fits, else grown by half, so a decode chain copies O(log) times."""
    return capacity if grown <= capacity else max(grown, capacity + capacity // 2, 16)


def _append_index(lengths: np.ndarray, query_lengths: np.ndarray, seq: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(batch index, position, query index) of every new token that is not padding."""
    queries = np.arange(seq)[None, :]  # [1, seq]
    valid = queries < query_lengths[:, None]  # [batch, seq]
    batch_index, query_index = np.nonzero(valid)
    return batch_index, lengths[batch_index] + query_index, query_index


@dataclasses.dataclass(frozen=True)
class LatentCache:
    """Contiguous latent cache: ``rows [batch, capacity, width]``, ``lengths [batch]``."""

    rows: np.ndarray
    lengths: np.ndarray
    fingerprint: str | None = None
    _written: _Written | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_rows("rows", self.rows, 3, self.lengths)

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, dtype: npt.DTypeLike = np.float64, capacity: int = 0,
              width: int | None = None) -> "LatentCache":
        """A cache holding no token for ``batch`` sequences, with room for ``capacity`` before it grows.

        ``width``: the row width, default ``latent_cache_width`` (the DSA indexer keys use index_head_dim, DSA.7).
        """
        _check_size(batch, capacity)
        width = config.latent_cache_width if width is None else width
        check_allocation("LatentCache", (batch, capacity, width), dtype, "MLA.18")
        lengths = np.zeros(batch, np.int64)
        cache = cls(np.zeros((batch, capacity, width), dtype), lengths, config_fingerprint(config))
        return _shared(cache, _Written(lengths))

    def check(self, config: ModelConfig, batch: int) -> None:
        """Raise ``CacheError`` if this cache was built for another config or batch."""
        _check_common(self, self.lengths, self.rows.shape[0], self.rows.shape[-1], config, batch)

    def append(self, new_rows: np.ndarray, query_lengths: np.ndarray) -> "LatentCache":
        """MLA.18 — write ``new_rows [batch, seq, width]`` after each sequence's last position."""
        batch, seq, width = new_rows.shape
        lengths = self.lengths + query_lengths
        grown = int(lengths.max(initial=0))
        rows, written = self.rows, self._written
        if grown > rows.shape[1] or not _in_place(self, query_lengths):
            rows = np.zeros((batch, _capacity(grown, rows.shape[1]), width), rows.dtype)
            rows[:, : self.rows.shape[1]] = self.rows
            written = _Written(self.lengths)
        batch_index, position, query_index = _append_index(self.lengths, query_lengths, seq)
        rows[batch_index, position] = new_rows[batch_index, query_index]
        return _shared(LatentCache(rows, lengths, self.fingerprint), written.extend(lengths))

    @property
    def dtype(self) -> np.dtype:
        return self.rows.dtype

    def key_rows(self) -> np.ndarray:
        """All cached rows ``[batch, max(lengths), width]``; rows past a sequence's length are padding."""
        return self.rows[:, : int(self.lengths.max(initial=0))]

    def truncate(self, lengths: npt.ArrayLike) -> "LatentCache":
        """Forget positions >= ``lengths`` (a rollback); lengths may only shrink."""
        lengths = _shrink(self.lengths, lengths)
        return _shared(LatentCache(self.rows, lengths, self.fingerprint), self._written)


@dataclasses.dataclass(frozen=True)
class PagedLatentCache:
    """Paged latent cache in the FlashMLA layout.

    ``blocks [num_blocks, block_size, 1, width]``; ``block_table [batch, max_blocks]`` maps
    block k of sequence b (positions k*block_size .. (k+1)*block_size - 1) to a pool block,
    -1 where none is allocated; ``lengths [batch]``. Allocated blocks never overlap.
    """

    blocks: np.ndarray
    block_table: np.ndarray
    lengths: np.ndarray
    fingerprint: str | None = None
    _written: _Written | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        validate_block_table(self.block_table, self.blocks.shape[0], self.blocks.shape[1], self.lengths)

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, max_tokens: int, block_size: int = 64,
              extra_blocks: int = 0, shuffle_seed: int | None = None, dtype: npt.DTypeLike = np.float64) -> "PagedLatentCache":
        """A pool with room for ``max_tokens`` per sequence; ``shuffle_seed`` scatters the block table."""
        for name, value, least in (("block_size", block_size, 1), ("max_tokens", max_tokens, 0), ("extra_blocks", extra_blocks, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
                raise CacheError(name, f"expected an int >= {least}, got {shown(value)}", "MLA.19")
        _check_size(batch, 0)
        per_sequence = -(-max_tokens // block_size)
        num_blocks = batch * per_sequence + extra_blocks
        check_allocation("PagedLatentCache", (num_blocks, block_size, 1, config.latent_cache_width), dtype, "MLA.19")
        order = np.arange(num_blocks)
        if shuffle_seed is not None:
            order = np.random.default_rng(shuffle_seed).permutation(num_blocks)
        table = order[: batch * per_sequence].reshape(batch, per_sequence)
        blocks = np.zeros((num_blocks, block_size, 1, config.latent_cache_width), dtype)
        lengths = np.zeros(batch, np.int64)
        return _shared(cls(blocks, table, lengths, config_fingerprint(config)), _Written(lengths))

    @property
    def block_size(self) -> int:
        return self.blocks.shape[1]

    @property
    def dtype(self) -> np.dtype:
        return self.blocks.dtype

    def check(self, config: ModelConfig, batch: int) -> None:
        """Raise ``CacheError`` if this cache was built for another config or batch."""
        _check_common(self, self.lengths, self.block_table.shape[0], self.blocks.shape[-1], config, batch)

    def _slots(self, batch_index: np.ndarray, position: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        block_column = position // self.block_size
        if (block_column >= self.block_table.shape[1]).any():
            bad = int(np.argmax(block_column >= self.block_table.shape[1]))
            raise CacheError("block_table", f"sequence {int(batch_index[bad])} needs position {int(position[bad])}, "
                             f"beyond its {self.block_table.shape[1]} blocks of {self.block_size}", "MLA.19")
        block = self.block_table[batch_index, block_column]
        if (block < 0).any():
            bad = int(np.argmax(block < 0))
            raise CacheError("block_table", f"no block allocated for position {int(position[bad])} of sequence {int(batch_index[bad])}", "MLA.19")
        return block, position % self.block_size

    def append(self, new_rows: np.ndarray, query_lengths: np.ndarray) -> "PagedLatentCache":
        """MLA.18 — write rows into the blocks the table assigns to their positions."""
        batch_index, position, query_index = _append_index(self.lengths, query_lengths, new_rows.shape[1])
        block, slot = self._slots(batch_index, position)
        lengths = self.lengths + query_lengths
        blocks, written = self.blocks, self._written
        if not _in_place(self, query_lengths):
            blocks, written = self.blocks.copy(), _Written(self.lengths)
        blocks[block, slot, 0] = new_rows[batch_index, query_index]
        return _shared(PagedLatentCache(blocks, self.block_table, lengths, self.fingerprint), written.extend(lengths))

    def key_rows(self) -> np.ndarray:
        """MLA.19 — gather ``[batch, max(lengths), width]``; slots past a length read as 0."""
        return gather_paged_rows(self.blocks, self.block_table, self.lengths)

    def truncate(self, lengths: npt.ArrayLike) -> "PagedLatentCache":
        """Forget positions >= ``lengths`` (a rollback); lengths may only shrink."""
        return _shared(PagedLatentCache(self.blocks, self.block_table, _shrink(self.lengths, lengths), self.fingerprint), self._written)


@dataclasses.dataclass(frozen=True)
class Fp8LatentCache:
    """FP8.12 — contiguous latent cache of FP8 records (656 bytes per token for V3.2): ``store.rows [batch, capacity,
    record_width]`` uint8, quantised when appended (FP8.10 with ``scale_rule``), read dequantised (FP8.11) in ``dtype``."""

    store: LatentCache
    kv_lora_rank: int
    qk_rope_head_dim: int
    scale_rule: str = "ue8m0"
    dtype: np.dtype = np.dtype(np.float64)

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, dtype: npt.DTypeLike = np.float64, capacity: int = 0,
              scale_rule: str = "ue8m0") -> "Fp8LatentCache":
        """A cache holding no token; its rows are read back as ``dtype`` (the compute dtype of mla_forward)."""
        check_record_dims(config.kv_lora_rank, config.qk_rope_head_dim, "FP8.12")
        check_scale_rule(scale_rule, "FP8.12")
        _check_size(batch, capacity)
        width = record_width(config.kv_lora_rank, config.qk_rope_head_dim)
        check_allocation("Fp8LatentCache", (batch, capacity, width), np.uint8, "FP8.12")
        lengths = np.zeros(batch, np.int64)
        store = _shared(LatentCache(np.zeros((batch, capacity, width), np.uint8), lengths, config_fingerprint(config)), _Written(lengths))
        return cls(store, config.kv_lora_rank, config.qk_rope_head_dim, scale_rule, np.dtype(dtype))

    @property
    def lengths(self) -> np.ndarray:
        return self.store.lengths

    def check(self, config: ModelConfig, batch: int) -> None:
        """Raise ``CacheError`` if this cache was built for another config or batch."""
        _check_common(self.store, self.lengths, self.store.rows.shape[0], self.store.rows.shape[-1], config, batch,
                      width_name="record_width", width=record_width(config.kv_lora_rank, config.qk_rope_head_dim))

    def append(self, new_rows: np.ndarray, query_lengths: np.ndarray) -> "Fp8LatentCache":
        """MLA.18 with FP8.10 — quantise the real rows of ``new_rows [batch, seq, kv_lora_rank + rope]`` and write their records."""
        batch, seq, _ = new_rows.shape
        written = np.arange(seq)[None, :] < query_lengths[:, None]  # [batch, seq]: padding is neither quantised nor cached
        records = np.zeros((batch, seq, self.store.rows.shape[-1]), np.uint8)  # [batch, seq, record_width]
        real = new_rows[written]  # [tokens, kv_lora_rank + rope]
        records[written] = encode_latent_record(real[:, : self.kv_lora_rank], real[:, self.kv_lora_rank:], self.scale_rule)
        return dataclasses.replace(self, store=self.store.append(records, query_lengths))

    def key_rows(self) -> np.ndarray:
        """FP8.11 — the cached rows dequantised, ``[batch, max(lengths), kv_lora_rank + rope]`` in ``dtype``."""
        return decode_latent_record(self.store.key_rows(), self.kv_lora_rank, self.qk_rope_head_dim).astype(self.dtype)

    def truncate(self, lengths: npt.ArrayLike) -> "Fp8LatentCache":
        """Forget positions >= ``lengths`` (a rollback); lengths may only shrink."""
        return dataclasses.replace(self, store=self.store.truncate(lengths))


@dataclasses.dataclass(frozen=True)
class NaiveCache:
    """Per-head cache: ``keys [batch, capacity, heads, qk_head_dim]``, ``values [.., v_head_dim]``."""

    keys: np.ndarray
    values: np.ndarray
    lengths: np.ndarray
    fingerprint: str | None = None
    _written: _Written | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_rows("keys", self.keys, 4, self.lengths)
        _check_rows("values", self.values, 4, self.lengths)
        if self.values.shape[:3] != self.keys.shape[:3]:
            raise CacheError("values", f"expected [batch, capacity, heads] = {list(self.keys.shape[:3])} as keys, got {list(self.values.shape[:3])}", "MLA.18")

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, dtype: npt.DTypeLike = np.float64, capacity: int = 0) -> "NaiveCache":
        """A cache holding no token for ``batch`` sequences, with room for ``capacity`` before it grows."""
        _check_size(batch, capacity)
        check_allocation("NaiveCache", (2, batch, capacity, config.num_attention_heads, max(config.qk_head_dim, config.v_head_dim)), dtype, "MLA.18")
        heads, lengths = config.num_attention_heads, np.zeros(batch, np.int64)
        cache = cls(np.zeros((batch, capacity, heads, config.qk_head_dim), dtype), np.zeros((batch, capacity, heads, config.v_head_dim), dtype),
                    lengths, config_fingerprint(config))
        return _shared(cache, _Written(lengths))

    def check(self, config: ModelConfig, batch: int) -> None:
        """Raise ``CacheError`` if this cache was built for another config or batch."""
        _check_common(self, self.lengths, self.keys.shape[0], self.keys.shape[-1], config, batch,
                      width_name="qk_head_dim", width=config.qk_head_dim)
        if self.keys.shape[2] != config.num_attention_heads or self.values.shape[-1] != config.v_head_dim:
            raise CacheError("NaiveCache", f"expected heads {config.num_attention_heads} and value width {config.v_head_dim}, "
                             f"got keys {list(self.keys.shape)}, values {list(self.values.shape)}", "MLA.18")

    def append(self, new_keys: np.ndarray, new_values: np.ndarray, query_lengths: np.ndarray) -> "NaiveCache":
        """MLA.18 — write per-head keys and values after each sequence's last position."""
        batch, seq = new_keys.shape[:2]
        lengths = self.lengths + query_lengths
        grown = int(lengths.max(initial=0))
        keys, values, written = self.keys, self.values, self._written
        if grown > keys.shape[1] or not _in_place(self, query_lengths):
            capacity = _capacity(grown, keys.shape[1])
            keys = np.zeros((batch, capacity) + self.keys.shape[2:], self.keys.dtype)
            values = np.zeros((batch, capacity) + self.values.shape[2:], self.values.dtype)
            keys[:, : self.keys.shape[1]], values[:, : self.values.shape[1]] = self.keys, self.values
            written = _Written(self.lengths)
        batch_index, position, query_index = _append_index(self.lengths, query_lengths, seq)
        keys[batch_index, position] = new_keys[batch_index, query_index]
        values[batch_index, position] = new_values[batch_index, query_index]
        return _shared(NaiveCache(keys, values, lengths, self.fingerprint), written.extend(lengths))

    @property
    def dtype(self) -> np.dtype:
        return self.keys.dtype

    def keys_values(self) -> tuple[np.ndarray, np.ndarray]:
        """Cached ``[batch, max(lengths), heads, ..]`` keys and values."""
        used = int(self.lengths.max(initial=0))
        return self.keys[:, :used], self.values[:, :used]

    def truncate(self, lengths: npt.ArrayLike) -> "NaiveCache":
        """Forget positions >= ``lengths`` (a rollback); lengths may only shrink."""
        return _shared(NaiveCache(self.keys, self.values, _shrink(self.lengths, lengths), self.fingerprint), self._written)


def _check_size(batch, capacity) -> None:
    for name, value, least in (("batch", batch, 1), ("capacity", capacity, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise CacheError(name, f"expected an int >= {least}, got {shown(value)}", "MLA.18")


def _check_rows(name: str, rows, ndim: int, lengths) -> None:
    """A cache's array: an ndarray of ``ndim`` axes ``[batch, capacity, ...]`` whose lengths never exceed its capacity."""
    if not isinstance(rows, np.ndarray) or rows.ndim != ndim or not (rows.dtype.kind == "f" or rows.dtype == np.uint8):
        described = f"{rows.dtype} {list(rows.shape)}" if isinstance(rows, np.ndarray) else type(rows).__name__
        raise CacheError(name, f"expected a float array (or the uint8 records of an Fp8LatentCache) of {ndim} axes "
                         f"[batch, capacity, ...], got {described}", "MLA.18")
    held = _lengths(lengths, rows.shape[0], "lengths")
    if (held > rows.shape[1]).any():
        bad = int(np.argmax(held > rows.shape[1]))
        raise CacheError("lengths", f"sequence {bad} holds {int(held[bad])} positions but the cache stores {rows.shape[1]} rows", "MLA.18")


def _shrink(current: np.ndarray, lengths) -> np.ndarray:
    lengths = _lengths(lengths, current.shape[0], "lengths")
    if (lengths > current).any():
        raise CacheError("lengths", f"rollback may only shrink: cache holds {current.tolist()}, asked {lengths.tolist()}", "MLA.18")
    return lengths


def _check_common(cache, lengths, batch_of_cache, width_of_cache, config, batch, width_name="latent_cache_width", width=None) -> None:
    """Fingerprint, width, batch and lengths of ``cache``; a cache built from arrays (no fingerprint) is bound to the
    first config it is checked against, so that it refuses any other afterwards."""
    width = config.latent_cache_width if width is None else width
    fingerprint = config_fingerprint(config)
    if cache.fingerprint is not None and cache.fingerprint != fingerprint:
        raise CacheError("cache", f"built for another config (fingerprint {cache.fingerprint}, expected {fingerprint} for {shown(config.name)})", "MLA.18")
    if width_of_cache != width:
        raise CacheError("cache", f"expected rows of {width_name} = {width}, got {width_of_cache}", "MLA.18")
    if batch_of_cache != batch:
        raise CacheError("cache", f"expected batch {batch}, got {batch_of_cache}", "MLA.18")
    _lengths(lengths, batch, "cache.lengths")
    if cache.fingerprint is None:
        object.__setattr__(cache, "fingerprint", fingerprint)


def validate_block_table(block_table: np.ndarray, num_blocks: int, block_size: int, lengths: np.ndarray) -> None:
    """MLA.19 — entries in [-1, num_blocks), no pool block used twice, every held position allocated."""
    table = np.asarray(block_table)
    if table.ndim != 2 or table.dtype.kind not in "iu":
        raise CacheError("block_table", f"expected an integer array [batch, max_blocks], got {table.dtype} {list(table.shape)}", "MLA.19")
    lengths = _lengths(lengths, table.shape[0], "cache_seqlens")
    if ((table < -1) | (table >= num_blocks)).any():
        bad = tuple(int(i) for i in np.argwhere((table < -1) | (table >= num_blocks))[0])
        raise CacheError("block_table", f"entry {bad} = {int(table[bad])} points outside the pool of {num_blocks} blocks (expected -1 .. {num_blocks - 1})", "MLA.19")
    used = table[table >= 0]
    if np.unique(used).size != used.size:
        values, counts = np.unique(used, return_counts=True)
        raise CacheError("block_table", f"pool block {int(values[counts > 1][0])} appears {int(counts.max())} times: blocks overlap", "MLA.19")
    needed = -(-lengths // block_size)  # [batch] blocks holding data
    if (needed > table.shape[1]).any():
        bad = int(np.argmax(needed > table.shape[1]))
        raise CacheError("cache_seqlens", f"sequence {bad} holds {int(lengths[bad])} tokens, more than its {table.shape[1]} blocks of {block_size}", "MLA.19")
    columns = np.arange(table.shape[1])[None, :]
    if ((columns < needed[:, None]) & (table < 0)).any():
        bad = tuple(int(i) for i in np.argwhere((columns < needed[:, None]) & (table < 0))[0])
        raise CacheError("block_table", f"entry {bad} is -1 but sequence {bad[0]} holds {int(lengths[bad[0]])} tokens", "MLA.19")


def gather_paged_rows(blocks: np.ndarray, block_table: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """MLA.19 — token t of sequence b is ``blocks[block_table[b, t // block_size], t % block_size, 0]``.

    Returns ``[batch, max(lengths), width]``; slots past a sequence's length are 0, never
    read from the pool (unused slots may hold NaN).
    """
    if blocks.ndim != 4 or blocks.shape[2] != 1:
        raise ShapeError("k_cache", f"expected [num_blocks, block_size, 1, width], got {list(blocks.shape)}", "MLA.19")
    block_size = blocks.shape[1]
    positions = np.arange(int(np.max(lengths, initial=0)))  # [keys]
    valid = positions[None, :] < lengths[:, None]  # [batch, keys]
    block = np.where(valid, block_table[:, positions // block_size] if positions.size else np.zeros_like(valid, np.int64), 0)
    rows = blocks[np.maximum(block, 0), positions[None, :] % block_size, 0]  # [batch, keys, width], a new array
    rows[~valid] = 0.0
    return rows


LayerCache = LatentCache | PagedLatentCache | Fp8LatentCache | NaiveCache  # the cache of one attention layer
