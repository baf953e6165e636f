"""The router tokenizes off its event loop in batches; the ids must be exactly those of plain `encode`."""

import asyncio
import random

from protocol.tokenizer import ChatTokenizer
from router.tokenize import BatchEncoder


async def test_batched_ids_equal_plain_encode_for_concurrent_prompts(demo_gguf):
    from engine.tokenizer_files import tokenizer_dir

    tok = ChatTokenizer.from_dir(tokenizer_dir(demo_gguf))
    enc = BatchEncoder(tok, max_batch=8)
    rng = random.Random(0)
    words = ["héllo", "world", "<|im_start|>", "\n", "  ", "12345", "naïve", "🙂", "the", "token", "<|im_end|>"]
    texts = [tok.render_chat([{"role": "user", "content": " ".join(rng.choice(words) for _ in range(rng.randint(1, 400)))}])
             for _ in range(40)]
    got = await asyncio.gather(*(enc.encode(t) for t in texts))  # several batches, some texts inline
    assert got == [tok.encode(t, add_special_tokens=False) for t in texts]
    enc.close()
