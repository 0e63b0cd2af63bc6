"""The drift watch: `site check`'s tests over a rolling window of the last N films a service answered.

Every film the service gives a probability (answered or referred; a refused film has none) enters the window; every
`every` new films, once the window holds `min_films`, the window is compared with the model's reference
(`pneumolab.site.films.load_reference`) by `pneumolab.site.check.shift_report`: KS on the gate score and on
P(PNEUMONIA), and the EM / BBSE prevalence. The pooled-features MMD is left out: a decision carries the gate's score,
not the features it summarises. The values go to gauges and ``/v1/model``; crossing into "shifted" logs one warning
line, and so does coming back.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from pneumolab.errors import PneumolabError
from pneumolab.inference.steps import Decision, InferenceModel
from pneumolab.site.check import calibrated_prior, shift_report
from pneumolab.site.films import FilmScores, load_reference

__all__ = ["DriftWatch"]

log = logging.getLogger("pneumolab.drift")


class DriftWatch:
    """Rolling drift check over the last `window` films (module doc).

    Args:
        model: The served model (its threshold and band).
        reference: The reference scores; None loads the model's stored or cached one, and without one the watch
            is off (`status` says why).
        window: N, the films the tests look at.
        every: Films between two checks.
        min_films: Films the window needs before the first check.
    """

    def __init__(
        self,
        model: InferenceModel,
        reference: FilmScores | None = None,
        *,
        window: int = 200,
        every: int = 25,
        min_films: int = 50,
    ) -> None:
        self.model = model
        self.window, self.every, self.min_films = window, every, min(min_films, window)
        self.status = "on"
        if reference is None:
            try:
                reference, _ = load_reference(model, progress=False)
            except PneumolabError as error:
                self.status = f"off: {error}"
        if reference is not None:  # the features are not watched (module doc); drop them from the reference
            reference = FilmScores(**{**reference.__dict__, "features": np.empty((len(reference), 0), np.float32)})
        self.reference = reference
        self.prior = calibrated_prior(model)  # read once: the card does not change while the model serves
        self._probabilities: deque[float] = deque(maxlen=window)
        self._gate_scores: deque[float] = deque(maxlen=window)
        self._since = 0
        self._lock = threading.Lock()
        self.report: dict[str, Any] | None = None

    def observe(self, decisions: Sequence[Decision]) -> dict[str, Any] | None:
        """Add the films of one batch; returns the new report when this batch triggered a check."""
        if self.reference is None:
            return None
        with self._lock:
            for decision in decisions:
                if decision.status == "refused" or decision.probability is None:
                    continue
                self._probabilities.append(float(decision.probability))
                self._gate_scores.append(np.nan if decision.gate_score is None else float(decision.gate_score))
                self._since += 1
            if len(self._probabilities) < self.min_films or self._since < self.every:
                return None
            self._since = 0
            probabilities, gate_scores = np.array(self._probabilities), np.array(self._gate_scores)
        return self._check(probabilities, gate_scores)

    def _check(self, probabilities: np.ndarray, gate_scores: np.ndarray) -> dict[str, Any]:
        n = len(probabilities)
        local = FilmScores(probabilities, np.zeros(n), gate_scores, np.zeros(n, bool), np.empty((n, 0), np.float32))
        report = shift_report(self.model, local, self.reference, prior=self.prior, resamples=0)
        was = self.report is not None and self.report["verdict"]["shifted"]
        if report["verdict"]["shifted"] != was:
            word = "crossed its limit" if report["verdict"]["shifted"] else "is back within its limit"
            log.warning("drift over the last %d films %s: %s", n, word, report["verdict"]["text"])
        self.report = report
        return report

    @property
    def films(self) -> int:
        """Films in the window now."""
        return len(self._probabilities)

    def facts(self) -> dict[str, Any]:
        """What ``/v1/model`` shows: the settings, and the last check's tests, prevalence and verdict."""
        facts: dict[str, Any] = {
            "status": self.status,
            "window": self.window,
            "every": self.every,
            "films": self.films,
        }
        if self.report is not None:
            facts.update({key: self.report[key] for key in ("tests", "prevalence", "verdict")})
        return facts
