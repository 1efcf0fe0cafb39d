"""JSON extraction: prompt and label mask with the real Qwen3 tokenizer, training, generation, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from support import (assert_refused_before_the_model_loads, assert_user_error, jsonl, qwen_tokenizer_dir,
                     read_jsonl, run, save_tiny_qwen, write, write_lines)
from qtune.errors import QtuneError
from qtune.records import ExtractionExample
from qtune.tasks.extraction.encode import DEFAULT_INSTRUCTION, PromptBuilder, collate
from qtune.tasks.extraction.model import loss as sft_loss

INSTRUCTION = "Extract name and phone as JSON."
PEOPLE = [("张伟", "13800000001"), ("Alice Smith", "555-0101"), ("李娜", "13900000002"), ("Bob Jones", "555-0199"),
          ("王芳", "13700000003"), ("Carol White", "555-0142"), ("刘洋", "13600000004"), ("Dan Brown", "555-0177")]


def _rows(people=PEOPLE):
    return [{"instruction": INSTRUCTION, "input": f"{name}的电话是{phone}", "output": {"name": name, "phone": phone}}
            for name, phone in people]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_tokenizer_dir())


@pytest.fixture(scope="module")
def qwen64_dir(tmp_path_factory) -> str:
    """A tiny Qwen3 wide enough (hidden 64) to memorise a few answers in seconds."""
    return save_tiny_qwen(tmp_path_factory.mktemp("qwen64"), hidden=64, head_dim=16)


# ---------------------------------------------------------------- prompt and label mask


def test_prompt_is_the_chat_template_with_thinking_off(tokenizer):
    builder = PromptBuilder(tokenizer, "default instruction")
    text = tokenizer.decode(builder.prompt_ids("张伟的电话是123", INSTRUCTION))
    assert text == (f"<|im_start|>user\n{INSTRUCTION}\n\n张伟的电话是123<|im_end|>\n"
                    "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # rows without an instruction get the model's default one
    assert tokenizer.decode(builder.prompt_ids("x")).startswith("<|im_start|>user\ndefault instruction\n\nx")
    assert tokenizer.decode(PromptBuilder(tokenizer).prompt_ids("x")).startswith(
        f"<|im_start|>user\n{DEFAULT_INSTRUCTION}\n\nx")


def test_label_mask_trains_exactly_the_answer_and_eos(tokenizer):
    builder = PromptBuilder(tokenizer)
    output = json.dumps({"name": "张伟", "phone": "13800000001"}, ensure_ascii=False)
    feature = builder.encode(ExtractionExample(input="张伟的电话是13800000001", output=output, instruction=INSTRUCTION))
    ids, labels = feature["input_ids"], feature["labels"]
    prompt = builder.prompt_ids("张伟的电话是13800000001", INSTRUCTION)
    assert len(ids) == len(labels) == len(feature["attention_mask"])
    assert ids[:len(prompt)] == prompt  # training sees the same prompt generation will
    assert labels[:len(prompt)] == [-100] * len(prompt)
    trained = [i for i, label in enumerate(labels) if label != -100]
    assert trained == list(range(len(prompt), len(ids)))  # every token after the prompt, nothing before
    assert [labels[i] for i in trained] == ids[len(prompt):]
    assert ids[-1] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode([ids[i] for i in trained]) == output + "<|im_end|>"
    # token by token: the answer tokens are the tokenizer's own encoding of the output text
    assert [ids[i] for i in trained[:-1]] == tokenizer(output, add_special_tokens=False)["input_ids"]
    # the whole example is what the chat template renders for the finished conversation, minus its final "\n"
    conversation = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{INSTRUCTION}\n\n张伟的电话是13800000001"},
         {"role": "assistant", "content": output}], tokenize=False, enable_thinking=False)
    assert tokenizer.decode(ids) + "\n" == conversation


def test_a_tokenizer_without_chat_template_is_refused(tiny_bert_dir):
    from transformers import AutoTokenizer

    with pytest.raises(QtuneError, match="chat template"):
        PromptBuilder(AutoTokenizer.from_pretrained(tiny_bert_dir))


def test_collate_pads_right_and_keeps_logits_from_the_first_answer(tokenizer):
    builder = PromptBuilder(tokenizer)
    features = [builder.encode(ExtractionExample(input=r["input"], output=json.dumps(r["output"]),
                                                 instruction=r["instruction"])) for r in _rows()[:3]]
    batch = collate(tokenizer, features)
    width = max(len(f["input_ids"]) for f in features)
    assert batch["input_ids"].shape == batch["labels"].shape == (3, width)
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == f["input_ids"]
        assert batch["input_ids"][row, n:].tolist() == [tokenizer.pad_token_id] * (width - n)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert batch["labels"][row].tolist() == f["labels"] + [-100] * (width - n)
    first = min(f["labels"].index(next(t for t in f["labels"] if t != -100)) for f in features)
    assert batch["logits_to_keep"] == width - first + 1


def test_loss_on_kept_logits_equals_the_loss_on_all_positions(tokenizer, tiny_qwen_dir):
    import torch.nn.functional as F

    from qtune.tasks import load_model

    loaded = load_model(tiny_qwen_dir, task="extract", device="cpu", precision="fp32")
    builder = PromptBuilder(tokenizer)
    features = [builder.encode(ExtractionExample(input=r["input"], output=json.dumps(r["output"]),
                                                 instruction=r["instruction"])) for r in _rows()[:4]]
    batch = collate(tokenizer, features)
    assert batch["logits_to_keep"] < batch["input_ids"].shape[1]
    with torch.no_grad():
        fast = sft_loss(loaded.model, batch)
        logits = loaded.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        full = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                               ignore_index=-100)
    assert fast.item() == pytest.approx(full.item(), rel=1e-6)


def test_lora_for_extraction_covers_every_linear_projection(tiny_qwen_dir):
    from qtune.modeling.loading import LoraSettings
    from qtune.tasks import load_model

    loaded = load_model(tiny_qwen_dir, task="extract", lora=LoraSettings(), trainable=True, device="cpu")
    targets = set(loaded.model.peft_config["default"].target_modules)
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert type(loaded.model.get_base_model()).__name__ == "Qwen3ForCausalLM"


# ---------------------------------------------------------------- train, extract, evaluate


LINEAR_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def overfit(qwen64_dir, tmp_path_factory):
    """A tiny Qwen3 trained on 8 examples until it knows them by heart: LoRA (the default way) on
    every linear layer, rank 32, no dropout; 70 steps (40 were too few, 60 enough) take about 30 s
    on 2 CPU cores, where full fine-tuning needed 100 steps and twice the time (the 151k-token
    embedding's gradient and AdamW state)."""
    from qtune.cli import main

    folder = tmp_path_factory.mktemp("extract-run")
    train = write(folder / "train.jsonl", jsonl(_rows()))
    output = folder / "run"
    # one batch of 8 per epoch; evaluation only at the end, so no checkpoint is written per epoch
    code = main(["train", "extract", "--model", qwen64_dir, "--train", str(train), "--output", str(output),
                 "--lora-r", "32", "--lora-dropout", "0", "--lora-targets", *LINEAR_LAYERS, "--lr", "1e-2",
                 "--epochs", "70", "--batch-size", "8", "--scheduler", "constant", "--warmup-ratio", "0.1",
                 "--eval-steps", "1000", "--device", "cpu"])
    assert code == 0
    return {"train": train, "output": output}


def test_training_then_extract_reproduces_the_training_answers(overfit, tmp_path, capsys):
    run_dir = overfit["output"]
    assert {p.name for p in run_dir.iterdir()} >= {"best", "last", "metrics.json", "config.yaml", "runs"}
    meta = json.loads((run_dir / "best" / "qtune.json").read_text())
    assert meta["task"] == "extract" and meta["instruction"] == INSTRUCTION
    # inputs without an instruction get the one stored with the model; batch 3 mixes lengths and padding
    inputs = write(tmp_path / "in.jsonl", jsonl([{"input": r["input"]} for r in _rows()]))
    out = tmp_path / "out.jsonl"
    code, stdout, err = run(capsys, "extract", "--model", run_dir / "best", "--input", inputs, "--output", out,
                            "--batch-size", "3", "--max-new-tokens", "64", "--device", "cpu")
    assert code == 0, err
    assert "8 parsed, 0 did not parse" in stdout
    rows = read_jsonl(out)
    assert [r["input"] for r in rows] == [r["input"] for r in _rows()]  # input order
    assert [r["output"] for r in rows] == [r["output"] for r in _rows()]
    assert all("error" not in r for r in rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]  # no temp file left


def test_eval_extract_on_the_learned_examples_is_perfect(overfit, tmp_path, capsys):
    code, stdout, err = run(capsys, "eval", "extract", "--model", overfit["output"] / "best", "--data",
                            overfit["train"], "--output", tmp_path / "report", "--max-new-tokens", "64",
                            "--device", "cpu")
    assert code == 0, err
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    result = metrics[str(overfit["output"] / "best")]
    assert result["count"] == 8
    assert result["json_valid"] == result["all_fields_exact"] == 1.0
    assert result["fields"] == {"name": 1.0, "phone": 1.0}
    assert (tmp_path / "report" / "report.md").is_file() and (tmp_path / "report" / "extraction.png").is_file()


def test_unparseable_answers_are_reported_not_fatal(tiny_qwen_dir, tmp_path, capsys):
    """An untrained model writes noise: every row still comes back, with output null and an error."""
    inputs = write(tmp_path / "in.jsonl", jsonl([{"input": r["input"]} for r in _rows()[:3]]))
    out = tmp_path / "out.jsonl"
    code, stdout, err = run(capsys, "extract", "--model", tiny_qwen_dir, "--input", inputs, "--output", out,
                            "--max-new-tokens", "6", "--device", "cpu")
    assert code == 0, err
    rows = read_jsonl(out)
    assert len(rows) == 3 and [r["input"] for r in rows] == [r["input"] for r in _rows()[:3]]
    for row in rows:
        assert row["output"] is None
        assert row["error"].startswith("stopped at max_new_tokens=6")
        assert isinstance(row["raw"], str)
    assert "0 parsed, 3 did not parse" in stdout


def test_extractor_matches_generate_one_by_one(tiny_qwen_dir):
    """Batched, left-padded, length-sorted generation gives what one-by-one generation gives."""
    from qtune.api import load

    extractor = load(tiny_qwen_dir, task="extract", device="cpu", precision="fp32")
    texts = [r["input"] * k for r, k in zip(_rows(), (1, 3, 2, 5))]
    batched = extractor.extract(texts, batch_size=4, max_new_tokens=8)
    single = [extractor.extract([t], batch_size=1, max_new_tokens=8)[0] for t in texts]
    assert [b.text for b in batched] == [s.text for s in single]


def test_long_examples_are_left_out_and_reported(qwen64_dir, tmp_path, capsys):
    rows = _rows()[:3] + [{"input": "很长的文本" * 200, "output": {"name": "x", "phone": "y"}}]
    train = write(tmp_path / "train.jsonl", jsonl(rows))
    code, stdout, err = run(capsys, "train", "extract", "--model", qwen64_dir, "--train", train, "--output",
                            tmp_path / "run", "--max-length", "128", "--epochs", "1", "--device", "cpu")
    assert code == 0, err
    assert "1 of 4 training examples are longer than --max-length 128 and are left out (lines 4)" in stdout


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("line, message", [
    ('{"input": "a", "output": {"name": "x"}}\n{"input": "b", "output": {"name"', "train.jsonl:2: malformed JSON"),
    ('{"input": "a"}', "train.jsonl:1, field 'output'"),
    ('{"input": "", "output": {"name": "x"}}', "train.jsonl:1, field 'input'"),
    ('{"input": "a", "output": [1, 2]}', "train.jsonl:1, field 'output'"),
])
def test_bad_training_rows_fail_before_any_model_loads(tmp_path, capsys, line, message):
    train = write_lines(tmp_path / "train.jsonl", line)
    assert_refused_before_the_model_loads(capsys, "extract", ["--train", train], tmp_path / "run", message)


def test_extract_refuses_a_non_jsonl_output_and_bad_input_rows(tiny_qwen_dir, tmp_path, capsys):
    inputs = write(tmp_path / "in.jsonl", jsonl([{"input": "a"}, {"text": "no input field"}]))
    code, _, err = run(capsys, "extract", "--model", tiny_qwen_dir, "--input", inputs, "--output", tmp_path / "o.csv")
    assert_user_error(code, err, "o.csv", "JSONL")
    code, _, err = run(capsys, "extract", "--model", tiny_qwen_dir, "--input", inputs, "--output", tmp_path / "o.jsonl")
    assert_user_error(code, err, "in.jsonl:2, field 'input'")
    assert not (tmp_path / "o.jsonl").exists()


def test_data_pii_sft_command(tmp_path, capsys):
    records = [{"name": f"人{i}", "location": f"地址{i}", "emailAddress": f"p{i}@x.cn", "phoneNumbers": 13800000000 + i,
                "naturalParagraph": f"人{i}住在地址{i}，邮箱p{i}@x.cn，电话{13800000000 + i}。"} for i in range(20)]
    source = tmp_path / "people.json"
    source.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    code, stdout, err = run(capsys, "data", "pii-sft", source, "--output", tmp_path / "sft", "--eval-fraction", "0.25")
    assert code == 0, err
    train, evaluation = read_jsonl(tmp_path / "sft" / "train.jsonl"), read_jsonl(tmp_path / "sft" / "eval.jsonl")
    assert (len(train), len(evaluation)) == (15, 5)
    assert "train.jsonl (15 rows)" in stdout and "eval.jsonl (5 rows)" in stdout
    row = (train + evaluation)[0]
    assert set(row["output"]) == {"name", "address", "email", "phone"}
    assert isinstance(row["output"]["phone"], str) and row["output"]["phone"] in row["input"]


def test_data_stats_counts_tokens_as_training_encodes_them(tokenizer, tmp_path, capsys):
    rows = _rows()
    train = write(tmp_path / "train.jsonl", jsonl(rows))
    builder = PromptBuilder(tokenizer)
    expected = sorted(len(builder.encode(ExtractionExample(input=r["input"], output=json.dumps(r["output"], ensure_ascii=False),
                                                           instruction=r["instruction"]))["input_ids"]) for r in rows)
    code, out, err = run(capsys, "data", "stats", train, "--task", "extract", "--model", qwen_tokenizer_dir(),
                         "--plot", tmp_path / "len.png", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert (summary["rows"], summary["min"], summary["max"]) == (8, expected[0], expected[-1])
    assert summary["suggested_max_length"] >= expected[-2] and summary["suggested_max_length"] % 8 == 0
    assert (tmp_path / "len.png").is_file()
    code, out, err = run(capsys, "data", "stats", train, "--task", "extract", "--model", qwen_tokenizer_dir(),
                         "--plot", tmp_path / "len.png")
    assert "tokens per example (chat prompt, answer, EOS)" in out and "left out of training" in out


def test_generate_gives_what_transformers_greedy_generate_gives(tiny_qwen_dir):
    """qtune's greedy loop against `model.generate` one prompt at a time: the same tokens, also where
    one row of a batch ends early (its end token made the model's) and the others go on."""
    import torch
    from transformers import GenerationConfig

    from qtune.tasks import load_model
    from qtune.tasks.extraction.model import generate

    loaded = load_model(tiny_qwen_dir, task="extract", device="cpu", precision="fp32")
    prompts = [[9707, 11, 1879, 13], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42, 7], [5, 900, 31, 77, 12]]
    model, tokenizer = loaded.model, loaded.tokenizer

    def reference(prompt, eos):
        config = GenerationConfig(max_new_tokens=10, do_sample=False, eos_token_id=eos,
                                  pad_token_id=tokenizer.pad_token_id)
        with torch.inference_mode():
            out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                 dtype=torch.long), generation_config=config)
        row = out[0, len(prompt):].tolist()
        end = next((k for k, t in enumerate(row) if t in eos), None)
        return row if end is None else row[:end + 1]

    eos = [tokenizer.eos_token_id]
    first = [reference(p, eos) for p in prompts]
    assert all(len(f) == 10 for f in first)  # random weights: no end token within 10
    # a token some row makes first at step k and another row never makes: made the end token, that
    # row ends after k + 1 tokens (its rest is padding) and the other goes on to 10
    r, k, token = next((r, k, t) for r, row in enumerate(first) for k, t in enumerate(row)
                       if t not in row[:k] and any(t not in f for f in first))
    model.config.eos_token_id = token
    eos = sorted({tokenizer.eos_token_id, token})
    expected = [reference(p, eos) for p in prompts]
    assert len(expected[r]) == k + 1 and max(len(e) for e in expected) == 10
    got = generate(loaded, prompts, batch_size=4, max_new_tokens=10)
    assert [g.tokens for g in got] == [len(e) for e in expected]
    assert [g.text for g in got] == [tokenizer.decode(e[:-1] if e[-1] in eos else e, skip_special_tokens=True).strip()
                                     for e in expected]
    assert [g.finished for g in got] == [e[-1] in eos for e in expected]
