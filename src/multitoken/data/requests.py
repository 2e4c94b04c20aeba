"""Natural user requests: the benchmark's committed prompts and the self-distillation requests.

* :func:`load_bench_requests`: the benchmark's chat requests (``bench_requests.jsonl``, package data,
  written for this project: groups ``code``, ``complete``, ``prose``), or a user's JSONL / text file.
* :func:`distill_requests`: requests for self-distillation, built offline and deterministically, that
  cover what users ask, and never equal (up to case, whitespace and punctuation) a benchmark prompt:
  function-writing, completion and code-review tasks derived from the stdlib's *train* split
  (:func:`stdlib_tasks`) and templated chat requests over many topics (:func:`chat_requests`).
* :func:`self_instruct_prefix` / :func:`clean_self_instruct`: the Magpie-style hook; the chat model is
  given only the template's text up to a user turn and writes the request itself.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import random
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

from multitoken.data.corpus import iter_documents, split_of
from multitoken.data.prompts import PROSE_PROMPTS, parse_prompts, read_prompt_text
from multitoken.errors import MultitokenError
from multitoken.io import json_object

GROUPS = ("code", "complete", "prose", "user")  # "user": prompts from a plain text file
BENCH_FILE = "bench_requests.jsonl"  # inside the multitoken.data package


@dataclass(frozen=True)
class Request:
    id: str  # unique within its file, e.g. "code-03"
    group: str  # one of GROUPS; the benchmark reports each group separately
    prompt: str  # one user turn, before the chat template is applied


def parse_requests(text: str, source: str) -> list[Request]:
    """Requests from JSONL text, one ``{"id", "group", "prompt"}`` object per non-blank line.

    Raises MultitokenError naming ``source`` and the line for bad JSON, a missing or non-string
    field, an unknown group, an empty prompt or a duplicate id."""
    out: list[Request] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source} line {n}"
        obj = json_object(line, where)
        for key in ("id", "group", "prompt"):
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                raise MultitokenError(f"{where}: missing or empty string field {key!r}")
        if obj["group"] not in GROUPS:
            raise MultitokenError(f"{where}: unknown group {obj['group']!r} (expected one of {', '.join(GROUPS)})")
        if obj["id"] in seen:
            raise MultitokenError(f"{where}: duplicate id {obj['id']!r} (first on line {seen[obj['id']]})")
        seen[obj["id"]] = n
        out.append(Request(obj["id"], obj["group"], obj["prompt"]))
    if not out:
        raise MultitokenError(f"{source}: no requests")
    return out


def load_bench_requests(path: str | Path | None = None) -> list[Request]:
    """The benchmark's requests (None: the packaged ``bench_requests.jsonl``), or a user's file:
    JSONL whose records have an ``id`` and ``group`` as :func:`parse_requests`, anything else as
    :func:`multitoken.data.prompts.read_prompts` (one prompt per non-empty line, or JSONL with
    "prompt" fields) in group ``"user"``."""
    if path is None:
        text = resources.files("multitoken.data").joinpath(BENCH_FILE).read_text(encoding="utf-8")
        return parse_requests(text, BENCH_FILE)
    text = read_prompt_text(path)
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    if first.lstrip().startswith("{") and "group" in json_object(first, f"{path}:1"):
        return parse_requests(text, str(path))
    return [Request(f"user-{i}", "user", p) for i, p in enumerate(parse_prompts(text, str(path)), 1)]


def normalize(text: str) -> str:
    """Key for near-duplicate checks: lowercase words, punctuation and whitespace runs ignored."""
    return " ".join(re.findall(r"\w+", text.lower()))


def completion_prompt(def_line: str, doc: str) -> str:
    """A HumanEval-style request: ``def f(x) -> int:`` (``def_line`` is ``"f(x) -> int"``) and ``doc``."""
    lines = doc.strip().split("\n")
    body = "\n".join([lines[0]] + [("    " + ln) if ln.strip() else "" for ln in lines[1:]])
    end = "\n    " if len(lines) > 1 else ""
    return f'Complete this function:\n\n```python\ndef {def_line}:\n    """{body}{end}"""\n```'


# --- (a) tasks derived from the stdlib's train split -------------------------------------------
@dataclass(frozen=True)
class StdlibTask:
    source: str  # the stdlib document it came from (its split is "train")
    name: str  # the function or class
    kind: str  # "write" (a function), "class", "complete" or "review"
    prompt: str


VERBS = set("""return get set make create convert compute calculate check test find read write parse build add remove
split join open close load save format print encode decode generate raise handle send run call construct extract apply
update copy translate determine produce search match replace escape quote normalize register wrap strip list count
insert delete decide try do take give compare expand fill change initialize validate guess walk iterate emit process
install mark display show indent pack unpack resolve look reset start stop wait clear fetch yield execute lookup
page sort merge filter map append read""".split())
REVIEW = ("Explain what this Python function does:", "Refactor this function to make it easier to read:",
          "Write two unit tests for this function:", "Add type hints to this function:",
          "Review this code. Is there anything that could go wrong?")
WRITE = ("Write a Python function `{sig}` that {pred}", "I need a Python function `{sig}`: {sent} Can you write it?",
         "Implement `{sig}` in Python. It should {base}")
CLASS = ("Write a Python class called `{name}`. {sent}", "Can you write a Python class named `{name}`? {sent} "
         "Show a short usage example.", "Implement a small Python class `{name}` based on this description: {sent}")


def _pick(key: str, n: int) -> int:
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) % n


def first_sentence(doc: str) -> str | None:
    """The docstring's first sentence, reST roles unwrapped; None if it is no plain description."""
    para = " ".join(doc.strip().split("\n\n")[0].split())
    para = re.sub(r":\w+:`~?([^`]*)`", r"`\1`", para)
    m = re.match(r"(.+?[.!?])(\s+[A-Z]|$)", para)  # not cut at "e.g. the"
    sent = m.group(1) if m else para + "."
    word = sent.split()[0] if sent else ""
    if not 15 <= len(sent) <= 200 or not word[:1].isalpha() or "(" in word or ">>>" in sent \
            or re.search(r"\s:\s|->|[][{}=<>]", sent) \
            or re.search(r"\b(XXX|TODO|deprecated|internal|private)\b", sent, re.I):  # markup, not a description
        return None
    return sent


