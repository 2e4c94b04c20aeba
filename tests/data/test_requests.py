"""Benchmark requests (the committed JSONL), distillation requests and the self-instruct hook."""
import ast
import collections
import json
import re

import pytest

from multitoken.data import requests as rq
from multitoken.data.corpus import Document, split_of
from multitoken.data.prompts import PROSE_PROMPTS
from multitoken.errors import MultitokenError

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def everything():
    """The full distillation set (every pool exhausted)."""
    return rq.distill_requests(10**6)


def code_block(prompt: str) -> str:
    return re.search(r"```python\n(.*?)```", prompt, re.S).group(1)


# --- the benchmark file --------------------------------------------------------------------------
def test_bench_file_groups_ids_and_prompts():
    reqs = rq.load_bench_requests()
    counts = collections.Counter(r.group for r in reqs)
    assert counts["code"] >= 16 and counts["complete"] >= 12 and counts["prose"] >= 16 and len(reqs) >= 48
    assert set(counts) == {"code", "complete", "prose"}
    assert len({r.id for r in reqs}) == len(reqs)
    assert all(r.id.startswith(r.group + "-") for r in reqs)
    keys = [rq.normalize(r.prompt) for r in reqs] + [rq.normalize(p) for p in PROSE_PROMPTS]
    assert len(set(keys)) == len(keys)  # no prompt twice, none equal to a PROSE_PROMPTS one
    for r in reqs:
        assert 10 <= len(r.prompt) <= 800, r.id
        if r.group == "complete":  # a signature and a docstring that parse as Python
            assert r.prompt.startswith("Complete this function:")
            fn = ast.parse(code_block(r.prompt) + "    pass\n").body[0]
            assert isinstance(fn, ast.FunctionDef) and ast.get_docstring(fn)
            doc = ast.get_docstring(fn)
            assert r.prompt == rq.completion_prompt(code_block(r.prompt).split("\n")[0][4:-1], doc)


def test_bench_file_is_what_parse_requests_reads():
    from importlib import resources
    text = resources.files("multitoken.data").joinpath(rq.BENCH_FILE).read_text(encoding="utf-8")
    lines = [json.loads(ln) for ln in text.splitlines()]
    assert [r.prompt for r in rq.load_bench_requests()] == [o["prompt"] for o in lines]
    assert all(set(o) == {"id", "group", "prompt"} for o in lines)


GOOD = [json.dumps({"id": "a", "group": "code", "prompt": "Write a function."}),
        json.dumps({"id": "b", "group": "prose", "prompt": "Explain tides."})]


@pytest.mark.parametrize("bad, words", [
    ('{"id": "c", "group": "prose", "prompt": "x"', "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"id": "c", "group": "poetry", "prompt": "Write a poem."}', "unknown group 'poetry'"),
    ('{"id": "c", "prompt": "Write a poem."}', "'group'"),
    ('{"group": "prose", "prompt": "Write a poem."}', "'id'"),
    ('{"id": "c", "group": "prose"}', "'prompt'"),
    ('{"id": "c", "group": "prose", "prompt": "   "}', "'prompt'"),
    ('{"id": "c", "group": "prose", "prompt": 7}', "'prompt'"),
    ('{"id": "a", "group": "prose", "prompt": "Write a poem."}', "duplicate id 'a' (first on line 1)"),
])
def test_bad_lines_name_the_line(tmp_path, bad, words):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(GOOD + [bad]) + "\n", encoding="utf-8")
    with pytest.raises(MultitokenError, match="line 3") as e:
        rq.load_bench_requests(path)
    assert words in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_user_files(tmp_path):
    good = tmp_path / "mine.jsonl"
    good.write_text("\n".join(GOOD) + "\n\n", encoding="utf-8")
    assert rq.load_bench_requests(good) == [rq.Request("a", "code", "Write a function."),
                                            rq.Request("b", "prose", "Explain tides.")]
    text = tmp_path / "mine.txt"
    text.write_text("# a line is a prompt, verbatim\nWhy is the sea salty?\n\nprint('a\\n')\n", encoding="utf-8")
    assert rq.load_bench_requests(text) == [rq.Request("user-1", "user", "# a line is a prompt, verbatim"),
                                            rq.Request("user-2", "user", "Why is the sea salty?"),
                                            rq.Request("user-3", "user", "print('a\\n')")]
    plain = tmp_path / "plain.jsonl"  # JSONL without ids and groups: the one prompt reader's format
    plain.write_text('{"prompt": "Write a haiku.\\nMake it sad."}\n{"text": "Explain tides."}\n', encoding="utf-8")
    assert [(r.group, r.prompt) for r in rq.load_bench_requests(plain)] == [
        ("user", "Write a haiku.\nMake it sad."), ("user", "Explain tides.")]
    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"id": "a", "group": "code", "prompt": "caf\xe9"}\n')
    for name, words in [("empty.txt", "no prompts"), ("empty.jsonl", "no prompts"), ("missing.txt", "cannot read"),
                        ("latin1.jsonl", "cannot read")]:
        with pytest.raises(MultitokenError, match=words):
            rq.load_bench_requests(tmp_path / name)


