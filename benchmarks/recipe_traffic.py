"""The recipe benchmark's traffic (benchmarks/recipe.py): production-like observations built from CLINC150.

Three namespaces, seven tasks, each an intent task with JSON outputs behind its own system prompt / response
format (templated: dates vary); labels flipped to another label of the same task at known rates; 3% of
queries repeat; 2% of calls are upstream errors (verified=false). Read from ../shared/datasets/clinc150
($KOLM_CLINC), never copied.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("KOLM_CLINC", ROOT.parent / "shared" / "datasets" / "clinc150"))

# (namespace, task, domains, output field, noise rate, request template). {d} = day of month.
TASKS = [
    ("assistant", "banking-intent", ["banking"], "intent", 0.10,
     {"messages": [{"role": "system", "content": "You classify banking requests. Today is 2024-05-{d}. Reply JSON {{\"intent\": ...}}."}]}),
    ("assistant", "namespace-router", None, "namespace", 0.0,
     {"messages": [{"role": "system", "content": "Route the query to one knowledge namespace."}],
      "response_format": {"type": "json_object"}}),
    ("assistant", "travel-intent", ["travel"], "intent+confidence", 0.20,
     {"system": "Travel desk triage ({d} May). Answer with the intent and your confidence."}),
    ("home-bot", "home-intent", ["home"], "intent", 0.05, None),
    ("home-bot", "kitchen-intent", ["kitchen_and_dining"], "intent", 0.15,
     {"messages": [{"role": "developer", "content": "Kitchen assistant intent tagger, session {d}."}],
      "response_format": {"type": "json_object"}}),
    ("ops", "auto-utility-intent", ["auto_and_commute", "utility"], "intent+domain", 0.10,
     {"messages": [{"role": "system", "content": "Tag the commuter/utility request with intent and domain."}]}),
    ("ops", "work-intent", ["work"], "intent", 0.0, {"system": "Workplace helpdesk classifier."}),
]  # fmt: skip
REPEAT = 0.03  # share of queries that repeat verbatim (same answer)
ERRORS = 0.02  # share of calls that failed upstream (verified=false)


def build_traffic(per_task: int, seed: int = 0) -> tuple[list, dict]:
    """Observations (as dicts) and the truth: task per id, correct output per id."""
    data = json.loads((DATA / "data_full.json").read_text())
    domains = json.loads((DATA / "domains.json").read_text())
    domain_of = {i: d for d, intents in domains.items() for i in intents}
    pool = defaultdict(list)
    for split in ("train", "val", "test"):
        for text, intent in data[split]:
            pool[domain_of[intent]].append((text, intent))
    rng = random.Random(seed)
    for rows in pool.values():
        rng.shuffle(rows)
    taken = Counter()
    observations, truth = [], {}
    for ns, task, doms, kind, noise, template in TASKS:
        doms = doms or list(domains)
        rows = []
        for k in range(per_task):
            d = doms[k % len(doms)]
            rows.append(pool[d][taken[d] % len(pool[d])])
            taken[d] += 1
        labels = sorted({i for d in doms for i in domains[d]}) if kind != "namespace" else sorted(doms)
        flips = set(rng.sample(range(len(rows)), round(noise * len(rows))))
        for k, (text, intent) in enumerate(rows):
            true_label = domain_of[intent] if kind == "namespace" else intent
            label = rng.choice([x for x in labels if x != true_label]) if k in flips else true_label
            out, correct = _outputs(kind, label, true_label, domain_of, rng)
            req = _request(template, text, rng)
            oid = f"{task}-{k:05d}"
            call = {"id": oid, "namespace": ns, "input": text, "output": out, "verified": None,
                    "request": req, "provider": "openai" if req and "messages" in req else "import"}  # fmt: skip
            _add(observations, truth, call, task, correct, rng)
    rng.shuffle(observations)
    return observations, truth


def _add(observations: list, truth: dict, call: dict, task: str, correct: dict, rng: random.Random) -> None:
    """One call, then at REPEAT the same question again (answered the same way) and at ERRORS an upstream
    error for it (verified=false, no correct answer)."""
    oid = call["id"]
    observations.append(call)
    truth[oid] = (task, correct)
    if rng.random() < REPEAT:
        observations.append({**observations[-1], "id": oid + "-r"})
        truth[oid + "-r"] = (task, correct)
    if rng.random() < ERRORS:
        observations.append({**observations[-1], "id": oid + "-e", "verified": False,
                             "output": {"error": {"message": "upstream overloaded", "code": 529}}})  # fmt: skip
        truth[oid + "-e"] = (task, None)


def _outputs(kind, label, true_label, domain_of, rng):
    if kind == "namespace":
        return {"namespace": label}, {"namespace": true_label}
    if kind == "intent":
        return {"intent": label}, {"intent": true_label}
    if kind == "intent+domain":
        return {"intent": label, "domain": domain_of[label]}, {
            "intent": true_label,
            "domain": domain_of[true_label],
        }
    conf = round(rng.uniform(0.7, 1.0) if label == true_label else rng.uniform(0.3, 0.8), 2)
    return {"intent": label, "confidence": conf}, {"intent": true_label}


def _request(template, text, rng):
    if template is None:
        return None
    req = json.loads(json.dumps(template).replace("{d}", f"{rng.randint(1, 28):02d}"))
    req["messages"] = [*req.get("messages", []), {"role": "user", "content": text}]
    return req


def is_correct(out, correct) -> bool:
    """Whether an output carries every field of the task's correct answer (never, for an upstream error)."""
    return correct is not None and all(out.get(k) == v for k, v in correct.items())


