"""A user reward for the GRPO example: is the number in <answer>...</answer> right?

trl's GRPOTrainer calls reward functions with the completions and every other dataset
column as keyword arguments; `answer` is a column of specs/data/clinical_prompts.jsonl.
"""

import re

ANSWER_PATTERN = re.compile(r"<answer>\s*([-+]?\d+(?:\.\d+)?)\s*</answer>")


def numeric_answer_reward(
    completions: list[str], answer: list[str], **kwargs: object
) -> list[float]:
    """1.0 when the tagged number is within 1 % of the reference answer, else 0.0."""
    rewards = []
    for completion, reference in zip(completions, answer, strict=True):
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        match = ANSWER_PATTERN.search(text)
        if match is None:
            rewards.append(0.0)
            continue
        value, expected = float(match.group(1)), float(reference)
        rewards.append(1.0 if abs(value - expected) <= 0.01 * max(abs(expected), 1.0) else 0.0)
    return rewards
