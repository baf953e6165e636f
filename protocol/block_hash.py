"""The chained block hash of DESIGN.md, shared by the router's prefix index and the workers' caches.

h_i = xxh3_64(h_{i-1}.to_bytes(8, 'little') + tokens_i as little-endian int32), h_{-1} = xxh3_64(model[+adapter]).
Only full blocks are hashed.
"""

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
    tokens = np.asarray(token_ids, dtype="<i4")
    num_full = len(tokens) // block_size
    parent = parent_hash
    hashes: list[int] = []
    raw = tokens[: num_full * block_size].tobytes()
    step = block_size * 4
    for i in range(num_full):
        parent = xxhash.xxh3_64_intdigest(parent.to_bytes(8, "little") + raw[i * step : (i + 1) * step])
        hashes.append(parent)
    return hashes
