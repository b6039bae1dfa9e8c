"""A conversation for the LLM tests: a follow-up visit at the doctor's, with every part of a context."""

from __future__ import annotations

from llm.interface import ContextMessage, ConversationContext

CONTEXT = ConversationContext(
    scenario_description="在社区医院复诊",
    scenario_supplement="医生比较忙",
    messages=(
        ContextMessage("msg_001", "医生", "最近睡得怎么样？"),
        ContextMessage("usr_002", "我", "还是经常半夜醒。"),
        ContextMessage("msg_003", "医生", "那药要不要换一下？"),
    ),
    focused_message_ids=("msg_003",),
    user_opinion="不想换药",
    modifications=("语气再委婉一点", "提一下副作用"),
    response_count=3,
    session_id="session-1",
    request_id="request-1",
)
