"""The projection from optimizer text to an action, on good and malformed answers."""

import pytest

from aflow.search.projection import normalize_modification, project

PARENT_GRAPH = "from aflow_ops import Custom\nimport prompt\n\nclass Workflow:\n    def __init__(self):\n        self.custom = Custom()\n\n    async def __call__(self, problem):\n        return (await self.custom(input=problem, instruction=prompt.A))['response']\n"
PARENT_PROMPT = "A = 'Solve it.'\n"
NEW_GRAPH = PARENT_GRAPH.replace("prompt.A", "prompt.B")
NEW_PROMPT = "B = 'Solve it step by step and end with the number.'\n"


def answer(modification="Ask for step-by-step reasoning.", graph=NEW_GRAPH, prompt=NEW_PROMPT):
    parts = []
    if modification is not None:
        parts.append(f"<modification>{modification}</modification>")
    if graph is not None:
        parts.append(f"<graph>\n```python\n{graph}```\n</graph>")
    if prompt is not None:
        parts.append(f"<prompt>\n{prompt}</prompt>")
    return "\n".join(parts)


def test_valid_answer_becomes_a_checked_workflow():
    action = project(answer(), PARENT_GRAPH, PARENT_PROMPT)
    assert action.is_valid, action.reason
    assert action.graph.strip() == NEW_GRAPH.strip() and action.prompt.strip() == NEW_PROMPT.strip()
    assert action.workflow is not None and action.workflow.format == "native"


def test_missing_prompt_keeps_the_parents():
    graph = PARENT_GRAPH.replace("prompt.A", "prompt.A + ' Be brief.'")
    action = project(answer(graph=graph, prompt=None), PARENT_GRAPH, PARENT_PROMPT)
    assert action.is_valid and action.prompt == PARENT_PROMPT


@pytest.mark.parametrize("text,reason", [
    ("", "no <graph>"),
    ("I think we should add an ensemble.", "no <graph>"),
    (answer(graph=None), "no <graph>"),
    (answer(graph=NEW_GRAPH[:60]), "static checks"),  # truncated code
    (answer(graph="class Workflow:\n    async def __call__(self, problem)\n        return 1\n"), "does not parse"),
    (answer(graph="import os\n" + NEW_GRAPH), "import of 'os'"),
    (answer(graph=NEW_GRAPH.replace("import prompt", "import prompt\nx = eval('1')")), "eval"),
    (answer(modification="", graph=NEW_GRAPH), "no <modification>"),
    (answer(graph=PARENT_GRAPH, prompt=PARENT_PROMPT), "unchanged"),
    ("<modification>x</modification><graph>class Foo:\n    pass\n</graph>", "no class Workflow"),
])
def test_malformed_answers_are_rejected_with_a_reason(text, reason):
    action = project(text, PARENT_GRAPH, PARENT_PROMPT)
    assert not action.is_valid
    assert reason in action.reason


def test_unicode_is_fine():
    action = project(answer(modification="Añadir razonamiento paso a paso ✓",
                            prompt="B = 'Résous étape par étape — 步骤'\n"), PARENT_GRAPH, PARENT_PROMPT)
    assert action.is_valid, action.reason
    assert "步骤" in action.prompt


def test_a_one_megabyte_answer_is_rejected_quickly():
    action = project("<modification>" + "x" * 1_000_000 + "</modification>", PARENT_GRAPH, PARENT_PROMPT)
    assert not action.is_valid and "characters" in action.reason


def test_a_modification_tried_before_is_rejected():
    tried = {normalize_modification("Ask for step-by-step reasoning!")}
    action = project(answer(), PARENT_GRAPH, PARENT_PROMPT, tried)
    assert not action.is_valid and "already tried" in action.reason


def test_unclosed_graph_tag_at_the_end_still_parses():
    text = f"<modification>Use step by step.</modification>\n<prompt>\n{NEW_PROMPT}</prompt>\n<graph>\n{NEW_GRAPH}"
    action = project(text, PARENT_GRAPH, PARENT_PROMPT)
    assert action.is_valid, action.reason


def test_aflow_round_format_is_accepted_and_converted():
    aflow_graph = (
        "import workspace.GSM8K.workflows.template.operator as operator\n"
        "import workspace.GSM8K.workflows.round_2.prompt as prompt_custom\n"
        "from metagpt.provider.llm_provider_registry import create_llm_instance\n\n"
        "class Workflow:\n"
        "    def __init__(self, name, llm_config, dataset):\n"
        "        self.llm = create_llm_instance(llm_config)\n"
        "        self.custom = operator.Custom(self.llm)\n\n"
        "    async def __call__(self, problem):\n"
        "        r = await self.custom(input=problem, instruction=prompt_custom.B)\n"
        "        return r['response'], 0.0\n")
    action = project(answer(graph=aflow_graph), PARENT_GRAPH, PARENT_PROMPT)
    assert action.is_valid, action.reason
    assert action.workflow.format == "aflow" and "aflow_ops" in action.workflow.graph


DEEP = "-" * 20_000 + "1"  # deeper than CPython's parser stack: ast.parse raises MemoryError, not SyntaxError


@pytest.mark.parametrize("graph, prompt, reason", [
    (NEW_GRAPH.replace("prompt.B", DEEP), NEW_PROMPT, "graph.py does not parse"),
    (NEW_GRAPH, f"B = {DEEP}\n", "prompt.py does not parse"),
    (NEW_GRAPH.replace("prompt.B", "prompt.B\0"), NEW_PROMPT, "graph.py does not parse"),
], ids=["deep-graph", "deep-prompt", "null-byte"])
def test_text_the_parser_cannot_hold_is_a_rejected_action_not_an_exception(graph, prompt, reason):
    """The projection never raises: nesting deeper than the parser's stack (well inside the
    answer-length limit) once escaped as a MemoryError from the worker's step."""
    action = project(answer(graph=graph, prompt=prompt), PARENT_GRAPH, PARENT_PROMPT)
    assert not action.is_valid and reason in action.reason, action.reason


def test_the_diversity_term_reads_no_operator_from_a_graph_the_parser_cannot_hold():
    from agent_system.reward import operators_used

    assert operators_used(NEW_GRAPH) == {"Custom"}
    assert operators_used(NEW_GRAPH.replace("prompt.B", DEEP)) == set()


def test_every_rejection_the_canvas_gives_has_its_kind():
    """The kinds are read from the real reasons (a reworded message would fall to "other" and fail here)."""
    from aflow import canvas
    from aflow.search.projection import project_canvas, rejection_kind

    start = canvas.initial(code=False)
    cases = {
        "Sure, here is my edit": "unparsable",
        "ADD": "unparsable",
        "ROUNDS 1 2": "not_applicable",  # step 1 has no rounds
        "ENSEMBLE 4 3": "no_such_step",
        "DELETE 1": "not_applicable",  # the only step
    }
    for text, kind in cases.items():
        move = project_canvas(text, start)
        assert not move.is_valid and rejection_kind(move.reason) == kind, (text, move.reason)
    child = canvas.apply(start, canvas.parse("ADD REVIEW"))
    again = project_canvas("ADD REVIEW", start, {canvas.canonical(child)})
    assert rejection_kind(again.reason) == "no_change", again.reason
    assert rejection_kind("the compiled canvas failed the static checks: x") == "other"
