"""Prompts for the drafter benchmark: seven kinds of request at the lengths users send
(about 100 to 1,500 tokens), built from text that ships with this machine, so the set is
the same on every run and needs no download.

Code comes from Python's standard library (`inspect.getsource`), articles and passages from
`drafter_articles.json` (this project's README sections as they were on 2026-12-02, frozen
so that editing the README does not change the benchmark); the writing briefs and math
problems are written here.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

ARTICLES = Path(__file__).resolve().parent / "drafter_articles.json"


def _articles() -> list[tuple[str, str]]:
    """(title, text) of each article."""
    return [(a["title"], a["text"]) for a in json.loads(ARTICLES.read_text())]


def _functions() -> list[str]:
    import argparse
    import json.decoder
    import shlex
    import textwrap

    chosen = [textwrap.TextWrapper._wrap_chunks, shlex.shlex.read_token, json.decoder.py_scanstring,
              argparse.HelpFormatter._format_usage]
    return [inspect.getsource(f) for f in chosen]


CODE_TASKS = [
    "Write a Python module that implements an LRU cache class with get, put and delete, a maximum size, "
    "optional per-entry time-to-live in seconds, and statistics (hits, misses, evictions). Use type hints, "
    "docstrings, and include a short example of use at the end. Do not use functools.lru_cache.",
    "Write a command-line tool in Python with argparse that reads a CSV file, groups rows by a column given "
    "with --by, and prints for every group the count, the mean and the maximum of a numeric column given "
    "with --value. Handle missing values and a missing file with clear error messages, and exit with "
    "status 2 on bad input.",
    "Implement in Python a function that parses durations such as '1h30m', '45s', '2d 4h' or '1.5h' into "
    "seconds, and the inverse that formats seconds as the shortest such string. Raise ValueError with a "
    "helpful message on bad input, and write pytest tests covering the edge cases.",
    "Write an asyncio-based rate limiter class in Python (token bucket) that supports 'async with limiter:' "
    "and a 'try_acquire()' that does not wait, with a configurable rate and burst size. Include docstrings "
    "and a small demo that runs ten tasks through a limiter of two per second.",
]

EDIT_INSTRUCTIONS = [
    "Add type hints and a docstring to this function. Return the complete rewritten function and nothing else.",
    "Rewrite this function with descriptive variable names and a comment before each block explaining what it "
    "does. Keep the behaviour identical and return the complete function.",
    "Add a docstring and type hints to this function, and replace string concatenation with f-strings where "
    "it applies. Return the whole function.",
    "Annotate this function: add a comment above every non-trivial line saying why it is there. Return the "
    "complete function with the comments.",
]

WRITING_BRIEFS = [
    "Write a short story (about 400 words) about a lighthouse keeper on a remote island who receives a letter "
    "addressed to someone who lived there a century ago. The tone should be quiet and a little melancholic, "
    "and the ending should leave the reader with a question rather than an answer.",
    "Write a blog post for small-business owners explaining why they should back up their data, what the "
    "3-2-1 backup rule is, and how to start this week with little money. Use a friendly tone, short "
    "paragraphs and a few headings.",
    "Write a persuasive letter to a city council arguing for protected bike lanes on the main street, "
    "addressing the usual objections about parking, delivery trucks and shop revenue.",
    "Write the opening scene of a science-fiction novel in which the crew of a generation ship discovers "
    "that the ship's calendar has been wrong for decades.",
]

MATH_PROBLEMS = [
    "A train leaves city A at 9:00 travelling at 80 km/h towards city B, 300 km away. Another train leaves "
    "city B at 10:00 travelling at 100 km/h towards city A. At what time do they meet, and how far from "
    "city A? Explain each step.",
    "A shop sells pens at 3 for $2 and notebooks at $3.50 each. Maria buys twice as many pens as notebooks "
    "and spends $39 in total. How many pens and notebooks did she buy? Show your reasoning.",
    "A rectangular garden is 4 metres longer than it is wide. A path 1 metre wide runs all around the "
    "outside of it, and the path's area is 48 square metres. Find the garden's dimensions, step by step.",
    "The average of five numbers is 18. When a sixth number is added the average becomes 20, and when a "
    "seventh is added it becomes 21. What are the sixth and seventh numbers? Explain your working.",
]

LANGUAGES = ["French", "German", "Spanish", "Italian"]
QUESTIONS = [
    "According to the passages, what happens when a request is cancelled, and why?",
    "Based only on the passages, what are the trade-offs of the options described?",
    "Using the passages, explain how the system decides what to do in the case they describe.",
    "What does the text say about measuring performance, and which numbers does it give?",
]


def build(per_category: int = 4) -> dict[str, list[str]]:
    """Category -> user messages (`per_category` each)."""
    articles = _articles()
    functions = _functions()
    n = per_category
    prompts = {
        "code generation": CODE_TASKS[:n],
        "code editing": [f"{EDIT_INSTRUCTIONS[i]}\n\n```python\n{functions[i]}```" for i in range(min(n, 4))],
        "summarization": [f"Summarize the following article in one paragraph of about 120 words.\n\n"
                          f"# {title}\n\n{text}" for title, text in articles[:n]],
        "question answering": [f"Read the passages and answer the question. Quote the passages where you can.\n\n"
                               f"Passage 1 ({articles[i][0]}):\n{articles[i][1][:2500]}\n\n"
                               f"Passage 2 ({articles[-1 - i][0]}):\n{articles[-1 - i][1][:2500]}\n\n"
                               f"Question: {QUESTIONS[i]}" for i in range(min(n, 4))],
        "translation": [f"Translate the following text into {LANGUAGES[i]}. Keep the Markdown formatting.\n\n"
                        f"{articles[i][1][:1500]}" for i in range(min(n, 4))],
        "open-ended writing": WRITING_BRIEFS[:n],
        "math word problems": MATH_PROBLEMS[:n],
    }
    return prompts
