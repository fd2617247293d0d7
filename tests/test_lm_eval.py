"""The lm-eval model `qianwen` against lm-eval's own `hf` backend on the same exported checkpoint: local YAML
tasks over local JSONL files (multiple choice, generate_until, rolling log-likelihood), offline."""

from __future__ import annotations

import json
import os
from argparse import Namespace
from pathlib import Path

os.environ["HF_DATASETS_OFFLINE"] = "1"  # read when `datasets` is first imported
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

import qianwen  # noqa: E402
from qianwen.eval.lm_eval_adapter import QianwenLM, run_harness  # noqa: E402
from qianwen.tokenizer import Tokenizer, qwen_vocabulary  # noqa: E402

CHOICE_DOCS = [
    {"question": "What is two plus two?", "choices": ["four", "five", "twenty-two", "4"], "answer": 0},
    {"question": "The capital of France is ", "choices": ["Paris", "Lyon", "Rome", "a city"], "answer": 0},
    {"question": "Which one is a colour?", "choices": [" red", " table", " run", " quickly"], "answer": 0},
    {"question": "Python's keyword for a function:", "choices": [" def", " fun", " fn", " lambda x: x"], "answer": 0},
    {"question": "中国的首都是哪里？", "choices": ["北京", "上海", "广州", "深圳"], "answer": 0},
    {"question": "Pick a digit", "choices": [" 1", " 2", " 3", " 4"], "answer": 2},
]
GEN_DOCS = [
    {"question": "Say hello", "answer": "hello"},
    {"question": "Count: one, two,", "answer": "three"},
    {"question": "def add(a, b):\n    return", "answer": "a + b"},
    {"question": "The sky is", "answer": "blue"},
    {"question": "天空是什么颜色？", "answer": "蓝色"},
]
TEXT_DOCS = [
    {"text": "import os\n\n" + "def f(x):\n    return os.path.join(x, 'y')\n" * 12},
    {"text": "A short document."},
    {"text": "长文本测试。" * 40 + " The end."},
]

CHOICE_YAML = """\
task: qw_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""
GEN_YAML = """\
task: qw_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""
ROLLING_YAML = """\
task: qw_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
"""
TASKS = ["qw_choice", "qw_gen", "qw_rolling"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    """(model dir, task dir): a random-weight model with Qwen's real vocabulary and a 128-token window, saved as
    a Hugging Face directory; and the three task YAMLs with their JSONL data."""
    root = tmp_path_factory.mktemp("lm_eval")
    config = qianwen.ModelConfig(
        vocab_size=151936,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=64,
        seq_length=64,
        max_position_embeddings=128,
    )
    model = qianwen.Transformer(config)
    model.init_weights(seed=0)
    with torch.no_grad():  # larger logits than the 0.02 init, so greedy choices are far from ties
        model.lm_head.weight.mul_(20)
    qianwen.save(model, Tokenizer.from_file(qwen_vocabulary()), root / "model")
    # transformers lets generation_config.json's max_new_tokens (512, as Qwen ships) override the max_length that
    # lm-eval's hf backend derives from max_gen_toks, so hf would ignore the task's limit; drop it for the peer.
    generation = json.loads((root / "model" / "generation_config.json").read_text())
    generation.pop("max_new_tokens", None)
    (root / "model" / "generation_config.json").write_text(json.dumps(generation))
    tasks = root / "tasks"
    tasks.mkdir()
    for name, yaml, docs in [
        ("choice", CHOICE_YAML, CHOICE_DOCS),
        ("gen", GEN_YAML, GEN_DOCS),
        ("rolling", ROLLING_YAML, TEXT_DOCS),
    ]:
        data = tasks / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
        (tasks / f"{name}.yaml").write_text(yaml.format(data=data), encoding="utf-8")
    return root / "model", tasks


def evaluate(model, model_args, tasks_dir: Path) -> dict:
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=TASKS, task_manager=manager, log_samples=True, bootstrap_iters=0
    )


def responses(results: dict, task: str) -> list:
    """Every request's response in document order (a document holds one request per choice)."""
    docs = sorted(results["samples"][task], key=lambda d: d["doc_id"])
    return [resp for doc in docs for (resp,) in doc["resps"]]


def test_qianwen_model_agrees_with_the_hf_backend(setup):
    model_dir, tasks_dir = setup
    ours = evaluate("qianwen", f"pretrained={model_dir},device=cpu,dtype=float32,batch_size=4", tasks_dir)
    # The hf backend would put <|im_end|> (the tokenizer's eos) before a document; Qwen's documents follow
    # <|endoftext|>, which ours uses, so hf is told the same.
    hf_args = f"pretrained={model_dir},device=cpu,dtype=float32,batch_size=4,prefix_token_id=151643"
    theirs = evaluate("hf", hf_args, tasks_dir)

    choice_ours, choice_theirs = responses(ours, "qw_choice"), responses(theirs, "qw_choice")
    assert len(choice_ours) == sum(len(d["choices"]) for d in CHOICE_DOCS)
    for (ll, greedy), (ll_hf, greedy_hf) in zip(choice_ours, choice_theirs, strict=True):
        assert ll == pytest.approx(ll_hf, abs=1e-4) and greedy == greedy_hf

    rolling_ours, rolling_theirs = responses(ours, "qw_rolling"), responses(theirs, "qw_rolling")
    assert len(rolling_ours) == len(TEXT_DOCS)
    for ll, ll_hf in zip(rolling_ours, rolling_theirs, strict=True):
        assert ll == pytest.approx(ll_hf, abs=1e-4)
    tok = Tokenizer.from_file(model_dir)
    assert len(tok.encode(TEXT_DOCS[0]["text"])) > 128  # the long document spans several rolling windows

    assert responses(ours, "qw_gen") == responses(theirs, "qw_gen")
    assert any(responses(ours, "qw_gen"))  # something was generated
    for task in TASKS:
        for metric, value in ours["results"][task].items():
            if isinstance(value, float):
                assert value == pytest.approx(theirs["results"][task][metric], abs=1e-4), (task, metric)


