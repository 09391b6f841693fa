"""Writes the toy preference data that ships in dpojax/assets (fixed seed, license-clean).

Two families a small model can learn from scratch:
  counting: the chosen answer counts up by one; the rejected one counts by two, counts
    down, or skips a number;
  helpfulness: the chosen answer helps with the named topic; the rejected one refuses.
Run: python scripts/make_toy_prefs.py
"""

import json
import os
import random

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "dpojax", "assets")
TOPICS = ["cats", "dogs", "trees", "rivers", "the moon", "bread", "music", "trains", "rain",
          "birds", "ships", "tea", "snow", "books", "stars", "horses", "apples", "bees"]
ADJECTIVES = ["lovely", "curious", "useful", "old", "bright", "simple", "famous", "quiet"]
REFUSALS = ["No. Ask someone else.", "I will not do that.", "Not my problem.",
            "Figure it out yourself.", "No, go away."]


def counting(rng):
  start = rng.randint(0, 30)
  n = rng.randint(4, 7)
  good = list(range(start, start + n))
  kind = rng.choice(["by_two", "backwards", "skip"])
  if kind == "by_two":
    bad = list(range(start, start + 2 * n, 2))
  elif kind == "backwards":
    bad = good[::-1]
  else:
    i = rng.randint(1, n - 2)
    bad = good[:i] + [x + 1 for x in good[i:]]
  prompt = f"Count from {good[0]} to {good[-1]}."
  return prompt, " ".join(map(str, good)), " ".join(map(str, bad))


def helpfulness(rng):
  topic = rng.choice(TOPICS)
  prompt = f"Please tell me about {topic}."
  chosen = f"Sure! {topic.capitalize()} are {rng.choice(ADJECTIVES)}. Happy to help."
  return prompt, chosen, rng.choice(REFUSALS)


def make(n, rng):
  rows = []
  for _ in range(n):
    prompt, chosen, rejected = (counting if rng.random() < 0.6 else helpfulness)(rng)
    rows.append({"prompt": prompt, "chosen_response": chosen, "rejected_response": rejected})
  return rows


def main():
  rng = random.Random(1234)
  for name, n in (("train", 2000), ("val", 200)):
    with open(os.path.join(OUT, f"toy_prefs_{name}.jsonl"), "w") as f:
      for row in make(n, rng):
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
