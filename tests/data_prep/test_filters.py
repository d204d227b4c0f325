"""Every rejection reason of every filter, each triggered by a small hand-written document,
and a clean paragraph of ordinary prose that passes them all."""

from __future__ import annotations

import itertools
import string

import pytest

from data_prep.document import Document, Drop
from data_prep.filters import (
    C4Config,
    C4Filter,
    CodeFilter,
    CodeFilterConfig,
    FineWebConfig,
    FineWebFilter,
    GopherQuality,
    GopherQualityConfig,
    GopherRepetition,
    GopherRepetitionConfig,
    LanguageConfig,
    LanguageFilter,
    PIIConfig,
    PIIScrubber,
)
from data_prep.filters.code import is_data_line
from data_prep.normalize import NormalizeConfig, Normalizer
from data_prep.stats import StepStats

CLEAN = (
    "The old library stood at the end of a quiet street, and its windows caught the last light "
    "of the afternoon. Every morning the librarian opened the heavy doors and greeted the first "
    "readers with a smile. Children came after school to borrow books about ships, planets and "
    "distant countries. Their parents often stayed to read the newspaper or to talk with friends "
    "near the fireplace. In winter the building was warm and bright, and many people said it was "
    "the heart of the town. When the council planned to close it, the whole neighbourhood "
    "gathered to defend the place they loved."
)

CLEAN_CODE = '''"""Small helpers for reading configuration files."""

import json
from pathlib import Path


def load(path: str) -> dict:
    """Return the JSON object stored at `path`."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save(obj: dict, path: str) -> None:
    Path(path).write_text(json.dumps(obj, indent=2))
'''


def five_letter_words():
    """Distinct 5-letter words: aaaaa, aaaab, ..."""
    for t in itertools.product(string.ascii_lowercase, repeat=5):
        yield "".join(t)


def text_with_repeats(block: list[str], times: int, total_words: int, spread: bool) -> str:
    """`total_words` 5-letter words on one line: `block` occurs `times` times, the rest distinct
    fillers (with `spread`, every occurrence is separated by fillers)."""
    fillers = (w for w in five_letter_words() if w not in block)
    n_fill = total_words - times * len(block)
    words: list[str] = []
    per_gap = n_fill // (times + 1) if spread else 0
    for _ in range(times):
        words += [next(fillers) for _ in range(per_gap)] + block
    words += [next(fillers) for _ in range(total_words - len(words))]
    assert len(words) == total_words
    return " ".join(words) + "."


def doc(text: str, domain: str = "prose") -> Document:
    return Document("t", text, "test", domain)


def process(step, text: str, domain: str = "prose"):
    """One document through one filter step, with fresh counters."""
    step._stats = StepStats(step.name)
    return step.process(doc(text, domain))


def reason_of(step, text: str, domain: str = "prose") -> str | None:
    out = process(step, text, domain)
    return out.reason if isinstance(out, Drop) else None


def lines(*ls: str) -> str:
    return "\n".join(ls)


# ---------------------------------------------------------------- the clean paragraph
def _prose_steps():
    return [
        GopherQuality(GopherQualityConfig()),
        GopherRepetition(GopherRepetitionConfig()),
        C4Filter(C4Config()),
        FineWebFilter(FineWebConfig()),
        LanguageFilter(LanguageConfig(), detector=FakeDetector("en", 0.95)),
    ]


def test_clean_paragraph_passes_every_prose_filter():
    for step in _prose_steps():
        step._stats = StepStats(step.name)
        out = step.process(doc(CLEAN))
        assert isinstance(out, Document), (step.name, out)
        assert out.text == CLEAN, step.name


def test_clean_code_passes_the_code_preset():
    assert reason_of(CodeFilter(CodeFilterConfig()), CLEAN_CODE, "code") is None


# ---------------------------------------------------------------- Gopher quality
GOPHER_QUALITY_CASES = {
    "too_few_words": "The cat sat on the mat and that was the end of it.",
    "too_many_words": "The cat and the dog. " * 21_000,
    "short_mean_word_length": "it is a ox to be of the an " * 8,
    "long_mean_word_length": "the internationalization telecommunications microarchitecture "
    "and incomprehensibilities " * 12,
    "hash_ratio": CLEAN + " #tag" * 20,
    "ellipsis_ratio": CLEAN + " wait..." * 20,
    "bullet_lines": lines(*[f"- the item number {i} is here with the rest" for i in range(60)]),
    "ellipsis_lines": lines(*[f"the story of line {i} goes on and on and then..." for i in range(20)]),
    "non_alpha_words": "the and with " + "12345 67890 " * 40,
    "few_stop_words": "Apples bananas cherries dates elderberries figs grapes honeydew " * 8,
}


