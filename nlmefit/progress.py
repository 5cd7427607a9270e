"""Progress bars and log messages of the long operations (estimation, likelihoods, replicates, bootstrap, SCM …).

Progress bars. Every operation that can take more than a couple of seconds takes ``progress: bool | None = None``
and shows a tqdm bar while it runs:

* ``progress=None`` (the default) is *automatic*: a bar when stderr is a terminal (TTY) or when the code runs in
  a Jupyter/IPython kernel (a notebook widget when ipywidgets is installed, else text), none otherwise, so CI logs,
  pipes and redirected output stay clean;
* ``progress=True`` forces a bar (on stderr, or the notebook widget) even when stderr is not a terminal;
  ``progress=False`` silences it.

The automatic choice can be overridden for the whole package: ``nlmefit.progress.set_default(False)`` (or True;
``set_default(None)`` restores the automatic rule), or the environment variable ``NLMEFIT_PROGRESS=0`` / ``1``.
Precedence: an explicit ``progress=True/False`` argument, then :func:`set_default`, then ``NLMEFIT_PROGRESS``,
then the automatic rule. The command line passes ``progress=False`` for ``--quiet`` and ``None`` otherwise.

Bars redraw at most every 0.1 s (tqdm's ``mininterval``); updating one costs a few microseconds on the host and
never reads a device tensor, so a bar adds no host–device synchronisation to a CUDA loop: the values shown (the
OFV of the classical estimators, the smoothed ELBO of VEM) are numbers the estimator has on the host already.

Estimators. The classical estimators and SAEM also accept a callable ``progress(n, ofv)`` (called after every
objective evaluation or iteration; ``ofv`` is NaN when there is none, as during SAEM): then no bar is drawn
and the callable does the reporting. :class:`IterationProgress` turns any of these forms into one object.

Logging. Messages go through :mod:`logging`, never ``print``: every module logs to ``logging.getLogger(__name__)``,
so the names are ``nlmefit.<module>`` (``nlmefit.covariate_search`` for the SCM step lines,
``nlmefit.resampling`` for the bootstrap, ``nlmefit.benchmark.generative`` …) under the parent ``nlmefit``.
A library configures no handler: ``logging.basicConfig(level=logging.INFO)`` (or
``logging.getLogger("nlmefit").setLevel(logging.INFO)`` with a handler of your own) shows them. The ``nlmefit``
command shows INFO messages of the ``nlmefit`` loggers on stderr (WARNING and above only with ``--quiet``).
Warnings that are part of a result's contract (non-convergence, low ESS …) stay :func:`warnings.warn`.
While a bar is shown, :func:`logging_redirect` routes console log records through ``tqdm.write`` so that log
lines and the bar do not garble each other.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from tqdm.contrib.logging import logging_redirect_tqdm
from tqdm.std import tqdm as std_tqdm

__all__ = ["ENV_VAR", "ProgressArg", "NoBar", "IterationProgress", "progress_bar", "set_default", "get_default",
           "resolve", "auto_enabled", "in_notebook", "logging_redirect", "is_progress_arg"]

#: the environment variable that switches bars on (1, true, yes, on) or off (0, false, no, off)
ENV_VAR = "NLMEFIT_PROGRESS"
#: what an estimator's ``progress`` may be: automatic (None), forced (bool) or a callable ``(n, ofv) -> None``
ProgressArg = bool | None | Callable[[int, float], None]

MININTERVAL = 0.1  # seconds between redraws (tqdm's default, stated)
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_default: bool | None = None


def is_progress_arg(progress: object) -> bool:
    """``progress`` is None, True/False or a callable ``(n, ofv)`` (what the estimators accept)."""
    return progress is None or isinstance(progress, bool) or callable(progress)


def set_default(enabled: bool | None) -> None:
    """The package-wide default of ``progress=None``: True (bars on), False (off) or None (the automatic rule,
    after ``NLMEFIT_PROGRESS``). An explicit ``progress=True/False`` argument still wins."""
    global _default
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"set_default takes True, False or None, got {enabled!r}")
    _default = enabled


def get_default() -> bool | None:
    """The value given to :func:`set_default` (None: not set)."""
    return _default


def _env() -> bool | None:
    raw = os.environ.get(ENV_VAR)
    if raw is None:
        return None
    val = raw.strip().lower()
    if val in _TRUE:
        return True
    if val in _FALSE:
        return False
    return None  # an unrecognised value: the automatic rule


def in_notebook() -> bool:
    """Running in a Jupyter/IPython kernel (notebook, JupyterLab, VS Code, Colab), not a terminal IPython."""
    if "ipykernel" not in sys.modules:
        return False
    ipy = sys.modules.get("IPython")
    try:
        shell = ipy.get_ipython() if ipy is not None else None
    except Exception:  # noqa: BLE001 - a broken IPython install: no notebook
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _stderr_is_tty() -> bool:
    stream = sys.stderr
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def auto_enabled() -> bool:
    """The automatic rule alone: stderr is a terminal, or the code runs in a Jupyter/IPython kernel."""
    return _stderr_is_tty() or in_notebook()


def resolve(enabled: bool | None) -> bool:
    """Whether a bar is shown for ``progress=enabled``: True/False as given; None by :func:`set_default`, then
    ``NLMEFIT_PROGRESS``, then :func:`auto_enabled`."""
    if enabled is not None:
        return bool(enabled)
    if _default is not None:
        return _default
    env = _env()
    if env is not None:
        return env
    return auto_enabled()


def _bar_class() -> type[std_tqdm]:
    """tqdm.auto's choice made at call time: the notebook widget in a kernel with ipywidgets, else text."""
    if in_notebook():
        try:
            import tqdm.notebook as tqdm_notebook  # local: needs IPython, imported only in a kernel
        except ImportError:
            return std_tqdm
        if getattr(tqdm_notebook, "IProgress", None) is not None:  # ipywidgets installed
            return tqdm_notebook.tqdm
    return std_tqdm


