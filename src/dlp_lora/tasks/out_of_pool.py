"""Prompts that belong to no task of the pool: what a router's `none` class ("base model alone") learns.

Sources, computed against the registry's *current* pool (never a fixed list, since the pool changes):
- every BIG-Bench Hard task in ``<data>/bbh`` whose file no pool task reads, except size variants of a
  pool task (``logical_deduction_five_objects`` when ``..._three_objects`` is pooled: same task, and its
  adapter serves it);
- every ``<data>/nutcracker-db`` folder no pool task reads (e.g. hellaswag);
- ``generic``: hand-written everyday instructions (small talk, code, other languages, writing, advice).

A fixed, hash-chosen part of the benchmark sources is `unseen`: never trained on, only tested, so the
report measures how a router treats a task it has never seen, not only new prompts of seen sources.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
from fnmatch import fnmatch
from pathlib import Path

from dlp_lora.config import SplitConfig
from dlp_lora.tasks import loaders as L
from dlp_lora.tasks.registry import get_task, load_splits, task_names
from dlp_lora.tasks.types import Example, Splits, Task

__all__ = [
    "NONE",
    "out_of_pool_sources",
    "out_of_pool_task",
    "out_of_pool_splits",
    "generic_examples",
    "is_unseen_source",
]

NONE = "none"
"""The router class of prompts that match no task: routed to the base model alone."""

_SIZE = re.compile(r"_(three|five|seven)_objects$")


def _pool_patterns(pool: list[str]) -> list[str]:
    """Data paths the pool reads ('bbh/navigate.json', 'nutcracker-db/mmlu-*'), from each task's source."""
    return [get_task(name).source.split()[0] for name in pool]


def out_of_pool_sources(data_dir: str | os.PathLike | None = None, pool: list[str] | None = None) -> list[str]:
    """Sorted source ids ('bbh/<name>', 'nutcracker-db/<folder>', 'generic') outside `pool` (default: registry)."""
    root = L.resolve_data_dir(data_dir)
    patterns = _pool_patterns(task_names() if pool is None else pool)
    families = {_SIZE.sub("", Path(p).stem) for p in patterns if p.startswith("bbh/")}
    out = []
    for path in sorted((root / "bbh").glob("*.json")):
        rel = f"bbh/{path.name}"
        if not any(fnmatch(rel, p) for p in patterns) and _SIZE.sub("", path.stem) not in families:
            out.append(f"bbh/{path.stem}")
    for folder in sorted(p for p in (root / "nutcracker-db").iterdir() if p.is_dir()):
        rel = f"nutcracker-db/{folder.name}"
        if not any(fnmatch(rel, p) for p in patterns):
            out.append(rel)
    return out + ["generic"]


def is_unseen_source(source: str) -> bool:
    """Benchmark sources kept out of training (a fixed quarter, by hash); `generic` is always trained on."""
    return source != "generic" and hashlib.sha256(source.encode()).digest()[0] % 4 == 0


def _bbh_loader(name: str, uid_prefix: str):
    def load(root: str) -> list[Example]:
        try:
            return L.bbh_choice(uid_prefix, name)(root)
        except (ValueError, KeyError):  # no 'Options:' block (or a target outside it): free-form task
            return L.bbh_free(uid_prefix, name, "")(root)

    return load


def out_of_pool_task(source: str, data_dir: str | os.PathLike | None = None) -> Task:
    """The examples of one out-of-pool source as a Task (name 'none:<source>', kind qa, never scored)."""
    name = f"{NONE}:{source}"
    if source == "generic":
        return Task(name=name, kind="qa", source="hand-written", metric="exact", load=lambda _r: generic_examples())
    root = str(L.resolve_data_dir(data_dir))
    kind, _, item = source.partition("/")
    if kind == "bbh":
        load = _bbh_loader(item, name)
    elif kind == "nutcracker-db":
        load = L.nutcracker(name, [item])
    else:
        raise ValueError(
            f"unknown out-of-pool source {source!r}; expected bbh/<name>, nutcracker-db/<folder> or generic"
        )
    return Task(name=name, kind="qa", source=source, metric="exact", load=lambda _r: load(root))


def out_of_pool_splits(
    data_dir: str | os.PathLike | None = None, cfg: SplitConfig = SplitConfig(), pool: list[str] | None = None
) -> dict[str, Splits]:
    """Seeded disjoint splits per out-of-pool source (as `load_splits` cuts a task); unseen sources keep
    every example in `test` (up to cfg.test_size)."""
    out = {}
    for source in out_of_pool_sources(data_dir, pool):
        splits = load_splits(out_of_pool_task(source, data_dir), data_dir, cfg)
        if is_unseen_source(source):
            everything = (splits.test + splits.dev + splits.train)[: cfg.test_size]
            splits = Splits(train=[], dev=[], test=everything)
        out[source] = splits
    return out


# ---- hand-written everyday prompts -----------------------------------------------------------------

