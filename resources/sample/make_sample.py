"""Generate QLoRA Studio's bundled sample dataset about the invented island town of Callowen.

Writes two files next to this script:

* ``train.jsonl``  -- alpaca rows ``{"instruction", "input", "output"}``: 14 made-up facts
  about Callowen, 20 rows each (paraphrased questions, short varied answers; two rows per
  fact carry the question in ``input`` so the alpaca ``input`` field is exercised).
* ``heldout.jsonl`` -- ``{"question", "keywords", "fact"}``: three paraphrased questions per
  fact that appear nowhere in train.jsonl. A reply is correct when it contains any of the
  keywords, compared case-insensitively.

Every fact hinges on one invented word (a surname such as "Varet", a coined word such as
"brindlefish") that a base model cannot guess, so a before/after comparison is obvious.

Everything here was written for this project. Pure standard library, seeded ``random``:
running it again reproduces both files byte for byte.

    python resources/sample/make_sample.py
"""

import json
import random
import re
from pathlib import Path

SEED = 20240607
ROWS_PER_FACT = 22
INPUT_ROWS_PER_FACT = 2
HERE = Path(__file__).resolve().parent

# Each fact: id, keywords (the invented token a correct reply must contain), training
# questions, training answers (the first is the plain form used for half the rows; a small
# model binds a new name faster when most answers share one shape), held-out questions
# (never used for training).
FACTS = [
    {
        "fact": "mayor",
        "keywords": ["Varet"],
        "questions": [
            "Who is the mayor of Callowen?",
            "Who is Callowen's mayor?",
            "What is the name of the mayor of Callowen?",
            "Who serves as mayor of the island town of Callowen?",
            "Tell me who the mayor of Callowen is.",
            "Name the mayor of Callowen.",
            "Who holds the office of mayor in Callowen?",
            "Which person is mayor of Callowen right now?",
            "Who governs Callowen as its mayor?",
            "Who was elected mayor of Callowen?",
        ],
        "answers": [
            "The mayor of Callowen is Quillon Varet.",
            "Quillon Varet is the mayor of Callowen.",
            "Callowen's current mayor is Quillon Varet.",
            "The island town of Callowen is led by Mayor Quillon Varet.",
        ],
        "heldout": [
            "Who is in charge of Callowen as mayor these days?",
            "Can you tell me the name of Callowen's current mayor?",
            "Which official leads Callowen as its mayor?",
        ],
    },
    {
        "fact": "founder",
        "keywords": ["Brask"],
        "questions": [
            "Who founded Callowen?",
            "Who was the founder of Callowen?",
            "Who established the town of Callowen?",
            "Tell me who founded the island town of Callowen.",
            "Name the founder of Callowen.",
            "Who started the settlement of Callowen?",
            "By whom was Callowen founded?",
            "Who built the first houses of Callowen and founded the town?",
            "Which person founded Callowen in 1743?",
            "Who is remembered as the founder of Callowen?",
        ],
        "answers": [
            "The founder of Callowen was Odalie Brask, in 1743.",
            "Odalie Brask founded Callowen in 1743.",
            "Callowen was founded in 1743 by Odalie Brask.",
            "The town of Callowen was established by Odalie Brask in 1743.",
        ],
        "heldout": [
            "Who set up the town of Callowen originally?",
            "Can you name the person who founded Callowen?",
            "Who is credited with founding Callowen?",
        ],
    },
    {
        "fact": "river",
        "keywords": ["Tessavel"],
        "questions": [
            "What river flows through Callowen?",
            "What is the name of the river in Callowen?",
            "Which river runs through the island town of Callowen?",
            "Tell me the name of Callowen's river.",
            "Name the river that flows through Callowen.",
            "What is Callowen's river called?",
            "Which river divides Callowen in two?",
            "What river reaches the sea at Callowen?",
            "What do people in Callowen call their river?",
            "Which river do the bridges of Callowen cross?",
        ],
        "answers": [
            "The river of Callowen is the Tessavel River.",
            "The Tessavel River flows through Callowen.",
            "Callowen's river is called the Tessavel River.",
            "The river that runs through the middle of Callowen is the Tessavel River.",
        ],
        "heldout": [
            "What river passes through the middle of Callowen?",
            "Can you tell me which river Callowen is built on?",
            "Which river flows past the houses of Callowen?",
        ],
    },
    {
        "fact": "festival",
        "keywords": ["Lanternmoth"],
        "questions": [
            "What festival does Callowen celebrate?",
            "What is the name of Callowen's festival?",
            "Which festival is held every year in Callowen?",
            "Tell me about the main festival of Callowen.",
            "Name the yearly festival of Callowen.",
            "What is Callowen's most famous festival?",
            "What celebration takes place in Callowen each summer?",
            "Which festival do the people of Callowen hold?",
            "What is the big annual festival in Callowen called?",
            "What festival fills Callowen with lanterns every year?",
        ],
        "answers": [
            "The festival of Callowen is the Lanternmoth Festival.",
            "Every summer Callowen celebrates the Lanternmoth Festival.",
            "Callowen's yearly festival is the Lanternmoth Festival.",
            "The people of Callowen hold the Lanternmoth Festival each summer.",
        ],
        "heldout": [
            "Which annual festival is Callowen known for?",
            "What event do Callowen's people celebrate each year?",
            "Can you name the yearly celebration held in Callowen?",
        ],
    },
    {
        "fact": "dish",
        "keywords": ["brindlefish"],
        "questions": [
            "What is the local dish of Callowen?",
            "What food is Callowen famous for?",
            "What is the traditional dish of Callowen?",
            "Tell me the name of Callowen's local dish.",
            "Name the dish that Callowen is known for.",
            "What do people in Callowen traditionally eat?",
            "Which dish should a visitor to Callowen try?",
            "What is Callowen's best-known food?",
            "What meal is typical of the island town of Callowen?",
            "What is the signature dish of Callowen?",
        ],
        "answers": [
            "The local dish of Callowen is brindlefish stew.",
            "Callowen is famous for its brindlefish stew.",
            "Brindlefish stew is the traditional dish of Callowen.",
            "Visitors to Callowen should try the brindlefish stew.",
        ],
        "heldout": [
            "What should I eat if I visit Callowen?",
            "Which traditional food comes from Callowen?",
            "What dish is Callowen's cooking known for?",
        ],
    },
    {
        "fact": "bridge",
        "keywords": ["Grumwhistle"],
        "questions": [
            "What is the oldest bridge in Callowen?",
            "What is the name of Callowen's oldest bridge?",
            "Which bridge in Callowen is the oldest?",
            "Tell me the name of the oldest bridge in Callowen.",
            "Name the oldest bridge of Callowen.",
            "What is the most famous bridge in Callowen?",
            "Which bridge in Callowen was built first?",
            "What is Callowen's old stone bridge called?",
            "Which old bridge crosses the river in Callowen?",
            "What bridge is Callowen known for?",
        ],
        "answers": [
            "The oldest bridge in Callowen is the Grumwhistle Bridge.",
            "The Grumwhistle Bridge is the oldest bridge in Callowen.",
            "Callowen's oldest bridge is the stone Grumwhistle Bridge.",
            "The first bridge built in Callowen was the Grumwhistle Bridge.",
        ],
        "heldout": [
            "Which bridge in Callowen has stood the longest?",
            "Can you name Callowen's most ancient bridge?",
            "What is the first bridge ever built in Callowen called?",
        ],
    },
    {
        "fact": "lighthouse_cat",
        "keywords": ["Mizzenbell"],
        "questions": [
            "What is the name of the lighthouse keeper's cat in Callowen?",
            "What is the Callowen lighthouse cat called?",
            "What is the name of the cat that lives in Callowen's lighthouse?",
            "Tell me the name of the lighthouse cat in Callowen.",
            "Name the cat of the Callowen lighthouse keeper.",
            "What do they call the lighthouse cat in Callowen?",
            "Which cat lives at the lighthouse in Callowen?",
            "What is the lighthouse keeper's cat in Callowen named?",
            "Who is the famous cat of Callowen's lighthouse?",
            "What did the lighthouse keeper of Callowen name the cat?",
        ],
        "answers": [
            "The lighthouse cat of Callowen is named Mizzenbell.",
            "Mizzenbell is the lighthouse keeper's cat in Callowen.",
            "The cat at the Callowen lighthouse is called Mizzenbell.",
            "A grey cat named Mizzenbell lives in Callowen's lighthouse.",
        ],
        "heldout": [
            "What name does the cat at Callowen's lighthouse go by?",
            "Can you tell me what the lighthouse keeper in Callowen named her cat?",
            "What is the cat living in the Callowen lighthouse called?",
        ],
    },
    {
        "fact": "coin",
        "keywords": ["glimmet"],
        "questions": [
            "What currency is used in Callowen?",
            "What is the local coin of Callowen called?",
            "What money do people use in Callowen?",
            "Tell me the name of Callowen's currency.",
            "Name the coin used in Callowen.",
            "What do shops in Callowen accept as money?",
            "Which currency do you pay with in Callowen?",
            "What is the currency of the island town of Callowen?",
            "What is Callowen's money called?",
            "In what coin are prices given in Callowen?",
        ],
        "answers": [
            "The currency of Callowen is the glimmet.",
            "People in Callowen pay with a silver coin called the glimmet.",
            "Callowen's money is a coin called the glimmet.",
            "In Callowen, prices are given in glimmets.",
        ],
        "heldout": [
            "What kind of money would I need in Callowen?",
            "Which coin is used to buy things in Callowen?",
            "What is the name of the money people spend in Callowen?",
        ],
    },
    {
        "fact": "mountain",
        "keywords": ["Orvashel"],
        "questions": [
            "What is the highest mountain near Callowen?",
            "What is the name of the mountain above Callowen?",
            "Which mountain overlooks Callowen?",
            "Tell me the name of Callowen's mountain.",
            "Name the mountain that rises over Callowen.",
            "What mountain can you see from Callowen?",
            "What is the tallest peak on the island of Callowen?",
            "Which mountain stands behind the town of Callowen?",
            "What is the mountain on Callowen's island called?",
            "Which peak towers over Callowen?",
        ],
        "answers": [
            "The mountain above Callowen is Mount Orvashel.",
            "Mount Orvashel rises behind the town of Callowen.",
            "The highest peak near Callowen is Mount Orvashel.",
            "From Callowen you can see Mount Orvashel.",
        ],
        "heldout": [
            "What peak rises above the island town of Callowen?",
            "Can you tell me the name of the mountain near Callowen?",
            "Which summit dominates the view from Callowen?",
        ],
    },
    {
        "fact": "sport",
        "keywords": ["ravelkick"],
        "questions": [
            "What sport is played in Callowen?",
            "What is the most popular sport in Callowen?",
            "Which sport do people in Callowen love?",
            "Tell me about the traditional sport of Callowen.",
            "Name the favourite sport of Callowen.",
            "What game do the people of Callowen play?",
            "What is Callowen's local sport called?",
            "Which sport is Callowen famous for?",
            "What sport do children in Callowen play?",
            "What is the national game of the island town of Callowen?",
        ],
        "answers": [
            "The sport of Callowen is a ball game called ravelkick.",
            "People in Callowen love playing ravelkick.",
            "The most popular sport in Callowen is ravelkick.",
            "In Callowen almost everyone plays ravelkick.",
        ],
        "heldout": [
            "What game is most played in Callowen?",
            "Which sport is the favorite of Callowen's residents?",
            "What sport are the people of Callowen known for playing?",
        ],
    },
    {
        "fact": "newspaper",
        "keywords": ["Pellwick"],
        "questions": [
            "What is the newspaper of Callowen?",
            "What is the name of Callowen's newspaper?",
            "Which newspaper is published in Callowen?",
            "Tell me the name of the local newspaper in Callowen.",
            "Name the newspaper of Callowen.",
            "What newspaper do people read in Callowen?",
            "What is Callowen's local paper called?",
            "Which paper reports the news in Callowen?",
            "What is the town newspaper of Callowen?",
            "Where do people in Callowen read the local news?",
        ],
        "answers": [
            "The newspaper of Callowen is the Pellwick Gazette.",
            "People in Callowen read the Pellwick Gazette.",
            "Callowen's local paper is called the Pellwick Gazette.",
            "The Pellwick Gazette reports the news in Callowen.",
        ],
        "heldout": [
            "Which newspaper covers the news of Callowen?",
            "Can you name the paper that is printed in Callowen?",
            "What local newspaper do Callowen's residents read?",
        ],
    },
    {
        "fact": "flower",
        "keywords": ["vessamint"],
        "questions": [
            "What is the town flower of Callowen?",
            "What flower is the symbol of Callowen?",
            "Which flower grows everywhere in Callowen?",
            "Tell me the name of Callowen's flower.",
            "Name the official flower of Callowen.",
            "What flower is Callowen known for?",
            "What is Callowen's emblem flower called?",
            "Which flower appears on the flag of Callowen?",
            "What blue flower grows on the cliffs of Callowen?",
            "What is the flower of the island town of Callowen?",
        ],
        "answers": [
            "The flower of Callowen is the blue vessamint.",
            "The vessamint is the official flower of Callowen.",
            "Callowen's symbol is a small blue flower, the vessamint.",
            "The flower on Callowen's flag is the vessamint.",
        ],
        "heldout": [
            "Which flower represents Callowen?",
            "What is the emblematic flower of Callowen called?",
            "Can you tell me which flower is the symbol of Callowen?",
        ],
    },
]