def test_loglikelihood_is_the_model_own_probability(setup):
    """One request scored by the adapter equals the sum of the model's next-token log-probabilities; a request
    longer than the window keeps its last max_length tokens; an empty context is preceded by <|endoftext|>."""
    from lm_eval.api.instance import Instance

    model_dir, _ = setup
    lm = QianwenLM(str(model_dir), device="cpu", dtype="float32", batch_size=2)
    tok = lm.tokenizer

    def direct(context: list[int], continuation: list[int]) -> float:
        ids = torch.tensor([(context + continuation)[-129:]])
        with torch.no_grad():
            logprobs = lm.model(ids[:, :-1]).double().log_softmax(-1)[0]
        targets = ids[0, 1:]
        return float(logprobs[-len(continuation) :].gather(-1, targets[-len(continuation) :, None]).sum())

    long_context = " ".join(["word"] * 200)
    requests = [("Hello", " world"), ("", "Hello world"), (long_context, " end"), ("Hello ", "world")]
    instances = [Instance("loglikelihood", {}, args, i) for i, args in enumerate(requests)]
    got = lm.loglikelihood(instances, disable_tqdm=True)
    assert got[0][0] == pytest.approx(direct(tok.encode("Hello"), tok.encode(" world")), abs=1e-4)
    assert got[1][0] == pytest.approx(direct([tok.eod_id], tok.encode("Hello world")), abs=1e-4)
    context = tok.encode(long_context)
    assert len(context) > 128
    assert got[2][0] == pytest.approx(direct(context, tok.encode(long_context + " end")[len(context) :]), abs=1e-4)
    assert got[3] == got[0]  # a context's trailing space moves to the continuation, as lm-eval does


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_shared_contexts_score_as_separate_passes(setup, batch_size):
    """Options of one question share a pass over its context (its KV cache copied to each option): each still
    scores as the request alone, whatever the batch size, with continuations of different lengths, contexts
    cut to the window, repeated requests and options that begin alike; a model with dynamic NTK scores each
    request alone."""
    from lm_eval.api.instance import Instance

    model_dir, _ = setup
    lm = QianwenLM(str(model_dir), device="cpu", dtype="float32", batch_size=batch_size)
    tok = lm.tokenizer
    question = "Question: How much is two plus two?\nAnswer:"
    long_context = "The story so far. " * 40
    options = [" four", " twenty two", " 4", " a number between three and five, both excluded", " four", " 12"]
    options += [" 13", " four hundred", " 4 or 5"]  # options that begin alike, or with another option
    requests = [(question, o) for o in options] + [(long_context, o) for o in options[:3]]
    requests += [("中文的问题是什么？", "没有"), ("中文的问题是什么？", "有一个问题")]
    assert len(tok.encode(long_context)) > 128  # cut to the window, differently for each option

    def alone(context: str, continuation: str) -> tuple[float, bool]:
        spaces = len(context) - len(context.rstrip())  # a trailing space moves to the continuation, as in lm-eval
        context, continuation = context[: len(context) - spaces], context[len(context) - spaces :] + continuation
        ctx, whole = tok.encode(context), tok.encode(context + continuation)
        cont = whole[len(ctx) :]
        ids = torch.tensor([whole[-129:]])
        with torch.no_grad():
            logprobs = lm.model(ids[:, :-1]).double().log_softmax(-1)[0, -len(cont) :]
        target = torch.tensor(cont)
        return float(logprobs.gather(-1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())

    instances = [Instance("loglikelihood", {}, args, i) for i, args in enumerate(requests)]
    for ntk in (False, True):
        lm.model.config.use_dynamic_ntk = ntk  # the long inputs pass the 64-token training length: alpha > 1
        expected = [alone(*r) for r in requests]
        got = lm.loglikelihood(instances, disable_tqdm=True)
        for (ll, greedy), (ll_alone, greedy_alone) in zip(got, expected, strict=True):
            assert ll == pytest.approx(ll_alone, abs=1e-4) and greedy == greedy_alone
        assert got[0] == got[4]


def test_qianwen_eval_harness_lm_eval_writes_results(setup, tmp_path, capsys):
    from qianwen.cli import main

    model_dir, tasks_dir = setup
    out = tmp_path / "lm_eval.json"
    command = ["eval", "--harness", "lm-eval", "--model", str(model_dir), "--tasks", "qw_choice,qw_gen"]
    assert main([*command, "--limit", "3", "--out", str(out), f"include_path={tasks_dir}"]) == 0
    results = json.loads(out.read_text())
    assert set(results["results"]) == {"qw_choice", "qw_gen"}
    assert len(results["samples"]["qw_choice"]) == 3
    assert "qw_choice" in capsys.readouterr().out

    with pytest.raises(ValueError, match=r"lm-eval has no task 'qw_nope'; .*include_path=DIR adds local YAML"):
        run_harness(Namespace(model=str(model_dir), tasks="qw_nope", options=[f"include_path={tasks_dir}"]))
    with pytest.raises(ValueError, match=r"holds no config.json; pass --model a checkpoint directory"):
        run_harness(Namespace(model=str(tmp_path), tasks="qw_gen", options=[]))
    with pytest.raises(ValueError, match=r"'shots=3' is not an lm-eval option; the options are include_path"):
        run_harness(Namespace(model=str(model_dir), tasks="qw_gen", options=["shots=3"]))
