"""The personal-data detector (serving.privacy): known answers for each kind, the checksums,
no false positives on real shoppers' queries (every judged query) or on product titles, and
1,000 generated personal-data queries of which none survives (the generator is shared with
tests/integration/test_privacy.py, which sends them through the whole system)."""

from __future__ import annotations

import random

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.privacy import (
    PLACEHOLDERS,
    find_personal_data,
    gtin_valid,
    iban_valid,
    luhn_valid,
    scrub,
)
from serving.text import normalise_query

# -- the generator ---------------------------------------------------------------------------

PRODUCTS = ["cordless drill", "Running Shoes", "phone case", "gift for mom", "espresso machine",
            "2x4 lumber 8 ft", "LED bulb 60W", "headphones", "3/4 in. copper pipe", "mug"]
STREETS = ["Main", "Oak", "Maple Grove", "Pennsylvania", "Sunset", "Elm", "Baker", "Cedar Hill"]
STRONG = ["Street", "St", "St.", "Avenue", "Ave", "Blvd", "Lane", "Ln", "Parkway", "Terrace"]
WEAK = ["Road", "Rd", "Drive", "Dr", "Court", "Ct", "Place", "Way", "Circle"]
IBAN_COUNTRIES = {"DE": 18, "GB": 18, "FR": 23, "NL": 14, "ES": 20, "IT": 23, "CH": 17}


def _luhn_complete(body: str) -> str:
    for check in "0123456789":
        if luhn_valid(body + check):
            return body + check
    raise AssertionError("unreachable")


def _iban(rng: random.Random, country: str) -> str:
    bban = "".join(rng.choice("0123456789") for _ in range(IBAN_COUNTRIES[country]))
    if country == "GB":
        bban = "WEST" + bban[4:]
    number = int("".join(str(int(ch, 36)) for ch in bban + country + "00"))
    return f"{country}{98 - number % 97:02d}{bban}"


def _grouped(digits: str, sizes: list[int], sep: str) -> str:
    out, at = [], 0
    for size in sizes:
        out.append(digits[at:at + size])
        at += size
    if at < len(digits):
        out.append(digits[at:])
    return sep.join(out)


def _pii(rng: random.Random, i: int) -> tuple[str, list[str]]:
    """One piece of personal data as a shopper would type it, and the substrings of it that
    must never be stored (as typed, case-folded, and its digits alone)."""
    kind = i % 7
    tag = f"{i:04d}"
    if kind == 0:
        user = rng.choice(["jane.doe", "J_Smith", "bob+shop", "max-mustermann", "li.wei"])
        value = f"{user}{tag}@{rng.choice(['gmail.com', 'example.co.uk', 'web.de', 'mail.fr'])}"
        return value, [value, value.casefold(), f"{user}{tag}".casefold()]
    if kind == 1:  # North American
        digits = f"{rng.randint(2, 9)}{rng.randint(0, 99):02d}{rng.randint(200, 999)}{tag}"
        a, b, c = digits[:3], digits[3:6], digits[6:]
        value = rng.choice([f"({a}) {b}-{c}", f"{a}-{b}-{c}", f"{a}.{b}.{c}", f"{a} {b} {c}",
                            f"+1 {a} {b} {c}", f"1-{a}-{b}-{c}", f"call {digits}"])
        return value, [value.removeprefix("call "), digits]
    if kind == 2:  # international and European national
        rest = f"{rng.randint(10, 99)}{rng.randint(1000, 9999)}{tag}"
        value = rng.choice([f"+44 20 {rest[2:6]} {rest[6:]}", f"+49 30 {rest}",
                            f"020 {rest[2:6]} {rest[6:]}", f"07{rest[1:4]} {rest[4:]}",
                            f"06 {rest[2:4]} {rest[4:6]} {rest[6:8]} {rest[8:]}",
                            f"phone 0{rest}", f"tel: +33 6 {rest}"])
        return value, [value.split(" ", 1)[1] if value.startswith(("phone", "tel")) else value,
                       "".join(ch for ch in value if ch.isdigit())]
    if kind == 3:  # card numbers, 15 to 19 digits (and Visa's 13), grouped or not
        length = rng.choice([13, 15, 16, 16, 16, 19])
        prefix = "4" if length in (13, 19) else rng.choice(["4", "51", "55", "2221", "6011",
                                                            "37", "35"])
        digits = _luhn_complete(prefix + f"{tag}" + "".join(
            rng.choice("0123456789") for _ in range(length - len(prefix) - 5)))
        value = rng.choice([digits, _grouped(digits, [4, 4, 4, 4], " "),
                            _grouped(digits, [4, 4, 4, 4], "-"), _grouped(digits, [4, 6, 5], " ")])
        return value, [value, digits]
    if kind == 4:
        iban = _iban(rng, rng.choice(sorted(IBAN_COUNTRIES)))
        value = rng.choice([iban, _grouped(iban, [4] * 8, " ")])
        return value, [value, value.casefold(), iban[4:]]
    if kind == 5:  # US social security numbers
        value = f"{rng.randint(100, 665)}-{rng.randint(10, 99)}-{tag}".replace("-0000", "-0001")
        return value, [value, value.replace("-", "")]
    street = f"{rng.choice(STREETS)} Q{tag}x"  # the tag makes each street name a needle
    number = rng.randint(1, 99999)
    value = rng.choice([
        f"{number} {street} {rng.choice(STRONG)}",
        f"{number} {street} {rng.choice(STRONG)}, Apt {rng.randint(1, 40)}",
        f"{number} {street} {rng.choice(WEAK)}, Springfield, IL 627{rng.randint(10, 99)}",
        f"{number} {street} {rng.choice(WEAK)} NW",
        f"{number} rue {street}", f"{street.split()[0]}strasse {number % 999 + 1}",
    ])
    return value, [f"q{tag}x"]


