"""From spooled instances to results sent: quiet-period study completion, the worker process, the sender thread.

The `Dispatcher` (threads in the listener's process) watches the spool: a study whose last instance arrived more
than `quiet_seconds` ago becomes a batch (one rename) and goes to the worker process, which decodes, gates and
classifies its films with the same code and the same decision as `pneumolab predict` (`load_backend`,
`InferenceModel.assess`), builds the SR and SC and writes them with ``outcome.json`` into the batch. The sender
thread then stores them at the destination (bounded retries) and closes the batch: ``done/``, or ``failed/`` with
the reason. Every step is journaled. On start, batches left in ``work/`` by a crash are resumed (a built batch
goes straight to sending), and studies spooled before the start wait at least `restart_grace` seconds: their
senders are re-sending what the node refused while it was down, and a study completed before those films came back
would get two results.

Every acknowledged instance ends in the journal's ``processed`` event as ``answered``, ``refer``, ``refused``
(with the reason) or ``skipped`` (a duplicate of one already processed, a structured report, or one of our own
results that a PACS forwarded with its study).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pneumolab.pacs.sender import AnyDestination, SendError, send_files
from pneumolab.pacs.spool import Spool, batch_study

__all__ = ["Dispatcher", "WorkerSettings", "process_batch"]

log = logging.getLogger("pneumolab.pacs")
_OUTCOME = "outcome.json"
_MAX_CRASHES = 2  # a batch whose processing killed the worker this often is failed, not retried forever


@dataclass(frozen=True)
class WorkerSettings:
    """What the worker process loads and how it builds results."""

    model: str | None = None  # a run folder, artefact, or None for the bundled model
    backend: str = "pytorch"
    gate: bool = True
    with_sc: bool = True
    threads: int = 1  # torch threads in the worker: the rest of the CPU answers C-STOREs


def process_batch(model: Any, identity: Any, batch: Path, *, seen: set[str], with_sc: bool) -> dict[str, Any]:
    """Decode, gate, classify one batch's films and write its results (``results/``) and ``outcome.json``.

    Returns:
        The outcome: ``{"instances": {sop: {"status", "label", "probability", "reason"}}, "results": [names]}``.
    """
    from pneumolab.data.io import load_xray_with_meta
    from pneumolab.errors import ImageReadError
    from pneumolab.fsutil import write_json_atomic
    from pneumolab.inference.steps import Decision
    from pneumolab.pacs.results import Classified, build_results, read_header, write_datasets

    instances: dict[str, dict[str, Any]] = {}
    classified: list[Classified] = []
    to_score: list[tuple[Any, np.ndarray, Any]] = []
    for path in sorted(batch.glob("*.dcm")):
        sop = path.stem
        if sop in seen:
            instances[sop] = {"status": "skipped", "reason": "duplicate: processed in an earlier batch"}
            continue
        header = read_header(path)
        if header is None:
            instances[sop] = {"status": "refused", "reason": "unreadable DICOM header (no SOP / study UIDs)"}
            continue
        skip = _not_a_film(header)
        if skip is not None:
            instances[sop] = {"status": "skipped", "reason": skip}
            continue
        try:
            image, meta = load_xray_with_meta(path, size=model.cache_size, name=f"instance {sop}")
        except ImageReadError as error:
            classified.append(Classified(header, Decision("refused", "", None, error.reason)))
            continue
        to_score.append((header, image, meta))
    if to_score:
        decisions = model.assess(np.stack([i for _, i, _ in to_score]), [m for _, _, m in to_score])
        for (header, image, _), decision in zip(to_score, decisions, strict=True):
            classified.append(Classified(header, decision, image))
    for item in classified:
        d = item.decision
        instances[str(item.dataset.SOPInstanceUID)] = {
            "status": d.status, "label": d.label, "probability": d.probability, "reason": d.reason,
        }  # fmt: skip
    written = write_datasets(build_results(classified, model, identity, with_sc=with_sc), batch / "results")
    outcome = {"instances": instances, "results": [p.name for p in written]}
    write_json_atomic(batch / _OUTCOME, outcome)
    return outcome


def _not_a_film(header: Any) -> str | None:
    """Why an accepted instance is no film to classify (a report, or one of our own results), or None."""
    from pneumolab.pacs.results import MANUFACTURER

    if str(header.SOPClassUID).startswith("1.2.840.10008.5.1.4.1.1.88."):
        return "a structured report, not an image"
    if str(getattr(header, "Manufacturer", "")) == MANUFACTURER:
        return "a pneumolab result, not a film"
    return None


def _exit_with_parent() -> None:
    """End the worker when the node is gone (a kill -9 of the node must not leave an orphan holding the model)."""
    import os

    parent = multiprocessing.parent_process()
    while parent is not None and parent.is_alive():
        time.sleep(1.0)
    os._exit(0)


def _worker_main(settings: WorkerSettings, tasks: Any, answers: Any) -> None:
    """The worker process: load the model once, then process batches until told to stop (None)."""
    import torch

    from pneumolab.inference.loader import load_backend
    from pneumolab.pacs.results import model_identity

    threading.Thread(target=_exit_with_parent, daemon=True, name="pacs-parent-watch").start()
    torch.set_num_threads(max(1, settings.threads))
    model = load_backend(settings.model, settings.backend)
    model.gate_enabled = settings.gate
    identity = model_identity(model)
    answers.put(("ready", identity.name, identity.version))
    while True:
        task = tasks.get()
        if task is None:
            return
        batch, seen = task
        try:
            outcome = process_batch(model, identity, Path(batch), seen=set(seen), with_sc=settings.with_sc)
            answers.put(("ok", batch, outcome))
        except Exception as error:  # one bad batch must not end the worker: it is failed with the reason
            answers.put(("error", batch, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"))


class Dispatcher:
    """Quiet-period study completion, the worker process and the sender (module doc).

    Args:
        spool: The spool.
        settings: The worker's settings.
        dest: Where results go (C-STORE or STOW-RS).
        calling_ae: Our AE title when sending.
        quiet_seconds: A study is complete when nothing arrived for this long.
        retries: Send retries after the first attempt.
        retry_delay: Seconds before the first retry (doubling).
        last_received: A callable giving the in-memory arrival times (study -> epoch seconds) of the listener.
        restart_grace: Seconds after the start before a study spooled earlier is complete (module doc).
    """

    def __init__(
        self,
        spool: Spool,
        settings: WorkerSettings,
        dest: AnyDestination,
        *,
        calling_ae: str = "PNEUMOLAB",
        quiet_seconds: float = 5.0,
        retries: int = 3,
        retry_delay: float = 2.0,
        last_received: Callable[[], dict[str, float]] | None = None,
        restart_grace: float = 30.0,
    ) -> None:
        self.spool, self.settings, self.dest = spool, settings, dest
        self.restart_grace, self._started = restart_grace, time.time()
        self.calling_ae, self.quiet_seconds = calling_ae, quiet_seconds
        self.retries, self.retry_delay = retries, retry_delay
        self._last_received = last_received or dict
        self._context = multiprocessing.get_context("spawn")
        self._tasks: Any = None
        self._answers: Any = None
        self._process: Any = None
        self._queued: list[Path] = []  # batches for the worker, in order
        self._busy: Path | None = None
        self._crashes: dict[str, int] = {}
        self._to_send: queue.Queue[Path | None] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.ready = threading.Event()

    # --- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Resume what a crash left, start the worker process and the threads."""
        self._started = time.time()
        self.resume()
        self._start_worker()
        for target in (self._dispatch_loop, self._send_loop):
            thread = threading.Thread(target=target, daemon=True, name=f"pacs-{target.__name__}")
            thread.start()
            self._threads.append(thread)

    def resume(self) -> None:
        """Queue what a crash left in ``work/``: batches to process again, and batches the worker had finished
        (to send; their `processed` event is journaled now when the crash came before it)."""
        self.spool.recover()
        batches = self.spool.work_batches()
        processed = {e.get("batch") for e in self.spool.events() if e["event"] == "processed"} if batches else set()
        for batch in batches:
            self.spool.journal("resumed", study=batch_study(batch), batch=batch.name)
            if not (batch / _OUTCOME).is_file():
                self._queued.append(batch)
                continue
            if batch.name not in processed:  # the worker finished it as the node died: its films' outcome now
                self._journal_processed(batch, json.loads((batch / _OUTCOME).read_text()))
            self._to_send.put(batch)

    def stop(self) -> None:
        """Stop the threads and the worker (what is in flight resumes on the next start)."""
        self._stop.set()
        self._to_send.put(None)
        if self._process is not None and self._process.is_alive():
            self._tasks.put(None)
            # an idle worker ends at once; a busy (or still loading) one is not waited for: its batch is redone
            self._process.join(timeout=2)
            if self._process.is_alive():
                self._process.terminate()
                self._process.join(timeout=5)
            if self._process.is_alive():
                self._process.kill()
        for thread in self._threads:
            thread.join(timeout=10)

    def _start_worker(self) -> None:
        self._tasks, self._answers = self._context.Queue(), self._context.Queue()
        self._process = self._context.Process(
            target=_worker_main, args=(self.settings, self._tasks, self._answers), daemon=True, name="pacs-worker"
        )
        self._process.start()

    # --- the dispatcher thread ---------------------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._complete_quiet_studies()
                self._feed_worker()
                self._collect(timeout=0.2)
            except Exception:  # the loop must survive anything a study throws at it
                log.exception("dispatcher error")
                time.sleep(0.5)

    def _complete_quiet_studies(self) -> None:
        now = time.time()
        memory = self._last_received()
        for study, disk_time in self.spool.pending_studies().items():
            last = max(disk_time, memory.get(study, 0.0))
            if now - last < self.quiet_seconds:
                continue
            if last < self._started and now - self._started < self.restart_grace:
                continue  # spooled before this start: wait for what its senders re-send (module doc)
            batch = self.spool.take_batch(study)
            count = len(list(batch.glob("*.dcm")))
            self.spool.journal("complete", study=study, batch=batch.name, instances=count, quiet_s=self.quiet_seconds)
            self._queued.append(batch)

    def _feed_worker(self) -> None:
        if self._busy is None and self._queued:
            self._busy = self._queued.pop(0)
            study = batch_study(self._busy)
            self.spool.journal("processing", study=study, batch=self._busy.name)
            self._tasks.put((str(self._busy), sorted(self._seen(study))))

    def _seen(self, study: str) -> set[str]:
        """The study's films processed in earlier batches: those sent (the spool's list) and those whose results
        are built and still being sent, so that a film re-sent meanwhile is skipped, not reported twice."""
        seen = self.spool.seen(study)
        for batch in self.spool.work_batches():
            if batch_study(batch) == study and (batch / _OUTCOME).is_file():
                seen |= {film.stem for film in batch.glob("*.dcm")}
        return seen

    def _collect(self, timeout: float) -> None:
        try:
            answer = self._answers.get(timeout=timeout)
        except queue.Empty:
            if not self._process.is_alive():
                self._worker_died()
            return
        kind = answer[0]
        if kind == "ready":
            self.ready.set()
            log.info("worker ready: %s %s", answer[1], answer[2])
            return
        batch = Path(answer[1])
        self._busy = None
        if kind == "ok":
            self._journal_processed(batch, answer[2])
            self._to_send.put(batch)
        else:
            self._fail(batch, f"processing failed: {answer[2]}")

    def _journal_processed(self, batch: Path, outcome: dict[str, Any]) -> None:
        """The `processed` event of a batch: each film's status, label, probability and reason."""
        counts: dict[str, int] = {}
        for facts in outcome["instances"].values():
            counts[facts["status"]] = counts.get(facts["status"], 0) + 1
        self.spool.journal(
            "processed", study=batch_study(batch), batch=batch.name, counts=counts,
            instances=outcome["instances"], results=len(outcome["results"]),
        )  # fmt: skip

    def _worker_died(self) -> None:
        code = self._process.exitcode
        log.error("the worker process ended (exit code %s); starting another", code)
        if self._busy is not None:
            key = self._busy.name
            self._crashes[key] = self._crashes.get(key, 0) + 1
            if self._crashes[key] >= _MAX_CRASHES:
                self._fail(self._busy, f"the worker process died (exit code {code}) processing this batch")
            else:
                self._queued.insert(0, self._busy)
            self._busy = None
        self._start_worker()

    def _fail(self, batch: Path, reason: str) -> None:
        study = batch_study(batch)
        self.spool.finish(batch, {}, failed_reason=reason)
        self.spool.journal("failed", study=study, batch=batch.name, reason=reason)
        log.error("study batch %s failed: %s", batch.name, reason)

    # --- the sender thread -------------------------------------------------------------------------------

    def _send_loop(self) -> None:
        while True:
            batch = self._to_send.get()
            if batch is None or self._stop.is_set():
                return
            try:
                self._send(batch)
            except Exception as error:  # keep sending the next batches
                log.exception("sender error")
                self._fail(batch, f"sending failed: {error}")

    def _send(self, batch: Path) -> None:
        study = batch_study(batch)
        outcome = json.loads((batch / _OUTCOME).read_text())
        files = sorted((batch / "results").glob("*.dcm"))
        if not files:
            self.spool.finish(batch, outcome)
            self.spool.journal("done", study=study, batch=batch.name, results=0)
            return
        try:
            attempts = send_files(
                files, self.dest, calling_ae=self.calling_ae, retries=self.retries, delay=self.retry_delay
            )
        except SendError as error:
            self._fail(batch, str(error))
            return
        self.spool.finish(batch, outcome)
        self.spool.journal("sent", study=study, batch=batch.name, results=len(files), attempts=attempts)