def third_person(verb: str) -> str:
    """"return" -> "returns", "try" -> "tries", "match" -> "matches"."""
    if re.search(r"[^aeiou]y$", verb):
        return verb[:-1] + "ies"
    return verb + ("es" if re.search(r"(s|sh|ch|x|z|o)$", verb) else "s")


THIRD = {third_person(v): v for v in VERBS}


def function_request(sig: str, sent: str, key: str) -> str:
    """A "write this function" request in one of several phrasings (chosen by ``key``)."""
    first, rest = sent.split(" ", 1) if " " in sent else (sent, "")
    verb = first.lower()
    base = verb if verb in VERBS else THIRD.get(verb)  # "Return"/"Returns" -> "return"
    if base is None:  # not a verb phrase ("A helper for ...")
        return WRITE[1].format(sig=sig, sent=sent)
    return WRITE[_pick(key, 3)].format(sig=sig, pred=f"{third_person(base)} {rest}".strip(),
                                       base=f"{base} {rest}".strip(), sent=sent)


def tasks_of(name: str, text: str) -> list[StdlibTask]:
    """The tasks of one source file: its public top-level functions and classes with a docstring."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith(("_", "test")) \
                or re.search(r"(Error|Exception|Warning)$", node.name):  # trivial to write, rare to ask
            continue
        doc = ast.get_docstring(node)
        sent = first_sentence(doc) if doc else None
        if sent is None or '"""' in doc:
            continue
        key = f"{name}:{node.name}"
        if isinstance(node, ast.ClassDef):
            out.append(StdlibTask(name, node.name, "class", CLASS[_pick(key, 3)].format(name=node.name, sent=sent)))
            continue
        sig = f"{node.name}({ast.unparse(node.args)})"
        if len(sig) > 100:
            continue
        src = ast.get_source_segment(text, node) or ""
        kind = ("write", "write", "complete", "complete", "review")[_pick(key, 5)]
        if kind == "review" and not (4 <= src.count("\n") + 1 <= 25 and len(src) <= 1200):
            kind = "complete"
        if kind == "write":
            prompt = function_request(sig, sent, key)
        elif kind == "complete":
            paras, size = [], 0
            for p in doc.strip().split("\n\n"):  # whole paragraphs, about 600 characters at most
                if paras and size + len(p) > 600:
                    break
                paras.append(p)
                size += len(p)
            ret = f" -> {ast.unparse(node.returns)}" if node.returns else ""
            prompt = completion_prompt(sig + ret, "\n\n".join(paras))
        else:
            prompt = f"{REVIEW[_pick(key + ':r', len(REVIEW))]}\n\n```python\n{src}\n```"
        out.append(StdlibTask(name, node.name, kind, prompt))
    return out


@functools.lru_cache(maxsize=2)
def stdlib_tasks(val_fraction: float = 0.05) -> tuple[StdlibTask, ...]:
    """Tasks from every stdlib file of the train split (2-10 s; cached): the validation split, where
    the benchmark's code continuation prompts come from, is never read."""
    return tuple(t for d in iter_documents(None) if split_of(d.name, val_fraction) == "train"
                 for t in tasks_of(d.name, d.text))