# --- distillation requests -----------------------------------------------------------------------
def test_distill_requests_deterministic_and_mixed():
    a = rq.distill_requests(400)
    assert a == rq.distill_requests(400) and len(a) == 400 and len(set(a)) == 400
    assert rq.distill_requests(150) == a[:150]
    b = rq.distill_requests(400, seed=1)
    assert b != a and len(set(a) & set(b)) < 200
    chat, code_chat = set(rq.chat_requests()), set(rq.chat_requests(code=True))
    kinds = collections.Counter("chat" if r in chat else "code_chat" if r in code_chat
                                else "complete" if r.startswith("Complete this function") else "stdlib" for r in a)
    assert kinds["chat"] == 200 and kinds["code_chat"] == 40 and kinds["complete"] == 40 and kinds["stdlib"] == 120
    templates = {t for t in rq.CHAT_TEMPLATES if any(r in chat and r.startswith(t.split("{")[0]) for r in a)}
    topics = {t for t in rq.CHAT_TOPICS if any(t in r for r in a if r in chat)}
    assert len(templates) >= 25 and len(topics) >= 50


def test_distill_is_varied_enough_overall():
    assert len(rq.CHAT_TEMPLATES) >= 30 and len(rq.CHAT_TOPICS) >= 60
    chat = rq.chat_requests()
    assert len(set(chat)) == len(chat) == len(rq.CHAT_TEMPLATES) * len(rq.CHAT_TOPICS)
    assert "Compare coral reefs with glaciers: what do they have in common, and how do they differ?" in chat
    assert all("{" not in r for r in chat + rq.chat_requests(code=True))
    short = [r for r in chat if len(r.split()) <= 8]
    multi = [r for r in chat if len(re.findall(r"[.?!](\s|$)", r)) >= 2]
    assert len(short) > 300 and len(multi) > 300


def test_distill_disjoint_from_every_benchmark_prompt(everything):
    bench = [r.prompt for r in rq.load_bench_requests()] + list(PROSE_PROMPTS)
    assert len(everything) > 4000
    keys = [rq.normalize(r) for r in everything]
    assert len(set(keys)) == len(keys)  # no near-duplicates inside the set either
    bench_keys = [rq.normalize(p) for p in bench]
    for key in keys:
        assert not any(b in key or key in b for b in bench_keys), key
    defined = set(re.findall(r"def (\w+)\(", "\n".join(bench)))
    assert not [r for r in everything if any(f"def {name}(" in r or f"`{name}(" in r for name in defined)]
    text = "\n".join(bench).lower()  # the topics of the templated requests are not the benchmark's
    for topic in rq.CHAT_TOPICS + rq.CODE_TOPICS:
        assert not re.search(rf"\b{re.escape(topic.lower())}\b", text), topic


def test_exclude_and_extra():
    first = rq.distill_requests(5)
    assert first[0] not in rq.distill_requests(5, exclude=[" " + first[0].upper() + "!"])
    extra = ["Why do cats purr?", "How do I fold a paper crane?", "how do i FOLD a paper crane", "Name three rivers."]
    got = rq.distill_requests(6, extra=extra)
    assert got[0::2] == ["How do I fold a paper crane?", "Name three rivers.", first[2]]  # bench prompt, repeat dropped
    assert got[1::2] == first[0:2] + [first[3]]  # extra exhausted: the mix goes on


def test_stdlib_tasks_come_from_the_train_split_only(monkeypatch):
    tasks = rq.stdlib_tasks()
    assert len(tasks) > 1000 and all(split_of(t.source, 0.05) == "train" for t in tasks)
    assert {t.kind for t in tasks} == {"write", "class", "complete", "review"}
    names = [f"pkg/m{i}.py" for i in range(200)]
    val, train = next(n for n in names if split_of(n, 0.05) == "val"), names[0]
    assert split_of(train, 0.05) == "train"
    src = 'def clip(x, lo, hi):\n    """Return x limited to the range lo..hi."""\n    return max(lo, min(hi, x))\n'
    docs = [Document(val, src.replace("clip", "seen_only_in_val")), Document(train, src)]
    monkeypatch.setattr(rq, "iter_documents", lambda sources: iter(docs))
    got = rq.stdlib_tasks.__wrapped__(0.05)  # uncached: the real cache keeps the real stdlib
    assert [(t.source, t.name) for t in got] == [(train, "clip")]


