"""Synthetic long-context tasks, generated locally at a requested token length.

The tasks follow RULER (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your Long-Context
Language Models?", arXiv 2404.06654); the wording, word lists and haystacks here are minikv's own:

- ``niah_single``: one needle, a 7-digit "special magic number" for a key; the pass-key test.
- ``niah_multikey``: several needles with distinct keys and values; one key is asked, the rest distract.
- ``niah_multivalue``: several values for the same key; all are asked.
- ``niah_multiquery``: several needles with distinct keys; all keys are asked at once.
- ``vt``: variable tracking. ``VAR ABCDE = 12345.`` then ``VAR FGHIJ = VAR ABCDE.`` and so on, with
  distractor chains; the question asks for every variable holding the value. This is the multi-hop case:
  the later links of a chain never mention the value, so a cache that keeps only what the question
  attends to loses them (the "bridge tokens" minikv's Nexus policy is built to keep).
- ``cwe``: common-words extraction. A numbered list of words in which a few words appear much more often
  than the rest; the question asks for the most common ones. It needs aggregation over the whole context.

Every prompt is the *user message only*: the engine applies the model's chat template around it. The
prompt ends with the start of the answer (RULER's answer prefix) so that a small model's first tokens are
the answer itself. Its length, measured with the model's tokenizer and without special tokens, is within
``LENGTH_TOLERANCE`` of the requested length (the chat template adds its own few tokens on top).

The same ``(task, length, seed, haystack, options)`` gives the same prompt on every run.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from minikv.errors import ConfigError
from minikv.eval.haystack import (
    HAYSTACK_SOURCES,
    HaystackStream,
    TokenCounter,
    TokenizerLike,
    fit_length,
    insert_at_depths,
    prose_paragraphs,
    token_counter,
)

MIN_LENGTH_TOKENS = 64
# Relative tolerance on the measured prompt length; very short prompts get at least this many tokens of
# slack, since one word of prose can be several tokens.
LENGTH_TOLERANCE = 0.02
MIN_SLACK_TOKENS = 2
# Draws that break a uniqueness rule or miss the length (rare) are redrawn, deterministically.
MAX_ATTEMPTS = 8

# Keys are adjective-noun pairs ("amber-falcon"): short, unambiguous, and absent from both haystacks.
_KEY_ADJECTIVES = (
    "amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "ivory", "jolly", "keen",
    "lunar", "mellow", "nimble", "olive", "proud", "quiet", "rustic", "silver", "tidy", "umber", "vivid",
    "windy", "young", "zesty", "bold", "crisp", "dapper", "frosty", "golden",
)
_KEY_NOUNS = (
    "falcon", "harbor", "meadow", "lantern", "pebble", "canyon", "willow", "beacon", "thistle", "otter",
    "summit", "orchard", "glacier", "badger", "comet", "fjord", "heron", "island", "juniper", "kettle",
    "lagoon", "marble", "nectar", "oyster", "prairie", "quarry", "raven", "saddle", "tundra", "valley",
)
_VARIABLE_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Pseudo-words for the common-words task with the 'repeated' haystack: pronounceable, unlimited in number,
# and meaningless, so no prior knowledge of word frequency helps.
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"

_NIAH_INTRO = (
    "A long text follows. Some special magic numbers are hidden in it; memorize them, because you will be "
    "asked about them afterwards."
)
_VT_INTRO = (
    "A long text follows. Chains of variable assignments are hidden in it; memorize and track them, "
    "because you will be asked about them afterwards."
)
_CWE_INTRO = (
    "Below is a numbered list of words. Some words appear more often than others; memorize the ones that "
    "appear most often."
)


@dataclass(frozen=True)
class Sample:
    """One generated task instance.

    ``prompt`` is the user message (no chat template) and ends with ``question``; ``answers`` are the
    strings a correct output contains; ``length_tokens`` is the prompt's measured token count.
    """

    prompt: str
    answers: list[str]
    task: str
    length_tokens: int
    question: str = ""
    seed: int = 0
    haystack: str = "prose"
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def context(self) -> str:
        """The prompt without its trailing question."""
        return self.prompt[: len(self.prompt) - len(self.question)]


@dataclass(frozen=True)
class _Draft:
    """What a task generator returns for one attempt: the prompt and the occurrence counts it promises."""

    prompt: str
    question: str
    answers: list[str]
    # Whole-word occurrence counts in the prompt that must hold exactly (e.g. the asked value: 1).
    exact_counts: dict[str, int]


Generator = Callable[[random.Random, HaystackStream, TokenCounter, int], _Draft]


@dataclass(frozen=True)
class Task:
    """A registered task: its name, a one-line description, and its options with their defaults."""

    name: str
    description: str
    make_generator: Callable[..., Generator]
    default_options: dict[str, Any]

    def generate(
        self,
        tokenizer: TokenizerLike,
        length_tokens: int,
        seed: int,
        haystack: str = "prose",
        **options: Any,
    ) -> Sample:
        """Generate one sample of about ``length_tokens`` tokens (see the module docstring)."""
        _check_request(self, tokenizer, length_tokens, seed, haystack, options)
        settings = {**self.default_options, **options}
        generator = self.make_generator(haystack=haystack, **settings)
        count_tokens = token_counter(tokenizer)
        rng = random.Random(f"minikv-eval:{self.name}:{seed}")
        for attempt in range(MAX_ATTEMPTS):
            stream = HaystackStream(haystack, seed * MAX_ATTEMPTS + attempt)
            draft = generator(rng, stream, count_tokens, length_tokens)
            measured = count_tokens(draft.prompt)
            if _within_tolerance(measured, length_tokens) and _counts_hold(draft.prompt, draft.exact_counts):
                return Sample(
                    prompt=draft.prompt,
                    answers=draft.answers,
                    task=self.name,
                    length_tokens=measured,
                    question=draft.question,
                    seed=seed,
                    haystack=haystack,
                    options=settings,
                )
        raise ConfigError(
            f"could not generate task {self.name!r} at {length_tokens} tokens within "
            f"{LENGTH_TOLERANCE:.0%} in {MAX_ATTEMPTS} attempts; try a longer length or other options"
        )


def _check_request(
    task: Task, tokenizer: Any, length_tokens: int, seed: int, haystack: str, options: dict[str, Any]
) -> None:
    if not callable(getattr(tokenizer, "encode", None)):
        raise ConfigError("the tokenizer must have an encode(text, add_special_tokens=False) method")
    if not isinstance(length_tokens, int) or length_tokens < MIN_LENGTH_TOKENS:
        raise ConfigError(
            f"length_tokens={length_tokens!r} must be an integer of at least {MIN_LENGTH_TOKENS} tokens"
        )
    if not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    if haystack not in HAYSTACK_SOURCES:
        raise ConfigError(f"unknown haystack {haystack!r}; choose one of {', '.join(HAYSTACK_SOURCES)}")
    unknown = sorted(set(options) - set(task.default_options))
    if unknown:
        known = ", ".join(task.default_options) or "none"
        raise ConfigError(f"task {task.name!r} has no option(s) {', '.join(unknown)}; its options: {known}")


def _within_tolerance(measured: int, target: int) -> bool:
    return abs(measured - target) <= max(LENGTH_TOLERANCE * target, MIN_SLACK_TOKENS)


def _whole_word(text: str) -> re.Pattern[str]:
    """A case-insensitive pattern for ``text`` not glued to other letters or digits."""
    return re.compile(r"(?<![A-Za-z0-9])" + re.escape(text) + r"(?![A-Za-z0-9])", re.IGNORECASE)


def count_occurrences(text: str, needle: str) -> int:
    """How many times ``needle`` occurs in ``text`` as a whole word (case-insensitive)."""
    return len(_whole_word(needle).findall(text))


def _counts_hold(prompt: str, exact_counts: dict[str, int]) -> bool:
    return all(count_occurrences(prompt, text) == count for text, count in exact_counts.items())


def _too_short(task: str, length_tokens: int, fixed_tokens: int) -> ConfigError:
    return ConfigError(
        f"length_tokens={length_tokens} is too short for task {task!r}: its instructions, needles and "
        f"question alone take about {fixed_tokens} tokens; ask for a longer length or fewer needles or words"
    )


# ---------------------------------------------------------------------------------------------------------
# Random draws


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def _distinct(draw: Callable[[], str], count: int) -> list[str]:
    values: list[str] = []
    while len(values) < count:
        value = draw()
        if value not in values:
            values.append(value)
    return values


def _keys(rng: random.Random, count: int) -> list[str]:
    return _distinct(lambda: f"{rng.choice(_KEY_ADJECTIVES)}-{rng.choice(_KEY_NOUNS)}", count)


def _variable_names(rng: random.Random, count: int) -> list[str]:
    return _distinct(lambda: "".join(rng.choice(_VARIABLE_LETTERS) for _ in range(5)), count)


def _depths(rng: random.Random, count: int) -> list[float]:
    """Needle depths spread over the text: one uniform draw inside each of ``count`` equal bands."""
    return [(band + rng.random()) / count for band in range(count)]


# ---------------------------------------------------------------------------------------------------------
# Needle-in-a-haystack tasks


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def _join_keys(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]


def _haystack_prompt(
    task: str,
    intro: str,
    needles: list[tuple[float, str]],
    question: str,
    stream: HaystackStream,
    count_tokens: TokenCounter,
    length_tokens: int,
) -> str:
    """Fit ``intro``, haystack with ``needles`` inserted, and ``question`` to ``length_tokens``."""

    def build(words: int) -> str:
        return f"{intro}\n\n{insert_at_depths(stream.text(words), needles)}\n\n{question}"

    fixed = count_tokens(build(0))
    if fixed > length_tokens * (1 - LENGTH_TOLERANCE):
        raise _too_short(task, length_tokens, fixed)
    prompt, _, _ = fit_length(build, count_tokens, length_tokens, max_units=length_tokens)
    return prompt


def _niah_generator(task: str, num_needles: int, num_asked: int, same_key: bool, depth: float | None = None):
    """Shared generator for the four needle tasks.

    ``num_needles`` needles are inserted; the first ``num_asked`` of them are asked. With ``same_key`` all
    needles share one key (multi-value); otherwise each has its own key and the unasked ones distract.
    """

    def generate(rng: random.Random, stream: HaystackStream, count_tokens: TokenCounter, length_tokens: int):
        keys = _keys(rng, 1) * num_needles if same_key else _keys(rng, num_needles)
        values = _distinct(lambda: _number(rng, 7), num_needles)
        depths = [depth] if depth is not None else _depths(rng, num_needles)
        # Shuffle which needle sits where, so the asked one is not always the first in the text.
        order = list(range(num_needles))
        rng.shuffle(order)
        needles = [(depths[slot], _needle(keys[i], values[i])) for slot, i in enumerate(order)]
        asked = _join_keys(list(dict.fromkeys(keys[:num_asked])))
        if num_asked == 1 and not same_key:
            question = (
                f"What is the special magic number for {asked} mentioned in the provided text? "
                f"The special magic number for {asked} mentioned in the provided text is"
            )
        else:
            question = (
                f"What are all the special magic numbers for {asked} mentioned in the provided text? "
                f"The special magic numbers for {asked} mentioned in the provided text are"
            )
        prompt = _haystack_prompt(task, _NIAH_INTRO, needles, question, stream, count_tokens, length_tokens)
        # Each value once; each key once per needle that carries it, plus its mentions in the question.
        exact = {value: 1 for value in values}
        exact.update({key: keys.count(key) + count_occurrences(question, key) for key in keys})
        return _Draft(prompt, question, values[:num_asked], exact)

    return generate


def _make_niah_single(haystack: str, depth: float | None):
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ConfigError(f"depth={depth} must be a fraction in [0, 1] (0 = start of the text, 1 = end)")
    return _niah_generator("niah_single", 1, 1, same_key=False, depth=depth)


def _make_niah_multikey(haystack: str, num_keys: int):
    _check_count("niah_multikey", "num_keys", num_keys, minimum=2)
    return _niah_generator("niah_multikey", num_keys, 1, same_key=False)


def _make_niah_multivalue(haystack: str, num_values: int):
    _check_count("niah_multivalue", "num_values", num_values, minimum=2)
    return _niah_generator("niah_multivalue", num_values, num_values, same_key=True)


def _make_niah_multiquery(haystack: str, num_queries: int):
    _check_count("niah_multiquery", "num_queries", num_queries, minimum=2)
    return _niah_generator("niah_multiquery", num_queries, num_queries, same_key=False)


def _check_count(task: str, option: str, value: Any, minimum: int, maximum: int = 64) -> None:
    if not isinstance(value, int) or not minimum <= value <= maximum:
        raise ConfigError(f"task {task!r}: {option}={value!r} must be an integer in [{minimum}, {maximum}]")


# ---------------------------------------------------------------------------------------------------------
# Variable tracking


def _make_vt(haystack: str, hops: int, distractor_chains: int):
    """Variable tracking: ``hops`` reassignments after the first assignment, plus distractor chains.

    The statements of each chain appear in order (each at a greater depth than the one before), so the
    chain can be followed reading forward; chains interleave with each other.
    """
    _check_count("vt", "hops", hops, minimum=1)
    _check_count("vt", "distractor_chains", distractor_chains, minimum=0)
    num_chains = 1 + distractor_chains

    def generate(rng: random.Random, stream: HaystackStream, count_tokens: TokenCounter, length_tokens: int):
        names = _variable_names(rng, num_chains * (hops + 1))
        chains = [names[c * (hops + 1) : (c + 1) * (hops + 1)] for c in range(num_chains)]
        values = _distinct(lambda: _number(rng, 5), num_chains)
        needles = []
        for chain, value in zip(chains, values):
            statements = [f"VAR {chain[0]} = {value}."]
            statements += [f"VAR {name} = VAR {previous}." for previous, name in zip(chain, chain[1:])]
            needles += zip(sorted(rng.random() for _ in statements), statements)
        needles.sort(key=lambda needle: needle[0])
        asked_value = values[0]
        question = (
            f"Question: Find all variables that are assigned the value {asked_value} in the text above, "
            f"directly or through other variables. Answer: {hops + 1} variables are assigned the value "
            f"{asked_value}; they are:"
        )
        prompt = _haystack_prompt("vt", _VT_INTRO, needles, question, stream, count_tokens, length_tokens)
        # Each value once in the text (the asked one once more in the question); each name once where it
        # is assigned and once where the next link copies it.
        exact = {value: 1 for value in values}
        exact[asked_value] = 1 + question.count(asked_value)
        for chain in chains:
            exact.update({name: 2 for name in chain[:-1]})
            exact[chain[-1]] = 1
        return _Draft(prompt, question, list(chains[0]), exact)

    return generate


# ---------------------------------------------------------------------------------------------------------
# Common-words extraction


def _prose_vocabulary() -> list[str]:
    """Distinct lowercase words (3 to 10 letters) of the prose haystack, sorted."""
    return sorted(set(re.findall(r"\b[a-z]{3,10}\b", " ".join(prose_paragraphs()))))


def _pseudo_words() -> list[str]:
    """All two-syllable consonant-vowel pseudo-words ("bako", "zuri", ...), sorted."""
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    return [first + second for first in syllables for second in syllables]


def _cwe_frequencies(entries: int, num_common: int, pool_size: int) -> tuple[int, int]:
    """How often each common word and each uncommon word appears in a list of ``entries`` words.

    Common words appear ``entries // 25`` times, kept between 3 and 30 (RULER uses up to 30); uncommon
    words appear once while the vocabulary lasts and more often when it does not. A common word always
    appears at least two more times than an uncommon one, so the answer is unambiguous; with a long list
    and a small vocabulary that raises the common frequency above 30.
    """
    common = min(30, max(3, entries // 25))
    uncommon = max(1, math.ceil((entries - common * num_common) / (pool_size - num_common)))
    if uncommon > common - 2:
        common = uncommon + 2
        uncommon = max(1, math.ceil((entries - common * num_common) / (pool_size - num_common)))
    return common, uncommon


def _word_list(words: list[str], num_common: int, entries: int, shuffle_seed: str) -> tuple[list[str], int]:
    """A shuffled list of ``entries`` words in which ``words[:num_common]`` are the most common.

    Returns the list and the number of times each common word appears in it.
    """
    common_freq, uncommon_freq = _cwe_frequencies(entries, num_common, len(words))
    uncommon_entries = max(1, entries - common_freq * num_common)
    uncommon_words = words[num_common : num_common + math.ceil(uncommon_entries / uncommon_freq)]
    items = words[:num_common] * common_freq + (uncommon_words * uncommon_freq)[:uncommon_entries]
    random.Random(f"{shuffle_seed}:{entries}").shuffle(items)
    return items, common_freq


def _make_cwe(haystack: str, num_common: int):
    """Common-words extraction over the vocabulary of the chosen haystack source.

    The list draws on the prose vocabulary (``prose``) or on meaningless pseudo-words (``repeated``);
    the haystack text itself is not used, since the list is the whole context.
    """
    _check_count("cwe", "num_common", num_common, minimum=1, maximum=50)
    question_template = (
        "Question: What are the {n} most common words in the list above? "
        "Answer: The {n} most common words in the list above are:"
    )
    # Words of the instructions are left out of the list, so each listed word's count is its count in
    # the whole prompt.
    instruction_words = set(re.findall(r"[a-z]+", (_CWE_INTRO + question_template).lower()))
    source = _prose_vocabulary() if haystack == "prose" else _pseudo_words()
    pool = [word for word in source if word not in instruction_words]

    def generate(rng: random.Random, stream: HaystackStream, count_tokens: TokenCounter, length_tokens: int):
        words = rng.sample(pool, len(pool))
        shuffle_seed = f"cwe:{rng.random()}"
        question = question_template.format(n=num_common)
        min_entries = 3 * num_common + 1

        def build(entries: int) -> str:
            items, _ = _word_list(words, num_common, max(entries, min_entries), shuffle_seed)
            listing = "\n".join(f"{index}. {word}" for index, word in enumerate(items, start=1))
            return f"{_CWE_INTRO}\n\n{listing}\n\n{question}"

        fixed = count_tokens(build(min_entries))
        if fixed > length_tokens * (1 + LENGTH_TOLERANCE):
            raise _too_short("cwe", length_tokens, fixed)
        prompt, entries, _ = fit_length(build, count_tokens, length_tokens, max_units=length_tokens)
        _, common_freq = _word_list(words, num_common, max(entries, min_entries), shuffle_seed)
        common = words[:num_common]
        return _Draft(prompt, question, list(common), {word: common_freq for word in common})

    return generate


# ---------------------------------------------------------------------------------------------------------
# Registry and public functions

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("niah_single", "one needle (a pass key) in the haystack; asked for its value", _make_niah_single, {"depth": None}),
        Task("niah_multikey", "several needles with distinct keys; one key asked", _make_niah_multikey, {"num_keys": 4}),
        Task("niah_multivalue", "several values for one key; all asked", _make_niah_multivalue, {"num_values": 4}),
        Task("niah_multiquery", "several needles with distinct keys; all asked", _make_niah_multiquery, {"num_queries": 4}),
        Task("vt", "variable tracking: multi-hop assignment chains with distractor chains", _make_vt, {"hops": 4, "distractor_chains": 1}),
        Task("cwe", "common-words extraction from a numbered word list", _make_cwe, {"num_common": 10}),
    )
}


def get_task(name: str) -> Task:
    """The registered task called ``name``; a ConfigError lists the known names otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


