"""The three ACE roles, their prompts, and robust parsing of what a small model writes back.

- Generator: answers an item with the retrieved playbook bullets in its prompt (before the item, so
  that items share that prefix) and names the bullet ids it used.
- Reflector: given the item, the generator's output and the gold answer (or, with ``ground_truth=False``,
  only feedback on the output's form), diagnoses the error, tags the used bullets helpful / harmful /
  neutral and proposes lessons.
- Curator: turns lessons into `Delta` operations (ADD / UPDATE / REMOVE) that `Playbook.apply` merges.

Each role asks for a short line format (``Answer: ...``, ``Lesson: ...``, ``str-00001: helpful``, ``ADD
[section]: ...``), and the runner primes the reply with its first label (``Reasoning:``, ``Diagnosis:``):
asked for JSON, SmolLM2-135M wrote a sentence of prose instead (tried on tatqa_tiny). Every parser also
reads JSON, the format of stronger models and of the ACE reference code, and reads it leniently: JSON
inside prose or a code fence, single quotes, trailing commas, unquoted keys, Python literals, a reply cut
off before its closing braces (`parse_json_lenient`). Output from which nothing can be read is returned
as such (``parsed=False``) for the caller to count and skip; no parser raises on model output.

Lessons pass `is_specific` first: a lesson must name something of the item's domain or error (a
number, a term of the domain, a word of the question, context or answer); advice that fits any
question ("double-check your work") and a verdict on one reply ("the correct answer is 10800") are
dropped, and so is a lesson that states the item's gold answer
(`leaks_answer`).
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field

from lightning_lab.ace.playbook import ENTRY_ID, TAGS, Delta, Entry, Playbook, section_name
from lightning_lab.ace.tasks import Item, extract_answer
from lightning_lab.eval.metrics import NUMBER, normalize_text, numeric_equal, parse_number

# Words that make advice sound concrete without naming anything: never evidence of a specific lesson.
GENERIC_WORDS = frozenset("""
about above after again always answer answers approach attention before being best better careful carefully
check checking clear clearly correct correctly could detail details double ensure error errors every example
final first focus follow from give given good have important information into just keep know make mistake
mistakes more most must never note order other over problem problems provided question questions read reading
really reason reasoning relevant remember result results right should simple solution solve solving some step
steps sure that their them then there these they thing things think thinking this those through time understand
understanding using verify very what when where which while will with work working would your always
""".split())
STOPWORDS = frozenset("""a an the and or of to in on at by for is are was were be been it its as if not no so than
that this with from into per each all any can may might use used""".split())
DOMAIN_TERMS = {
    "finance": "revenue income profit margin cost costs expense expenses asset assets liability liabilities equity "
               "cash dividend share shares ratio percent percentage growth change year quarter million thousand "
               "operating net gross tax interest debt balance total average decrease increase",
    "medical": "patient diagnosis symptom symptoms drug dose treatment disease deficiency infection vitamin "
               "blood heart lung kidney liver therapy fever pain test syndrome acute chronic first-line",
    "iot": "sensor sensors reading readings anomaly anomalies normal threshold temperature humidity pressure "
           "voltage current vibration battery spike drift stuck offline baseline device gateway rate",
    "math": "add subtract multiply divide total sum difference product fraction percent ratio each per half "
            "twice times remaining left",
}
WORD = re.compile(r"[a-z][a-z0-9\-]+")
# "The correct answer is 10800.", "The model's answer is wrong.": a verdict on one reply, not a rule
VERDICT = re.compile(r"\banswer\s+(?:to\s+[^.]*?\s+)?(?:is|was|should\s+be)\b|\bthe\s+model\b", re.IGNORECASE)


# ---- lenient JSON -------------------------------------------------------------------------------


def parse_json_lenient(text: str) -> dict | list | None:
    """The first JSON object (or list) in `text`, read leniently (module docstring); None when none."""
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    if start < 0:
        return None
    candidate = _balanced(text[start:])
    for attempt in (candidate, _repair(candidate)):
        try:
            return json.loads(attempt)
        except (json.JSONDecodeError, RecursionError):
            pass
        try:
            value = ast.literal_eval(re.sub(r"\btrue\b", "True", re.sub(r"\bfalse\b", "False",
                                            re.sub(r"\bnull\b", "None", attempt))))
        except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
            continue
        if isinstance(value, (dict, list)):
            return value
    return None


def _balanced(text: str) -> str:
    """`text` up to where its first bracket closes; a reply cut off early gets its missing closers."""
    closers, in_string, quote, escaped = [], False, "", False
    for index, char in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                in_string = False
        elif char in "\"'":
            in_string, quote = True, char
        elif char in "{[":
            closers.append("}" if char == "{" else "]")
        elif char in "}]" and closers:
            closers.pop()
            if not closers:
                return text[: index + 1]
    return text + (quote if in_string else "") + "".join(reversed(closers))


def _repair(text: str) -> str:
    text = text.replace("“", '"').replace("”", '"').replace("‘", "'").replace("’", "'")
    text = re.sub(r",\s*([}\]])", r"\1", text)  # trailing commas
    text = re.sub(r"([{,]\s*)([A-Za-z_][\w\-]*)\s*:", r'\1"\2":', text)  # unquoted keys
    return re.sub(r"\bTrue\b", "true", re.sub(r"\bFalse\b", "false", re.sub(r"\bNone\b", "null", text)))


def _field(record: dict, *names: str):
    """The first of `names` present in `record` (keys compared case-insensitively)."""
    lowered = {str(key).lower(): value for key, value in record.items()}
    return next((lowered[name] for name in names if name in lowered), None)


# ---- generator ----------------------------------------------------------------------------------


@dataclass
class Answer:
    output: str  # what the model wrote
    answer: str  # the extracted answer
    bullet_ids: list[str]  # ids of shown bullets it says it used
    parsed: bool  # an answer was found (JSON field or an "Answer:" line)
    seconds: float = 0.0


def generator_prompt(item: Item, bullets: str, reflection: str = "") -> str:
    domain = f"{item.domain} " if item.domain else ""
    parts = [f"You answer {domain}questions."]
    if bullets:
        parts.append("Playbook of lessons from earlier questions. Use those that apply and name their ids:\n"
                     + bullets)
    if item.context:
        parts.append(f"Context:\n{item.context}")
    parts.append(f"Question: {item.question}")
    if reflection:
        parts.append(f"Your previous answer was wrong. Reflection on it:\n{reflection}")
    parts.append("Reply in three lines:\nReasoning: <one or two short sentences>\nBullets used: <ids, or none>\n"
                 "Answer: <the final answer only>")
    return "\n\n".join(parts)


def parse_answer(output: str, item: Item, shown_ids: list[str]) -> Answer:
    """The answer and the used bullet ids (only ids that were shown) from a generator output."""
    record = parse_json_lenient(output) if "{" in output else None
    final = _field(record, "final_answer", "answer") if isinstance(record, dict) else None
    if final is not None and str(final).strip():
        answer, parsed = str(final).strip(), True
        cited = " ".join(map(str, _field(record, "bullet_ids", "bullets_used", "bullets") or [])) or output
    else:
        answer = extract_answer(output, item.answer)
        parsed = bool(re.search(r"\banswer\b", output, re.IGNORECASE)) and bool(answer)
        cited = output
    shown = set(shown_ids)
    used = list(dict.fromkeys(i for i in ENTRY_ID.findall(cited) if i in shown))
    return Answer(output, answer, used, parsed)


# ---- reflector ----------------------------------------------------------------------------------


@dataclass
class Reflection:
    output: str
    diagnosis: str
    tags: dict[str, str]  # bullet id -> helpful | harmful | neutral
    lessons: list[str]
    parsed: bool  # anything at all could be read
    seconds: float = 0.0


def feedback(item: Item, answer: Answer) -> str:
    """What can be said of an output without the gold answer: its form. Empty when nothing is wrong."""
    if not answer.parsed:
        return "The reply has no 'Answer:' line."
    if parse_number(item.answer) is not None and parse_number(answer.answer) is None \
            and not re.search(r"\d", answer.answer):
        return f"The question asks for a number but the answer {answer.answer!r} holds none."
    return ""


def reflector_prompt(item: Item, answer: Answer, used: list[Entry], ground_truth: bool, correct: bool) -> str:
    parts = [f"You review an answer to a {item.domain or 'task'} question and write lessons for a playbook."]
    if item.context:
        parts.append(f"Context:\n{item.context}")
    parts.append(f"Question: {item.question}\n\nModel output:\n{answer.output.strip()}")
    if ground_truth:
        verdict = "correct" if correct else "wrong"
        parts.append(f"Correct answer: {item.answer}\nThe model's answer {answer.answer!r} is {verdict}.")
    else:
        parts.append("Feedback: " + (feedback(item, answer) or "the reply is well formed; its correctness is unknown."))
    if used:
        parts.append("Playbook bullets the model used:\n" + "\n".join(entry.render() for entry in used))
    parts.append("Reply in this format:\nDiagnosis: <what went wrong or right, and why>\n"
                 "Lesson: <one specific rule for questions like this one>"
                 + ("\nBullet tags: <id> helpful|harmful|neutral, for each bullet the model used" if used else ""))
    return "\n\n".join(parts)


def parse_reflection(output: str, shown_ids: list[str]) -> Reflection:
    """Diagnosis, tags (for shown ids only) and lessons from a reflector output, JSON or lines."""
    record = parse_json_lenient(output)
    record = record if isinstance(record, dict) else {}
    diagnosis = str(_field(record, "diagnosis", "error_identification", "reasoning", "root_cause") or "").strip()
    shown, tags = set(shown_ids), {}
    raw_tags = _field(record, "bullet_tags", "tags")
    if isinstance(raw_tags, list):  # [{"id": ..., "tag": ...}] as the ACE reference code writes them
        raw_tags = {str(_field(t, "id")): _field(t, "tag") for t in raw_tags if isinstance(t, dict)}
    if isinstance(raw_tags, dict):
        tags = {str(key): str(value).lower() for key, value in raw_tags.items()
                if str(key) in shown and str(value).lower() in TAGS}
    for entry_id, tag in re.findall(r"\b([a-z]{1,8}-\d{5})\b\W{0,6}(helpful|harmful|neutral)", output, re.IGNORECASE):
        if entry_id in shown:
            tags.setdefault(entry_id, tag.lower())
    lessons = _field(record, "lessons", "key_insight", "lesson", "insights")
    lessons = [lessons] if isinstance(lessons, str) else lessons if isinstance(lessons, list) else []
    lessons = [str(lesson).strip() for lesson in lessons if str(lesson).strip()]
    if not record:
        lessons += [m.strip() for m in re.findall(r"(?im)^\s*(?:[-*]\s*)?lesson\s*\d*\s*:\s*(.+)$", output)]
        stated = re.search(r"(?im)^\s*diagnosis\s*:\s*(.+)$", output)
        diagnosis = stated.group(1).strip() if stated else ""
    parsed = bool(record) or bool(tags) or bool(lessons)
    return Reflection(output, diagnosis, tags, list(dict.fromkeys(lessons)), parsed)


def is_specific(lesson: str, item: Item) -> bool:
    """A lesson names something of the item's domain or error (module docstring); 4-60 words."""
    words = WORD.findall(lesson.lower())
    if not 4 <= len(lesson.split()) <= 60 or VERDICT.search(lesson):
        return False
    if re.search(r"\d", lesson):
        return True
    meaningful = {w for w in words if w not in GENERIC_WORDS and w not in STOPWORDS and len(w) >= 4}
    item_words = set(WORD.findall(f"{item.question} {item.context} {item.answer}".lower()))
    domain_words = set(DOMAIN_TERMS.get(item.domain, "").split())
    return bool(meaningful & (item_words | domain_words))


