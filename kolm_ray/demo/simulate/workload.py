"""The workload: namespaced support queries and the deterministic "frontier" label of each.

Queries are built from templates around namespace-specific topic phrases (with shared slot values such
as service names, so words like "billing-sync" appear across namespaces); `frontier_label` finds the
topic phrase again, so the stand-in upstream labels a query the way the generator meant it with no
lookup table or shared seed. `noise` flips a hash-chosen fraction of labels to another namespace.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from typing import NamedTuple

SYSTEM_PROMPT = (
    "You route customer support questions. Classify the user's message into exactly one namespace: "
    "billing, runbooks, incidents, onboarding, security, analytics, integrations, accounts. "
    'Answer with JSON only, like {"namespace": "billing"}.'
)
UNKNOWN = "unknown"  # the label for text that is not one of the generated queries

SLOTS: dict[str, list[str]] = {
    "service": [
        "ingest",
        "search",
        "auth-gateway",
        "payments-api",
        "notifications",
        "scheduler",
        "export-worker",
        "billing-sync",
    ],
    "env": ["prod", "staging", "eu-west-1", "us-east-1", "the canary cluster"],
    "month": [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ],
    "year": ["2021", "2022", "2023", "2024", "2025"],
    "time": ["9am", "last night", "the 14:00 deploy", "yesterday", "the weekend"],
    "team": ["the data team", "platform", "mobile", "the growth squad", "support"],
    "country": ["Brazil", "Romania", "Vietnam", "an unknown IP", "a Tor exit node"],
    "person": ["Dana", "Priya", "Marco", "our new CTO", "the finance lead"],
}
_NUM_SLOT = r"\d+"

# namespace -> (noun phrases, verb phrases). Every phrase is unique to its namespace.
TOPICS: dict[str, tuple[list[str], list[str]]] = {
    "billing": (
        [
            "my latest invoice",
            "a duplicate charge on my card",
            "the refund for order {num}",
            "proration after a plan upgrade",
            "VAT on the {month} invoice",
            "the annual plan discount",
            "a failed payment on the enterprise plan",
            "credits on our account balance",
            "the price of extra seats",
            "our billing contact email",
        ],
        [
            "update the credit card on file",
            "download invoices for {year}",
            "switch from monthly to annual billing",
            "get a refund for order {num}",
            "cancel the subscription renewal",
            "add a PO number to invoices",
            "change the billing currency to euros",
            "dispute a charge from {month}",
        ],
    ),
    "runbooks": (
        [
            "the runbook for rotating {service} certificates",
            "the failover procedure for {service}",
            "the standard steps to drain a node in {env}",
            "the playbook for a full disk on {service}",
            "the checklist for scaling {service}",
            "the restore-from-backup procedure",
            "the runbook for {service} OOM kills",
        ],
        [
            "restart the {service} worker in {env}",
            "roll back a bad deploy of {service}",
            "rotate the database credentials for {service}",
            "clear the {service} cache safely",
            "fail over {service} to the standby region",
            "drain traffic from {env} before maintenance",
            "rebuild the search index from scratch",
            "bump the replica count of {service} in {env}",
        ],
    ),
    "incidents": (
        [
            "the outage on {service} this morning",
            "elevated 503s from {service} in {env}",
            "the postmortem for INC-{num}",
            "latency spikes on {service} since {time}",
            "the sev1 page about {service}",
            "customer reports of {service} being down",
            "the incident timeline for INC-{num}",
        ],
        [
            "declare a sev2 for {service}",
            "open an incident for the {service} errors",
            "page the {service} on-call engineer",
            "update the status page about {service}",
            "write the postmortem for INC-{num}",
            "escalate the {service} outage to leadership",
        ],
    ),
    "onboarding": (
        [
            "the onboarding checklist for new hires",
            "access for a new engineer joining {team}",
            "the getting-started guide",
            "laptop setup for day one",
            "the first-week training schedule",
            "the new hire orientation deck",
        ],
        [
            "invite a new teammate to the workspace",
            "set up my dev environment",
            "get access to the {team} repo",
            "assign an onboarding buddy to {person}",
            "finish the compliance training for new starters",
            "request a laptop for someone starting in {month}",
        ],
    ),
    "security": (
        [
            "a suspicious login from {country}",
            "the SOC 2 report",
            "our SSO configuration",
            "a leaked API key in a public repo",
            "the phishing email that {team} received",
            "MFA enforcement for admins",
            "the vulnerability scan findings",
        ],
        [
            "enable two-factor authentication for everyone",
            "revoke an exposed API key",
            "report a phishing email",
            "review audit logs for user {num}",
            "request the latest penetration test report",
            "set up SAML SSO with Okta",
            "lock down admin permissions for {team}",
        ],
    ),
    "analytics": (
        [
            "the weekly active users dashboard",
            "churn numbers for {month}",
            "the conversion funnel report",
            "a discrepancy in the revenue chart",
            "retention cohorts by signup month",
            "the events table schema",
            "the {year} usage trends",
        ],
        [
            "export the dashboard to CSV",
            "build a report of signups by country",
            "track a custom event in the SDK",
            "schedule the KPI report to email every Monday",
            "compare {month} usage with last year",
            "segment active users by plan tier",
        ],
    ),
    "integrations": (
        [
            "the Slack integration",
            "our Salesforce sync",
            "webhook deliveries to our endpoint",
            "the Zapier connector",
            "the Jira plugin",
            "rate limits on the public API",
            "the OAuth app for our CRM",
        ],
        [
            "connect our GitHub org",
            "retry failed webhook deliveries",
            "set up the Salesforce sync",
            "generate an OAuth client for the REST API",
            "map custom fields in the HubSpot integration",
            "send {service} events to our Slack channel",
        ],
    ),
    "accounts": (
        [
            "a locked account",
            "the password reset email that never arrived",
            "changing the account owner",
            "deleting my account and data",
            "two accounts with the same email",
            "my profile picture upload",
        ],
        [
            "reset my password",
            "change the email on my profile",
            "transfer workspace ownership to {person}",
            "merge two user accounts",
            "unlock a user after too many login attempts",
            "update my display name",
        ],
    ),
}
NAMESPACES: list[str] = list(TOPICS)

NOUN_TEMPLATES = [
    "question about {x}",
    "{x} looks wrong",
    "who can help with {x}?",
    "need help with {x}",
    "can someone point me to {x}?",
    "any update on {x}?",
    "I have an issue with {x}",
    "where do I find {x}?",
    "{x} - what's going on?",
    "could you explain {x}",
    "is there documentation for {x}?",
    "looking into {x} today",
]
VERB_TEMPLATES = [
    "how do I {x}?",
    "what's the process to {x}?",
    "is it possible to {x}?",
    "I need to {x}",
    "can you walk me through how to {x}",
    "steps to {x}?",
    "what's the fastest way to {x}",
    "who is allowed to {x}?",
    "trying to {x} but stuck",
    "best way to {x}?",
    "we want to {x} this week",
]
OPENERS = [
    "",
    "",
    "",
    "hi, ",
    "hey team, ",
    "quick question: ",
    "hello - ",
    "urgent: ",
    "sorry if this is obvious, ",
    "FYI ",
]
CLOSERS = [
    "",
    "",
    "",
    " thanks!",
    " thx",
    " asap please",
    " (customer is waiting)",
    " any docs?",
    " cheers",
    " :)",
]


class WorkItem(NamedTuple):
    """One generated query: its true namespace, the text, and the frontier's label (== namespace but for noise)."""

    namespace: str
    query: str
    label: str


