"""The chained block hash of DESIGN.md, shared by the router's prefix index and the workers' caches.

h_i = xxh3_64(h_{i-1}.to_bytes(8, 'little') + tokens_i as little-endian int32), h_{-1} = xxh3_64(model[+adapter]).
Only full blocks are hashed.
"""

import struct
from collections.abc import Sequence

import numpy as np
import xxhash


def root_hash(model_name: str, adapter_name: str | None = None) -> int:
    """h_{-1}: the seed every chain starts from; differs per model (and adapter)."""
    key = model_name if adapter_name is None else f"{model_name}\x00{adapter_name}"
    return xxhash.xxh3_64_intdigest(key.encode())


def hash_block(parent_hash: int, block_tokens: Sequence[int] | np.ndarray) -> int:
    data = np.asarray(block_tokens, dtype="<i4").tobytes()
    return xxhash.xxh3_64_intdigest(parent_hash.to_bytes(8, "little") + data)


def hash_blocks(token_ids: Sequence[int] | np.ndarray, block_size: int, parent_hash: int) -> list[int]:
    """Hashes of every full block of token_ids, chained from parent_hash (the root, or the last block's)."""
    n = len(token_ids) // block_size * block_size
    if isinstance(token_ids, list):  # the router's prompts: struct packs a list ~1.6x faster than numpy converts it
        raw = struct.pack(f"<{n}i", *token_ids[:n])
    else:
        raw = np.asarray(token_ids[:n], dtype="<i4").tobytes()
    step = block_size * 4
    digest = xxhash.xxh3_64_intdigest
    parent = parent_hash
    hashes: list[int] = []
    for i in range(0, n * 4, step):
        parent = digest(parent.to_bytes(8, "little") + raw[i : i + step])
        hashes.append(parent)
    return hashes
