"""Seeded generator of small math problems with worked solutions (the demo's `math` shard).

Each problem is a dict `{"question", "solution", "answer", "kind"}`; `format_problem` renders it as
`Problem: ...\\nSolution: ...\\nAnswer: ...`. Everything derives from one `random.Random(seed)`, so a
seed fixes the whole stream. Answers are short strings (an integer, a reduced fraction, a decimal),
which lets an lm-eval task score exact matches.
"""

from __future__ import annotations

import random
from fractions import Fraction
from math import gcd
from typing import Callable, Iterator

NAMES = ["Ada", "Ben", "Chen", "Dana", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jun", "Kira", "Leo", "Maya", "Noor",
         "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera", "Wes", "Yuki", "Zoe"]
ITEMS = [("apple", "apples"), ("book", "books"), ("marble", "marbles"), ("pencil", "pencils"), ("card", "cards"),
         ("stamp", "stamps"), ("cookie", "cookies"), ("shell", "shells"), ("coin", "coins"), ("sticker", "stickers")]
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _frac(f: Fraction) -> str:
    return str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"


def arithmetic(r: random.Random) -> dict:
    a, b = r.randint(2, 999), r.randint(2, 999)
    op = r.choice(["+", "-", "*"])
    if op == "*":
        a, b = r.randint(2, 99), r.randint(2, 99)
    sym = {"+": "+", "-": "-", "*": "×"}[op]
    ans = OPS[op](a, b)
    verb = {"+": "Add", "-": "Subtract", "*": "Multiply"}[op]
    how = {"+": f"{verb} {b} to {a}", "-": f"{verb} {b} from {a}", "*": f"{verb} {a} by {b}"}[op]
    return {"question": f"Compute {a} {sym} {b}.", "solution": f"{how}: {a} {sym} {b} = {ans}.", "answer": str(ans)}


def multi_step(r: random.Random) -> dict:
    a, b, c, d = r.randint(2, 50), r.randint(2, 50), r.randint(2, 12), r.randint(1, 100)
    s = a + b
    p = s * c
    ans = p - d
    q = f"Evaluate ({a} + {b}) × {c} - {d}."
    sol = f"First the parentheses: {a} + {b} = {s}. Then multiply: {s} × {c} = {p}. Finally subtract: {p} - {d} = {ans}."
    return {"question": q, "solution": sol, "answer": str(ans)}


def linear_equation(r: random.Random) -> dict:
    x = r.randint(-20, 20)
    a = r.choice([i for i in range(-9, 10) if i not in (0,)])
    b = r.randint(-50, 50)
    c = a * x + b
    bs = f"+ {b}" if b >= 0 else f"- {-b}"
    q = f"Solve for x: {a}x {bs} = {c}."
    step1 = f"subtract {b} from both sides" if b >= 0 else f"add {-b} to both sides"
    sol = f"First {step1}: {a}x = {c - b}. Then divide both sides by {a}: x = {c - b} / {a} = {x}."
    return {"question": q, "solution": sol, "answer": str(x)}