# --- (b) templated chat requests -----------------------------------------------------------------
CHAT_TEMPLATES = (
    "Tell me about {t}.", "Explain {t} in simple terms.", "Explain {t} to a high school student in a few paragraphs.",
    "Give me a list of five interesting facts about {t}.",
    "List the most important things a beginner should know about {t}.",
    "Write a short story in which {t} plays an important part.", "Write a short poem about {t}.",
    "Write an email to my team suggesting a lunch talk about {t}.",
    "Write a short email inviting a friend to a workshop on {t}.",
    "I want to learn more about {t}. Where should I start, and what should I avoid?",
    "What are the biggest misconceptions about {t}?", "How would you explain {t} to a child?",
    "Give me three pieces of advice related to {t}.", "Write a paragraph for a school report on {t}.",
    "Summarize the key ideas behind {t} in three bullet points.", "What questions should I ask an expert on {t}?",
    "Compare {t} with {u}: what do they have in common, and how do they differ?",
    "Which is more interesting to study, {t} or {u}? Give reasons.", "Write a tweet about {t}.",
    "Write the opening of a short speech about {t}.", "What is the history of {t}, in brief?",
    "My friend says {t} is boring. How could I change their mind?",
    "Create a quiz with four questions about {t}, with answers.",
    "Write a dialogue between two friends talking about {t}.", "How has {t} changed over the last hundred years?",
    "Describe a typical day for someone whose job involves {t}.",
    "Give me a step-by-step plan to learn about {t} in one month.", "Write a haiku about {t}.",
    "In two sentences, why should anyone care about {t}?",
    "I'm preparing a presentation on {t}. Suggest an outline with five slides.",
    "What would the world be like without {t}?", "Write a short news article about a new discovery related to {t}.",
    "Give me a fun fact about {t}.", "What jobs are connected to {t}?",
    "Write a review of an imaginary documentary about {t}.",
    "My kids keep asking me about {t}, and I don't know much. Can you help me answer their questions?",
)
CHAT_TOPICS = (  # related pairs, neighbours in the list: "compare {t} with {u}" asks about a pair
    "coral reefs", "glaciers", "the Silk Road", "the Vikings", "ancient Egypt", "ancient Greece",
    "the periodic table", "the metric system", "origami", "calligraphy", "jazz music", "opera", "deserts",
    "the Arctic", "the Great Wall of China", "the Pyramids of Giza", "penguins", "octopuses", "3D printing",
    "carpentry", "the stock market", "credit cards", "antibiotics", "fermentation", "the history of aviation",
    "trains", "photography", "sculpture", "urban gardening", "mushrooms", "dinosaurs", "archaeology",
    "the Renaissance", "the Industrial Revolution", "meditation", "yoga", "board games", "video games", "honey",
    "sourdough starters", "democracy", "the United Nations", "volunteering", "charity fundraising", "plate tectonics",
    "tsunamis", "comets", "eclipses", "the planet Mars", "constellations", "knitting", "sewing", "the piano",
    "the violin", "wolves", "elephants", "dolphins", "sharks", "the Amazon River", "the Nile", "cryptography",
    "Morse code", "weather forecasting", "tornadoes", "gravity", "magnets", "the speed of light", "sound waves",
    "bicycles", "skateboards", "bridges", "skyscrapers", "ants", "spiders", "the alphabet", "sign language",
    "mechanical clocks", "calendars", "nutrition labels", "food allergies", "social media", "video calls", "camping",
    "budget travel",
)
CODE_TEMPLATES = (
    "Explain {t} in Python with a short example.", "What are {t} in Python, and when should I use them?",
    "Show me a simple example of {t} in Python.", "What are common mistakes with {t} in Python? Show some code.",
    "Write a short tutorial on {t} for a Python beginner.", "How do I use {t} in Python? Give me two examples.",
)
CODE_TOPICS = (  # each reads as a plural noun phrase
    "list comprehensions", "dictionaries", "sets", "f-strings", "with statements", "exceptions",
    "classes and inheritance", "type hints", "lambda functions", "itertools functions", "collections.Counter objects",
    "regular expressions", "pathlib paths", "enumerate and zip", "virtual environments", "unittest test cases",
    "loggers", "context managers", "properties", "slices", "default arguments", "*args and **kwargs",
    "key functions for sorting", "datetime objects", "recursive functions", "threads", "async functions",
    "random numbers", "modules and imports", "tuples", "namedtuples", "string methods", "while loops",
    "global variables", "abstract base classes", "docstrings",
)


