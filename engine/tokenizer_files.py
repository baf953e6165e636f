"""The tokenizer files of a model: as they are in a Hugging Face folder, or converted from GGUF metadata.

A GGUF file carries its tokenizer as metadata; transformers converts it to a fast tokenizer, which is then
saved once into a cache folder keyed by the file's identity, so that workers can serve plain files to the
router (which must not need torch).
"""

import hashlib
import os
import shutil
from pathlib import Path

from engine.errors import ModelLoadError
from engine.weight_loader import is_gguf
from protocol.tokenizer import TOKENIZER_FILES, ChatTokenizer


def _cache_root() -> Path:
    return Path(os.path.expanduser("~/.cache/pdserve/tokenizers"))


def tokenizer_dir(model: str | Path, cache_root: Path | None = None) -> Path:
    """A folder holding tokenizer.json (+ config, chat template) for this model."""
    model = Path(model)
    if not model.exists():
        raise ModelLoadError(f"model path {model} does not exist")
    if not is_gguf(model):
        if not (model / "tokenizer.json").exists():
            raise ModelLoadError(f"{model} has no tokenizer.json")
        return model
    st = model.stat()
    key = hashlib.sha256(f"{model.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = (cache_root or _cache_root()) / key
    if (out / "tokenizer.json").exists():
        return out
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model.parent), gguf_file=model.name)
    except Exception as e:  # transformers raises many kinds for a broken file
        raise ModelLoadError(f"cannot read the tokenizer of {model}: {e}") from e
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tok.save_pretrained(str(tmp))
    try:
        tmp.rename(out)
    except OSError:  # another worker converted it at the same time
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_tokenizer_files(folder: Path) -> dict[str, str]:
    return {name: (folder / name).read_text() for name in TOKENIZER_FILES if (folder / name).exists()}


def load_tokenizer(model: str | Path) -> ChatTokenizer:
    return ChatTokenizer.from_dir(tokenizer_dir(model))
