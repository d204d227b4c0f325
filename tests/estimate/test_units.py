import pytest

from estimate.units import human, parse_count, parse_value_range, sig


@pytest.mark.parametrize(
    "text, expected",
    [
        ("15.6T", 15.6e12),
        ("300B", 300e9),
        ("300b", 300e9),
        ("1e12", 1e12),
        ("1.4e12", 1.4e12),
        ("2_000_000", 2e6),
        ("2,000,000", 2e6),
        ("500M", 500e6),
        ("10k", 10e3),
        ("7G", 7e9),
        (" 3T ", 3e12),
        (42, 42.0),
    ],
)
def test_parse_count(text, expected):
    assert parse_count(text) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("bad", ["15.6X", "T", "", "abc", "1.5.5B", "-3B", "0", "1e999", "nan"])
def test_parse_count_rejects_bad_input_naming_it(bad):
    with pytest.raises(ValueError) as e:
        parse_count(bad, "tokens")
    assert "tokens" in str(e.value)


def test_parse_count_message_lists_accepted_forms():
    with pytest.raises(ValueError, match="15.6T"):
        parse_count("twelve", "tokens")


def test_parse_value_range():
    assert parse_value_range("0.4") == (0.4, None, None)
    assert parse_value_range("0.4:0.35:0.55") == (0.4, 0.35, 0.55)
    with pytest.raises(ValueError, match="LOW <= CENTRAL <= HIGH"):
        parse_value_range("0.3:0.35:0.55")
    with pytest.raises(ValueError, match="one number or three"):
        parse_value_range("0.3:0.5")
    with pytest.raises(ValueError, match="CENTRAL:LOW:HIGH"):
        parse_value_range("high")


def test_human_and_sig():
    assert human(2.86e6) == "2.86M"
    assert human(30.84e6) == "30.8M"
    assert human(801e3) == "801K"
    assert human(15.6e12) == "15.6T"
    assert human(None) == "n/a"
    assert sig(2412.7) == "2,410"
    assert sig(58.34) == "58.3"
    assert sig(0.01234) == "0.0123"