# ---- One app, one system prompt: where clustering has to cluster (issue 28) --------------------------------
#
# Every call of the app goes out with the SAME system prompt and response_format; the instruction is in the
# user turn, in one of three phrasings per task. Four of the six tasks answer {"label": ...} (one output
# shape), so the structural fingerprint separates only the router ({"namespace"}) and the parser ({"intent",
# "slots"}); the four label tasks are the clustering's to tell apart, from the text alone (their label
# vocabularies differ, as different tasks' do). SNIPS rows come from ../shared/datasets/snips ($KOLM_SNIPS).
SNIPS = Path(os.environ.get("KOLM_SNIPS", ROOT.parent / "shared" / "datasets" / "snips"))
SHARED_NAMESPACE = "acme-app"
SHARED_REQUEST = {
    "messages": [{"role": "system", "content": "You are Acme's assistant. Do what the user's message asks. "
                                               "Answer with JSON only."}],
    "response_format": {"type": "json_object"},
}  # fmt: skip
# (task, source, CLINC domains or None for all, output kind, noise, the instruction's phrasings)
SHARED_TASKS = [
    ("banking-intent", "clinc", ["banking"], "label", 0.10,
     ["Classify this banking request. Reply {\"label\": intent}.", "Which banking intent is this?",
      "Banking support: tag the customer's message with its intent."]),
    ("travel-intent", "clinc", ["travel"], "label", 0.05,
     ["Classify this travel request. Reply {\"label\": intent}.", "Which travel intent is this?",
      "Travel desk: tag the traveller's message with its intent."]),
    ("kitchen-intent", "clinc", ["kitchen_and_dining"], "label", 0.15,
     ["Classify this kitchen question. Reply {\"label\": intent}.", "Which cooking intent is this?",
      "Kitchen helper: tag the cook's message with its intent."]),
    ("voice-intent", "snips", None, "label", 0.05,
     ["Classify this voice command. Reply {\"label\": intent}.", "Which voice assistant intent is this?",
      "Smart speaker: tag the spoken command with its intent."]),
    ("namespace-router", "clinc", None, "namespace", 0.0,
     ["Route the query to one knowledge namespace.", "Which knowledge base should answer this?",
      "Pick the namespace to search for:"]),
    ("voice-parse", "snips", None, "frame", 0.0,
     ["Parse this voice command into intent and slots.", "Extract the intent and the slot values:",
      "Smart speaker: parse the spoken command (intent, slots)."]),
]  # fmt: skip


def build_shared_prompt_traffic(per_task: int, seed: int = 0) -> tuple[list, dict]:
    """SHARED_TASKS' observations (one namespace, one request template) and the truth, as build_traffic."""
    import sys

    sys.path.insert(0, str(ROOT))
    from kolm_ray.demo.simulate.snips import read_snips

    data = json.loads((DATA / "data_full.json").read_text())
    domains = json.loads((DATA / "domains.json").read_text())
    domain_of = {i: d for d, intents in domains.items() for i in intents}
    clinc = defaultdict(list)
    for split in ("train", "val", "test"):
        for text, intent in data[split]:
            clinc[domain_of[intent]].append((text, intent))
    snips = [
        (r["input"].strip(), r["output"]) for r in read_snips(SNIPS, "train") + read_snips(SNIPS, "validate")
    ]
    rng = random.Random(seed)
    for rows in clinc.values():
        rng.shuffle(rows)
    rng.shuffle(snips)
    taken, snips_at = Counter(), 0
    observations, truth = [], {}
    for task, source, doms, kind, noise, phrasings in SHARED_TASKS:
        rows = []  # (text, true output)
        for k in range(per_task):
            if source == "snips":
                text, frame = snips[snips_at % len(snips)]
                snips_at += 1
                rows.append((text, {"label": frame["intent"]} if kind == "label" else frame))
            else:
                d = (doms or sorted(domains))[k % len(doms or domains)]
                text, intent = clinc[d][taken[d] % len(clinc[d])]
                taken[d] += 1
                rows.append((text, {"namespace": d} if kind == "namespace" else {"label": intent}))
        field = {"label": "label", "namespace": "namespace", "frame": "intent"}[kind]
        vocab = sorted({out[field] for _, out in rows})
        flips = set(rng.sample(range(len(rows)), round(noise * len(rows))))
        for k, (text, correct) in enumerate(rows):
            out = dict(correct)
            if k in flips:
                out[field] = rng.choice([x for x in vocab if x != correct[field]])
            prompt = f"{rng.choice(phrasings)}\n\n{text}"
            req = json.loads(json.dumps(SHARED_REQUEST))
            req["messages"].append({"role": "user", "content": prompt})
            oid = f"{task}-{k:05d}"
            call = {"id": oid, "namespace": SHARED_NAMESPACE, "input": prompt, "output": out, "verified": None,
                    "request": req, "provider": "openai"}  # fmt: skip
            _add(observations, truth, call, task, correct, rng)
    rng.shuffle(observations)
    return observations, truth
