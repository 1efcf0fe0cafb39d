"""Extractor export: the merged LM with greedy generation settings and a chat template whose
default is qtune's prompt; transformers' `generate` on it answers as qtune's Extractor does.

The source is a LoRA checkpoint of the tiny Qwen3 with random adapter weights (so merging
changes the outputs); its answers are gibberish, but greedy and reproducible."""

from __future__ import annotations

import json

import pytest
import torch
from support import run

import qtune
from qtune.errors import QtuneError
from qtune.modeling.checkpoint import merge_lora, save_model_files
from qtune.modeling.loading import LoraSettings
from qtune.tasks import load_model
from qtune.tasks.extraction.export import PROMPT_FILE, check_export, write_export

TEXTS = ["Alice is 30.", "Bob, 41, lives in Paris and works at the old train station near the river.", "张三 25 岁"]


@pytest.fixture(scope="module")
def source(tiny_qwen_dir, tmp_path_factory) -> str:
    loaded = load_model(tiny_qwen_dir, task="extract", lora=LoraSettings(), device="cpu", precision="fp32")
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    folder = tmp_path_factory.mktemp("extract-lora") / "src"
    save_model_files(loaded, folder)
    return str(folder)


@pytest.fixture(scope="module")
def extractor(source):
    return qtune.load(source, task="extract", device="cpu")


@pytest.fixture(scope="module")
def out(source, tmp_path_factory):
    """`write_export` as the framework calls it: loaded on the CPU in fp32, LoRA merged."""
    loaded = merge_lora(load_model(source, task="extract", device="cpu", precision="fp32"))
    folder = tmp_path_factory.mktemp("extract-export") / "out"
    folder.mkdir()
    write_export(loaded, folder, "causal-lm")
    return folder


def test_generation_config_is_greedy_with_qtune_stop_and_pad_ids(out, extractor):
    tokenizer = extractor.loaded.tokenizer
    config = json.loads((out / "generation_config.json").read_text(encoding="utf-8"))
    assert config["do_sample"] is False and config["max_new_tokens"] == 256
    assert config["eos_token_id"] == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert config["pad_token_id"] == tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    spec = json.loads((out / PROMPT_FILE).read_text(encoding="utf-8"))
    assert spec["user_message"] == "{instruction}\n\n{input}"
    assert spec["instruction"] == "Extract the requested fields from the text. Answer with a JSON object only."


def test_the_exported_chat_template_renders_qtune_prompt_by_default(out, extractor):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    spec = json.loads((out / PROMPT_FILE).read_text(encoding="utf-8"))
    for text in TEXTS:
        messages = [{"role": "user", "content": f"{spec['instruction']}\n\n{text}"}]
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert rendered.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert tokenizer(rendered, add_special_tokens=False)["input_ids"] == extractor.builder.prompt_ids(text)
        # a caller can still turn thinking on
        thinking = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                                 enable_thinking=True)
        assert thinking.endswith("<|im_start|>assistant\n")


def test_greedy_generate_of_the_export_equals_the_extractor(out, extractor):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    prompts = [extractor.builder.prompt_ids(t) for t in TEXTS]
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # (rows, width), left-padded
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        new = model.generate(input_ids=ids, attention_mask=mask)[:, width:].tolist()  # the folder's settings
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    expected = extractor.extract(TEXTS)
    for row, want in zip(new, expected):
        kept = row[:row.index(stop) + 1] if stop in row else row
        assert len(kept) == want.tokens
        assert tokenizer.decode([t for t in kept if t != stop], skip_special_tokens=True).strip() == want.text
    assert all(e.text for e in expected)


def test_check_export_reports_no_difference_and_sees_another_model(out, extractor, tiny_qwen_dir):
    found = check_export(out, extractor, TEXTS)
    assert found == {"transformers: prompts differing (share)": 0.0, "transformers: answers differing (share)": 0.0,
                     "transformers: next-token probabilities": pytest.approx(0.0, abs=1e-5)}
    other = check_export(out, qtune.load(tiny_qwen_dir, task="extract", device="cpu"), TEXTS[:1])
    assert other["transformers: answers differing (share)"] == 1.0
    # a random model spreads its probability over the whole vocabulary: small, but far from equal
    probabilities = "transformers: next-token probabilities"
    assert other[probabilities] > 1e3 * max(found[probabilities], 1e-12)


def test_an_extractor_exports_only_as_causal_lm(source, tmp_path):
    loaded = load_model(source, task="extract", device="cpu", precision="fp32")
    with pytest.raises(QtuneError, match="merge the LoRA adapter"):
        write_export(loaded, tmp_path, "causal-lm")
    with pytest.raises(QtuneError, match="an extractor exports as causal-lm, not 'onnx'"):
        write_export(merge_lora(loaded), tmp_path, "onnx")


def test_export_and_check_export_commands(source, tmp_path, capsys, monkeypatch):
    """The commands' plumbing: answers of 16 tokens (the export's generation config says how many
    `check-export` generates; the default 256 is checked above)."""
    import qtune.tasks.extraction.export as export

    monkeypatch.setattr(export, "default_max_new_tokens", lambda: 16)
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "export", "--model", source, "--output", out)
    assert code == 0, err
    assert "causal-lm" in stdout and (out / "generation_config.json").is_file()
    assert json.loads((out / "generation_config.json").read_text(encoding="utf-8"))["max_new_tokens"] == 16
    code, stdout, err = run(capsys, "check-export", out)
    assert code == 0, err
    assert "transformers: answers differing (share)" in stdout and "OVER" not in stdout
