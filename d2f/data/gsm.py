"""An offline, seeded generator of GSM8K-format word problems for the embedded testbed.

    problems = make_problems("train", 20000, seed=0)
    problems[0] == {"question": "Mia has 12 apples. She buys 3 bags ...",
                    "answer": "Mia buys 3 * 4 = 12 apples in the bags.\n...\n#### 19",
                    "final": "19"}

Why an in-house generator and not reasoning-gym's `gsm_symbolic`: the testbed models are ~5M
parameters trained for under an hour on two CPU cores. `gsm_symbolic`'s templates are real GSM8K
problems with real GSM8K arithmetic (percentages, fractions, four-digit products); a model that
size cannot learn that arithmetic in that budget, so its accuracy would sit near zero and no
decoding claim could be measured on it. Here every template keeps GSM8K's *form* (a story about
people and objects -> one working line per step with the operation written out -> `#### N`) while
bounding the numbers: operands < 50, multiplications by a factor <= 10, every intermediate and
final result in [0, 200). Working lines carry GSM8K's `<<a+b=c>>` calculator annotations. Numbers are written as plain digits so the testbed tokenizer, which
splits numbers into single digits, sees column-wise arithmetic.

Split by construction: a problem's split is a pure function of its question text (a SHA-1 bucket,
1 in 10 goes to "test"), and each split keeps only problems whose bucket matches, so no question
can ever appear in both splits. Everything is driven by `random.Random(f"{split}-{seed}")`, so the
same (split, n, seed) always gives the same list.
"""
from __future__ import annotations

import hashlib
import random
import re
from typing import Callable

SPLITS = ("train", "test")
TEST_BUCKETS = 1  # out of 10: the share of all question texts that belong to the test split

NAMES = {
    "she": ["Mia", "Emma", "Olivia", "Ava", "Sofia", "Lily", "Grace", "Chloe", "Zoe", "Nora", "Hannah", "Ruby",
            "Alice", "Julia", "Sara", "Maya", "Elena", "Rosa", "Aisha", "Fatima", "Mei", "Yuki", "Priya", "Ines",
            "Clara", "Lucy", "Anna", "Leah", "Ella", "Amara"],
    "he": ["Tom", "Jack", "Liam", "Noah", "Ben", "Sam", "Leo", "Max", "Omar", "Ravi", "Kenji", "Diego", "Luis",
           "Mateo", "Hugo", "Felix", "Oscar", "Adam", "Ethan", "Ryan", "Jamal", "Ivan", "Marco", "Paul", "David",
           "Kofi", "Arjun", "Hiro", "Carlos", "Eli"],
}
# countable things a person can hold, buy or collect: (plural, container)
ITEMS = [("apples", "bags"), ("oranges", "bags"), ("pencils", "boxes"), ("stickers", "packs"), ("marbles", "jars"),
         ("cookies", "boxes"), ("cards", "packs"), ("stamps", "albums"), ("shells", "buckets"), ("beads", "jars"),
         ("crayons", "boxes"), ("eggs", "cartons"), ("candies", "bags"), ("balloons", "packs"), ("books", "boxes"),
         ("toy cars", "boxes"), ("flowers", "bunches"), ("muffins", "trays"), ("buttons", "jars"),
         ("pebbles", "buckets"), ("lemons", "bags"), ("erasers", "packs"), ("cupcakes", "trays"),
         ("rocks", "buckets"), ("coins", "jars")]
SHOP_THINGS = [("notebook", "notebooks"), ("pen", "pens"), ("sandwich", "sandwiches"), ("toy", "toys"),
               ("ticket", "tickets"), ("cake", "cakes"), ("ball", "balls"), ("shirt", "shirts"), ("plant", "plants"),
               ("puzzle", "puzzles"), ("kite", "kites"), ("mug", "mugs"), ("game", "games"), ("hat", "hats"),
               ("candle", "candles"), ("comic", "comics")]