_SMALL_TALK = [
    "Hi! How are you today?",
    "Good morning, what's up?",
    "Hello there",
    "Hey, can we chat for a bit?",
    "Tell me a joke.",
    "What's your name?",
    "Who made you?",
    "Are you a robot?",
    "Thanks, that was helpful!",
    "I'm bored. Any ideas?",
    "What do you like to do for fun?",
    "How was your weekend?",
    "Do you have feelings?",
    "Can you keep a secret?",
    "What's your favourite colour?",
    "Goodnight!",
    "I had a rough day at work.",
    "Say something nice to me.",
    "What should I call you?",
    "lol that's funny",
    "ok thanks bye",
    "Can you be my friend?",
    "What's the weather like where you are?",
    "Do you dream?",
    "I just got a puppy!",
    "Congratulate me, I passed my driving test!",
    "hmm",
    "Are you there?",
    "What time is it?",
    "Sing me a song.",
]
_CODE_ASKS = [
    "Write a {lang} function that reverses a string.",
    "How do I read a CSV file in {lang}?",
    "Fix this {lang} code: for i in range(10) print(i)",
    "Explain what a closure is in {lang}.",
    "Write a {lang} class for a bank account with deposit and withdraw.",
    "How do I sort a list of dicts by a key in {lang}?",
    "What is the difference between a list and a tuple in {lang}?",
    "Write unit tests in {lang} for a fizzbuzz function.",
    "Convert this loop to {lang}: for (int i = 0; i < n; i++) sum += a[i];",
    "Why does my {lang} program throw a null pointer error?",
    "Implement binary search in {lang}.",
    "How do I make an HTTP request in {lang}?",
    "Write a {lang} script that renames every file in a folder.",
]
_LANGS = ["Python", "JavaScript", "Rust", "Go", "Java", "C++", "SQL", "Bash"]
_FOREIGN = [
    "Bonjour, comment ça va ?",
    "Peux-tu m'aider à écrire une lettre de motivation ?",
    "Quelle est la capitale de l'Australie ?",
    "¿Cuál es la mejor manera de aprender inglés?",
    "Escribe un poema sobre el mar.",
    "¿Qué hora es en Tokio?",
    "Wie spät ist es?",
    "Kannst du mir ein Rezept für Apfelkuchen geben?",
    "Erkläre mir die Relativitätstheorie einfach.",
    "Ciao, come stai?",
    "Mi consigli un buon libro da leggere?",
    "Olá, tudo bem? Preciso de ajuda com meu currículo.",
    "Как дела?",
    "Расскажи мне анекдот.",
    "你好，你叫什么名字？",
    "请帮我写一封请假邮件。",
    "今日は天気がいいですね。",
    "おすすめのアニメを教えてください。",
    "안녕하세요, 오늘 뭐 해요?",
    "مرحبا، كيف حالك؟",
    "नमस्ते, आप कैसे हैं?",
    "Merhaba, bana bir şaka anlatır mısın?",
    "Hallo, kun je me helpen met mijn huiswerk?",
    "Hej! Vad heter du?",
    "Cześć, jak się masz?",
    "Γεια σου, τι κάνεις;",
    "Xin chào, bạn có khỏe không?",
    "Selamat pagi, apa kabar?",
]
_WRITING = [
    "Write a {form} about {topic}.",
    "Can you draft a short {form} on {topic}?",
    "I need a {form} about {topic} for tomorrow.",
]
_FORMS = ["poem", "haiku", "short story", "blog post", "birthday message", "limerick", "speech", "product description"]
_TOPICS = [
    "autumn leaves",
    "my cat",
    "the ocean",
    "friendship",
    "a rainy Monday",
    "space travel",
    "coffee",
    "our new office",
    "climate change",
    "a lost umbrella",
]
_ADVICE = [
    "How can I sleep better?",
    "Give me tips for a job interview.",
    "What should I cook tonight with eggs and rice?",
    "Plan a 3-day trip to Rome for me.",
    "How do I ask my boss for a raise?",
    "Suggest a workout for beginners.",
    "Summarize the plot of Hamlet in two sentences.",
    "Recommend some podcasts about history.",
    "How do I get red wine out of a carpet?",
    "What's a good name for a bakery?",
    "Help me write an email to my landlord.",
    "How do I stop procrastinating?",
    "Explain the stock market to a ten-year-old.",
    "What are some fun date ideas?",
    "Make me a grocery list for a week of vegetarian meals.",
    "How do I change a flat tire?",
    "Translate 'good luck' into five languages.",
    "Give me a motivational quote.",
    "What is the meaning of life?",
    "Write a tweet announcing our product launch.",
]


def generic_examples() -> list[Example]:
    """Everyday prompts no benchmark task covers (about 400), in a fixed order."""
    texts = list(_SMALL_TALK) + list(_FOREIGN) + list(_ADVICE)
    texts += [t.format(lang=lang) for t, lang in itertools.product(_CODE_ASKS, _LANGS)]
    texts += [t.format(form=f, topic=p) for t, f, p in itertools.product(_WRITING, _FORMS, _TOPICS)][::2]
    return [
        Example(uid=f"{NONE}:generic/{i}", task=f"{NONE}:generic", prompt=t, answer="-", references=("-",), question=t)
        for i, t in enumerate(texts)
    ]
