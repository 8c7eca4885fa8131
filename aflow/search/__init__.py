"""AFlow's workflow search (MCTS over workflow code), with a selection rule that can mix in a
learned value and an optimizer that can be any OpenAI-compatible model (our trained policy).

    tree.py        nodes (one per evaluated workflow) and the search tree
    selection.py   AFlow's selection rule, UCB, and fusion with a value provider
    value.py       value providers: none, empirical (experience pool), model (an endpoint)
    experience.py  the experience pool: sqlite, shared across processes, exportable as JSONL
    projection.py  optimizer text -> action (modification, graph, prompt, is_valid): shared with the RL env
    prompts.py     what the optimizer reads
    workspace.py   the run directory: atomic writes, resume
    optimizer.py   the loop: select, expand, evaluate, record, converge
    report.py      test-split evaluation, report.md and the plot
"""