def chat_requests(code: bool = False) -> list[str]:
    """Every template x topic chat request (general topics, or Python ones when ``code``), in a
    fixed order; comparison templates pair each topic with its neighbour (0 with 1, 2 with 3, ...)."""
    templates, topics = (CODE_TEMPLATES, CODE_TOPICS) if code else (CHAT_TEMPLATES, CHAT_TOPICS)
    return [tpl.format(t=t, u=topics[(i ^ 1) % len(topics)]) for i, t in enumerate(topics) for tpl in templates]


# --- (c) self-instruct (Magpie) --------------------------------------------------------------------
SENTINEL = "\u2063MultiToken-User-Request\u2063"  # invisible separators: no real request contains them
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>", "<|endoftext|>", "<|im_start|>", "<|start_header_id|>")


def self_instruct_prefix(tokenizer, system: str | None = None) -> str:
    """The chat template's text up to where a user message starts (a system turn first if the
    template adds one, or if ``system`` is given). A chat model that continues this text writes
    a user request (Magpie); cut its output with :func:`clean_self_instruct`. Tokenize the prefix
    without adding special tokens: the template already contains them."""
    if not getattr(tokenizer, "chat_template", None):
        raise MultitokenError("self-instruct needs a chat model: the tokenizer has no chat template")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": SENTINEL}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    if SENTINEL not in text:
        raise MultitokenError("the chat template does not render the user message as given; cannot self-instruct")
    return text[:text.index(SENTINEL)]


def clean_self_instruct(texts: Iterable[str], end_markers: Sequence[str] = END_OF_TURN, min_chars: int = 15,
                        max_chars: int = 800, require_end: bool = True) -> list[str]:
    """Plausible requests among what a chat model wrote after :func:`self_instruct_prefix`.

    Each text (decoded with special tokens kept) is cut at its first end marker; a text without
    one was cut off by the token limit and is dropped when ``require_end``. Kept: stripped,
    ``min_chars``..``max_chars`` long, at least three words, mostly letters, first of its
    near-duplicates (:func:`normalize`), in input order."""
    out, seen = [], set()
    for text in texts:
        cut = min((text.index(m) for m in end_markers if m in text), default=-1)
        if cut < 0 and require_end:
            continue
        req = (text if cut < 0 else text[:cut]).strip()
        letters = sum(c.isalpha() for c in req)
        key = normalize(req)
        if not min_chars <= len(req) <= max_chars or len(req.split()) < 3 or "\ufffd" in req \
                or letters < 0.5 * len(req.replace(" ", "")) or key in seen:
            continue
        seen.add(key)
        out.append(req)
    return out


# --- the mix ---------------------------------------------------------------------------------------
MIX = ("chat", "write", "chat", "complete", "chat", "code_chat", "chat", "class", "chat", "review")  # half prose


def bench_prompts() -> list[str]:
    """Every benchmark prompt written for chat models (the packaged requests and PROSE_PROMPTS)."""
    return [r.prompt for r in load_bench_requests()] + list(PROSE_PROMPTS)


def distill_requests(n: int, seed: int = 0, exclude: Iterable[str] = (), extra: Sequence[str] = ()) -> list[str]:
    """Up to ``n`` distinct requests for self-distillation, deterministic for a given seed.

    Pools (each shuffled by ``seed``): chat requests on general topics and on Python, stdlib
    function/class writing, completion and review tasks, and ``extra`` (e.g. cleaned
    self-instruct requests), which when given takes every other slot. The rest follow
    :data:`MIX`; an empty pool is skipped. Dropped: any request equal up to :func:`normalize` to a
    benchmark prompt (:func:`bench_prompts`) or to one in ``exclude``, stdlib tasks about a
    function a benchmark prompt defines, and repeats."""
    bench = bench_prompts()
    banned = {normalize(p) for p in [*bench, *exclude]}
    bench_defs = set(re.findall(r"def (\w+)\(", "\n".join(bench)))
    tasks = [t for t in stdlib_tasks() if t.name not in bench_defs]
    pools = {"extra": list(extra), "chat": chat_requests(), "code_chat": chat_requests(code=True),
             **{k: [t.prompt for t in tasks if t.kind == k] for k in ("write", "class", "complete", "review")}}
    for name, pool in pools.items():
        if name != "extra":
            random.Random(f"{seed}:{name}").shuffle(pool)
    order = [s for m in MIX for s in ("extra", m)] if extra else list(MIX)
    out: list[str] = []
    pos = dict.fromkeys(pools, 0)
    while len(out) < n and any(pos[k] < len(pools[k]) for k in pools):
        for name in order:
            while pos[name] < len(pools[name]) and len(out) < n:
                req = pools[name][pos[name]]
                pos[name] += 1
                if normalize(req) not in banned:
                    banned.add(normalize(req))
                    out.append(req)
                    break
    return out
