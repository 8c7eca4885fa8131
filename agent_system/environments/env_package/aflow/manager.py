"""`AFlowEnvironmentManager`: the policy-facing side of an episode.

It turns environment observations into chat messages with a bounded history (the last
`history_length` turns: what was proposed and what it scored), and projects the policy's
text into actions. The agent loop and the local trainer both go through it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TurnRecord:
    action_summary: str
    reward: float
    valid: bool


@dataclass
class AFlowEnvironmentManager:
    history_length: int = 2
    history: list[TurnRecord] = field(default_factory=list)

    def record(self, action_text: str, reward: float, info: dict) -> None:
        summary = info.get("reason") or _modification(action_text)
        self.history.append(TurnRecord(summary[:300], reward, bool(info.get("valid"))))

    def history_text(self) -> str:
        recent = self.history[-self.history_length:] if self.history_length > 0 else []
        if not recent:
            return ""
        lines = [f"- {'accepted' if t.valid else 'rejected'}: {t.action_summary} (reward {t.reward:+.4f})"
                 for t in recent]
        return "Your recent turns:\n" + "\n".join(lines)

    def user_message(self, observation: str) -> dict:
        history = self.history_text()
        return {"role": "user", "content": f"{history}\n\n{observation}" if history else observation}


def _modification(text: str) -> str:
    from aflow.parsing import extract_tag

    return extract_tag(text, "modification") or text.strip().splitlines()[0] if text.strip() else "(empty answer)"
