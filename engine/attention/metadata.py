"""What an attention backend needs to know about one step's batch, built once a step by the model runner."""

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class BatchMetadata:
    # Tokens of the step are packed request after request: [num_tokens].
    query_start_loc: torch.Tensor  # [num_seqs + 1] int64, start of each request's new tokens
    seq_lens: torch.Tensor  # [num_seqs] int64, context length after this step (cached + new)
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int64, padded with 0
    slot_blocks: torch.Tensor  # [num_tokens] int64, block id where each new token's KV is written
    slot_offsets: torch.Tensor  # [num_tokens] int64, offset inside that block
    max_query_len: int
    max_seq_len: int
    is_decode_only: bool  # every request has exactly one new token
    # CSR form of the block tables for kernels that want it (FlashInfer); indptr stays on the host.
    kv_indptr_host: torch.Tensor | None = None  # [num_seqs + 1] int32, CPU
    kv_indices: torch.Tensor | None = None  # [total blocks] int32, device
    kv_last_page_len_host: torch.Tensor | None = None  # [num_seqs] int32, CPU
    query_start_loc_host: torch.Tensor | None = None  # [num_seqs + 1] int32, CPU

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]