@pytest.mark.parametrize("reason", GopherQuality.reasons)
def test_gopher_quality_reasons(reason):
    assert reason_of(GopherQuality(GopherQualityConfig()), GOPHER_QUALITY_CASES[reason]) == reason


# ---------------------------------------------------------------- Gopher repetition
DISTINCT = [
    f"This is sentence number {w} and it says something new."
    for w in itertools.islice(five_letter_words(), 40)
]
GOPHER_REPETITION_CASES = {
    "dup_para_fraction": "\n\n".join([CLEAN, "Same paragraph.", "Same paragraph.", "Same paragraph."]),
    "dup_para_char_fraction": "\n\n".join([CLEAN, *DISTINCT[:6], CLEAN]),
    "dup_line_fraction": lines(*DISTINCT[:4], *["Same line here."] * 4),
    "dup_line_char_fraction": lines(*DISTINCT[:8], CLEAN, CLEAN),
    # block of k words repeated `times` times among 5-letter fillers: fractions = k*times/N
    "top_2gram_char_fraction": text_with_repeats(["abcde", "fghij"], 15, 100, spread=True),
    "top_3gram_char_fraction": text_with_repeats(["abcde", "fghij", "klmno"], 8, 100, spread=True),
    "top_4gram_char_fraction": text_with_repeats(["abcde", "fghij", "klmno", "pqrst"], 5, 100, spread=True),
}
# a 10-word block occurring twice covers 20 of N words: 20/N sits between the thresholds of
# n-1 and n (0.15, 0.14, ..., 0.10 for n = 5..10)
BLOCK = ["blkaa", "blkbb", "blkcc", "blkdd", "blkee", "blkff", "blkgg", "blkhh", "blkii", "blkjj"]
for _n, _total in {5: 100, 6: 138, 7: 148, 8: 160, 9: 174, 10: 190}.items():
    GOPHER_REPETITION_CASES[f"dup_{_n}gram_char_fraction"] = text_with_repeats(BLOCK, 2, _total, spread=True)


@pytest.mark.parametrize("reason", GopherRepetition.reasons)
def test_gopher_repetition_reasons(reason):
    assert reason_of(GopherRepetition(GopherRepetitionConfig()), GOPHER_REPETITION_CASES[reason]) == reason


def test_gopher_repetition_rejects_unknown_ngram_size():
    with pytest.raises(ValueError, match="unsupported"):
        GopherRepetition(GopherRepetitionConfig(top_ngram_max_fraction={7: 0.1}))


# ---------------------------------------------------------------- C4
C4_CASES = {
    "lorem_ipsum": CLEAN + " Lorem ipsum dolor sit amet.",
    "curly_bracket": CLEAN + " Write {x} here.",
    "too_few_sentences": "Only one sentence here, and it is not enough.",
}


@pytest.mark.parametrize("reason", C4Filter.reasons)
def test_c4_reasons(reason):
    assert reason_of(C4Filter(C4Config()), C4_CASES[reason]) == reason


def test_c4_line_rules():
    text = lines(
        CLEAN + " It was built in 1901.[1] Nobody remembers why.[citation needed]",
        "Please enable JavaScript to view the comments powered by the site.",
        "This site uses cookies to improve your experience, as usual.",
        "Read more",
        "Too short.",
        "A line without a full stop at the end",
    )
    step = C4Filter(C4Config())
    stats = StepStats("c4")
    step._stats = stats
    out = step.process(doc(text))
    assert isinstance(out, Document)
    assert out.text == CLEAN + " It was built in 1901. Nobody remembers why."
    assert stats.counters == {
        "citations_removed": 2,
        "lines_removed:javascript": 1,
        "lines_removed:policy": 1,
        "lines_removed:no_terminal_punct": 2,
        "lines_removed:too_few_words": 1,
    }


# ---------------------------------------------------------------- FineWeb
FINEWEB_CASES = {
    "line_punct_ratio": lines(*[f"a line {i} of text without any punctuation at its end" for i in range(10)]),
    "short_line_ratio": lines(*[f"Short line {i}." for i in range(10)]),
    "char_dup_ratio": lines(*DISTINCT[:20], DISTINCT[0]),
    "newline_ratio": lines(*[f"Incomprehensibilities{i} notwithstanding." for i in range(10)]),
}


@pytest.mark.parametrize("reason", FineWebFilter.reasons)
def test_fineweb_reasons(reason):
    assert reason_of(FineWebFilter(FineWebConfig()), FINEWEB_CASES[reason]) == reason