PLANTS = ["tomato plants", "roses", "tulips", "carrots", "sunflowers", "pepper plants", "trees", "bean plants"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
ACTIVITIES = [("reads", "pages", "a book"), ("runs", "laps", "the track"), ("swims", "lengths", "the pool"),
              ("writes", "lines", "a story"), ("walks", "blocks", "the town"), ("solves", "puzzles", "a puzzle book")]
ANIMALS = [("chickens", 2), ("ducks", 2), ("geese", 2), ("cows", 4), ("goats", 4), ("sheep", 4), ("pigs", 4),
           ("horses", 4), ("dogs", 4), ("cats", 4)]


class Ctx:
    """One problem's random choices: a person (name + pronouns), other people, things."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def person(self) -> tuple[str, str, str]:
        """(name, subject pronoun, possessive pronoun), never repeating a name in one problem."""
        he = self.rng.choice(["he", "she"])
        name = self.rng.choice([n for n in NAMES[he] if n not in self.used])
        self.used.add(name)
        return name, he, {"he": "his", "she": "her"}[he]

    def n(self, lo: int, hi: int) -> int:
        """An integer in [lo, hi] inclusive."""
        return self.rng.randint(lo, hi)


def cap(s: str) -> str:
    return s[0].upper() + s[1:]


# ---- templates: each returns (question, working lines, final) or None to redraw ---------------------
# Every working line writes the operation out ("a + b = c"); `annotate` then adds GSM8K's calculator
# annotation ("a + b = <<a+b=c>>c"), exactly as the real data set writes its working.

def t_buy_give(c: Ctx):
    a, he, _ = c.person()
    b, _, _ = c.person()
    item, box = c.rng.choice(ITEMS)
    x, k, per, d = c.n(2, 40), c.n(2, 6), c.n(2, 10), c.n(1, 30)
    bought = k * per
    total = x + bought
    if d > total:
        return None
    q = (f"{a} has {x} {item}. {cap(he)} buys {k} {box} of {item} with {per} {item} in each of the {box}. "
         f"Then {he} gives {d} {item} to {b}. How many {item} does {a} have now?")
    lines = [f"{a} buys {k} * {per} = {bought} {item} in the {box}.",
             f"Before giving any away, {a} has {x} + {bought} = {total} {item}.",
             f"After giving {d} {item} to {b}, {a} has {total} - {d} = {total - d} {item}."]
    return q, lines, total - d


def t_two_days_times(c: Ctx):
    a, he, _ = c.person()
    b, _, _ = c.person()
    item, _ = c.rng.choice(ITEMS)
    d1, d2 = c.rng.sample(DAYS, 2)
    x, y, k = c.n(2, 25), c.n(2, 25), c.n(2, 4)
    s = x + y
    if s * k >= 200:
        return None
    word = {2: "twice", 3: "three times", 4: "four times"}[k]
    q = (f"{a} collects {x} {item} on {d1} and {y} {item} on {d2}. {b} collects {word} as many {item} as {a} "
         f"collected on both days. How many {item} did {b} collect?")
    lines = [f"On both days {a} collects {x} + {y} = {s} {item}.",
             f"{b} collects {word} as many, so {b} collects {s} * {k} = {s * k} {item}."]
    return q, lines, s * k


def t_change(c: Ctx):
    a, he, _ = c.person()
    one, many = c.rng.choice(SHOP_THINGS)
    k, p = c.n(2, 8), c.n(2, 12)
    cost = k * p
    bill = c.rng.choice([b for b in (20, 50, 100) if b >= cost + 1] or [0])
    if not bill:
        return None
    q = (f"{a} buys {k} {many} for ${p} each. {cap(he)} pays with a ${bill} bill. "
         f"How much change does {a} get back in dollars?")
    lines = [f"The {many} cost {k} * {p} = ${cost} in total.",
             f"{a} paid ${bill}, so the change is {bill} - {cost} = ${bill - cost}."]
    return q, lines, bill - cost


def t_share(c: Ctx):
    a, _, _ = c.person()
    b, _, _ = c.person()
    item, _ = c.rng.choice(ITEMS)
    k = c.n(2, 9)
    each = c.n(2, 12)
    s = k * each
    x = c.n(1, s - 1) if s > 2 else None
    if x is None:
        return None
    y = s - x
    q = (f"{a} has {x} {item} and {b} has {y} {item}. They put all their {item} together and share them "
         f"equally among {k} friends. How many {item} does each friend get?")
    lines = [f"Together they have {x} + {y} = {s} {item}.",
             f"Shared among {k} friends, each friend gets {s} / {k} = {each} {item}."]
    return q, lines, each


def t_ages(c: Ctx):
    a, _, _ = c.person()
    b, _, _ = c.person()
    d, _, _ = c.person()
    x, y, z = c.n(3, 20), c.n(2, 15), c.n(1, 10)
    bb = x + y
    dd = bb - z
    if dd <= 0:
        return None
    q = (f"{a} is {x} years old. {b} is {y} years older than {a}. {d} is {z} years younger than {b}. "
         f"What is the sum of the ages of {a}, {b} and {d}?")
    lines = [f"{b} is {x} + {y} = {bb} years old.",
             f"{d} is {bb} - {z} = {dd} years old.",
             f"The sum of their ages is {x} + {bb} + {dd} = {x + bb + dd} years."]
    return q, lines, x + bb + dd


def t_activity_left(c: Ctx):
    a, he, _ = c.person()
    verb, unit, thing = c.rng.choice(ACTIVITIES)
    per, days = c.n(2, 15), c.n(2, 7)
    done = per * days
    total = done + c.n(1, 60)
    if total >= 200:
        return None
    q = (f"{a} wants to finish {thing} with {total} {unit}. {cap(he)} {verb} {per} {unit} every day for "
         f"{days} days. How many {unit} does {a} still have to do?")
    lines = [f"In {days} days {a} {verb} {per} * {days} = {done} {unit}.",
             f"{a} still has {total} - {done} = {total - done} {unit} to do."]
    return q, lines, total - done


def t_rows_empty(c: Ctx):
    r, per = c.n(2, 10), c.n(2, 15)
    seats = r * per
    if seats >= 200:
        return None
    g1, g2 = c.n(1, 30), c.n(1, 30)
    if g1 + g2 > seats:
        return None
    place = c.rng.choice(["a hall", "a theater", "a classroom", "a tent", "a garden party"])
    q = (f"In {place} there are {r} rows of chairs with {per} chairs in each row. {g1} children and {g2} adults "
         f"sit down. How many chairs are still empty?")
    lines = [f"There are {r} * {per} = {seats} chairs in all.",
             f"There are {g1} + {g2} = {g1 + g2} people sitting down.",
             f"So {seats} - {g1 + g2} = {seats - g1 - g2} chairs are still empty."]
    return q, lines, seats - g1 - g2


def t_save_spend(c: Ctx):
    a, he, _ = c.person()
    one, _ = c.rng.choice(SHOP_THINGS)
    x, w = c.n(2, 15), c.n(2, 8)
    saved = x * w
    start = c.n(0, 40)
    total = saved + start
    cost = c.n(1, total) if total >= 1 else 0
    if total >= 200 or not cost:
        return None
    q = (f"{a} has ${start}. {cap(he)} saves ${x} every week for {w} weeks. Then {he} spends ${cost} on a {one}. "
         f"How many dollars does {a} have left?")
    lines = [f"In {w} weeks {a} saves {x} * {w} = ${saved}.",
             f"Then {a} has {start} + {saved} = ${total}.",
             f"After buying the {one}, {a} has {total} - {cost} = ${total - cost} left."]
    return q, lines, total - cost


def t_class_pencils(c: Ctx):
    b_, g_, k = c.n(3, 20), c.n(3, 20), c.n(2, 5)
    n = b_ + g_
    item, _ = c.rng.choice(ITEMS[:14])
    if n * k >= 200:
        return None
    lost = c.n(1, min(30, n * k))
    q = (f"A class has {b_} boys and {g_} girls. Each student brings {k} {item} to school. Then {lost} of the "
         f"{item} get lost. How many {item} are left?")
    lines = [f"There are {b_} + {g_} = {n} students in the class.",
             f"They bring {n} * {k} = {n * k} {item}.",
             f"After {lost} get lost, {n * k} - {lost} = {n * k - lost} {item} are left."]
    return q, lines, n * k - lost


def t_garden(c: Ctx):
    a, he, his = c.person()
    plant = c.rng.choice(PLANTS)
    r, per = c.n(2, 9), c.n(2, 12)
    n = r * per
    dead, more = c.n(1, min(20, n)), c.n(1, 30)
    q = (f"{a} plants {r} rows of {plant} in {his} garden with {per} {plant} in each row. {dead} of them do not "
         f"grow, so {he} plants {more} more. How many {plant} are in the garden now?")
    lines = [f"{a} plants {r} * {per} = {n} {plant}.",
             f"After {dead} do not grow, there are {n} - {dead} = {n - dead} {plant}.",
             f"With {more} more, there are {n - dead} + {more} = {n - dead + more} {plant} now."]
    return q, lines, n - dead + more


def t_bake_half(c: Ctx):
    a, he, _ = c.person()
    b, _, _ = c.person()
    trays, per = c.n(2, 6), c.n(4, 12)
    n = trays * per
    eat = c.n(1, 10)
    rest = n - eat
    if rest <= 0 or rest % 2:
        return None
    food = c.rng.choice(["cookies", "muffins", "cupcakes", "rolls", "pies", "buns"])
    q = (f"{a} bakes {trays} trays of {food} with {per} {food} on each tray. {cap(he)} eats {eat} of them and gives "
         f"half of the rest to {b}. How many {food} does {b} get?")
    lines = [f"{a} bakes {trays} * {per} = {n} {food}.",
             f"After eating {eat}, there are {n} - {eat} = {rest} {food} left.",
             f"Half of them go to {b}, so {b} gets {rest} / 2 = {rest // 2} {food}."]
    return q, lines, rest // 2


def t_bus(c: Ctx):
    x = c.n(10, 50)
    off1, on1 = c.n(1, x), c.n(1, 25)
    after1 = x - off1 + on1
    off2 = c.n(1, after1)
    vehicle = c.rng.choice(["bus", "train", "tram", "boat"])
    q = (f"A {vehicle} has {x} passengers. At the first stop {off1} passengers get off and {on1} get on. "
         f"At the second stop {off2} passengers get off. How many passengers are on the {vehicle} now?")
    lines = [f"After {off1} get off, there are {x} - {off1} = {x - off1} passengers.",
             f"After {on1} get on, there are {x - off1} + {on1} = {after1} passengers.",
             f"At the second stop, {after1} - {off2} = {after1 - off2} passengers are left on the {vehicle}."]
    return q, lines, after1 - off2


def t_more_fewer_total(c: Ctx):
    a, _, _ = c.person()
    b, _, _ = c.person()
    d, _, _ = c.person()
    item, _ = c.rng.choice(ITEMS)
    x, y, z = c.n(2, 40), c.n(1, 20), c.n(1, 20)
    bb = x + y
    dd = bb - z
    if dd <= 0 or x + bb + dd >= 200:
        return None
    q = (f"{a} has {x} {item}. {b} has {y} more {item} than {a}. {d} has {z} fewer {item} than {b}. "
         f"How many {item} do they have altogether?")
    lines = [f"{b} has {x} + {y} = {bb} {item}.",
             f"{d} has {bb} - {z} = {dd} {item}.",
             f"Altogether they have {x} + {bb} + {dd} = {x + bb + dd} {item}."]
    return q, lines, x + bb + dd


def t_two_prices(c: Ctx):
    a, he, _ = c.person()
    (o1, m1), (o2, m2) = c.rng.sample(SHOP_THINGS, 2)
    k1, p1, k2, p2 = c.n(2, 6), c.n(2, 15), c.n(2, 6), c.n(2, 15)
    c1, c2 = k1 * p1, k2 * p2
    if c1 + c2 >= 200:
        return None
    q = (f"{a} buys {k1} {m1} that cost ${p1} each and {k2} {m2} that cost ${p2} each. "
         f"How much money does {a} spend in all?")
    lines = [f"The {m1} cost {k1} * {p1} = ${c1}.",
             f"The {m2} cost {k2} * {p2} = ${c2}.",
             f"In all {a} spends {c1} + {c2} = ${c1 + c2}."]
    return q, lines, c1 + c2


def t_tickets(c: Ctx):
    adult, child = c.n(5, 20), c.n(2, 10)
    na, nc = c.n(1, 4), c.n(1, 6)
    if adult <= child:
        return None
    ca, cc = na * adult, nc * child
    if ca + cc >= 200:
        return None
    place = c.rng.choice(["the zoo", "the museum", "the cinema", "the fair", "the aquarium", "the circus"])
    q = (f"Tickets to {place} cost ${adult} for an adult and ${child} for a child. A family buys {na} adult "
         f"tickets and {nc} child tickets. How much do they pay in total?")
    lines = [f"The adult tickets cost {na} * {adult} = ${ca}.",
             f"The child tickets cost {nc} * {child} = ${cc}.",
             f"In total they pay {ca} + {cc} = ${ca + cc}."]
    return q, lines, ca + cc


def t_shop_sells(c: Ctx):
    item, box = c.rng.choice(ITEMS)
    k, per = c.n(2, 10), c.n(4, 15)
    n = k * per
    s1, s2 = c.n(1, 30), c.n(1, 30)
    if n >= 200 or s1 + s2 > n:
        return None
    q = (f"A shop has {k} {box} of {item} with {per} {item} in each of the {box}. It sells {s1} {item} in the "
         f"morning and {s2} {item} in the afternoon. How many {item} are left in the shop?")
    lines = [f"The shop has {k} * {per} = {n} {item}.",
             f"It sells {s1} + {s2} = {s1 + s2} {item} in the day.",
             f"There are {n} - {s1 + s2} = {n - s1 - s2} {item} left."]
    return q, lines, n - s1 - s2


def t_legs(c: Ctx):
    a, _, his = c.person()
    (an1, l1), (an2, l2) = c.rng.sample(ANIMALS, 2)
    n1, n2 = c.n(2, 20), c.n(2, 20)
    if n1 * l1 + n2 * l2 >= 200:
        return None
    q = (f"On {a}'s farm there are {n1} {an1} and {n2} {an2}. How many legs do the animals on {his} farm "
         f"have in total?")
    lines = [f"The {an1} have {n1} * {l1} = {n1 * l1} legs.",
             f"The {an2} have {n2} * {l2} = {n2 * l2} legs.",
             f"In total the animals have {n1 * l1} + {n2 * l2} = {n1 * l1 + n2 * l2} legs."]
    return q, lines, n1 * l1 + n2 * l2


def t_compare_weeks(c: Ctx):
    a, _, _ = c.person()
    b, _, _ = c.person()
    verb, unit, _ = c.rng.choice(ACTIVITIES)
    x, d, y, e = c.n(2, 12), c.n(2, 7), c.n(2, 12), c.n(2, 7)
    ta, tb = x * d, y * e
    if ta == tb:
        return None
    (hi, thi), (lo, tlo) = sorted([(a, ta), (b, tb)], key=lambda p: -p[1])
    q = (f"{a} {verb} {x} {unit} a day for {d} days. {b} {verb} {y} {unit} a day for {e} days. "
         f"How many more {unit} does {hi} do than {lo}?")
    lines = [f"{a} does {x} * {d} = {ta} {unit}.",
             f"{b} does {y} * {e} = {tb} {unit}.",
             f"{hi} does {thi} - {tlo} = {thi - tlo} more {unit} than {lo}."]
    return q, lines, thi - tlo


def t_fraction_give(c: Ctx):
    a, he, _ = c.person()
    b, _, _ = c.person()
    item, _ = c.rng.choice(ITEMS)
    k = c.rng.choice([2, 3, 4, 5])
    part = c.n(2, 15)
    x = k * part
    more = c.n(1, 40)
    word = {2: "half", 3: "a third", 4: "a quarter", 5: "a fifth"}[k]
    q = (f"{a} has {x} {item}. {cap(he)} gives {word} of them to {b}. Then {he} finds {more} more {item}. "
         f"How many {item} does {a} have now?")
    lines = [f"{a} gives away {x} / {k} = {part} {item}.",
             f"Then {a} has {x} - {part} = {x - part} {item}.",
             f"After finding {more} more, {a} has {x - part} + {more} = {x - part + more} {item}."]
    return q, lines, x - part + more


def t_per_day_total(c: Ctx):
    a, he, _ = c.person()
    item, _ = c.rng.choice(ITEMS)
    x, y, days = c.n(1, 10), c.n(1, 10), c.n(2, 7)
    per = x + y
    if per * days >= 200:
        return None
    used = c.n(1, per * days)
    q = (f"Every day {a} gets {x} {item} from {his_or(he)} mom and {y} {item} from {his_or(he)} dad. After "
         f"{days} days {he} has used {used} of them. How many {item} does {a} have left?")
    lines = [f"Each day {a} gets {x} + {y} = {per} {item}.",
             f"In {days} days {a} gets {per} * {days} = {per * days} {item}.",
             f"After using {used}, {a} has {per * days} - {used} = {per * days - used} {item} left."]
    return q, lines, per * days - used


def his_or(he: str) -> str:
    return {"he": "his", "she": "her"}[he]


def t_four_step(c: Ctx):
    a, he, his = c.person()
    b, _, _ = c.person()
    item, box = c.rng.choice(ITEMS)
    k, per, x, d, more = c.n(2, 5), c.n(2, 10), c.n(1, 20), c.n(1, 15), c.n(1, 20)
    bought = k * per
    total = x + bought
    if d > total or total - d + more >= 200:
        return None
    q = (f"{a} has {x} {item}. At the market {he} buys {k} {box} with {per} {item} in each. {cap(he)} gives {d} "
         f"{item} to {b}, and later {his} aunt gives {a} {more} {item}. How many {item} does {a} have at the end?")
    lines = [f"{a} buys {k} * {per} = {bought} {item}.",
             f"Then {a} has {x} + {bought} = {total} {item}.",
             f"After giving {d} away, {a} has {total} - {d} = {total - d} {item}.",
             f"With {more} more, {a} has {total - d} + {more} = {total - d + more} {item}."]
    return q, lines, total - d + more


TEMPLATES: list[Callable[[Ctx], tuple[str, list[str], int] | None]] = [
    t_buy_give, t_two_days_times, t_change, t_share, t_ages, t_activity_left, t_rows_empty, t_save_spend,
    t_class_pencils, t_garden, t_bake_half, t_bus, t_more_fewer_total, t_two_prices, t_tickets, t_shop_sells,
    t_legs, t_compare_weeks, t_fraction_give, t_per_day_total, t_four_step,
]


CALC = re.compile(r"(\d+(?: [-+*/] \d+)+) = (\$?)(\d+)")


def annotate(line: str) -> str:
    """"7 + 4 = 11" -> "7 + 4 = <<7+4=11>>11" (GSM8K's calculator annotation), checking the arithmetic."""
    def sub(m: re.Match) -> str:
        expr, dollar, result = m.group(1), m.group(2), m.group(3)
        compact = expr.replace(" ", "")
        value = eval(compact, {"__builtins__": {}})  # digits and + - * / only (the regex guarantees it)
        assert value == int(result), (line, value)
        return f"{expr} = {dollar}<<{compact}={result}>>{result}"
    return CALC.sub(sub, line)


def split_of(question: str) -> str:
    """The split a question text belongs to, a pure function of the text (so splits are disjoint)."""
    bucket = int(hashlib.sha1(question.encode()).hexdigest()[:8], 16) % 10
    return "test" if bucket < TEST_BUCKETS else "train"


def make_problem(rng: random.Random) -> dict:
    """One problem from a random template (redrawing until its number constraints hold)."""
    while True:
        out = rng.choice(TEMPLATES)(Ctx(rng))
        if out is None:
            continue
        question, lines, final = out
        assert 0 <= final < 200, (question, final)
        return {"question": question, "answer": "\n".join(map(annotate, lines)) + f"\n#### {final}", "final": str(final)}


def make_problems(split: str, n: int, seed: int = 0) -> list[dict]:
    """`n` distinct problems of `split` ("train" or "test"), the same list for the same arguments."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"{split}-{seed}")
    out, seen = [], set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 10_000:
            raise RuntimeError(f"could only generate {len(out)} distinct {split} problems of the {n} asked for")
        p = make_problem(rng)
        if p["question"] in seen or split_of(p["question"]) != split:
            continue
        seen.add(p["question"])
        out.append(p)
    return out
