"""Each Gopher, C4 and FineWeb rule at its threshold, from the definitions in docs/data.md
("Filter rules"): one document just inside the threshold is kept, one just outside is dropped
for that rule's reason. Plus the word definition: Gopher counts whitespace-separated words, so
a punctuation-only token (`*`, `--`) is a word without a letter."""

from __future__ import annotations

import itertools
import string

import pytest

from data_prep.filters import (
    C4Config,
    C4Filter,
    FineWebConfig,
    FineWebFilter,
    GopherQuality,
    GopherQualityConfig,
    GopherRepetition,
    GopherRepetitionConfig,
)
from tests.data_prep.test_filters import process as run
from tests.data_prep.test_filters import reason_of as reason


def fillers(prefix: str = ""):
    """Distinct 5-character words (with a prefix, shorter)."""
    for t in itertools.product(string.ascii_lowercase, repeat=5 - len(prefix)):
        yield prefix + "".join(t)


def gq(**kw) -> GopherQuality:
    return GopherQuality(GopherQualityConfig(**kw))


def words(n: int, w: str = "words") -> str:
    return " ".join([w] * n)


# ---------------------------------------------------------------- the word definition
# a vim changelog: 12 whitespace words a line, 9 with a letter (75% < 80%); without the
# punctuation-only "--" and with "(2022-06-28)" stripped, 9 of 11 (82%) would pass
VIM = "\n".join(
    f"Patch 9.0.{i:04d} (2022-06-28) -- Problem: the cursor moves and redraw is slow"
    for i in range(6)
)


def test_vim_changelog_drops_on_alphabetic_words():
    assert reason(gq(), VIM) == "non_alpha_words"
    assert reason(gq(word_definition="strip_punct"), VIM) is None  # the old count kept it


def test_punctuation_only_token_is_a_word():
    text = "the and " + words(47) + " --"  # 50 whitespace words, 49 with a letter
    assert reason(gq(), text) is None
    assert reason(gq(word_definition="strip_punct"), text) == "too_few_words"


def test_unknown_word_definition_is_refused():
    with pytest.raises(ValueError, match="word_definition"):
        gq(word_definition="nltk")


# ---------------------------------------------------------------- Gopher quality
def test_gopher_word_count_bounds():
    assert reason(gq(), "the and " + words(48)) is None  # 50
    assert reason(gq(), "the and " + words(47)) == "too_few_words"  # 49
    assert reason(gq(), "the and " + words(99_998)) is None  # 100,000
    assert reason(gq(), "the and " + words(99_999)) == "too_many_words"


def test_gopher_mean_word_length_bounds():
    assert reason(gq(), "the and " + words(48, "cat")) is None  # mean 3.0
    assert reason(gq(), "the and at " + words(47, "cat")) == "short_mean_word_length"  # 2.98
    ten = "abcdefghij"
    long24 = "x" * 24  # (3 + 3 + 47*10 + 24) / 50 = 10.0
    assert reason(gq(), f"the and {words(47, ten)} {long24}") is None
    assert reason(gq(), f"the and {words(47, ten)} {long24}x") == "long_mean_word_length"


def test_gopher_hash_and_ellipsis_ratios():
    base = "the and " + words(88)  # 90 words, then 10 or 11 symbol words
    assert reason(gq(), base + " #tag" * 10) is None  # 10 / 100
    assert reason(gq(), base + " #tag" * 11) == "hash_ratio"  # 11 / 101
    assert reason(gq(), "wait... " * 10 + base) is None
    assert reason(gq(), "wait... " * 11 + base) == "ellipsis_ratio"


def test_gopher_bullet_and_ellipsis_lines():
    line = "the and words words words"
    bullets = lambda k: "\n".join([f"- {line}"] * k + [line] * (20 - k))  # noqa: E731
    assert reason(gq(), bullets(18)) is None  # 0.9
    assert reason(gq(), bullets(19)) == "bullet_lines"  # 0.95
    ell = lambda k: "\n".join([f"{line}..."] * k + [line] * (10 - k))  # noqa: E731
    assert reason(gq(), ell(3)) is None  # 0.3
    assert reason(gq(), ell(4)) == "ellipsis_lines"


def test_gopher_alpha_words_ratio():
    assert reason(gq(), "the and " + words(78) + " 1234" * 20) is None  # 80 / 100
    assert reason(gq(), "the and " + words(77) + " 1234" * 21) == "non_alpha_words"  # 79


def test_gopher_stop_words():
    assert reason(gq(), "The, and " + words(48)) is None  # two distinct, punctuation ignored
    assert reason(gq(), "the the " + words(48)) == "few_stop_words"


# ---------------------------------------------------------------- Gopher repetition
def gr() -> GopherRepetition:
    return GopherRepetition(GopherRepetitionConfig())


def spread(block: list[str], times: int, total: int) -> str:
    """`total` 5-letter words: `block` `times` times, spread among distinct fillers."""
    fill = (w for w in fillers() if w not in block)
    out: list[str] = []
    gap = (total - times * len(block)) // (times + 1)
    for _ in range(times):
        out += [next(fill) for _ in range(gap)] + block
    out += [next(fill) for _ in range(total - len(out))]
    return " ".join(out)


