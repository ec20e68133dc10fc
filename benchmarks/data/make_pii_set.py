"""Build benchmarks/data/pii_labelled.jsonl: realistic PII in context, labelled, with hard negatives.

    python benchmarks/data/make_pii_set.py          # rewrites the file (seed 26: the same file every time)

One JSON object a line: {"id", "split": "validation"|"test", "kind": one of the five or "negative",
"format", "text", "spans": [[start, end, kind], ...]}. Every generated number is checked with the same
libraries the redactor uses only where a real value must be valid (a card's Luhn digit, an IBAN's mod-97,
a phone number some country can dial); hard negatives are made to look like PII and not be it (order ids,
dates, prices, tracking numbers, 16-digit numbers with a wrong Luhn digit, IBANs with wrong check digits).
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import phonenumbers
from stdnum import iban as iban_check
from stdnum import luhn

SEED = 26
OUT = Path(__file__).resolve().parent / "pii_labelled.jsonl"
FIRST = ["jane", "john", "maria", "wei", "aisha", "lukas", "sofia", "omar", "priya", "tom", "élodie", "kenji"]
LAST = ["doe", "smith", "garcia", "chen", "khan", "müller", "rossi", "okafor", "patel", "nguyen", "berg"]
DOMAINS = ["example.com", "gmail.com", "mail.example.org", "corp.acme-inc.io", "uni.example.ac.uk", "web.de"]

TEMPLATES = {
    "email": [
        "Hi, please send the invoice to {x} instead of my old address.",
        "You can reach me at {x} if the package is late.",
        "Update my account email to {x}, thanks!",
        "My colleague ({x}) will handle the refund from now on.",
        "Forwarded from {x}: the report is attached.",
        "contact: {x}",
    ],
    "phone": [
        "Call me back at {x} after 5pm please.",
        "My new number is {x}, can you update the file?",
        "The courier tried {x} but nobody answered.",
        "Reach our front desk on {x} for the booking.",
        "tel: {x}",
        "If it breaks again, text {x} and I'll come by.",
    ],
    "card": [
        "I was charged twice on my card {x} yesterday.",
        "Please refund to the card ending... actually the full number is {x}.",
        "Card number: {x}, expiry 09/27.",
        "Why was {x} declined at checkout?",
        "Use {x} for the renewal.",
    ],
    "iban": [
        "Please wire the deposit to IBAN {x} by Friday.",
        "My bank details changed: {x}.",
        "Refund to {x} (account holder J. Doe).",
        "IBAN: {x}",
        "Can you confirm the transfer to {x} went through?",
    ],
    "ssn": [
        "For the background check my SSN is {x}.",
        "Tax form says {x} but that's my old number.",
        "social security number {x}",
        "Employee record: name Tom Berg, SSN {x}, start date 2024-03-01.",
    ],
}

NEGATIVE_TEMPLATES = [
    ("order id", "Where is my order {x}? It was due last week."),
    ("order id", "Order #{x} arrived damaged."),
    ("date", "Can you move my appointment to {x}?"),
    ("date", "The contract started on {x} and runs a year."),
    ("time", "Set a reminder for {x} tomorrow."),
    ("price", "The total came to {x} including tax."),
    ("tracking", "Tracking number {x} shows no movement since Monday."),
    ("invalid card", "Is {x} a valid card number? The form rejects it."),
    ("invalid iban", "The bank says {x} is not a valid IBAN."),
    ("invalid ssn", "The form shows {x} in the SSN field, which looks wrong."),
    ("version", "We upgraded to release {x} last night."),
    ("ip address", "The server at {x} keeps timing out."),
    ("isbn", "Do you have ISBN {x} in stock?"),
    ("zip", "Ship it to the warehouse at zip {x}."),
    ("quantity", "We need {x} units by the end of Q3."),
    ("invoice", "Invoice INV-{x} is still unpaid."),
]


def luhn_number(prefix: str, length: int, rng: random.Random) -> str:
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    return body + luhn.calc_check_digit(body)


def card(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(["visa", "visa", "mastercard", "mastercard2", "amex", "discover"])
    prefix, length = {
        "visa": ("4", 16),
        "mastercard": (str(rng.randint(51, 55)), 16),
        "mastercard2": (str(rng.randint(2221, 2720)), 16),
        "amex": (rng.choice(["34", "37"]), 15),
        "discover": ("6011", 16),
    }[kind]
    n = luhn_number(prefix, length, rng)
    style = rng.choice(["spaces", "hyphens", "compact"])
    if length == 15:
        groups = [n[:4], n[4:10], n[10:]]
    else:
        groups = [n[i : i + 4] for i in range(0, 16, 4)]
    sep = {"spaces": " ", "hyphens": "-", "compact": ""}[style]
    return sep.join(groups), f"{kind} {style}"


IBAN_BBAN = {  # country: BBAN pattern (a: capital letter, n: digit, c: either)
    "DE": "nnnnnnnnnnnnnnnnnn",
    "GB": "aaaannnnnnnnnnnnnn",
    "NL": "aaaannnnnnnnnn",
    "AT": "nnnnnnnnnnnnnnnn",
    "CH": "nnnnnccccccccccccc",
    "IE": "aaaannnnnnnnnnnnnn",
    "BE": "nnnnnnnnnnnn",
    "ES": "nnnnnnnnnnnnnnnnnnnn",
    "FR": "nnnnnnnnnnnnnnnnnnnnnnn",
}


def _fill(pattern: str, rng: random.Random) -> str:
    pick = {
        "a": string.ascii_uppercase,
        "n": string.digits,
        "c": string.ascii_uppercase + string.digits,
        " ": " ",
    }
    return "".join(rng.choice(pick[p]) for p in pattern)


def _check_digits(cc: str, bban: str) -> str:
    numeric = "".join(str(int(ch, 36)) for ch in bban + cc + "00")
    return f"{98 - int(numeric) % 97:02d}"


def iban(rng: random.Random, valid: bool = True) -> tuple[str, str]:
    while True:
        cc = rng.choice(list(IBAN_BBAN))
        bban = _fill(IBAN_BBAN[cc], rng)
        check = _check_digits(cc, bban)
        if not valid:
            check = f"{(int(check) + rng.randint(1, 90)) % 100:02d}"
        value = cc + check + bban
        if iban_check.is_valid(value) == valid:  # national check digits (BE, ES, FR): retry until right
            break
    style = rng.choice(["grouped", "compact"])
    shown = " ".join(value[i : i + 4] for i in range(0, len(value), 4)) if style == "grouped" else value
    return shown, f"{cc} {style}"


PHONE_COUNTRIES = ["US", "US", "US", "GB", "GB", "DE", "FR", "IN", "AU", "CA", "ES", "BR", "JP"]


def phone(rng: random.Random) -> tuple[str, str]:
    while True:
        region = rng.choice(PHONE_COUNTRIES)
        example = phonenumbers.example_number(region)
        national = str(example.national_number)
        digits = national[:2] + "".join(rng.choice(string.digits) for _ in range(len(national) - 2))
        num = phonenumbers.parse("+" + str(example.country_code) + digits)
        if phonenumbers.is_valid_number(num):
            break
    if region in ("US", "CA"):
        d = str(num.national_number)
        style = rng.choice(["intl", "parens", "hyphens", "dots", "compact", "e164"])
        shown = {
            "intl": f"+1 {d[:3]} {d[3:6]} {d[6:]}",
            "parens": f"({d[:3]}) {d[3:6]}-{d[6:]}",
            "hyphens": f"{d[:3]}-{d[3:6]}-{d[6:]}",
            "dots": f"{d[:3]}.{d[3:6]}.{d[6:]}",
            "compact": d,
            "e164": f"+1{d}",
        }[style]
        return shown, f"{region} {style}"
    if region == "GB" and rng.random() < 0.4:
        return phonenumbers.format_number(num, phonenumbers.PhoneNumberFormat.NATIONAL), "GB national"
    fmt = rng.choice([phonenumbers.PhoneNumberFormat.INTERNATIONAL, phonenumbers.PhoneNumberFormat.E164])
    name = "intl" if fmt == phonenumbers.PhoneNumberFormat.INTERNATIONAL else "e164"
    return phonenumbers.format_number(num, fmt), f"{region} {name}"


def email(rng: random.Random) -> tuple[str, str]:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    first = first.encode("ascii", "ignore").decode() or "el"
    last = last.encode("ascii", "ignore").decode() or "mu"
    style = rng.choice(["dot", "plus", "subdomain", "underscore digits", "upper"])
    domain = rng.choice(DOMAINS)
    local = {
        "dot": f"{first}.{last}",
        "plus": f"{first}+{rng.choice(['orders', 'news', 'kolm', 'x1'])}",
        "subdomain": f"{first[0]}.{last}",
        "underscore digits": f"{first}_{last}{rng.randint(1, 99)}",
        "upper": f"{first.title()}.{last.title()}",
    }[style]
    if style == "subdomain":
        domain = f"{rng.choice(['mail', 'eu', 'staff'])}.{domain}"
    return f"{local}@{domain}", style


def ssn(rng: random.Random) -> tuple[str, str]:
    while True:
        area, group, serial = rng.randint(1, 899), rng.randint(1, 99), rng.randint(1, 9999)
        if area != 666:
            break
    style = rng.choice(["hyphens", "hyphens", "spaces"])
    sep = {"hyphens": "-", "spaces": " "}[style]
    return f"{area:03d}{sep}{group:02d}{sep}{serial:04d}", style


def negative(kind: str, rng: random.Random) -> str:
    if kind == "order id":
        return rng.choice(
            [str(rng.randint(10**9, 10**10 - 1)), f"A{rng.randint(10, 99)}-{rng.randint(1000, 9999)}-{rng.randint(100, 999)}",
             f"{rng.randint(100, 999)}-{rng.randint(1000000, 9999999)}-{rng.randint(1000000, 9999999)}"]
        )  # fmt: skip
    if kind == "date":
        y, m, d = rng.randint(2019, 2027), rng.randint(1, 12), rng.randint(1, 28)
        return rng.choice([f"{y}-{m:02d}-{d:02d}", f"{d:02d}/{m:02d}/{y}", f"{m}/{d}/{y}", f"{d}.{m}.{y}"])
    if kind == "time":
        return rng.choice([f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}", f"{rng.randint(1, 12)}:{rng.randint(0, 59):02d} pm",
                           f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}"])  # fmt: skip
    if kind == "price":
        v = rng.randint(100, 9_999_999)
        return rng.choice(
            [f"${v // 100:,}.{v % 100:02d}", f"€{v // 100}.{v % 100:02d}", f"{v:,} USD", f"£ {v // 100:,}"]
        )
    if kind == "tracking":
        return rng.choice(
            ["1Z" + _fill("cccccccccccccccc", rng), " ".join(_fill("nnnn", rng) for _ in range(5)) + " " + _fill("nn", rng),
             _fill("nnnn nnnn nnnn", rng), _fill("nnnnnnnnnnnnnnnnnnnnnn", rng)]
        )  # fmt: skip
    if kind == "invalid card":
        n = luhn_number("4", 16, rng)
        n = n[:-1] + str((int(n[-1]) + rng.randint(1, 9)) % 10)
        return rng.choice(
            [
                " ".join(n[i : i + 4] for i in range(0, 16, 4)),
                n,
                "-".join(n[i : i + 4] for i in range(0, 16, 4)),
            ]
        )
    if kind == "invalid iban":
        return iban(rng, valid=False)[0]
    if kind == "invalid ssn":
        return rng.choice([f"000-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}", f"666-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}",
                           f"9{rng.randint(10, 99)}-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}", f"{rng.randint(100, 899)}-00-{rng.randint(1000, 9999)}"])  # fmt: skip
    if kind == "version":
        return f"v{rng.randint(1, 20)}.{rng.randint(0, 40)}.{rng.randint(0, 200)}-{rng.randint(1000, 99999)}"
    if kind == "ip address":
        return ".".join(str(rng.randint(1, 254)) for _ in range(4))
    if kind == "isbn":
        return (
            f"978-{rng.randint(0, 9)}-{rng.randint(10, 99)}-{rng.randint(100000, 999999)}-{rng.randint(0, 9)}"
        )
    if kind == "zip":
        return f"{rng.randint(10000, 99999)}-{rng.randint(1000, 9999)}"
    if kind == "quantity":
        return f"{rng.randint(1000, 999999):,}"
    if kind == "invoice":
        return f"{rng.randint(2020, 2027)}-{rng.randint(100000, 999999)}"
    raise ValueError(kind)


MAKERS = {"email": email, "phone": phone, "card": card, "iban": iban, "ssn": ssn}
PER_KIND = 80
NEGATIVES = 240


def build() -> list[dict]:
    rng = random.Random(SEED)
    items = []
    for kind, make in MAKERS.items():
        for _ in range(PER_KIND):
            value, fmt = make(rng)
            template = rng.choice(TEMPLATES[kind])
            pre, post = template.split("{x}")
            spans = [[len(pre), len(pre) + len(value), kind]]
            text = pre + value + post
            if rng.random() < 0.25:  # a second kind in the same message
                other = rng.choice([k for k in MAKERS if k != kind])
                v2, _ = MAKERS[other](rng)
                joiner = rng.choice([" Also: ", " / alt: ", "\nP.S. "])
                spans.append([len(text) + len(joiner), len(text) + len(joiner) + len(v2), other])
                text = text + joiner + v2
            items.append({"kind": kind, "format": fmt, "text": text, "spans": spans})
    for i in range(NEGATIVES):
        kind, template = NEGATIVE_TEMPLATES[i % len(NEGATIVE_TEMPLATES)]
        items.append(
            {"kind": "negative", "format": kind, "text": template.format(x=negative(kind, rng)), "spans": []}
        )
    rng.shuffle(items)
    for i, item in enumerate(items):
        item["id"] = f"pii-{i:04d}"
        item["split"] = "validation" if i % 2 == 0 else "test"
    return [{k: it[k] for k in ("id", "split", "kind", "format", "text", "spans")} for it in items]


def main() -> None:
    items = build()
    OUT.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items), encoding="utf-8")
    print(f"wrote {len(items)} items to {OUT}")


if __name__ == "__main__":
    main()
