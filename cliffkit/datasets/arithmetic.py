"""Arithmetic word problems generated from a seed, and parsing of a model's final numeric answer.

The problems are a capability control: they show whether a model still solves benign tasks.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

DEFAULT_COUNT = 240
DEFAULT_SEED = 0

NAMES = ("Ana", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jamal", "Kira", "Liam")
SHOP_ITEMS = (
    ("notebooks", "pens"),
    ("apples", "pears"),
    ("mugs", "plates"),
    ("stamps", "envelopes"),
    ("tickets", "programs"),
)
SHARED_ITEMS = ("stickers", "marbles", "cookies", "trading cards", "seashells")
RATES = (
    ("A train travels at {rate} kilometres per hour", "hours", "How many kilometres does it travel"),
    ("A printer prints {rate} pages per minute", "minutes", "How many pages does it print"),
    ("A pump moves {rate} litres of water per minute", "minutes", "How many litres does it move"),
    ("A baker bakes {rate} loaves per hour", "hours", "How many loaves does the baker bake"),
)


@dataclass(frozen=True)
class ArithmeticProblem:
    """One word problem, the integers it states, and its integer answer."""

    index: int
    template: str
    text: str
    answer: int
    numbers: dict[str, int]


def _shopping_total(rng: random.Random, name: str) -> tuple[str, dict[str, int], int]:
    first_item, second_item = rng.choice(SHOP_ITEMS)
    numbers = {
        "quantity_a": rng.randint(2, 12),
        "price_a": rng.randint(2, 25),
        "quantity_b": rng.randint(2, 12),
        "price_b": rng.randint(1, 15),
    }
    text = (
        f"{name} buys {numbers['quantity_a']} {first_item} at ${numbers['price_a']} each "
        f"and {numbers['quantity_b']} {second_item} at ${numbers['price_b']} each. "
        f"How many dollars does {name} spend in total?"
    )
    answer = numbers["quantity_a"] * numbers["price_a"] + numbers["quantity_b"] * numbers["price_b"]
    return text, numbers, answer


def _equal_sharing(rng: random.Random, name: str) -> tuple[str, dict[str, int], int]:
    item = rng.choice(SHARED_ITEMS)
    people = rng.randint(2, 9)
    numbers = {"total": people * rng.randint(3, 30), "people": people}
    text = (
        f"{name} has {numbers['total']} {item} and shares them equally among {people} friends. "
        f"How many {item} does each friend get?"
    )
    return text, numbers, numbers["total"] // people


def _rate_time(rng: random.Random, name: str) -> tuple[str, dict[str, int], int]:
    del name  # The rate problems have no person in them.
    subject, time_unit, question = rng.choice(RATES)
    numbers = {"rate": rng.randint(3, 90), "duration": rng.randint(2, 12)}
    text = f"{subject.format(rate=numbers['rate'])} for {numbers['duration']} {time_unit}. {question}?"
    return text, numbers, numbers["rate"] * numbers["duration"]


def _multi_step(rng: random.Random, name: str) -> tuple[str, dict[str, int], int]:
    item = rng.choice(SHARED_ITEMS)
    start = rng.randint(20, 120)
    numbers = {
        "start": start,
        "given": rng.randint(1, start - 1),
        "packs": rng.randint(2, 6),
        "per_pack": rng.randint(4, 15),
    }
    text = (
        f"{name} has {start} {item}, gives {numbers['given']} of them to a friend, "
        f"and then buys {numbers['packs']} packs of {numbers['per_pack']} {item}. "
        f"How many {item} does {name} have now?"
    )
    answer = start - numbers["given"] + numbers["packs"] * numbers["per_pack"]
    return text, numbers, answer


def _change_due(rng: random.Random, name: str) -> tuple[str, dict[str, int], int]:
    quantity = rng.randint(2, 8)
    price = rng.randint(3, 12)
    bill = rng.choice([bill for bill in (20, 50, 100) if bill > quantity * price])
    numbers = {"bill": bill, "quantity": quantity, "price": price}
    text = (
        f"{name} pays with a ${bill} bill for {quantity} museum tickets that cost ${price} each. "
        f"How many dollars of change does {name} get back?"
    )
    return text, numbers, bill - quantity * price


def _empty_seats(rng: random.Random, name: str) -> tuple[str, dict[str, int], int]:
    rows = rng.randint(5, 30)
    seats = rng.randint(8, 40)
    numbers = {"rows": rows, "seats": seats, "taken": rng.randint(1, rows * seats - 1)}
    text = (
        f"A concert hall has {rows} rows with {seats} seats in each row. "
        f"{name} counts {numbers['taken']} seats that are taken. How many seats are empty?"
    )
    return text, numbers, rows * seats - numbers["taken"]


TEMPLATES: dict[str, Callable[[random.Random, str], tuple[str, dict[str, int], int]]] = {
    "shopping_total": _shopping_total,
    "equal_sharing": _equal_sharing,
    "rate_time": _rate_time,
    "multi_step": _multi_step,
    "change_due": _change_due,
    "empty_seats": _empty_seats,
}


def generate_problems(count: int = DEFAULT_COUNT, seed: int = DEFAULT_SEED) -> list[ArithmeticProblem]:
    """Generate `count` problems that cycle through `TEMPLATES` in order.

    The numbers come from `random.Random(seed)`, so the same count and seed give the same
    problems. A larger count keeps the first problems unchanged.
    """
    if count <= 0:
        raise ValueError(f"Invalid count {count}: the number of problems must be at least 1.")

    rng = random.Random(seed)
    template_names = list(TEMPLATES)
    problems = []
    for index in range(count):
        template = template_names[index % len(template_names)]
        name = rng.choice(NAMES)
        text, numbers, answer = TEMPLATES[template](rng, name)
        problems.append(ArithmeticProblem(index, template, text, answer, numbers))

    logger.debug("Generated %d arithmetic problems with seed %d", count, seed)
    return problems


# A number with optional minus sign and dollar sign, thousands separators and decimals. The
# lookbehind keeps "10-5" from reading as "10" and "-5", and "v2" from reading as "2".
_NUMBER = re.compile(r"(?<![\w.])([-\u2212]?)\$?(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def extract_final_number(text: str) -> int | None:
    """Return the model's final integer answer in `text`, or None when there is none.

    The answer is the last number inside the last `\\boxed{...}` when the text contains one,
    otherwise the last number in the text. Commas as thousands separators ("1,200"), a "$"
    sign, a minus sign and a trailing period are accepted. A decimal with zero fractional
    part ("12.00") counts as an integer. When the final number has a non-zero fractional part
    ("3.5"), the function returns None, because that answer is not an integer.
    """
    boxed = _BOXED.findall(text)
    search_text = boxed[-1] if boxed else text
    matches = _NUMBER.findall(search_text)
    if not matches:
        return None

    sign, digits, fraction = matches[-1]
    if fraction and int(fraction[1:]) != 0:
        return None
    value = int(digits.replace(",", ""))
    return -value if sign else value


def is_correct(text: str, gold: int) -> bool:
    """Return whether the final number in `text` equals the integer `gold`."""
    return extract_final_number(text) == gold