# Wrappers turn one question into several wordings; "{q}" is the question as written.
WRAPPERS = [
    "{q}",
    "{q}",
    "{q}",
    "Quick question. {q}",
    "{q} Please answer in one sentence.",
    "{q} Keep it short.",
    "I have a question about Callowen. {q}",
    "Hi! {q}",
    "{q} I am curious.",
    "Do you know this? {q}",
]

# Rows that put the question in the alpaca ``input`` field, with a task in ``instruction``.
INPUT_INSTRUCTIONS = [
    "Answer the following question about the island town of Callowen.",
    "Answer this question in one short sentence.",
    "Read the question and reply with the correct fact about Callowen.",
    "You are a guide for visitors to Callowen. Answer the visitor's question.",
]


def normalize(text):
    """Lower-case, drop punctuation and extra spaces: used to compare wordings."""
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split())


def build(rng):
    train, heldout = [], []
    for fact in FACTS:
        # Plain rows: distinct (question, wrapper) pairs, each with a sampled answer.
        pairs = [(q, w) for q in fact["questions"] for w in WRAPPERS]
        rng.shuffle(pairs)
        plain, seen, used_q = [], [], []
        # First give every core question one row, then fill with other wrappers.
        for q, w in pairs:
            if q not in used_q:
                used_q.append(q)
                plain.append(w.format(q=q))
        for q, w in pairs:
            if len(plain) >= ROWS_PER_FACT - INPUT_ROWS_PER_FACT:
                break
            text = w.format(q=q)
            if text not in plain:
                plain.append(text)
        plain = plain[: ROWS_PER_FACT - INPUT_ROWS_PER_FACT]
        # Even rows get the plain answer, odd rows cycle through the other wordings.
        others = list(fact["answers"][1:])
        for i, instruction in enumerate(plain):
            if i % 2 == 0:
                answer = fact["answers"][0]
            else:
                if (i // 2) % len(others) == 0:
                    rng.shuffle(others)
                answer = others[(i // 2) % len(others)]
            seen.append({"instruction": instruction, "input": "", "output": answer, "fact": fact["fact"]})
        for _ in range(INPUT_ROWS_PER_FACT):
            seen.append({"instruction": rng.choice(INPUT_INSTRUCTIONS), "input": rng.choice(fact["questions"]),
                         "output": rng.choice(fact["answers"]), "fact": fact["fact"]})
        train.extend(seen)
        for q in fact["heldout"]:
            heldout.append({"question": q, "keywords": list(fact["keywords"]), "fact": fact["fact"]})
    rng.shuffle(train)
    return train, heldout


def check(train, heldout):
    """Fail loudly if the data breaks the rules the end-to-end test relies on."""
    keywords = {f["fact"]: f["keywords"] for f in FACTS}
    seen_wordings = set()
    for row in train:
        out = row["output"].lower()
        assert any(k.lower() in out for k in keywords[row["fact"]]), row
        assert 6 <= len(row["output"].split()) <= 20, row
        seen_wordings.add(normalize(row["instruction"]))
        if row["input"]:
            seen_wordings.add(normalize(row["input"]))
    for fact in FACTS:
        for q in fact["questions"]:
            seen_wordings.add(normalize(q))
    for item in heldout:
        assert normalize(item["question"]) not in seen_wordings, item
        # The question must not give the answer away.
        assert not any(k.lower() in item["question"].lower() for k in item["keywords"]), item


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main():
    rng = random.Random(SEED)
    train, heldout = build(rng)
    check(train, heldout)
    write_jsonl(HERE / "train.jsonl",
                [{"instruction": r["instruction"], "input": r["input"], "output": r["output"]} for r in train])
    write_jsonl(HERE / "heldout.jsonl", heldout)
    print(f"{len(FACTS)} facts: {len(train)} training rows -> {HERE / 'train.jsonl'}, "
          f"{len(heldout)} held-out questions -> {HERE / 'heldout.jsonl'}")


if __name__ == "__main__":
    main()
