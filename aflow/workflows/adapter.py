"""Load a workflow written in AFlow's round format (MetaGPT's `workspace/.../round_N/graph.py`).

AFlow rounds import their operators and prompts through workspace paths and build an LLM
from MetaGPT: `Workflow(name, llm_config, dataset)`, `operator.Custom(self.llm)`, and
`__call__` returning `(answer, cost)`. The rewrite below maps those imports onto the
sandbox's own modules, so the rest of the file runs unchanged:

    import workspace.X.workflows.template.operator as operator  ->  import aflow_ops as operator
    import workspace.X.workflows.round_N.prompt as prompt_custom ->  import prompt as prompt_custom
    from metagpt.provider.llm_provider_registry import create_llm_instance -> from aflow_ops import ...
    from metagpt.utils.cost_manager import CostManager           -> from aflow_ops import CostManager
    from scripts.async_llm import create_llm_instance            -> from aflow_ops import ... (current AFlow)
    from scripts.evaluator import DatasetType; from scripts.logs import logger -> from aflow_ops import ...

The sandbox then constructs `Workflow("workflow", None, dataset)` and keeps the answer
from the returned tuple. Cost is accounted by the trusted side, not by the file.
"""

from __future__ import annotations

import ast

# Names AFlow rounds import from MetaGPT (older rounds) or from AFlow's `scripts` package.
AFLOW_NAMES = {"create_llm_instance", "CostManager", "DatasetType", "logger"}


def is_aflow_format(tree: ast.Module) -> bool:
    """AFlow's Workflow takes (name, llm_config, dataset); ours takes nothing."""
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Workflow":
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    return len(item.args.args) > 1
    return False


def _target(module: str) -> str | None:
    if module.endswith(".operator") or module == "operator_an":
        return "aflow_ops"
    if module.endswith(".prompt"):
        return "prompt"
    return None


class _Rewrite(ast.NodeTransformer):
    def visit_Import(self, node: ast.Import):
        for alias in node.names:
            target = _target(alias.name) if "." in alias.name else None
            if target:
                alias.asname = alias.asname or alias.name.rsplit(".", 1)[-1]
                alias.name = target
        return node

    def visit_ImportFrom(self, node: ast.ImportFrom):
        module = node.module or ""
        if module.startswith(("metagpt", "scripts.")) and not module.endswith((".operator", ".prompt")):
            kept = [a for a in node.names if a.name in AFLOW_NAMES]
            if not kept:
                return None  # type-only imports of MetaGPT have no use in the sandbox
            return ast.copy_location(ast.ImportFrom(module="aflow_ops", names=kept, level=0), node)
        target = _target(module) if "." in module else None
        if target:
            node.module, node.level = target, 0
        return node


def convert(source: str) -> str:
    """AFlow round source -> source importing only sandbox modules."""
    tree = _Rewrite().visit(ast.parse(source))
    return ast.unparse(ast.fix_missing_locations(tree))
