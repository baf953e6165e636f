"""Structured outputs' cost (JSON lines).

1. Decode step time at batch B with half the requests under a JSON-schema grammar, against the same batch
   with none, in the same run (fresh prompts each side: neither runs on the other's prefix cache), for two
   grammars that never end within the run, so every step masks B/2 rows:
   - `records`: a list of records, each constrained request's of one of bench/json_schemas.py's schemas
     (nested objects, enums, numbers, short strings), at least 64 of them: what applications ask for;
   - `long_string`: one JSON string of 4,000 characters or more, the costly case: inside a string nearly
     every token is allowed, and random weights pick byte tokens that leave the lexer mid-character, where
     llguidance's masks cost most (a trained model writes words there).
   Issue 32's bar: <= 1.05x at batch 64 (records).
2. Grammar build time for bench/json_schemas.py's schemas, cold (a matcher built from the schema) and cached
   (a copy of the cached one), with llguidance (what the engine uses) and, when installed, xgrammar (cold
   compile and its compiler's cache), the measurement behind engine/guided.py's choice; and the mask time a
   token along a schema's answer for each.

  python -m bench.structured                # GPU: 1B shapes (random weights), batch 64, 128 output tokens
  python -m bench.structured --quick        # CPU: the demo model, batch 8, 16 output tokens, records only
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

from bench.common import emit
from bench.json_schemas import SCHEMAS

LONG_STRING = {"type": "object", "properties": {"text": {"type": "string", "minLength": 4000}}, "required": ["text"]}
WORKLOADS = {"records": [{"type": "array", "items": s, "minItems": 64} for s in SCHEMAS], "long_string": [LONG_STRING]}


def step_times(engine, batch: int, prompt_len: int, output_len: int, schemas: list[dict] | None, salt: int) -> float:
    """Seconds an output token (a decode step) of the batch, every other request under one of the schemas
    (in turn; None: no grammar)."""
    from engine.sampling_params import SamplingParams

    plain = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    rng = np.random.default_rng(salt)
    prompts = [rng.integers(100, 30000, prompt_len).tolist() for _ in range(batch)]
    params = [plain] * batch
    for k, i in enumerate(range(1, batch, 2) if schemas else ()):
        params[i] = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True,
                                   grammar=("json_schema", json.dumps(schemas[k % len(schemas)])))
    t0 = time.perf_counter()
    done = engine.generate(prompts, params)
    wall = time.perf_counter() - t0
    assert all(len(c.token_ids) == output_len for c in done), "a request ended early"
    return wall / output_len


def decode_overhead(model: str, engine_args: dict, batch: int, prompt_len: int, output_len: int,
                    workloads: list[str]) -> None:
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=model, max_num_seqs=batch, **engine_args))
    for name in workloads:  # warm-up: kernels, graphs, the grammars' templates
        step_times(engine, batch, prompt_len, 4, WORKLOADS[name], salt=1)
    salt = 100
    for name in workloads:
        schemas = WORKLOADS[name]
        runs = {"none": [], "half": []}
        for _ in range(3):  # interleaved, so drift (clocks, allocator) falls on both sides
            runs["none"].append(step_times(engine, batch, prompt_len, output_len, None, salt=salt))
            runs["half"].append(step_times(engine, batch, prompt_len, output_len, schemas, salt=salt + 1))
            salt += 2
        none, half = min(runs["none"]), min(runs["half"])
        emit("structured", f"decode_step_b{batch}_half_json_{name}", half * 1e3, "ms", baseline="no grammar",
             baseline_value=none * 1e3, batch=batch, output_tokens=output_len, schemas=len(schemas),
             runs_ms=[x * 1e3 for x in runs["half"]], baseline_runs_ms=[x * 1e3 for x in runs["none"]])


def grammar_costs(tokenizer_json: str, vocab: int) -> None:
    import llguidance

    from protocol.grammar import to_llguidance

    grammars = [to_llguidance("json_schema", json.dumps(s)) for s in SCHEMAS]
    t0 = time.perf_counter()
    tok = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab, eos_token=[0])
    tok_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    templates = [llguidance.LLMatcher(tok, g) for g in grammars]
    cold = time.perf_counter() - t0
    assert not any(m.is_error() for m in templates), [m.get_error() for m in templates if m.is_error()]
    t0 = time.perf_counter()
    for m in templates:
        m.deep_copy()
    cached = time.perf_counter() - t0
    n = len(SCHEMAS)
    emit("structured", "llguidance_build_cached_per_schema", cached / n * 1e6, "us", baseline="cold",
         baseline_value=cold / n * 1e6, schemas=n, tokenizer_s=tok_s)
    llg_mask = _walk_llguidance(tok, templates)
    try:
        import xgrammar as xgr
    except ImportError:
        emit("structured", "llguidance_mask_per_token", llg_mask * 1e6, "us", note="xgrammar not installed")
        return
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json))
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab))
    t0 = time.perf_counter()
    compiled = [compiler.compile_json_schema(json.dumps(s), any_whitespace=False) for s in SCHEMAS]
    x_cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    for s in SCHEMAS:
        compiler.compile_json_schema(json.dumps(s), any_whitespace=False)
    x_cached = time.perf_counter() - t0
    emit("structured", "llguidance_build_cold_per_schema", cold / n * 1e6, "us", baseline="xgrammar compile cold",
         baseline_value=x_cold / n * 1e6, schemas=n)
    emit("structured", "xgrammar_compile_cached_per_schema", x_cached / n * 1e6, "us", schemas=n)
    x_mask = _walk_xgrammar(xgr, compiled, vocab)
    emit("structured", "llguidance_mask_per_token", llg_mask * 1e6, "us", baseline="xgrammar mask per token",
         baseline_value=x_mask * 1e6)


def _random_walks(fill, consume, unpack, matchers: list, steps: int = 24) -> float:
    """Mean seconds a mask along seeded random walks through each grammar (allowed tokens only)."""
    rng = np.random.default_rng(0)
    total, count = 0.0, 0
    for m in matchers:
        for _ in range(steps):
            t0 = time.perf_counter()
            bits = fill(m)
            total += time.perf_counter() - t0
            count += 1
            allowed = unpack(bits)
            if not len(allowed) or not consume(m, int(rng.choice(allowed))):
                break
    return total / count


def _unpack(bits: np.ndarray, vocab: int) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(bits.view(np.uint8), bitorder="little")[:vocab])


def _walk_llguidance(tok, templates: list) -> float:
    import llguidance.numpy as lnp

    buf = lnp.allocate_token_bitmask(1, tok.vocab_size)

    def fill(m):
        lnp.fill_next_token_bitmask(m, buf, 0)
        return buf[0]

    return _random_walks(fill, lambda m, t: m.consume_token(t) and not m.is_stopped(),
                         lambda b: _unpack(b, tok.vocab_size), [m.deep_copy() for m in templates])


def _walk_xgrammar(xgr, compiled: list, vocab: int) -> float:
    buf = xgr.allocate_token_bitmask(1, vocab)

    def fill(m):
        m.fill_next_token_bitmask(buf, 0)
        return buf[0].numpy()

    return _random_walks(fill, lambda m, t: m.accept_token(t) and not m.is_terminated(),
                         lambda b: _unpack(b, vocab), [xgr.GrammarMatcher(c) for c in compiled])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU, the demo model, a small batch")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--output-len", type=int, default=None)
    ap.add_argument("--workload", choices=[*WORKLOADS, "all"], default=None,
                    help="the decode-step workloads to run (default: all; records with --quick)")
    ap.add_argument("--tokenizer-dir", default=".gpu/tokenizer", help="tokenizer files for the random-weight shapes")
    a = ap.parse_args()
    batch, output_len = a.batch or (8 if a.quick else 64), a.output_len or (16 if a.quick else 128)
    from engine.tokenizer_files import tokenizer_dir
    from pdserve_cli.main import demo_model

    if a.quick:
        model, engine_args = demo_model(), {"device": "cpu", "kv_cache_bytes": 64 << 20}
        tok_dir = tokenizer_dir(demo_model())
    else:
        from bench.disagg import LLAMA_1B, dummy_model

        tok_dir = Path(a.tokenizer_dir)
        model, engine_args = str(dummy_model(tok_dir, LLAMA_1B)), {"load_format": "dummy"}
    workload = a.workload or ("records" if a.quick else "all")  # (--quick: the bar's workload, the same code)
    decode_overhead(model, engine_args, batch, 32, output_len, list(WORKLOADS) if workload == "all" else [workload])
    grammar_costs((Path(tok_dir) / "tokenizer.json").read_text(), 49152)


if __name__ == "__main__":
    main()
