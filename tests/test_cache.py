"""Caches are immutable values even though appends write in place: every snapshot keeps reading what it held.

A decode chain appends into a shared buffer without copying it; appending to an older
snapshot, to a truncated cache or to a cache built from the caller's own arrays copies first.
"""

import numpy as np
import pytest

from mla_ref import LatentCache, NaiveCache, PagedLatentCache, load_config
from mla_ref.checks import checked_weight
from mla_ref.errors import WeightError


@pytest.fixture(scope="module")
def config():
    return load_config("tiny")


def _rows(config, rng, batch, seq):
    return rng.standard_normal((batch, seq, config.latent_cache_width))


def _held(cache):
    """What a cache holds, position by position: {(sequence, position): row}."""
    if isinstance(cache, NaiveCache):
        keys, values = cache.keys_values()
        flat = lambda a: a.reshape(a.shape[:2] + (a.shape[2] * a.shape[3],))  # noqa: E731
        rows = np.concatenate([flat(keys), flat(values)], axis=-1)
    else:
        rows = cache.key_rows()
    return {(b, t): rows[b, t].copy() for b in range(rows.shape[0]) for t in range(int(cache.lengths[b]))}


def _append(cache, rng, config, query_lengths):
    query_lengths = np.asarray(query_lengths)
    seq = int(query_lengths.max(initial=0))
    if isinstance(cache, NaiveCache):
        heads = config.num_attention_heads
        keys = rng.standard_normal((len(query_lengths), seq, heads, config.qk_head_dim))
        values = rng.standard_normal((len(query_lengths), seq, heads, config.v_head_dim))
        return cache.append(keys, values, query_lengths)
    return cache.append(_rows(config, rng, len(query_lengths), seq), query_lengths)


def _empty(kind, config, batch):
    if kind == "latent":
        return LatentCache.empty(config, batch)
    if kind == "paged":
        return PagedLatentCache.empty(config, batch, 64, block_size=4, shuffle_seed=1)
    return NaiveCache.empty(config, batch)


def _buffer(cache):
    return {LatentCache: "rows", PagedLatentCache: "blocks", NaiveCache: "keys"}[type(cache)]


@pytest.mark.parametrize("kind", ["latent", "paged", "naive"])
def test_every_snapshot_keeps_what_it_held(config, kind):
    rng = np.random.default_rng(0)
    snapshots = [_empty(kind, config, 2)]
    for query_lengths in ([3, 1], [1, 1], [0, 2], [1, 0], [2, 2]):
        snapshots.append(_append(snapshots[-1], rng, config, query_lengths))
    expected = [_held(cache) for cache in snapshots]
    # branch from old snapshots, roll back and go on: none of it may change what another cache holds
    branch = _append(snapshots[2], rng, config, [2, 3])
    rolled = _append(snapshots[-1].truncate([2, 4]), rng, config, [1, 1])
    _append(snapshots[-1], rng, config, [1, 1])
    for cache, held in zip(snapshots, expected):
        now = _held(cache)
        assert now.keys() == held.keys()
        for key in held:
            np.testing.assert_array_equal(now[key], held[key])
    assert _held(branch).keys() >= _held(snapshots[2]).keys()
    assert rolled.lengths.tolist() == [3, 5]


@pytest.mark.parametrize("kind", ["latent", "paged", "naive"])
def test_a_decode_chain_writes_in_place(config, kind):
    rng = np.random.default_rng(1)
    cache = _append(_empty(kind, config, 1), rng, config, [5])
    buffer = getattr(cache, _buffer(cache))
    for _ in range(3):
        cache = _append(cache, rng, config, [1])
    if kind != "paged":  # contiguous caches may grow (and then copy) when full
        cache = _append(type(cache).empty(config, 1, capacity=16) if kind == "latent" else NaiveCache.empty(config, 1, capacity=16),
                        rng, config, [5])
        buffer = getattr(cache, _buffer(cache))
        for _ in range(3):
            cache = _append(cache, rng, config, [1])
    assert getattr(cache, _buffer(cache)) is buffer
    assert cache.lengths.tolist() == [8]


def test_a_cache_built_from_the_callers_arrays_is_copied_on_append(config):
    rng = np.random.default_rng(2)
    rows = _rows(config, rng, 1, 6)
    original = rows.copy()
    cache = LatentCache(rows, np.array([4]))
    grown = cache.append(_rows(config, rng, 1, 1), np.array([1]))
    np.testing.assert_array_equal(rows, original)
    assert grown.rows is not rows and grown.lengths.tolist() == [5]


def test_truncate_then_append_does_not_grow_the_buffer(config):
    rng = np.random.default_rng(3)
    cache = LatentCache.empty(config, 1, capacity=32)
    cache = cache.append(_rows(config, rng, 1, 10), np.array([10]))
    for _ in range(20):  # speculative decoding: roll back, append again
        cache = cache.truncate([8]).append(_rows(config, rng, 1, 2), np.array([2]))
    assert cache.rows.shape[1] == 32


def test_checked_weights_are_remembered_only_while_they_cannot_change(config):
    weight = np.ones((4, 4))
    assert checked_weight("w", weight, np.float64, "T") is weight
    cast = checked_weight("w", weight, np.float32, "T")
    assert checked_weight("w", weight, np.float32, "T") is not cast  # writeable: cast again, never a stale copy
    changing = np.ones((4, 4))
    checked_weight("w", changing, np.float32, "T")
    changing *= 2.0
    assert checked_weight("w", changing, np.float32, "T")[0, 0] == 2.0
    changing[0, 0] = np.nan
    with pytest.raises(WeightError, match=r"w: contains nan at index \(0, 0\)"):
        checked_weight("w", changing, np.float32, "T")
    frozen = np.ones((4, 4))
    frozen.setflags(write=False)
    cast = checked_weight("w", frozen, np.float32, "T")
    assert cast.dtype == np.float32 and checked_weight("w", frozen, np.float32, "T") is cast and not cast.flags.writeable
    view = np.ones((4, 4))[1:]
    view.setflags(write=False)  # its base is writeable: it can still change
    assert checked_weight("w", view, np.float32, "T") is not checked_weight("w", view, np.float32, "T")
    bad = weight.copy()
    bad[1, 2] = np.inf
    with pytest.raises(WeightError, match=r"w: contains inf at index \(1, 2\); expected finite values \(T\)"):
        checked_weight("w", bad, np.float64, "T")
    huge = np.full((2, 2), np.finfo(np.float32).max, dtype=np.float32)  # the sum overflows, the values are finite
    assert checked_weight("w", huge, np.float32, "T") is huge