def fractions(r: random.Random) -> dict:
    b, d = r.randint(2, 12), r.randint(2, 12)
    a, c = r.randint(1, b * 2), r.randint(1, d * 2)
    op = r.choice(["+", "-", "*"])
    f1, f2 = Fraction(a, b), Fraction(c, d)
    if op == "*":
        raw_n, raw_d = a * c, b * d
        res = f1 * f2
        sol = f"Multiply numerators and denominators: ({a} × {c}) / ({b} × {d}) = {raw_n}/{raw_d}"
    else:
        l = b * d // gcd(b, d)
        n1, n2 = a * (l // b), c * (l // d)
        raw_n, raw_d = (n1 + n2, l) if op == "+" else (n1 - n2, l)
        res = f1 + f2 if op == "+" else f1 - f2
        sol = f"Use the common denominator {l}: {n1}/{l} {op} {n2}/{l} = {raw_n}/{raw_d}"
    sol += "." if _frac(res) == f"{raw_n}/{raw_d}" else f", which simplifies to {_frac(res)}."
    sym = "×" if op == "*" else op
    return {"question": f"Compute {a}/{b} {sym} {c}/{d}. Give the answer as a reduced fraction.", "solution": sol,
            "answer": _frac(res)}


def percentage(r: random.Random) -> dict:
    p = r.choice([5, 10, 12, 15, 20, 25, 30, 40, 50, 60, 75, 80, 90, 120, 150])
    n = r.randint(1, 80) * 20
    ans = Fraction(p * n, 100)
    q = f"What is {p}% of {n}?"
    sol = f"{p}% means {p}/100, so {p}/100 × {n} = {p * n}/100 = {_frac(ans)}."
    return {"question": q, "solution": sol, "answer": _frac(ans)}


def word_problem(r: random.Random) -> dict:
    name, other = r.sample(NAMES, 2)
    one, many = r.choice(ITEMS)
    start, bags, per, gave = r.randint(3, 60), r.randint(2, 9), r.randint(2, 12), r.randint(1, 20)
    bought = bags * per
    total = start + bought
    gave = min(gave, total)
    ans = total - gave
    q = (f"{name} has {start} {many}. {name} buys {bags} bags with {per} {many} in each bag, then gives {gave} "
         f"{many if gave != 1 else one} to {other}. How many {many} does {name} have now?")
    sol = (f"The bags hold {bags} × {per} = {bought} {many}. Together with the first {start}, {name} has "
           f"{start} + {bought} = {total}. After giving away {gave}, {name} has {total} - {gave} = {ans}.")
    return {"question": q, "solution": sol, "answer": str(ans)}


def rate_problem(r: random.Random) -> dict:
    speed, hours = r.randint(3, 90), r.randint(2, 12)
    dist = speed * hours
    q = f"A train travels {dist} kilometres in {hours} hours at a constant speed. What is its speed in kilometres per hour?"
    sol = f"Speed is distance divided by time: {dist} / {hours} = {speed} kilometres per hour."
    return {"question": q, "solution": sol, "answer": str(speed)}


def gcd_lcm(r: random.Random) -> dict:
    k = r.randint(2, 15)
    a, b = k * r.randint(2, 20), k * r.randint(2, 20)
    if r.random() < 0.5:
        g = gcd(a, b)
        return {"question": f"Find the greatest common divisor of {a} and {b}.",
                "solution": f"By the Euclidean algorithm, {_euclid(a, b)} So gcd({a}, {b}) = {g}.", "answer": str(g)}
    g = gcd(a, b)
    m = a * b // g
    return {"question": f"Find the least common multiple of {a} and {b}.",
            "solution": f"gcd({a}, {b}) = {g}, so lcm = {a} × {b} / {g} = {a * b} / {g} = {m}.", "answer": str(m)}


def _euclid(a: int, b: int) -> str:
    steps = []
    while b:
        steps.append(f"{a} = {a // b} × {b} + {a % b}.")
        a, b = b, a % b
    return " ".join(steps)


def system_2x2(r: random.Random) -> dict:
    x, y = r.randint(-10, 10), r.randint(-10, 10)
    s, d = x + y, x - y
    q = f"Solve the system: x + y = {s} and x - y = {d}. What is x?"
    sol = (f"Adding the equations gives 2x = {s} + {d} = {s + d}, so x = {x}. "
           f"Then y = {s} - {x} = {y}.")
    return {"question": q, "solution": sol, "answer": str(x)}


TEMPLATES: dict[str, Callable[[random.Random], dict]] = {
    "arithmetic": arithmetic, "multi_step": multi_step, "linear_equation": linear_equation, "fractions": fractions,
    "percentage": percentage, "word_problem": word_problem, "rate": rate_problem, "gcd_lcm": gcd_lcm,
    "system_2x2": system_2x2,
}


def format_problem(p: dict) -> str:
    return f"Problem: {p['question']}\nSolution: {p['solution']}\nAnswer: {p['answer']}"


def generate_problems(seed: int, kinds: list[str] | None = None) -> Iterator[dict]:
    """An endless, seeded stream of problems cycling through the templates in a seeded random order."""
    kinds = list(kinds or TEMPLATES)
    unknown = [k for k in kinds if k not in TEMPLATES]
    if unknown:
        raise ValueError(f"unknown math problem kind(s) {unknown}; known: {sorted(TEMPLATES)}")
    r = random.Random(seed)
    while True:
        kind = r.choice(kinds)
        p = TEMPLATES[kind](r)
        p["kind"] = kind
        p["text"] = format_problem(p)
        yield p