def generate(
    task: str,
    tokenizer: TokenizerLike,
    length_tokens: int,
    seed: int,
    haystack: str = "prose",
    **options: Any,
) -> Sample:
    """Generate one sample of the task named ``task``; see ``Task.generate``."""
    return get_task(task).generate(tokenizer, length_tokens, seed, haystack, **options)


def score(sample: Sample, output_text: str) -> float:
    """Exact-match score in [0, 1]: the fraction of expected answers found in the output.

    This is RULER's "string match all": each answer counts when it occurs in the output as a whole word
    (not glued to other letters or digits), case-insensitively. With one answer (``niah_single``,
    ``niah_multikey``) the score is 1 or 0. Naming a distractor's value instead of the asked one scores 0.
    """
    if not sample.answers:
        raise ConfigError(f"sample of task {sample.task!r} has no answers to score against")
    found = sum(bool(_whole_word(answer).search(output_text)) for answer in sample.answers)
    return found / len(sample.answers)


def perplexity_text(tokenizer: TokenizerLike, length_tokens: int, seed: int) -> str:
    """A natural English text (the prose haystack) of about ``length_tokens`` tokens, for perplexity.

    The text starts at a seeded sentence of the prose source and measures within ``LENGTH_TOLERANCE``.
    """
    if not isinstance(length_tokens, int) or length_tokens < MIN_LENGTH_TOKENS:
        raise ConfigError(
            f"length_tokens={length_tokens!r} must be an integer of at least {MIN_LENGTH_TOKENS} tokens"
        )
    stream = HaystackStream("prose", seed)
    text, _, measured = fit_length(stream.text, token_counter(tokenizer), length_tokens, max_units=length_tokens)
    if not _within_tolerance(measured, length_tokens):
        raise ConfigError(f"could not cut a prose text of {length_tokens} tokens (got {measured})")
    return text


PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def passkey_prompt(tokenizer: TokenizerLike, seed: int, depth: float, length_tokens: int = 2000) -> tuple[str, str]:
    """The passkey task of Mohtashami & Jaggi (2023, arXiv 2305.16300) as (raw completion prompt, key).

    A 5-digit key, stated twice in one sentence pair, sits at ``depth`` of a repeated filler; the prompt ends
    with "The pass key is" (no chat template: SmolLM2's chat form of this task fails 1 of 3 prompts even
    with the full cache). Used by the issue-3 acceptance test and tools/passkey.py.
    """
    if not 0.0 <= depth <= 1.0:
        raise ConfigError(f"depth is a fraction of the filler, 0 <= depth <= 1 (got {depth})")
    key = str(random.Random(seed).randint(10_000, 99_999))
    per_filler = len(tokenizer.encode(" " + PASSKEY_FILLER, add_special_tokens=False))
    fillers = max(1, (length_tokens - 80) // per_filler)
    before = int(fillers * depth)
    parts = ["There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
             "I will quiz you about the important information there."]
    parts += [PASSKEY_FILLER] * before + [f"The pass key is {key}. Remember it. {key} is the pass key."]
    parts += [PASSKEY_FILLER] * (fillers - before) + ["What is the pass key? The pass key is"]
    return " ".join(parts), key
