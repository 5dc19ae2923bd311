"""The search-trace viewer: `itscale view` writes one self-contained HTML page per trace.

A trace (itscale.trace) holds every step of every particle of one search. The page draws
it as a genealogy: one lane per chain and sweep, one column per step, one circle per
particle sized by its weight within the column, a curve to its parent, resampling steps
banded with their effective sample size, finished particles coloured, particles without a
descendant at the end faded, the chosen particle and its ancestry in gold. Clicking a
particle shows its whole text step by step with each step's reward; beside it are the final
answers with their weights and votes, the usage and the settings. Everything is inline (no
network when it is opened), so the file can be sent.

`render.py` reads traces and evaluation records and renders the page; `commands.py` is the
command; `static/` holds the page, its script and its styles, written into every page;
`browser.py` opens a page in headless Chromium (the tests, the pictures in docs/results).
"""

from itscale.viewer.render import read_eval_record, read_trace, render_html

__all__ = ["read_eval_record", "read_trace", "render_html"]
