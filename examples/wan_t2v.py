"""Wan t2v with difffuse: `python examples/wan_t2v.py [--model PATH_OR_ID] [--compile difffuse|inductor|none]
[--regional] [--steps N] [--height H --width W --frames F]`. Without --model it builds a tiny
random pipeline from configs (no downloads) so it runs on any machine. Writes the frames to
outputs/wan_t2v.gif (--output PATH to change)."""
from _wan_cli import run

if __name__ == "__main__":
    run("t2v", __doc__)