def test_tasks_of_one_file():
    src = '''
def add(a, b=1):
    """Return the sum of a and b.

    Works for numbers and strings.
    """
    return a + b

def _private(x):
    """Return x."""

def undocumented(x):
    return x

class RingBuffer:
    """A fixed-size buffer that overwrites its oldest item when full."""

class ParseError(Exception):
    """Raised on bad input."""

def test_something():
    """Check something important."""
'''
    tasks = rq.tasks_of("pkg/mod.py", src)
    assert [t.name for t in tasks] == ["add", "RingBuffer"]
    ring = tasks[1]
    assert ring.kind == "class" and "`RingBuffer`" in ring.prompt and "overwrites its oldest item" in ring.prompt
    kinds = set()
    for i in range(40):  # the kind of a function is chosen by a hash of its file and name
        add = rq.tasks_of(f"pkg/m{i}.py", src)[0]
        kinds.add(add.kind)
        if add.kind == "write":
            assert "`add(a, b=1)`" in add.prompt and re.search(r"returns? the sum of a and b", add.prompt, re.I)
        elif add.kind == "complete":
            doc = "Return the sum of a and b.\n\nWorks for numbers and strings."
            assert add.prompt == rq.completion_prompt("add(a, b=1)", doc)
        else:
            assert add.kind == "review" and code_block(add.prompt).rstrip().endswith("return a + b")
    assert kinds == {"write", "complete", "review"}
    assert rq.tasks_of("bad.py", "def (:\n") == []


@pytest.mark.parametrize("doc, sentence", [
    ("Return the sum of a and b.\n\nMore text.", "Return the sum of a and b."),
    ("Split the text, e.g. at commas. Then more.", "Split the text, e.g. at commas."),
    ("Look up :func:`foo` in the\n    table", "Look up `foo` in the table."),
    ("f(x) -> y\n\nThe C-style signature line.", None), ("Instance attributes: a : [string] b : [int]", None),
    ("data -> gzip encoded data", None), ("XXX fix me later please", None), ("Short.", None),
])
def test_first_sentence(doc, sentence):
    assert rq.first_sentence(doc) == sentence


def test_function_request_phrasing():
    assert [rq.third_person(v) for v in ("return", "try", "match", "do", "say")] == \
        ["returns", "tries", "matches", "does", "says"]
    reqs = {rq.function_request("f(x)", "Return the square of x.", k) for k in map(str, range(40))}
    assert reqs == {"Write a Python function `f(x)` that returns the square of x.",
                    "I need a Python function `f(x)`: Return the square of x. Can you write it?",
                    "Implement `f(x)` in Python. It should return the square of x."}
    assert rq.function_request("f(x)", "Returns the square of x.", "0").endswith("the square of x.")
    assert rq.function_request("f(x)", "A helper for squares.", "0") == \
        "I need a Python function `f(x)`: A helper for squares. Can you write it?"


# --- self-instruct -------------------------------------------------------------------------------
def test_self_instruct_prefix_ends_where_a_user_message_starts():
    from hf_fixtures import make_tokenizer
    tok = make_tokenizer()
    with pytest.raises(MultitokenError, match="no chat template"):
        rq.self_instruct_prefix(tok)
    tok.chat_template = CHATML
    prefix = rq.self_instruct_prefix(tok)
    assert prefix == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    msg = [{"role": "user", "content": "Why is the sea salty?"}]
    assert tok.apply_chat_template(msg, tokenize=False) == prefix + "Why is the sea salty?<|im_end|>\n"
    assert rq.self_instruct_prefix(tok, system="Be brief.") == \
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}"
    with pytest.raises(MultitokenError, match="does not render"):
        rq.self_instruct_prefix(tok)


def test_clean_self_instruct():
    texts = [
        "  How do I keep basil alive indoors?<|im_end|>\n<|im_start|>assistant\nWater it.",
        "how do I keep   basil alive INDOORS<|im_end|>",  # near-duplicate of the first
        "Write a limerick about a cat who hates Mondays.<|im_end|>",
        "Write me an essay about the history of everything that has ever happened and",  # no end: truncated
        "Hi<|im_end|>",  # too short
        "1234 5678 9012 3456 !!!!<|im_end|>",  # not words
        "x " * 500 + "<|im_end|>",  # too long
        "Tell me a joke about sailors please.</s>",
        "<|im_end|>",
    ]
    assert rq.clean_self_instruct(texts) == ["How do I keep basil alive indoors?",
                                             "Write a limerick about a cat who hates Mondays.",
                                             "Tell me a joke about sailors please."]
    loose = rq.clean_self_instruct(texts, require_end=False)
    assert "Write me an essay about the history of everything that has ever happened and" in loose
    assert rq.clean_self_instruct(["Explain gravity to me.[END]"], end_markers=["[END]"]) == ["Explain gravity to me."]
