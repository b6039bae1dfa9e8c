"""Chat messages for the two generation tasks, built from the prompt files in `llm/prompts/`.

The wording lives in the text files (Chinese, edited by people who are not programmers); this
module only fills them in. The whole conversation goes into every request, except that a long
history is trimmed to a character budget: oldest messages go first, while the scenario, the
focused messages and the latest message are always kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from string import Template
from typing import Any

from llm.interface import ContextMessage, ConversationContext, PersonProfile

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
OPINION_RANGE = (3, 5)
NOTHING = "（无）"
FOCUS_MARK = " ★重点"


def _read(name: str) -> str:
    return (PROMPT_DIR / name).read_text(encoding="utf-8").strip()


def _template(name: str) -> Template:
    return Template(_read(name))


SYSTEM = _read("system.txt")
CONTEXT = _template("context.txt")
TASKS = {"opinions": _template("opinions.txt"), "replies": _template("replies.txt")}
FOLLOW_UP = _template("follow_up.txt")

Message = dict[str, str]


class Task(StrEnum):
    OPINIONS = "opinions"
    REPLIES = "replies"


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


def response_format(task: Task, count: Wanted) -> dict[str, Any]:
    """OpenAI-style structured output: an object with one array of strings of the wanted length."""
    return {
        "type": "json_schema",
        "json_schema": {
            "name": task.value,
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {
                    "suggestions": {
                        "type": "array",
                        "items": {"type": "string"},
                        "minItems": count.minimum,
                        "maxItems": count.maximum,
                    }
                },
                "required": ["suggestions"],
                "additionalProperties": False,
            },
        },
    }


def build_messages(task: Task, context: ConversationContext, history_char_budget: int) -> list[Message]:
    """The system prompt and one user message carrying the whole context and the task."""
    focused = set(context.focused_message_ids)
    known_focus = [m.message_id for m in context.messages if m.message_id in focused]
    user = CONTEXT.substitute(
        scenario=_one_line(context.scenario_description) or NOTHING,
        supplement=_one_line(context.scenario_supplement) or NOTHING,
        user_profile=render_profile(context.user_profile),
        target_profile=render_profile(context.target_profile),
        history="\n".join(render_history(context.messages, focused, history_char_budget)) or NOTHING,
        focused="、".join(known_focus) or NOTHING,
        opinion=_one_line(context.user_opinion) or NOTHING,
        modifications="\n".join(f"{n}. {_one_line(m)}" for n, m in enumerate(context.modifications, 1)) or NOTHING,
        task=TASKS[task.value].substitute(count=context.response_count),
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


def render_history(messages: tuple[ContextMessage, ...], focused: set[str], char_budget: int) -> list[str]:
    """One line per message, trimmed to `char_budget` characters, oldest first.

    Focused messages and the latest message are kept whatever their length (the replies answer
    them); the other messages are kept newest first while they fit. A gap left by dropped messages
    becomes one line saying how many were left out, so the model knows the record is incomplete.
    """
    lines = [_history_line(message, message.message_id in focused) for message in messages]
    keep = {index for index, message in enumerate(messages) if message.message_id in focused}
    if messages:
        keep.add(len(messages) - 1)
    used = sum(len(lines[index]) for index in keep)
    for index in range(len(messages) - 1, -1, -1):
        if index in keep:
            continue
        if used + len(lines[index]) > char_budget:
            break
        keep.add(index)
        used += len(lines[index])
    rendered: list[str] = []
    dropped = 0
    for index, line in enumerate(lines):
        if index not in keep:
            dropped += 1
            continue
        if dropped:
            rendered.append(f"（此处省略 {dropped} 条较早的消息）")
            dropped = 0
        rendered.append(line)
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


def _history_line(message: ContextMessage, focused: bool) -> str:
    mark = FOCUS_MARK if focused else ""
    return f"[{message.message_id}] {message.sender}：{_one_line(message.content) or '（无语音内容）'}{mark}"


def _one_line(text: str) -> str:
    """Keep one message per line so that a message cannot pose as another section or speaker."""
    return " ".join(text.split())