def leaks_answer(lesson: str, item: Item) -> bool:
    """The lesson states the item's gold answer (a number equal to it, or its words) where the question
    does not: it would teach that item's answer, not a rule, and in online epochs over the same items put
    the answer into the next epoch's prompt."""
    gold = normalize_text(item.answer)
    if parse_number(item.answer) is not None:
        return any(numeric_equal(number.replace(",", "").replace("$", ""), item.answer)
                   for number in NUMBER.findall(lesson))
    return bool(gold) and f" {gold} " in f" {normalize_text(lesson)} " \
        and f" {gold} " not in f" {normalize_text(item.question)} "


# ---- curator ------------------------------------------------------------------------------------


@dataclass
class Curation:
    output: str
    deltas: list[Delta] = field(default_factory=list)
    parsed: bool = False
    seconds: float = 0.0


def curator_prompt(item: Item, lessons: list[str], related: list[Entry], playbook: Playbook) -> str:
    parts = [f"You maintain a playbook of lessons for {item.domain or 'these'} questions."]
    parts.append("Related playbook bullets:\n" + (playbook.render(related) if related else "(none yet)"))
    parts.append("New lessons:\n" + "\n".join(f"- {lesson}" for lesson in lessons))
    parts.append("Reply with one operation per line, adding only what the playbook lacks:\n"
                 "ADD [strategies|formulas|mistakes]: <lesson>\nUPDATE <id>: <better wording>\n"
                 "REMOVE <id of a wrong bullet>")
    return "\n\n".join(parts)


