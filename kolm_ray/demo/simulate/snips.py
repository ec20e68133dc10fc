"""SNIPS (../shared/datasets/snips, Coucke et al. 2018) as extraction traffic: each utterance, the gold JSON a
frontier model asked to parse it would answer, and its slot spans for CoNLL-style scoring.

    rows = read_snips("/work/shared/datasets/snips", "validate")     # 700 rows, 100 per intent
    rows[0] == {"input": "...", "output": {"intent": "AddToPlaylist", "slots": {"artist": "..."}},
                "spans": [["artist", 12, 20], ...]}

The gold JSON keeps one value per slot type (the first; 61 of 13,784 training utterances repeat a type),
so `slots` is a nested object of optional keys and every value occurs verbatim in the utterance.
train_PlayMusic_full.json is not valid UTF-8 as published: bytes that do not decode as UTF-8 are read as
Latin-1 (each such byte becomes the character of that code point), everything else as UTF-8.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

INTENTS = (
    "AddToPlaylist",
    "BookRestaurant",
    "GetWeather",
    "PlayMusic",
    "RateBook",
    "SearchCreativeWork",
    "SearchScreeningEvent",
)
SYSTEM_PROMPT = (
    'Parse the user\'s command. Answer with JSON only: {"intent": one of '
    + ", ".join(INTENTS)
    + ', "slots": {slot type: the exact text of the slot in the command}}.'
)
_SURROGATE = re.compile("[\udc80-\udcff]")


def _read(path: Path) -> Any:
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    text = _SURROGATE.sub(lambda m: chr(ord(m.group()) - 0xDC00), text)  # undecodable byte -> Latin-1
    return json.loads(text)


def read_snips(directory: str | Path, split: str = "train") -> list[dict[str, Any]]:
    """Rows of one split ("train": the *_full files; "validate": 100 per intent), intents in a fixed order."""
    d = Path(directory)
    rows = []
    for intent in INTENTS:
        name = f"train_{intent}_full.json" if split == "train" else f"validate_{intent}.json"
        for item in _read(d / name)[intent]:
            text, slots, spans = "", {}, []
            for piece in item["data"]:
                start = len(text)
                text += piece["text"]
                entity = piece.get("entity")
                if entity:
                    spans.append([entity, start, len(text)])
                    slots.setdefault(entity, piece["text"])
            rows.append({"input": text, "output": {"intent": intent, "slots": slots}, "spans": spans})
    return rows
