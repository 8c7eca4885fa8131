"""Episodes in the canvas action space (env.action_space=canvas): one canvas edit per turn.

Why a subclass: the state, the rewards and the merge are task/query mode's own (episode.py);
only what an action is changes. An action is one line of the canvas language, read by the
same `project_canvas` as `aflow optimize --action-space canvas`; the workflow it yields is the
compiled canvas, an ordinary workflow for scoring, the search tree and the experience. The canvas
of a workflow comes back from its files (`canvas_of`), so a tree node needs nothing else.

Task mode: a valid edit is measured against the canvas it edits on a fresh sample (episode.py), its
reward the difference; FINISH is a
valid turn with reward 0 that ends the episode. "Already tried" is exact: the canvases the start
node's recorded edits made, plus every canvas this episode has been at (the start included).

Query mode: edits change the canvas without running it (reward 0); at FINISH or after max_turns
turns the last valid canvas is compiled and run on the problem, and its score is the last turn's
reward, so the episode return is the final workflow's score.
"""

from __future__ import annotations

from aflow import canvas as cv
from aflow.search.projection import CanvasMove, project_canvas, tried_canvases
from aflow.search.prompts import canvas_optimizer_prompt
from aflow.workflows import from_source
from agent_system.environments.env_package.aflow.episode import Episode, Turn
from agent_system.environments.env_package.aflow.prompts import canvas_continuation, query_canvas_observation


class CanvasEpisode(Episode):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        canvas = cv.canvas_of(self.current.graph, self.current.prompt)
        if canvas is None:
            raise ValueError("a canvas episode starts from a compiled canvas (its prompt.py holds CANVAS)")
        self.canvas = canvas
        self.finished = False
        if self.mode == "task":
            self.tried = tried_canvases(canvas, [e.modification for e in self.experience]) | {cv.canonical(canvas)}
        else:
            self.tried = set()  # query mode: a detour back to an earlier canvas costs turns, nothing else

    @property
    def done(self) -> bool:
        return self.finished or len(self.turns) >= self.max_turns

    def observation(self, feedback: str = "") -> str:
        if self.mode == "query":
            text = query_canvas_observation(self.bench.name, self.problems[0].inputs["problem"], self.canvas)
        else:
            text = canvas_optimizer_prompt(self.bench.name, self.canvas, self.current.score, self.experience,
                                           self.current.failures)
        return f"{feedback}\n\n{text}" if feedback else text

    async def step(self, text: str) -> tuple[str, float, bool, dict]:
        if self.done:
            raise RuntimeError("step() on a finished episode")
        anchor = cv.anchor(self.canvas)
        if len(text) > self.max_action_chars:
            move = CanvasMove("", None, False, f"answer over {self.max_action_chars} characters")
        else:
            move = project_canvas(text, self.canvas, self.tried)
        if not move.is_valid:
            turn = Turn(anchor, False, 0.0, move.reason, modification=move.modification)  # the line, if it parsed
        elif move.finish:
            self.finished = True
            turn = Turn(anchor, True, 0.0, "", self.current.score if self.mode == "task" else None,
                        move.modification)
        elif self.mode == "task":
            scored, baseline = await self._paired(move.workflow)
            turn = Turn(anchor, True, scored.score - baseline, "", scored.score, move.modification)
            self.nodes.append((move.modification, scored))
            self._moved(move.modification, baseline, scored)
            self.current_code, self.canvas = move.workflow, move.canvas
            self.tried.add(cv.canonical(move.canvas))
        else:
            turn = Turn(anchor, True, 0.0, "", None, move.modification)
            self.canvas = move.canvas
        self.turns.append(turn)
        if self.mode == "query" and self.done:
            await self._score_final(turn)
        return self._reply(turn)

    async def _score_final(self, turn: Turn) -> None:
        """Query mode's end: run the final canvas on the problem; its score is this (last) turn's reward."""
        graph, prompt = cv.compile_canvas(self.canvas, self.canvas.code)
        scored = await self._evaluate(from_source(graph, prompt, name="canvas"))
        turn.reward, turn.score = scored.score, scored.score
        self.nodes.append((turn.modification or "final canvas", scored))
        self.current = scored

    def _continuation(self, turn: Turn) -> str:
        return canvas_continuation(turn, self.canvas, self.mode)