# ---------------------------------------------------------------- code preset
CODE_CASES = {
    "autogenerated": "# This file is automatically generated. DO NOT EDIT.\nx = 1\n",
    "long_line": "x = '" + "a" * 1200 + "'\nprint(x)\n",
    "long_mean_line": "\n".join(f"value_{i} = compute(" + "argument, " * 14 + ")" for i in range(5)),
    "low_alnum_fraction": "# ==== ---- ==== ----\n" * 10 + "x = 1\n",
    "data_table": "TABLE = {\n" + "".join(f"    0x{i:04x}: 0x{i * 7 % 65536:04x},  # entry\n" for i in range(1100)) + "}\n",
}


@pytest.mark.parametrize("reason", CodeFilter.reasons)
def test_code_reasons(reason):
    assert reason_of(CodeFilter(CodeFilterConfig()), CODE_CASES[reason], "code") == reason


def test_data_lines():
    assert is_data_line("    0x0080: 0x00c7,     #  LATIN CAPITAL LETTER C WITH CEDILLA")
    assert is_data_line("    '\\u20ac'   #  0x80 -> EURO SIGN")
    assert is_data_line('    "AElig": "\\u00c6",')
    assert is_data_line("    (1, 2.5e-3, -4),")
    assert not is_data_line("    return x + 1")
    assert not is_data_line("    foo('a', 1)")
    assert not is_data_line("}")


# ---------------------------------------------------------------- language
class FakeDetector:
    def __init__(self, lang: str, conf: float) -> None:
        self.lang, self.conf = lang, conf

    def detect(self, text: str) -> tuple[str, float]:
        return self.lang, self.conf


@pytest.mark.parametrize(
    "lang,conf,reason", [("fr", 0.9, "wrong_language"), ("en", 0.3, "low_confidence"), ("en", 0.9, None)]
)
def test_language_reasons(lang, conf, reason):
    step = LanguageFilter(LanguageConfig(enabled=True), detector=FakeDetector(lang, conf))
    assert reason_of(step, CLEAN) == reason
    assert set(LanguageFilter.reasons) == {"wrong_language", "low_confidence"}


def test_language_with_lingua():
    pytest.importorskip("lingua")
    step = LanguageFilter(LanguageConfig(enabled=True))
    assert reason_of(step, CLEAN) is None
    french = ("La vieille bibliothèque se trouvait au bout d'une rue tranquille, et ses fenêtres "
              "recevaient la dernière lumière de l'après-midi.")
    assert reason_of(step, french) == "wrong_language"


# ---------------------------------------------------------------- normalisation
def test_normalize_reason_and_rules():
    n = Normalizer(NormalizeConfig())
    assert reason_of(n, "\x00\x01 \u200b\n\r\n\t ") == "empty_after_normalize"
    out = n.process(doc("Cafe\u0301  au\u00a0lait\x07 \r\nline two  \r\n\n\n\nend"))
    assert out.text == "Caf\u00e9 au lait\nline two\n\nend"
    code = n.process(doc("\ufeffdef f():\r\n\tif x:  \n        return 1\n\n\n\n\nz = 2", "code"))
    assert code.text == "def f():\n\tif x:\n        return 1\n\n\nz = 2\n"


# ---------------------------------------------------------------- PII
def test_pii_scrubbing():
    step = PIIScrubber(PIIConfig())
    stats = StepStats("pii")
    step._stats = stats
    text = ("Write to jane.doe@mail.co.uk or see docs@example.com. Server 8.8.8.8 and "
            "2606:4700:4700::1111 answer, 192.168.1.10 and 127.0.0.1 are private.")
    out = step.process(doc(text))
    assert out.text == ("Write to email@example.com or see docs@example.com. Server 192.0.2.1 and "
                        "2001:db8::1 answer, 192.168.1.10 and 127.0.0.1 are private.")
    assert stats.counters == {"emails_replaced": 1, "ips_replaced": 2}
    # in code, IP-like strings are versions or constants: only e-mails are scrubbed by default
    code = step.process(doc("NET = '8.8.8.8'  # by guido@python.org\n", "code"))
    assert code.text == "NET = '8.8.8.8'  # by email@example.com\n"
    assert not step.reasons  # scrubbing never drops


def test_every_reason_is_covered():
    covered = {
        GopherQuality: GOPHER_QUALITY_CASES, GopherRepetition: GOPHER_REPETITION_CASES,
        C4Filter: C4_CASES, FineWebFilter: FINEWEB_CASES, CodeFilter: CODE_CASES,
    }
    for cls, cases in covered.items():
        assert set(cls.reasons) == set(cases), cls.name


def test_prose_filters_skip_code_by_default():
    for step in _prose_steps():
        assert not step.applies(doc(CLEAN_CODE, "code")), step.name
    assert not CodeFilter(CodeFilterConfig()).applies(doc(CLEAN))
