"""GSM8K / MATH loaders on small files in the real formats, templates, chat template, mixtures, filter."""
import json

import pytest

from alignreg.config import ConfigError, DataSource, MathDataConfig, RLConfig, TaskConfig, from_dict, load_config
from alignreg.data import TASKS, prompt_dataset
from alignreg.data.math import build_math_dataset, load_source, math_prompt_dataset, mix, read_records, render_prompt
from alignreg.models import build_tokenizer

GSM8K = [
    {"question": f"Natalia sold clips to {i} of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": f"Natalia sold {i}/2 = <<{i}/2={i // 2}>>{i // 2} clips in May.\nNatalia sold {i}+{i // 2} = "
               f"<<{i}+{i // 2}={i + i // 2}>>{i + i // 2} clips altogether in April and May.\n#### {i + i // 2:,}"}
    for i in range(2, 2002, 50)
]
MATH = [
    {"problem": f"What is $\\frac{{1}}{{{i}}} + \\frac{{1}}{{{i}}}$?", "level": "Level 1", "type": "Prealgebra",
     "solution": f"We have $\\frac{{1}}{{{i}}} + \\frac{{1}}{{{i}}} = \\boxed{{\\frac{{2}}{{{i}}}}}$."}
    for i in range(3, 33)
]


@pytest.fixture
def files(tmp_path):
    import pandas as pd

    g = tmp_path / "gsm8k_train.jsonl"
    g.write_text("\n".join(json.dumps(r) for r in GSM8K) + "\n")
    m = tmp_path / "math_train.parquet"
    pd.DataFrame(MATH).to_parquet(m)
    return g, m


def test_read_real_formats(files):
    g, m = files
    rows = read_records(g)
    assert len(rows) == len(GSM8K) and rows[0]["question"] == GSM8K[0]["question"]
    assert read_records(m)[0]["solution"] == MATH[0]["solution"]
    with pytest.raises(ConfigError, match="not a .jsonl"):
        read_records(g.parent / "missing.jsonl")
    import datasets

    saved = g.parent / "gsm8k_saved"  # Dataset.save_to_disk: state.json, dataset_info.json, *.arrow
    datasets.Dataset.from_list(GSM8K).save_to_disk(str(saved))
    assert read_records(saved) == GSM8K
    train, held = prompt_dataset(TaskConfig(name="gsm8k", path=str(saved), eval_size=5))
    assert len(train) + len(held) == len(GSM8K)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(GSM8K)}).save_to_disk(str(g.parent / "dd"))
    with pytest.raises(ConfigError, match="saved DatasetDict; point to one split's directory .*dd/train"):
        read_records(g.parent / "dd")


def test_gsm8k_and_math_tasks_extract_gold(files):
    g, m = files
    train, held = TASKS.get("gsm8k")(TaskConfig(name="gsm8k", path=str(g), eval_size=5))
    assert len(held) == 5 and len(train) == len(GSM8K) - 5
    by_q = {r["question"]: r for r in train + held}
    r = by_q[GSM8K[-1]["question"]]
    assert r["answer"] == "2928" and "#### 2,928" in GSM8K[-1]["answer"]  # thousands separator removed
    assert r["prompt"].startswith(GSM8K[-1]["question"]) and "####" in r["prompt"]
    train, held = prompt_dataset(TaskConfig(name="math", path=str(m), eval_size=4))
    rec = next(x for x in train + held if x["question"] == MATH[0]["problem"])
    assert rec["answer"] == "\\frac{2}{3}" and "\\boxed{}" in rec["prompt"]
    assert not {x["question"] for x in train} & {x["question"] for x in held}


