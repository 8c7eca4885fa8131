ANSWER = "Answer the question. End with the final answer."
CODE = "Complete the Python function. Reply with the complete function in one ```python block."
