"""ALRR's KV-cache snapshot on vLLM in every cache layout vLLM declares.

vLLM (0.32, RFC #42082) gives each attention layer a logical ``[blocks, kv_heads, block_size, content]`` view of a
flat buffer; a backend's ``KVCacheLayout`` (CPU: LBHNC; FlashInfer: LBHNC or BLHNC; FlashAttention: any) only
permutes the strides. The views here are made by vLLM's own ``create_kv_cache_views`` from a random byte buffer, so
the test reads the layouts as vLLM builds them; the reference is the raw buffer itself, compared byte for byte.
"""

from __future__ import annotations

import pytest
import torch

from tellnorm.errors import TellnormError

pytest.importorskip("vllm")

LAYERS, BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_SIZE = 3, 6, 16, 2, 32


def _layer_views(layout):
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheTensor,
        compute_layout_strides,
        create_kv_cache_views,
    )

    spec = FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=KV_HEADS, head_size=HEAD_SIZE, dtype=torch.float32)
    strides = compute_layout_strides(spec, BLOCKS, LAYERS, layout)
    size = LAYERS * BLOCKS * KV_HEADS * BLOCK_SIZE * spec.state_content_size_bytes
    raw = torch.randint(-100, 100, (size,), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    tensor = KVCacheTensor(size=size, layers=[f"layer.{i}" for i in range(LAYERS)], layer_stride=strides[0],
                           block_stride=strides[1])
    return raw, create_kv_cache_views(raw, spec, BLOCKS, layout, tensor)


def _layouts():
    from vllm.v1.kv_cache_layout import KVCacheLayout

    return list(KVCacheLayout)


@pytest.mark.parametrize("layout", _layouts(), ids=lambda layout: layout.name)
def test_the_blocks_a_step_writes_are_restored_bit_for_bit_in_every_layout(layout):
    from tellnorm.backends.vllm.session import touched_blocks

    raw, views = _layer_views(layout)
    cache = views[1]
    assert cache.shape == (BLOCKS, KV_HEADS, BLOCK_SIZE, 2 * HEAD_SIZE)
    slots = torch.tensor([BLOCK_SIZE + 1, BLOCK_SIZE + 2, 2 * BLOCK_SIZE + 7, -1])  # blocks 1, 2 and padding
    blocks = touched_blocks(slots, cache)
    assert blocks.tolist() == [1, 2]
    before = raw.clone()
    saved = cache[blocks].clone()
    for slot in slots[slots >= 0].tolist():  # the extra pass writes its own K/V into the step's slots
        cache[slot // BLOCK_SIZE, :, slot % BLOCK_SIZE] = float("nan")
    assert not torch.equal(raw, before)
    cache[blocks] = saved
    assert torch.equal(raw, before)  # every byte of every layer, not just this view
    views[2][4] = 0.0  # another layer's block and an untouched block of this layer are not restored over
    cache[5] = 1.0
    after = raw.clone()
    cache[blocks] = saved
    assert torch.equal(raw, after)


def test_a_cache_that_is_not_a_paged_attention_cache_is_refused_in_one_line():
    from tellnorm.backends.vllm.session import touched_blocks

    with pytest.raises(TellnormError) as err:
        touched_blocks(torch.tensor([0, 1]), torch.zeros(4, 16, 576))  # MLA's latent cache: [blocks, size, latent]
    assert "has shape (4, 16, 576)" in str(err.value) and "\n" not in str(err.value)
