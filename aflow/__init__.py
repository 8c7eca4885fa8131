"""aflow: workflows, operators, benchmarks and search. Imports neither verl nor ray."""
