"""The entry points torch loads by name (declared in pyproject.toml):

- `backend`: the `difffuse` torch.compile backend (group `torch_dynamo_backends`), so that
  `torch.compile(m, backend="difffuse")` needs no `import difffuse`;
- `torch_autoload`: the Inductor switch (group `torch.backends`, which `import torch` loads):
  with DIFFFUSE_INDUCTOR_PASS set, difffuse's pass joins every Inductor compile of the process.

A top-level module apart from the `difffuse` package, importing only the standard library: it
runs inside every `import torch` of the environment, so it must be cheap, must not fail, and
must still work where a folder named `difffuse` shadows the package (Python started from the
folder that holds a clone: the clone is then an empty namespace package), which it names.
"""
from __future__ import annotations

import os

_OFF = ("", "0", "false", "no", "off")


def torch_autoload() -> None:
    """Called by `import torch`. DIFFFUSE_INDUCTOR_PASS unset or off: returns at once, nothing
    imported. Otherwise installs the switch (difffuse.fusion_pass.inductor_hook); never raises."""
    if os.environ.get("DIFFFUSE_INDUCTOR_PASS", "").strip().lower() in _OFF:
        return
    try:
        _difffuse()
        from difffuse.fusion_pass.inductor_hook import autoload
    except Exception as exc:  # noqa: BLE001  an `import torch` must not fail because of difffuse
        import logging

        logging.getLogger("difffuse").warning("%s; the Inductor switch (DIFFFUSE_INDUCTOR_PASS) stays off",
                                              str(exc).rstrip("."))
        return
    autoload()


def backend(gm, example_inputs, options=None, mode=None):
    """The `difffuse` torch.compile backend (see `difffuse.backend`)."""
    return _difffuse().backend(gm, example_inputs, options=options, mode=mode)


def _difffuse():
    """The difffuse package, or an ImportError that says why `import difffuse` found a folder."""
    import difffuse

    if getattr(difffuse, "__file__", None) is None:  # a namespace package: a folder, not difffuse
        where = ", ".join(getattr(difffuse, "__path__", [])) or "?"
        raise ImportError(
            f"difffuse: `import difffuse` found the folder {where}, not the installed package: Python runs "
            "from the folder that holds the difffuse clone, and the clone (a folder named difffuse) shadows "
            "the install. Run Python from another folder, or from inside the clone.", name="difffuse")
    return difffuse