def test_templates_and_chat_template():
    tok = build_tokenizer()
    assert render_prompt("1+1?", MathDataConfig(template="plain")) == "1+1?"
    assert render_prompt("1+1?", MathDataConfig(template="Q: {question} A:")) == "Q: 1+1? A:"
    chat = render_prompt("1+1?", MathDataConfig(template="plain", chat_template=True, system_prompt="Be brief."), tok)
    assert chat == tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}],
                                           tokenize=False, add_generation_prompt=True)
    with pytest.raises(ConfigError, match="string with"):
        render_prompt("x", MathDataConfig(template="no placeholder"))
    # braces other than {question} are kept as written (the canonical Qwen2.5-Math instruction)
    qwen = "{question}\nPlease reason step by step, and put your final answer within \\boxed{}."
    assert render_prompt("1+1?", MathDataConfig(template=qwen)) == "1+1?\nPlease reason step by step, and put your final answer within \\boxed{}."
    assert render_prompt("1+1?", MathDataConfig()) == render_prompt("1+1?", MathDataConfig(template=qwen))  # the built-in boxed
    assert render_prompt("What is {x}?", MathDataConfig(template="Q: {question}")) == "Q: What is {x}?"
    with pytest.raises(ConfigError, match="math_data.template: 'Solve {q}' .*add {question}"):  # refused at config time
        from_dict(RLConfig, {"math_data": {"template": "Solve {q}"}})
    assert from_dict(RLConfig, {"math_data": {"template": qwen}}).math_data.template == qwen
    from alignreg.orchestration.score import second_prompt_ids  # SCoRe's second turn repeats the first prompt

    data = MathDataConfig(template=qwen, chat_template=True)
    ids = second_prompt_ids(tok, {"question": "1+1?"}, [], [], "2", " check:", data)
    first = tok(render_prompt("1+1?", data, tok), add_special_tokens=False)["input_ids"]
    assert ids[: len(first)] == first
    from alignreg.models import encode_prompts

    assert chat.startswith(tok.bos_token)  # the template writes BOS: encoding must not add a second one
    ids = encode_prompts(tok, [chat, "1+1?"])
    assert ids[0] == tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}],
                                             tokenize=True, add_generation_prompt=True, return_dict=False)
    assert [i.count(tok.bos_token_id) for i in ids] == [1, 1] and ids[1][0] == tok.bos_token_id


def test_mixture_weights_and_length_filter(files):
    g, m = files
    tok = build_tokenizer()
    cfg = RLConfig()
    cfg.task = TaskConfig(name="math_mixture", eval_size=4, train_size=30, reward="math_verify")
    cfg.math_data = MathDataConfig(sources=[DataSource(format="gsm8k", path=str(g), weight=2.0),
                                            DataSource(format="math", path=str(m), weight=1.0)], template="plain")
    train, held = math_prompt_dataset(cfg, tok)
    srcs = [r["source"] for r in train]
    assert len(train) == 30 and srcs.count("gsm8k") == 20 and srcs.count("math") == 10
    assert len(held) == 4
    again, _ = math_prompt_dataset(cfg, tok)
    assert [r["prompt"] for r in again] == [r["prompt"] for r in train]  # seeded
    cfg.math_data.max_prompt_tokens = 60  # the char tokenizer: MATH problems (~45 chars) pass, GSM8K (~190) do not
    train, held = math_prompt_dataset(cfg, tok)
    assert train and all(r["source"] == "math" for r in train)
    assert all(len(tok(r["prompt"])["input_ids"]) <= 60 for r in train + held)
    assert math_prompt_dataset(load_config(RLConfig, None, ["task.name=sort"]), tok) is None


def test_eval_path_and_errors(files, tmp_path):
    g, m = files
    train, held = build_math_dataset(TaskConfig(name="gsm8k", path=str(g), eval_size=3),
                                     MathDataConfig(eval_path=str(g), template="gsm8k"))
    assert len(held) == 3 and len(train) == len(GSM8K)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "x"}) + "\n")
    with pytest.raises(ConfigError, match="needs string fields .*'solution' is missing"):
        build_math_dataset(TaskConfig(name="math", path=str(bad), eval_size=1), MathDataConfig())
    bad.write_text(json.dumps({"question": "q", "answer": 3}) + "\n")  # a converted file with a numeric answer
    with pytest.raises(ConfigError, match="bad.jsonl row 0: .*needs string fields .*'answer' is int 3"):
        build_math_dataset(TaskConfig(name="gsm8k", path=str(bad), eval_size=1), MathDataConfig())
    # a broken line: datasets says only "An error occurred while generating the dataset"
    bad.write_text(json.dumps(GSM8K[0]) + "\n" + json.dumps(GSM8K[1])[:-1] + "\n" + json.dumps(GSM8K[2]) + "\n")
    with pytest.raises(ConfigError, match="cannot read .*bad.jsonl:2 is not valid JSON"):
        build_math_dataset(TaskConfig(name="gsm8k", path=str(bad), eval_size=1), MathDataConfig())
    # a solution without a final answer was kept with the whole worked solution as its gold: never rewarded
    for fmt, row, msg in [("gsm8k", {"question": "q", "answer": "She has 5 + 3 = 8 apples."}, "needs a '#### <answer>'"),
                          ("math", {"problem": "p", "solution": "So $x = 2$."}, "needs a \\\\boxed"),
                          ("math", {"problem": "p", "solution": "So $x = 2$.", "answer": " "}, "needs a \\\\boxed"),
                          ("prompt_answer", {"prompt": "p", "answer": ""}, "gold answer is empty")]:
        bad.write_text(json.dumps(row) + "\n")
        with pytest.raises(ConfigError, match=f"bad.jsonl row 0: .*{msg}"):
            build_math_dataset(TaskConfig(name="math_mixture", eval_size=1),
                               MathDataConfig(sources=[DataSource(format=fmt, path=str(bad))]))
    bad.write_text(json.dumps({"problem": "p", "solution": "So $x = 2$.", "answer": "2"}) + "\n")  # MATH-500's field
    assert load_source(DataSource(format="math", path=str(bad)))[0]["answer"] == "2"
    with pytest.raises(ConfigError, match="task.path is empty"):
        build_math_dataset(TaskConfig(name="gsm8k", eval_size=1), MathDataConfig())
    assert mix([[1, 2, 3], [4, 5]], [1.0, 1.0], 4, 0).__len__() == 4


