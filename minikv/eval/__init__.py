"""Long-context evaluation: synthetic RULER-style tasks and a prose text for perplexity, all offline.

``generate(task, tokenizer, length_tokens, seed)`` makes a prompt (the user message; the engine applies
the chat template) and its expected answers; ``score(sample, output)`` compares a model's output with them.
"""

from minikv.eval.haystack import HAYSTACK_SOURCES, haystack_text, insert_at_depths, prose_paragraphs
from minikv.eval.tasks import TASKS, Sample, Task, generate, get_task, passkey_prompt, perplexity_text, score

__all__ = [
    "HAYSTACK_SOURCES",
    "TASKS",
    "Sample",
    "Task",
    "generate",
    "get_task",
    "haystack_text",
    "insert_at_depths",
    "passkey_prompt",
    "perplexity_text",
    "prose_paragraphs",
    "score",
]