class NoBar:
    """A disabled bar: the methods of a tqdm bar that nlmefit uses, doing nothing."""

    disable = True

    def __init__(self, total: float | None = None, initial: float = 0) -> None:
        self.total = total
        self.n = initial
        self.postfix: Any = None

    def update(self, n: float = 1) -> bool | None:
        self.n += n
        return None

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        pass

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(total: float | None = None, desc: str | None = None, unit: str = "it",
                 enabled: bool | None = None, leave: bool = True, **kwargs: Any) -> std_tqdm | NoBar:
    """A tqdm bar (text on stderr, or the notebook widget in a Jupyter kernel), or a :class:`NoBar` when
    :func:`resolve` (``enabled``) says no. ``total`` None: a counter without a percentage. ``kwargs`` go to tqdm
    (``initial``, ``position`` …). It redraws at most every 0.1 s; use it as a context manager or ``close()`` it."""
    if not resolve(enabled):
        return NoBar(total, kwargs.get("initial", 0))
    cls = _bar_class()
    if total is None and not unit.startswith(" "):
        unit = " " + unit  # a counter: "26 eval", not "26eval"
    opts: dict[str, Any] = dict(total=total, desc=desc, unit=unit, leave=leave, mininterval=MININTERVAL)
    if cls is std_tqdm:
        opts.update(file=sys.stderr, dynamic_ncols=True)  # sys.stderr now (a redirected or captured stream)
    opts.update(kwargs)
    return cls(**opts)


@contextlib.contextmanager
def logging_redirect(bar: std_tqdm | NoBar) -> Iterator[None]:
    """While ``bar`` is shown, console log records of the root and ``nlmefit`` loggers are written with
    ``tqdm.write`` (above the bar, which is redrawn) instead of through the bar's line; a no-op without a bar."""
    if isinstance(bar, NoBar) or getattr(bar, "disable", False):
        yield
        return
    loggers = [lg for lg in (logging.root, logging.getLogger("nlmefit"))
               if any(isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr)
                      for h in lg.handlers)]  # only loggers with a console handler (no handler is added)
    if not loggers:
        yield
        return
    with logging_redirect_tqdm(loggers=loggers, tqdm_class=type(bar)):
        yield


class IterationProgress:
    """What an iterative operation does with its ``progress`` argument (:data:`ProgressArg`).

    A callable gets ``callback(n, ofv)`` on every :meth:`__call__` and no bar is drawn (the behaviour of the
    classical estimators' and SAEM's ``progress`` callbacks); True/False/None give a bar by :func:`resolve`, its
    count set to ``n`` and its postfix to the OFV (when finite) and any ``fields``. Use as a context manager."""

    def __init__(self, progress: ProgressArg, desc: str, unit: str = "it", total: float | None = None,
                 leave: bool = True, **kwargs: Any) -> None:
        if not is_progress_arg(progress):
            raise TypeError(f"progress must be True, False, None or a callable (n, ofv), got {progress!r}")
        self.callback = progress if callable(progress) and not isinstance(progress, bool) else None
        self.bar = progress_bar(total, desc, unit, enabled=False if self.callback is not None else progress,
                                leave=leave, **kwargs)

    @property
    def enabled(self) -> bool:
        """A bar is drawn."""
        return not isinstance(self.bar, NoBar)

    def __call__(self, n: int, ofv: float = math.nan, **fields: Any) -> None:
        if self.callback is not None:
            self.callback(n, ofv)
        bar = self.bar
        if isinstance(bar, NoBar):
            return
        post = {"ofv": f"{ofv:.4f}"} if math.isfinite(ofv) else {}
        post.update(fields)
        if post:
            bar.set_postfix(post, refresh=False)  # drawn with the next redraw (at most every 0.1 s)
        if n > bar.n:
            bar.update(n - bar.n)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> IterationProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