def test_file_tasks_train_on_every_record_unless_capped(tmp_path, capsys):
    """task.train_size 0 (the default): a file task trains on all its records (a 7500-record MATH file used to
    train on 4096 silently); synthetic tasks still generate 4096; the split is printed at start-up."""
    n = 4200
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(n)]
    j = tmp_path / "big.jsonl"
    j.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    train, held = prompt_dataset(TaskConfig(name="jsonl", path=str(j), eval_size=10))
    assert (len(train), len(held)) == (n - 10, 10)
    assert f"task jsonl: {n - 10} train / 10 eval prompts (of {n} records in {j})" in capsys.readouterr().err
    train, _ = prompt_dataset(TaskConfig(name="jsonl", path=str(j), eval_size=10, train_size=100))
    assert len(train) == 100 and "task.train_size=100 caps the train set" in capsys.readouterr().err
    g = tmp_path / "big_gsm8k.jsonl"
    g.write_text("\n".join(json.dumps({"question": r["prompt"], "answer": f"#### {r['answer']}"}) for r in rows) + "\n")
    train, held = TASKS.get("gsm8k")(TaskConfig(name="gsm8k", path=str(g), eval_size=10))
    assert (len(train), len(held)) == (n - 10, 10)
    assert f"task gsm8k: {n - 10} train / 10 eval prompts (of {n} records in {g})" in capsys.readouterr().err
    train, _ = prompt_dataset(TaskConfig(name="arithmetic", max_operand=99, eval_size=10))
    assert len(train) == 4096
    with pytest.raises(ConfigError, match="train_size must be >= 0"):
        from_dict(TaskConfig, {"train_size": -1})


def test_resume_of_a_run_saved_with_the_old_train_size_default(tmp_path):
    """Runs written before train_size defaulted to 0 stored train_size: 4096; a synthetic task generates the
    same prompts for both, so their resume is not refused; a file task's would change its data, so it is."""
    import yaml

    from alignreg.config import to_dict
    from alignreg.orchestration.trainer import check_resume_config

    for name, refused in (("sort", False), ("jsonl", True)):
        cfg = load_config(RLConfig, None, [f"task.name={name}", "trainer.steps=10"])
        ckpt = tmp_path / name / "checkpoints" / "step_00000005"
        ckpt.mkdir(parents=True)
        (ckpt / "config.yaml").write_text(yaml.safe_dump({**to_dict(cfg), "task": {**to_dict(cfg.task), "train_size": 4096}}))
        if refused:
            with pytest.raises(ConfigError, match="task.train_size 4096 -> 0"):
                check_resume_config(cfg, ckpt)
        else:
            assert check_resume_config(cfg, ckpt) == []


def test_prompts_too_long_for_the_context_are_refused_at_start_up(tmp_path):
    """A prompt + rollout.max_new_tokens beyond the model's positions (tiny-qwen2: 128) is a one-line error before
    the run starts (vLLM refused it mid-run, HF ran past its position table)."""
    from alignreg.data import check_prompt_lengths
    from alignreg.orchestration.trainer import build_run

    tok = build_tokenizer()
    j = tmp_path / "long.jsonl"
    j.write_text("\n".join(json.dumps({"prompt": "1+" * (10 + i) + "1=", "answer": "x"}) for i in range(50)) + "\n")
    longest = max(len(tok("1+" * (10 + i) + "1=")["input_ids"]) for i in range(50))
    check_prompt_lengths([{"prompt": "1+" * 59 + "1="}], tok, 8, longest + 8, "limit")  # fits exactly
    base = [f"task.name=jsonl", f"task.path={j}", "task.eval_size=5", f"trainer.run_dir={tmp_path / 'run'}"]
    with pytest.raises(ConfigError, match=rf"the longest prompt has {longest} tokens, and {longest} \+ rollout.max_new_tokens "
                                          rf"\(64\) > 128 \(the model's max_position_embeddings\); .*math_data.max_prompt_tokens"):
        build_run(load_config(RLConfig, None, base + ["rollout.max_new_tokens=64"]), ckpt=None)
    with pytest.raises(ConfigError, match=r"> 100 \(vllm.max_model_len\)"):
        check_prompt_lengths([{"prompt": "1+" * 59 + "1="}], tok, 8, 100, "vllm.max_model_len")
