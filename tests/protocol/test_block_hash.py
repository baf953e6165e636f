"""The chained block hash is the one DESIGN.md specifies."""

import numpy as np
import xxhash

from protocol.block_hash import hash_blocks, root_hash


def test_hash_chain_follows_the_contract():
    root = root_hash("smollm2")
    assert root == xxhash.xxh3_64_intdigest(b"smollm2")
    tokens = list(range(40))
    hashes = hash_blocks(tokens, 16, root)
    assert len(hashes) == 2  # the partial block is not hashed
    h0 = xxhash.xxh3_64_intdigest(root.to_bytes(8, "little") + b"".join(t.to_bytes(4, "little") for t in range(16)))
    assert hashes[0] == h0
    assert hash_blocks(tokens[16:32], 16, h0) == hashes[1:]
    big = [151_000 + t for t in tokens]  # the router hashes lists, workers arrays: one answer
    assert hash_blocks(big, 16, root) == hash_blocks(np.array(big, dtype=np.int64), 16, root) != hashes


def test_same_block_under_another_prefix_or_model_hashes_differently():
    a = hash_blocks([1] * 32, 16, root_hash("m"))
    assert a[0] != a[1]
    assert hash_blocks([1] * 16, 16, root_hash("other")) != a[:1]
    assert root_hash("m", "lora-a") != root_hash("m")