def test_top_2gram_fraction():
    # word characters: 10 * 2 * 5 / 500 = 0.2 keeps, 11 times = 0.22 drops
    assert reason(gr(), spread(["abxyz", "cdxyz"], 10, 100)) is None
    assert reason(gr(), spread(["abxyz", "cdxyz"], 11, 100)) == "top_2gram_char_fraction"


def test_dup_5gram_fraction():
    block = ["qqqqa", "qqqqb", "qqqqc", "qqqqd", "qqqqe"]
    # 10 covered words of N: 10/67 = 0.149 keeps, 10/66 = 0.152 drops
    assert reason(gr(), spread(block, 2, 67)) is None
    assert reason(gr(), spread(block, 2, 66)) == "dup_5gram_char_fraction"


def test_dup_line_fraction():
    long = [" ".join(itertools.islice(fillers(f"{c}"), 12)) + "." for c in "abcdef"]
    assert reason(gr(), "\n".join(long + ["Ok."] * 4)) is None  # 3 of 10 repeat
    assert reason(gr(), "\n".join(long + ["Ok."] * 5)) == "dup_line_fraction"  # 4 of 11


# ---------------------------------------------------------------- C4
def c4(**kw) -> C4Filter:
    return C4Filter(C4Config(**kw))


S = "This line is a sentence."  # 5 words


def test_c4_words_per_line_and_sentences():
    step = c4()
    assert run(step, "\n".join([S] * 3)).text == "\n".join([S] * 3)  # 3 sentences
    assert reason(step, "\n".join([S] * 2)) == "too_few_sentences"
    out = run(step, "\n".join([S] * 3 + ["Four words line here."]))
    assert out.text == "\n".join([S] * 3)  # a 4-word line is removed
    assert step._stats.counters == {"lines_removed:too_few_words": 1}


def test_c4_terminal_punctuation():
    out = run(c4(), "\n".join([S] * 3 + ["And then the story goes on..."]))
    assert out.text == "\n".join([S] * 3)


def test_c4_max_word_length():
    ok, too_long = "a" * 1000, "a" * 1001
    assert run(c4(), "\n".join([S] * 3 + [f"The word {ok} is long."])).text.endswith("long.")
    out = run(c4(), "\n".join([S] * 3 + [f"The word {too_long} is long."]))
    assert out.text == "\n".join([S] * 3)


@pytest.mark.parametrize("rule,marker", [("curly_bracket", "{"), ("lorem_ipsum", "lorem ipsum")])
def test_c4_page_rules_scope(rule, marker):
    removed_line = f"menu {marker} home"  # no terminal mark: removed before the rule looks
    text = "\n".join([S] * 3 + [removed_line])
    assert reason(c4(), text) is None  # released code: only kept lines
    assert reason(c4(doc_rules_scope="page"), text) == rule  # paper: the whole page
    kept_line = f"The {marker} shows up in this line."
    assert reason(c4(), "\n".join([S] * 3 + [kept_line])) == rule
    with pytest.raises(ValueError, match="doc_rules_scope"):
        c4(doc_rules_scope="lines")


# ---------------------------------------------------------------- FineWeb
def fw() -> FineWebFilter:
    return FineWebFilter(FineWebConfig())


def long_lines(n: int, end: str = ".") -> list[str]:
    return [f"line {w} holds a few more words{end}" for w in itertools.islice(fillers(), n)]


def test_fineweb_line_punct_ratio():
    # 3 of 25 lines end in punctuation: 0.12 drops (<=); 4 of 25, 0.16, keeps
    assert reason(fw(), "\n".join(long_lines(3) + long_lines(22, ""))) == "line_punct_ratio"
    assert reason(fw(), "\n".join(long_lines(4) + long_lines(21, ""))) is None


def test_fineweb_short_line_ratio():
    short = [f"Lines {w} is exactly thirty." for w in itertools.islice(fillers("s"), 67)]
    assert all(len(s) == 30 for s in short)  # 30 characters is short (<= 30)
    assert reason(fw(), "\n".join(short + long_lines(33))) == "short_line_ratio"  # 0.67
    assert reason(fw(), "\n".join(short[:66] + long_lines(34))) is None  # 0.66


def test_fineweb_char_dup_ratio():
    lines = [f"{w} " + "ab " * 30 + "xyz." for w in itertools.islice(fillers(), 98)]
    assert {len(ln) for ln in lines} == {100}
    dup100, dup99 = "yy " * 32 + "yyy.", "yy " * 32 + "yy."
    assert reason(fw(), "\n".join(lines + [dup100] * 2)) == "char_dup_ratio"  # 100/10000
    assert reason(fw(), "\n".join(lines + [dup99] * 2)) is None  # 99/9998


def test_fineweb_newline_ratio():
    w = "Incomprehensibilities"
    counts = [3, 3, 2, 2]  # 3 newlines / 10 words keeps; 4 / 10 drops
    keep = [f"{w}{i} " * (k - 1) + f"{w}{i}." for i, k in enumerate(counts)]
    assert reason(fw(), "\n".join(keep)) is None
    drop = [f"{w}{i} {w}{i}." for i in range(5)]
    assert reason(fw(), "\n".join(drop)) == "newline_ratio"
