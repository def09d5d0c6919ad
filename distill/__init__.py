"""distill: distributed knowledge distillation with an offline teacher cache.

One installed package; every part of the project is a sub-package of it (`distill.teacher_cache`,
`distill.student_train`, `distill.compress`, `distill.deploy`, `distill.cluster`, and the shared rooms below
them), so nothing generic lands at the top level of a user's environment. README, "Python API", shows how to call
each stage with a config object.
"""

from __future__ import annotations

from pathlib import Path as _Path

__version__ = "0.1.0"

# An installed wheel holds the sub-packages inside this folder (pyproject.toml maps `distill.core` to `core/` and so
# on). A source checkout keeps them beside it (the layout the design fixes), and so does a copy of the checkout that
# `ray job submit --working-dir .` ships to every worker: there the checkout's root joins this package's search
# path, so `distill.core` is that checkout's `core/` whether or not (and wherever) it was installed.
_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "teacher_cache" / "__init__.py").is_file():
    __path__.append(str(_checkout))  # the package's own module search path
