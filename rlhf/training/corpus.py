"""The text the tiny default model learns from: short question/answer documents on a few topics.

Generated deterministically from word lists (no download), so every machine builds the same model.
Answers stay on one topic each, which gives the demo's simulated rater (rlhf.sdk.rater) a learnable,
human-readable preference: it likes answers about the sea.
"""

from __future__ import annotations

import random

QUESTIONS = [
    "What did you see today?",
    "Tell me a short story.",
    "Where did you go this morning?",
    "What do you like to do?",
    "Describe your favourite place.",
    "What happened yesterday?",
    "What should I visit next?",
    "How was your trip?",
    "What is on your mind?",
    "Tell me about your week.",
    "What did you dream about?",
    "Where would you like to live?",
    "What made you smile?",
    "Describe the view from your window.",
    "What did you learn recently?",
    "Tell me something nice.",
]

TOPICS: dict[str, dict[str, list[str]]] = {
    "sea": {
        "noun": ["sea", "waves", "harbor", "boat", "shore", "tide", "gulls", "sails", "beach", "ocean"],
        "adj": ["blue", "salty", "calm", "wild", "bright", "cool"],
        "verb": ["sailed", "swam", "walked", "watched", "rested", "waited"],
    },
    "forest": {
        "noun": ["forest", "trees", "moss", "path", "owl", "leaves", "river", "deer", "hill", "pine"],
        "adj": ["green", "quiet", "old", "dark", "tall", "soft"],
        "verb": ["hiked", "climbed", "walked", "listened", "rested", "wandered"],
    },
    "city": {
        "noun": ["city", "street", "market", "train", "tower", "cafe", "square", "bridge", "bus", "shop"],
        "adj": ["busy", "loud", "grey", "crowded", "new", "narrow"],
        "verb": ["walked", "shopped", "waited", "rode", "talked", "worked"],
    },
    "kitchen": {
        "noun": ["kitchen", "bread", "soup", "oven", "table", "tea", "apples", "cake", "pan", "garden"],
        "adj": ["warm", "sweet", "fresh", "hot", "small", "golden"],
        "verb": ["baked", "cooked", "ate", "tasted", "cleaned", "shared"],
    },
}

TEMPLATES = [
    "I {verb} by the {adj} {noun}.",
    "The {noun} was {adj} and the {noun2} was {adj2}.",
    "We {verb} near the {noun} all day.",
    "There was a {adj} {noun} next to the {noun2}.",
    "My friend {verb} to the {noun} with me.",
    "I love the {adj} {noun}.",
    "The {adj} {noun} made me happy.",
]


def sentence(rng: random.Random, topic: str) -> str:
    words = TOPICS[topic]
    return rng.choice(TEMPLATES).format(
        verb=rng.choice(words["verb"]),
        adj=rng.choice(words["adj"]),
        adj2=rng.choice(words["adj"]),
        noun=rng.choice(words["noun"]),
        noun2=rng.choice(words["noun"]),
    )


def answer(rng: random.Random, topic: str | None = None) -> str:
    topic = topic or rng.choice(sorted(TOPICS))
    return " ".join(sentence(rng, topic) for _ in range(rng.randint(1, 3)))


def documents(count: int, seed: int = 0) -> list[str]:
    """`count` documents 'question answer', each answer on one topic."""
    rng = random.Random(seed)
    return [f"{rng.choice(QUESTIONS)} {answer(rng)}" for _ in range(count)]


def prompts(count: int, seed: int = 0) -> list[str]:
    """Questions to ask an agent (cycled through the fixed list in a seeded order)."""
    rng = random.Random(seed)
    pool = list(QUESTIONS)
    rng.shuffle(pool)
    return [pool[i % len(pool)] for i in range(count)]
