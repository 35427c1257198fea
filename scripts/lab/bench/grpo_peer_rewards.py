"""The peer's reward for ``bench grpo``: mlx-dp's built-in ``exact_match``, as an mlx-lm-lora reward function.

mlx-lm-lora execs this file (``--reward-functions-file``) and looks the
function up by name (``--reward-functions exact_match_answer``). It is the
same rule as ``trainer/objectives/rewards.py``'s ``exact_match`` on the
``answer`` column: 1 when the completion equals the answer, ignoring case,
runs of white space, surrounding space and a final full stop; else 0.
``tests/test_lab_grpo.py`` checks the two agree. Without mlx-lm-lora (our
own environment, in that test) it only defines the function.
"""


def normalise(value) -> str:
    """The text compared: words joined by one space, lower case, one final full stop dropped."""
    return " ".join(str(value).split()).lower().rstrip(".")


def exact_match_answer(prompts, completions, answer, types=None) -> list[float]:
    """mlx-lm-lora's reward signature: one float per completion (its ``answer`` is the row's answer)."""
    return [float(normalise(c) == normalise(a)) for c, a in zip(completions, answer)]


try:  # registered only inside the peer's environment
    from mlx_lm_lora.trainer.grpo_reward_functions import register_reward_function
except ImportError:
    pass
else:
    register_reward_function("exact_match_answer")(exact_match_answer)
