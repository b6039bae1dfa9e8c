"""Chat messages for the generation tasks, built from the prompt files in `llm/prompts/`.

The wording lives in the text files (Chinese, edited by people who are not programmers); this
module only fills them in. One character budget covers the whole prompt (system prompt, task and
every part of the context), so no client text, however long, reaches the provider whole: each
free-text part has a share of the budget and is shortened in the middle beyond it, and whatever
the other parts leave goes to the conversation history, newest first. The focused messages and
the latest message always keep a line; the oldest history goes first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

from llm.interface import ContextMessage, ConversationContext, PersonProfile, Task

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
OPINION_RANGE = (3, 5)
NOTHING = "（无）"
FOCUS_MARK = " ★重点"
# The name of the structured answer that holds keywords and the replies prepared for each.
SPECULATION_SCHEMA = "opinions_with_replies"
# A shortened text keeps at least this much; a line is never cut below it.
MIN_LINE_CHARS = 60
# Room kept for the placeholders of empty sections and the line breaks between sections.
LAYOUT_SLACK = 48


def _read(name: str) -> str:
    return (PROMPT_DIR / name).read_text(encoding="utf-8").strip()


def _template(name: str) -> Template:
    return Template(_read(name))


SYSTEM = _read("system.txt")
CONTEXT = _template("context.txt")
TASKS = {task: _template(f"{task.value}.txt") for task in Task}
SPECULATION = _template(f"{SPECULATION_SCHEMA}.txt")
FOLLOW_UP = _template("follow_up.txt")

Message = dict[str, str]


@dataclass(frozen=True, slots=True)
class Wanted:
    """How many suggestions a task must return (inclusive bounds)."""

    minimum: int
    maximum: int

    def describe(self) -> str:
        if self.minimum == self.maximum:
            return f"恰好 {self.minimum} 条"
        return f"{self.minimum} 到 {self.maximum} 条"


def wanted(task: Task, context: ConversationContext) -> Wanted:
    if task is Task.OPINIONS:
        return Wanted(*OPINION_RANGE)
    return Wanted(context.response_count, context.response_count)


def _string_array(count: Wanted) -> dict[str, Any]:
    return {"type": "array", "items": {"type": "string"}, "minItems": count.minimum, "maxItems": count.maximum}


def _json_schema(name: str, properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "json_schema",
        "json_schema": {
            "name": name,
            "strict": True,
            "schema": {
                "type": "object",
                "properties": properties,
                "required": list(properties),
                "additionalProperties": False,
            },
        },
    }


def response_format(task: Task, count: Wanted) -> dict[str, Any]:
    """OpenAI-style structured output: an object with one array of strings of the wanted length."""
    return _json_schema(task.value, {"suggestions": _string_array(count)})


def speculation_format(response_count: int) -> dict[str, Any]:
    """Keywords first (so they can be shown while the rest is still written), then a reply list per
    keyword and one for no opinion, each of exactly `response_count` replies."""
    replies = Wanted(response_count, response_count)
    prepared = {
        "type": "object",
        "properties": {"opinion": {"type": "string"}, "suggestions": _string_array(replies)},
        "required": ["opinion", "suggestions"],
        "additionalProperties": False,
    }
    return _json_schema(
        SPECULATION_SCHEMA,
        {
            "suggestions": _string_array(Wanted(*OPINION_RANGE)),
            "replies": {"type": "array", "items": prepared, "minItems": OPINION_RANGE[0], "maxItems": OPINION_RANGE[1]},
            "no_opinion_replies": _string_array(replies),
        },
    )


def prediction_format() -> dict[str, Any]:
    return _json_schema(Task.PREDICTION.value, {name: {"type": "string"} for name in ("tendency", "mood", "tone")})


def build_messages(
    task: Task, context: ConversationContext, char_budget: int, *, prepare_replies: bool = False
) -> list[Message]:
    """The system prompt and one user message carrying the context and the task, within `char_budget`
    characters in all (for any budget above the fixed wording: see LAYOUT_SLACK and MIN_LINE_CHARS).

    `prepare_replies` asks, with the opinion keywords, for replies prepared for each of them.
    """
    template = SPECULATION if prepare_replies else TASKS[task]
    task_text = template.substitute(count=context.response_count)
    empty = dict.fromkeys(
        ("scenario", "supplement", "user_profile", "target_profile", "history", "focused", "opinion", "modifications"),
        "",
    )
    fixed = len(SYSTEM) + len(CONTEXT.substitute(empty, task=task_text)) + LAYOUT_SLACK
    available = max(0, char_budget - fixed)

    focused = set(context.focused_message_ids)
    known_focus = [m.message_id for m in context.messages if m.message_id in focused]
    sections = {
        "scenario": clip(_one_line(context.scenario_description), available // 8),
        "supplement": clip(_one_line(context.scenario_supplement), available // 8),
        "user_profile": clip(render_profile(context.user_profile), available // 16),
        "target_profile": clip(render_profile(context.target_profile), available // 16),
        "opinion": clip(_one_line(context.user_opinion), available // 16),
        "focused": clip("、".join(known_focus), available // 32),
        "modifications": "\n".join(render_modifications(context.modifications, available // 8)),
    }
    # Whatever the other parts leave is the history's, so a short context keeps a long history.
    history_budget = available - sum(len(text) for text in sections.values())
    history = "\n".join(render_history(context.messages, focused, history_budget))
    user = CONTEXT.substitute(
        {name: text or NOTHING for name, text in sections.items()},
        history=history or NOTHING,
        task=task_text,
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def follow_up_messages(messages: list[Message], previous_answer: str, have: int, missing: Wanted) -> list[Message]:
    """Continue the same chat: show the model its short answer and ask only for what is missing.

    An empty answer leaves nothing to continue from (and some providers refuse an empty assistant
    turn), so then the original request is simply asked again.
    """
    if not previous_answer.strip():
        return messages
    ask = FOLLOW_UP.substitute(have=have, wanted=missing.describe())
    return [*messages, {"role": "assistant", "content": previous_answer}, {"role": "user", "content": ask}]


def render_modifications(modifications: tuple[str, ...], char_budget: int) -> list[str]:
    """Numbered lines, newest kept first while they fit; each is shortened to a share of the budget."""
    each = max(MIN_LINE_CHARS, char_budget // 3)
    lines: list[str] = []
    used = 0
    for number in range(len(modifications), 0, -1):
        line = clip(f"{number}. {_one_line(modifications[number - 1])}", each)
        if used + len(line) + 1 > char_budget:
            lines.insert(0, f"（更早的 {number} 条修改意见已省略）")
            break
        lines.insert(0, line)
        used += len(line) + 1
    return lines


def render_history(messages: tuple[ContextMessage, ...], focused: set[str], char_budget: int) -> list[str]:
    """One line per message, oldest first, in at most `char_budget` characters (line breaks included).

    Focused messages and the latest message (the replies answer them) share up to half the budget
    and are shortened in the middle to fit; the other messages are kept newest first while they
    fit, each shortened to an eighth of the budget. A gap left by dropped messages becomes one line
    saying how many were left out, so the model knows the record is incomplete.
    """
    if not messages:
        return []
    pinned = [index for index, message in enumerate(messages) if message.message_id in focused]
    if len(messages) - 1 not in pinned:
        pinned.append(len(messages) - 1)
    pinned_each = max(MIN_LINE_CHARS, (char_budget // 2) // len(pinned))
    other_each = max(MIN_LINE_CHARS, char_budget // 8)
    lines = {
        index: clip(_history_line(message, message.message_id in focused), other_each)
        for index, message in enumerate(messages)
    }
    # Pinned lines newest first, so that an absurd number of focused ids cannot crowd out the latest.
    keep: set[int] = set()
    used = 0
    for index in reversed(pinned):
        lines[index] = clip(_history_line(messages[index], messages[index].message_id in focused), pinned_each)
        if keep and used + len(lines[index]) + 1 > char_budget // 2:
            break
        keep.add(index)
        used += len(lines[index]) + 1
    for index in range(len(messages) - 1, -1, -1):
        if index in keep:
            continue
        if used + len(lines[index]) + 1 > char_budget:
            break
        keep.add(index)
        used += len(lines[index]) + 1
    rendered = _with_gaps(lines, keep, len(messages))
    # The lines saying what was left out take room too: give up the oldest other lines until they fit.
    while len(keep) > 1 and sum(len(line) + 1 for line in rendered) > char_budget:
        keep.discard(min((keep - set(pinned)) or (keep - {len(messages) - 1})))
        rendered = _with_gaps(lines, keep, len(messages))
    return rendered


def _with_gaps(lines: dict[int, str], keep: set[int], count: int) -> list[str]:
    rendered: list[str] = []
    dropped = 0
    for index in range(count):
        if index not in keep:
            dropped += 1
            continue
        if dropped:
            rendered.append(f"（此处省略 {dropped} 条较早的消息）")
            dropped = 0
        rendered.append(lines[index])
    return rendered


def render_profile(profile: PersonProfile | None) -> str:
    """One line: the known fields of a profile, labelled in Chinese; unknown fields are left out."""
    if profile is None:
        return NOTHING
    parts = [
        ("姓名", _one_line(profile.name)),
        ("年龄", "" if profile.age is None else f"{profile.age} 岁"),
        ("性别", _one_line(profile.gender)),
        ("与用户的关系", "、".join(_one_line(item) for item in profile.relations)),
        ("性格", "、".join(_one_line(item) for item in profile.personalities)),
        ("喜好", "、".join(_one_line(item) for item in profile.preferences)),
        ("忌讳", "、".join(_one_line(item) for item in profile.taboos)),
        ("常聊话题", "、".join(_one_line(item) for item in profile.common_topics)),
    ]
    return "；".join(f"{label}：{value}" for label, value in parts if value) or NOTHING


def clip(text: str, limit: int) -> str:
    """`text` in at most `limit` characters (never below MIN_LINE_CHARS): the middle gives way,
    since the start says what a text is about and the end is its newest part."""
    limit = max(limit, MIN_LINE_CHARS)
    if len(text) <= limit:
        return text
    room = limit - len(f"…（中间省略 {len(text)} 字）…")
    head = room // 3
    return f"{text[:head]}…（中间省略 {len(text) - room} 字）…{text[len(text) - (room - head) :]}"


def _history_line(message: ContextMessage, focused: bool) -> str:
    mark = FOCUS_MARK if focused else ""
    return f"[{message.message_id}] {message.sender}：{_one_line(message.content) or '（无语音内容）'}{mark}"


def _one_line(text: str) -> str:
    """Keep one message per line so that a message cannot pose as another section or speaker."""
    return " ".join(text.split())
