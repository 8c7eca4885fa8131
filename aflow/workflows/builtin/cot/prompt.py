REASON = "Solve the problem step by step."
CODE = "Think about the edge cases first, then write the function."