def personal_queries(n: int = 1000, seed: int = 15) -> list[tuple[str, list[str]]]:
    """``n`` queries that hold personal data, each with the substrings that must never be
    stored; at most ``max_query_chars`` (256) long."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        value, secrets = _pii(rng, i)
        product = rng.choice(PRODUCTS)
        query = rng.choice([f"{product} {value}", f"{value} {product}",
                            f"deliver {product} to {value}", value])
        out.append((query, [s for s in secrets if len(s) >= 4]))
    return out


# -- known answers ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, scrubbed", [
    ("john.doe+shop@gmail.com", "[email]"),
    ("email me at jane_smith@example.co.uk please", "email me at [email] please"),
    ("bob @ yahoo.com drill", "[email] drill"),
    ("(555) 123-4567 store", "[phone] store"),
    ("call 555-867-5309", "call [phone]"),
    ("555.867.5309", "[phone]"),
    ("1-800-555-0199 support", "[phone] support"),
    ("+44 20 7946 0958", "[phone]"),
    ("+1 (212) 555-0100 hours", "[phone] hours"),
    ("phone 5558675309", "phone [phone]"),
    ("my cell: 0612345678", "my cell: [phone]"),
    ("020 7946 0958", "[phone]"),
    ("06 12 34 56 78", "[phone]"),
    ("07700 900123", "[phone]"),
    ("4111 1111 1111 1111", "[card]"),
    ("4111-1111-1111-1111 exp 12/27", "[card] exp 12/27"),
    ("4111111111111111", "[card]"),
    ("378282246310005", "[card]"),                        # Amex, 15 digits
    ("3782 822463 10005", "[card]"),                      # Amex grouping
    ("4111 1111 1111 1111 123", "[card] 123"),            # and its CVV
    ("2 4111 1111 1111 1111", "2 [card]"),                # a quantity, then a card
    ("4222222222222", "[card]"),                          # Visa's 13 digits
    ("de89 3704 0044 0532 0130 00", "[iban]"),
    ("GB82WEST12345698765432 refund", "[iban] refund"),
    ("ssn 123-45-6789", "ssn [ssn]"),
    ("123 main st", "[address]"),
    ("42 elm street apt 5", "[address]"),
    ("1600 pennsylvania avenue nw, washington, dc 20500", "[address]"),
    ("221b baker street london", "[address] london"),
    ("12 oak drive, springfield, il 62704", "[address]"),
    ("77 sunset blvd", "[address]"),
    ("12 rue de la paix", "[address]"),
    ("hauptstraße 5 berlin", "[address] berlin"),
    ("po box 1234", "[address]"),
    ("a@b.co 555-867-5309 4111111111111111", "[email] [phone] [card]"),
])
def test_personal_data_is_replaced_by_its_placeholder(text, scrubbed):
    assert scrub(text) == scrubbed
    assert scrub(scrubbed) == scrubbed                      # idempotent
    assert normalise_query(scrubbed) == scrubbed.casefold()  # placeholders survive normalising


@pytest.mark.parametrize("text", [
    # product numbers, model numbers, sizes, years, barcodes and codes from the judged queries
    "dcd771c2 20v", "2x4x8", "10-12 kids", "2014 mustang", "3/4 in. x 1/2 in. copper",
    "754-0754", "000-767-816", "1000 014 266", "8 4616809045 9", "043156889930",
    "ge washer 000-767-816", "mtd belt mtd nr 754-0754", "1000.051.824 drill bit set",
    "carlisle wide plank flooring 118-23-01-34-20-5508-212-natol", "honeywell filter 50028044-001",
    "5901234123457",                      # an EAN-13 barcode that also passes Luhn
    "4006381333931",                      # an EAN-13 barcode
    "97350053850012",                     # a GTIN-14
    "bosch 0 601 9e6 000", "1-800-flowers", "0.5 mm drill", "r-13 insulation 15 in.",
    "90 degree street elbow", "3/4 45 street", "4 way square ceiling diffuser",
    "2 tb external hard drive", "700c road bike", "500 gb hard drive", "3 way switch",
    "rubbermaid 28 qt. square container", "loctite 10 fl.-oz. pl 500", "iphone 13 pro max 256",
    "samsung galaxy s23 case", "c++ for dummies", "e-mail @ home sign", "18650 battery cell 3400",
    "ripley's believe it or not 2017", "12-pack 16.9 oz water", "1/2 drive socket set 12 pc",
])
def test_product_numbers_sizes_and_codes_are_not_personal_data(text):
    assert find_personal_data(text) == [] and scrub(text) == text


def test_checksums_known_answers():
    assert luhn_valid("4111111111111111") and luhn_valid("378282246310005")
    assert not luhn_valid("4111111111111112")
    assert luhn_valid("0") and luhn_valid("18") and not luhn_valid("19")
    assert gtin_valid("4006381333931") and gtin_valid("036000291452")  # EAN-13, UPC-A
    assert not gtin_valid("4006381333932")
    for iban in ("GB82WEST12345698765432", "DE89370400440532013000", "NL91ABNA0417164300",
                 "fr14 2004 1010 0505 0001 3m02 606", "CH9300762011623852957"):
        assert iban_valid(iban), iban
    for bad in ("GB82WEST12345698765433",      # checksum
                "DE8937040044053201300",       # length for DE
                "XX82WEST12345698765432",      # no such country
                "GB8WEST123456987654321"):     # check digits not digits
        assert not iban_valid(bad), bad


def test_findings_name_kind_and_place():
    text = "mail a@b.co or call 555-867-5309"
    found = find_personal_data(text)
    assert [(f.kind, text[f.start:f.end]) for f in found] == [("email", "a@b.co"),
                                                              ("phone", "555-867-5309")]
    assert set(PLACEHOLDERS.values()) == {"[email]", "[iban]", "[card]", "[ssn]", "[phone]",
                                          "[address]"}


def test_a_thousand_generated_personal_data_queries_leave_nothing_behind():
    queries = personal_queries()
    assert len(queries) == 1000 and len({q for q, _ in queries}) == 1000
    missed = []
    for query, secrets in queries:
        text = normalise_query(query)
        stored = scrub(text)
        if any(s.casefold() in stored for s in secrets) or stored == text:
            missed.append((query, stored))
    assert missed == []


# pieces of what the patterns look for, so that examples come near them
_PIECES = st.sampled_from([*"0123456789 -.()+@#,/", "\n", "a", "st", "street", "apt", "phone ",
                           "de89", "gmail.com", "\u0663", "\uff14", "4111", " 555 "])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_PIECES, max_size=60).map("".join) | st.text(max_size=300))
def test_scrubbing_anything_never_fails_and_is_idempotent(text):
    scrubbed = scrub(text)
    assert scrub(scrubbed) == scrubbed
    if not any(ch.isdigit() or ch == "@" for ch in text):
        assert scrubbed == text


# -- false positives on real data ------------------------------------------------------------

def test_no_false_positive_on_any_judged_query(shared_data):
    queries = sorted({q for name in ("homedepot", "crowdflower") for q in pl.read_parquet(
        shared_data / name / "judgments.parquet")["query"].to_list()})
    assert len(queries) == 8406
    flagged = [(q, scrub(normalise_query(q))) for q in queries
               if find_personal_data(normalise_query(q))]
    assert flagged == []


def test_no_false_positive_on_any_product_title(shared_data):
    # titles are full of what search boxes receive: model numbers, sizes, barcodes, "Hard Drive"
    titles = [t for name in ("homedepot", "crowdflower") for t in pl.read_parquet(
        shared_data / name / "products.parquet")["title"].to_list()]
    assert len(titles) == 64_580
    flagged = [(t, scrub(t.casefold())) for t in titles if find_personal_data(t.casefold())]
    assert flagged == []