LINE_OP = re.compile(r"(?im)^\s*(?:[-*]\s*)?(ADD|UPDATE|REMOVE)\b\s*(?:\[([^\]]*)\])?\s*([a-z]{1,8}-\d{5})?\s*:?\s*(.*)$")


def parse_curation(output: str) -> Curation:
    """Delta operations from a curator output: JSON ({"operations": [...]} or a bare list), else lines
    such as ``ADD [formulas]: ...``, ``UPDATE str-00003: ...``, ``REMOVE str-00004``."""
    record = parse_json_lenient(output)
    operations = _field(record, "operations", "deltas", "ops") if isinstance(record, dict) else record
    deltas: list[Delta] = []
    if isinstance(operations, list):
        for operation in operations:
            if not isinstance(operation, dict):
                continue
            op = str(_field(operation, "op", "type", "operation") or "").upper()
            deltas.append(Delta(op, str(_field(operation, "content", "text") or ""),
                                section_name(str(_field(operation, "section") or "")),
                                str(_field(operation, "id", "bullet_id") or "")))
    else:
        for op, section, entry_id, rest in LINE_OP.findall(output):
            deltas.append(Delta(op.upper(), rest.strip(), section_name(section), entry_id or ""))
    return Curation(output, deltas, parsed=bool(deltas))
