"""verl agent loops and their CPU stand-ins."""
