"""Evaluation harness: accuracy against budget for each algorithm, on a benchmark.

datasets.py     problems from JSONL files, named shortcuts, or the Hugging Face hub
plan.py         the grid (algorithms × budgets × seeds × problems) and its units of work
runner.py       one search per unit, graded; K units at once
reuse.py        sample reuse: smaller budgets picked from one larger run, honest usage
store.py        the output directory: configuration check, crash-safe JSONL records
evaluate.py     resume, run (here or on Ray, distributed.py), write, progress bars
report.py       the table with bootstrap intervals; plots.py the scaling plots
commands.py     `itscale eval` and `itscale report`
"""

from itscale.eval.datasets import Dataset, Problem, load_dataset
from itscale.eval.evaluate import Summary, evaluate
from itscale.eval.plan import Backend, Plan, Unit
from itscale.eval.report import write_report

__all__ = ["Backend", "Dataset", "Plan", "Problem", "Summary", "Unit", "evaluate", "load_dataset", "write_report"]
