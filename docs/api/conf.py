"""Sphinx settings for gstream's API reference (built by scripts/docs.sh)."""

import os
import sys

# Locust monkey-patches when imported; under an import lock (autodoc importing
# gstream.contrib.locust) that fails. Patch first, as gstream's CLI does.
from gevent import monkey

monkey.patch_all()

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

project = "gstream"
author = "gstream contributors"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
# Google-style "Args:/Raises:/Attributes:" sections, as the docstrings are written.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# The source uses `from __future__ import annotations`; keep the written names.
autodoc_preserve_defaults = True
nitpicky = False
# A short :attr:`close_code` inside an inherited docstring matches several classes; Sphinx
# still links one. Everything else (bad reST, duplicates, import failures) stays an error.
suppress_warnings = ["ref.python"]
html_theme = "alabaster"
exclude_patterns = ["_build"]