def _pattern(phrase: str) -> str:
    out, pos = [], 0
    for m in re.finditer(r"\{(\w+)\}", phrase):
        out.append(re.escape(phrase[pos : m.start()]))
        slot = m.group(1)
        out.append(_NUM_SLOT if slot == "num" else "(?:" + "|".join(re.escape(v) for v in SLOTS[slot]) + ")")
        pos = m.end()
    out.append(re.escape(phrase[pos:]))
    return "".join(out)


_MATCHERS = {
    ns: re.compile("|".join(_pattern(p) for p in nouns + verbs), re.IGNORECASE)
    for ns, (nouns, verbs) in TOPICS.items()
}


def true_namespace(query: str) -> str:
    """The namespace whose topic phrase occurs in `query` (longest match wins), else `unknown`."""
    best, best_len = UNKNOWN, 0
    for ns, rx in _MATCHERS.items():
        for m in rx.finditer(query):
            if len(m.group(0)) > best_len:
                best, best_len = ns, len(m.group(0))
    return best


def frontier_label(query: str, noise: float = 0.02) -> str:
    """What the stand-in frontier answers: the true namespace, flipped for a hash-chosen `noise` fraction."""
    ns = true_namespace(query)
    if ns == UNKNOWN or noise <= 0:
        return ns
    h = hashlib.sha256(query.encode()).digest()
    if int.from_bytes(h[:4], "big") / 2**32 >= noise:
        return ns
    others = [n for n in NAMESPACES if n != ns]
    return others[h[4] % len(others)]


def frontier_answer(query: str, noise: float = 0.02) -> str:
    """The assistant text: JSON like {"namespace": "runbooks"}."""
    return json.dumps({"namespace": frontier_label(query, noise)})


def _fill(phrase: str, rng: random.Random) -> str:
    def slot(m: re.Match) -> str:
        name = m.group(1)
        return str(rng.randint(1000, 99999)) if name == "num" else rng.choice(SLOTS[name])

    return re.sub(r"\{(\w+)\}", slot, phrase)


def generate_workload(n: int, seed: int = 0, noise: float = 0.02) -> list[WorkItem]:
    """`n` deterministic support queries, namespaces drawn uniformly; same (n, seed, noise), same list."""
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        ns = rng.choice(NAMESPACES)
        nouns, verbs = TOPICS[ns]
        if rng.random() < 0.5:
            text = rng.choice(NOUN_TEMPLATES).format(x=_fill(rng.choice(nouns), rng))
        else:
            text = rng.choice(VERB_TEMPLATES).format(x=_fill(rng.choice(verbs), rng))
        query = rng.choice(OPENERS) + text + rng.choice(CLOSERS)
        if rng.random() < 0.1:
            query = query.lower()
        items.append(WorkItem(ns, query, frontier_label(query, noise)))
    return items
