"""Three small labelled datasets built by headlab: deterministic, generated from templates (and a shipped table).

``capitals``   True/false statements about country capitals, from ``countries.csv`` (151 countries, checked by
               hand). Each country appears in three templates, once with its capital (label True) and once with
               another country's capital drawn by a seeded RNG (label False): 906 examples. ``group`` is the
               country, so grouped splits keep all statements about one country on one side. Probes
               truthfulness / factual recall ("Geometry of Truth", Marks & Tegmark 2023; ITI, Li et al. 2023).
               Read at the ``last`` token (the full stop).
``sentiment``  Templated movie reviews with label ``positive``/``negative``; a quarter negate the adjective
               ("was not dull"), which flips the label, and ``negated`` records it. 640 examples, balanced.
               Probes sentiment (sentiment summariser heads, Tigges et al. 2023). Read at ``last`` or ``mean``.
``ioi``        Indirect-object-identification sentences (Wang et al. 2022) over 24 names: "When Mary and John went
               to the store, John gave a drink to Mary". ``label`` is True when the final name is the indirect
               object (the correct completion) and False when it is the subject; ``order`` is the template
               (ABBA or BABA); ``io`` and ``subject`` name the two. The final name is marked (``mark`` is its
               character offset): read it with ``--positions marked``. 640 examples, balanced.

Every example is a dict with ``text``, ``label`` and the extra fields above.
"""

from __future__ import annotations

import csv
import random
from importlib import resources

BUILTIN_DATASETS = ("capitals", "sentiment", "ioi")


def countries() -> list[tuple[str, str]]:
    with resources.files(__name__).joinpath("countries.csv").open() as handle:
        return [(row["country"], row["capital"]) for row in csv.DictReader(handle)]


def capitals(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    table = countries()
    templates = ["The capital of {c} is {k}.", "{k} is the capital of {c}.", "The capital city of {c} is {k}."]
    examples = []
    for i, (country, capital) in enumerate(table):
        for template in templates:
            wrong = table[(i + rng.randrange(1, len(table))) % len(table)][1]
            examples.append({"text": template.format(c=country, k=capital), "label": True, "group": country})
            examples.append({"text": template.format(c=country, k=wrong), "label": False, "group": country})
    return examples


_POSITIVE = ["wonderful", "brilliant", "moving", "delightful", "gripping", "charming", "superb", "funny"]
_NEGATIVE = ["boring", "dreadful", "tedious", "clumsy", "dull", "awful", "lifeless", "predictable"]
_SUBJECTS = ["The film", "This movie", "The plot", "The acting", "The script", "The ending", "The soundtrack",
             "The story", "The direction", "The cast"]
_FRAMES = ["{s} was {n}{a}.", "Honestly, {s_l} was {n}{a}.", "I thought {s_l} was {n}{a}.",
           "{s} was {n}{a} from start to finish."]


def sentiment(seed: int = 0, n: int = 640) -> list[dict]:
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        positive = i % 2 == 0
        negated = i % 4 >= 2
        adjective = rng.choice(_POSITIVE if positive != negated else _NEGATIVE)
        subject = rng.choice(_SUBJECTS)
        text = rng.choice(_FRAMES).format(
            s=subject, s_l=subject[0].lower() + subject[1:], n="not " if negated else "", a=adjective
        )
        examples.append({"text": text, "label": "positive" if positive else "negative", "negated": negated})
    return examples


_NAMES = ["Mary", "John", "Tom", "James", "Anna", "Paul", "Sarah", "David", "Emma", "Mark", "Laura", "Peter",
          "Kate", "Daniel", "Lisa", "Michael", "Alice", "Robert", "Jane", "Steve", "Rachel", "Chris", "Amy", "Brian"]
_PLACES = ["store", "park", "school", "office", "restaurant", "station", "garden", "beach"]
_OBJECTS = ["drink", "book", "ring", "letter", "ball", "bone", "kiss", "snack"]


def ioi(seed: int = 0, n: int = 640) -> list[dict]:
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        io, subject = rng.sample(_NAMES, 2)
        order = "ABBA" if i % 4 < 2 else "BABA"
        first, second = (io, subject) if order == "ABBA" else (subject, io)
        prefix = (f"When {first} and {second} went to the {rng.choice(_PLACES)}, "
                  f"{subject} gave a {rng.choice(_OBJECTS)} to ")
        is_io = i % 2 == 0
        examples.append({"text": prefix + (io if is_io else subject), "label": is_io, "order": order,
                         "mark": len(prefix), "io": io, "subject": subject})
    return examples


def load_builtin(name: str) -> list[dict]:
    return {"capitals": capitals, "sentiment": sentiment, "ioi": ioi}[name]()
