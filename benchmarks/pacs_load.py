"""`pneumolab listen` under load against a real Orthanc (issue 27): throughput, acknowledgement latency, chaos.

Starts Debian's `Orthanc` and `pneumolab listen` (the bundled model, PyTorch, the node's defaults unless told) on
free loopback ports with a temporary spool and storage, exactly as tests/pacs/test_node.py does (its helpers
`tests.pacs.orthanc.Orthanc` and `Node` are reused), converts ``--films`` shared JPEGs to DX files once (the shared
rendition is 224 x 224: resized to ``--film-size``, default 2500 x 2048, about 10 MB of 16-bit pixels like a real
DX film; explicit VR little endian, `pneumolab.pacs.convert.film_to_dicom`), sends one warm-up study through the
whole node (not counted: the worker's first batch imports and initialises what the others reuse), then sends
studies from a pynetdicom SCU (one association per study, new Study / Series / SOP Instance UIDs each time).
Progress goes to stderr, the figures to stdout and ``--json``.

* ``throughput``: ``--studies`` studies of ``--films-per-study`` films, sent as fast as the node acknowledges them
  (``--senders`` associations at a time) or at ``--rate`` studies a second; then waits until every study's
  results are in Orthanc (SR, and with SC one secondary capture per film not refused; ``--sr-only`` runs the
  node with ``--no-sc``). Reports studies a minute from the first C-STORE to the last result stored in Orthanc
  (the node journals ``sent`` once Orthanc answered the C-STORE of the study's last result; Orthanc's REST API
  confirms the counts), the C-STORE acknowledgement latency (median, p99), each study's end-to-end latency (last
  acknowledgement to results stored), and where the worker's time goes (the journal's ``processing`` ->
  ``processed`` -> ``sent`` times).
* ``ack``: ``--backlog`` ordinary studies sent at once, so that the worker is busy, then ``--large`` instances of
  about 20 MB (``--large-size`` rows x columns of 16-bit pixels, an upscaled chest film), each its own study and
  association, ``--large-interval`` s apart; reports their C-STORE latency (median, p99, max) and how many batches
  the worker finished meanwhile (it must be busy for the figure to mean anything).
* ``chaos``: ``--studies`` studies of ``--films-per-study`` films at ``--rate`` studies a second (default 2, twice
  the throughput goal), ``--senders`` at a time. ``--abort-share`` of the associations (default 5 %) are aborted
  (A-ABORT) right after the first film's acknowledgement; the node is killed with SIGKILL once (at
  ``--kill-at`` of the sending schedule) and restarted on the same spool; Orthanc is restarted once (at
  ``--orthanc-restart-at``, down for ``--orthanc-down`` s). Like a PACS, the SCU re-sends what was not
  acknowledged (an association refused or aborted) with doubling delays. Then it waits until the spool's
  ``incoming/`` and ``work/`` are empty and reconciles every study with an acknowledged film: the SRs in Orthanc
  (their referenced films), the SCs, the journal's ``failed`` events. A study is ``ok`` with exactly one SR that
  covers its acknowledged films, ``failed`` with no SR and a journaled failure with its reason, ``duplicated`` with
  more than one SR (``split``: the SRs cover disjoint parts of the study; otherwise a film is reported twice), and
  ``lost`` otherwise. Peak memory is that of the node's process tree (``pneumolab listen`` and its worker): the
  sum of RSS, and of PSS, read from /proc every 0.5 s.

Run from the repository root (the benchmark imports the tests' helpers), one at a time on a quiet machine:

    python -m benchmarks.pacs_load throughput --studies 60 --json pacs-sr-sc.json
    python -m benchmarks.pacs_load throughput --studies 60 --sr-only --json pacs-sr.json
    python -m benchmarks.pacs_load ack --backlog 60 --large 20 --json pacs-ack.json
    python -m benchmarks.pacs_load chaos --studies 200 --rate 2 --json pacs-chaos.json

``--listen-arg=--threads=2`` (repeatable) passes options through to `pneumolab listen`; ``--keep DIR`` keeps the
spool, journal, node log and Orthanc log.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/pacs_load.py` as well as `python -m benchmarks.pacs_load`
    sys.path.insert(0, str(ROOT))

from tests.pacs.orthanc import Node, Orthanc, free_port  # noqa: E402 (after the path above)

DATA = (ROOT / ".." / "shared" / "data" / "chest_xray" / "test").resolve()
EXPLICIT_LE, IMPLICIT_LE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
CALLING_AE = "LOADSCU"


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summary_ms(seconds: list[float]) -> dict[str, float | int | None]:
    """Median, p99 and max of latencies (seconds) in milliseconds."""
    ms = [s * 1000 for s in seconds]
    return {
        "n": len(ms),
        "median_ms": round(statistics.median(ms), 1) if ms else None,
        "p99_ms": round(percentile(ms, 99), 1) if ms else None,
        "max_ms": round(max(ms), 1) if ms else None,
    }


# --- films ---------------------------------------------------------------------------------------------------


def film_pixels(jpeg: Path, rows: int, columns: int) -> np.ndarray | Path:
    """The JPEG's gray levels in [0, 1] resized to rows x columns (bilinear), or the JPEG itself when rows is 0."""
    if not rows:
        return jpeg
    from PIL import Image

    with Image.open(jpeg) as im:
        return np.asarray(im.convert("L").resize((columns, rows), Image.BILINEAR), dtype=np.float64) / 255.0


def prepare_films(folder: Path, count: int, size: tuple[int, int], compression: str | None) -> list[bytes]:
    """`count` shared JPEGs (NORMAL and PNEUMONIA alternately) as DX files of `size` written once; their bytes."""
    from pneumolab.pacs.convert import film_to_dicom

    normal = sorted((DATA / "NORMAL").glob("*.jpeg"))
    pneumonia = sorted((DATA / "PNEUMONIA").glob("*.jpeg"))
    if not normal or not pneumonia:
        raise SystemExit(f"the shared dataset is not at {DATA}")
    jpegs = [j for pair in zip(normal, pneumonia, strict=False) for j in pair][:count]
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, jpeg in enumerate(jpegs):
        target = folder / f"film-{i:03d}.dcm"
        ds = film_to_dicom(
            film_pixels(jpeg, *size),
            patient_id=f"LOAD-{i}",
            patient_name="Load^Test",
            study_uid="1.2.3",
            compression=compression,
        )
        ds.save_as(target, enforce_file_format=True)
        out.append(target.read_bytes())
    sizes = [len(b) for b in out]
    say(f"{len(out)} films converted in {folder} ({min(sizes) / 2**20:.1f}-{max(sizes) / 2**20:.1f} MiB)")
    return out


def large_film(folder: Path, rows: int, columns: int) -> bytes:
    """One chest film upscaled to rows x columns, 16-bit, uncompressed (about 2 * rows * columns bytes)."""
    from pneumolab.pacs.convert import film_to_dicom

    jpeg = sorted((DATA / "PNEUMONIA").glob("*.jpeg"))[0]
    ds = film_to_dicom(
        film_pixels(jpeg, rows, columns), patient_id="LOAD-LARGE", patient_name="Load^Large", study_uid="1.2.3"
    )
    target = folder / "large.dcm"
    ds.save_as(target, enforce_file_format=True)
    data = target.read_bytes()
    say(f"large film {rows} x {columns}: {len(data) / 2**20:.1f} MiB")
    return data


def study_datasets(templates: list[bytes], first: int, films: int) -> tuple[str, list]:
    """A new study of `films` datasets read from the templates (new Study / Series / SOP Instance UIDs)."""
    import pydicom
    from pydicom.uid import generate_uid

    study = generate_uid()
    series = generate_uid()
    out = []
    for k in range(films):
        ds = pydicom.dcmread(io.BytesIO(templates[(first + k) % len(templates)]))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        out.append(ds)
    return study, out


# --- the SCU -------------------------------------------------------------------------------------------------


class Sender:
    """Sends studies to the node, one association per study; records every acknowledgement."""

    def __init__(self, port: int) -> None:
        from pynetdicom import AE

        from pneumolab.pacs.convert import DX_STORAGE

        self.port = port
        self.ae = AE(CALLING_AE)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 60
        self.ae.add_requested_context(DX_STORAGE, [EXPLICIT_LE, IMPLICIT_LE])
        self.lock = threading.Lock()
        self.acks: list[dict] = []  # {study, sop, start, seconds}
        self.first_store: float | None = None
        self.attempt_failures = 0
        self.aborted = 0

    def send(self, datasets: list, *, abort_after_first: bool = False) -> list[str]:
        """One association: send the datasets in order; returns the SOP UIDs acknowledged with success.

        With `abort_after_first`, the association is aborted right after the first acknowledgement."""
        acked: list[str] = []
        assoc = self.ae.associate("127.0.0.1", self.port, ae_title="PNEUMOLAB")
        if not assoc.is_established:
            with self.lock:
                self.attempt_failures += 1
            return acked
        try:
            for ds in datasets:
                start = time.time()
                with self.lock:
                    self.first_store = start if self.first_store is None else self.first_store
                status = assoc.send_c_store(ds)
                seconds = time.time() - start
                if not status or status.Status != 0:
                    with self.lock:
                        self.attempt_failures += 1
                    break
                sop = str(ds.SOPInstanceUID)
                acked.append(sop)
                with self.lock:
                    self.acks.append(
                        {"study": str(ds.StudyInstanceUID), "sop": sop, "start": start, "seconds": seconds}
                    )
                if abort_after_first:
                    with self.lock:
                        self.aborted += 1
                    assoc.abort()
                    return acked
        finally:
            if assoc.is_established:
                assoc.release()
        return acked

    def send_with_retries(
        self, datasets: list, *, abort_first: bool = False, delay: float = 1.0, give_up: float = 180.0
    ) -> list[str]:
        """Send until every dataset is acknowledged (re-sending only what was not), or `give_up` seconds."""
        pending, acked = list(datasets), []
        deadline = time.monotonic() + give_up
        abort = abort_first
        while pending:
            try:
                done = self.send(pending, abort_after_first=abort)
            except Exception as error:  # a connection reset mid-association: retry what was not acknowledged
                say(f"send error: {type(error).__name__}: {error}")
                done = []
            abort = False
            acked += done
            pending = [ds for ds in pending if str(ds.SOPInstanceUID) not in done]
            if pending:
                if time.monotonic() > deadline:
                    break
                time.sleep(delay)
                delay = min(delay * 2, 16)
        return acked


# --- the node's process tree ---------------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fp:
                ppid = int(fp.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        out.setdefault(ppid, []).append(int(entry))
    return out


def _kib(path: str, key: str) -> int:
    try:
        with open(path) as fp:
            for line in fp:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_memory(pid: int) -> tuple[int, int, int]:
    """(RSS, PSS, processes) of `pid` and its descendants, in bytes."""
    children = _children()
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += children.get(p, [])
    rss = sum(_kib(f"/proc/{p}/status", "VmRSS:") for p in seen) * 1024
    pss = sum(_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in seen) * 1024
    return rss, pss, len(seen)


class MemoryWatch:
    """Samples the node's process tree every `interval` s (the node object may change pid on restart)."""

    def __init__(self, node: Node, interval: float = 0.5) -> None:
        self.node, self.interval = node, interval
        self.peak_rss = self.peak_pss = self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):
                rss, pss, count = tree_memory(self.node.process.pid)
                self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
                self.peak_processes = max(self.peak_processes, count)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {
            "peak_rss_mb": round(self.peak_rss / 2**20),
            "peak_pss_mb": round(self.peak_pss / 2**20),
            "peak_processes": self.peak_processes,
        }


# --- Orthanc -------------------------------------------------------------------------------------------------


def orthanc_results(orthanc: Orthanc) -> dict[str, dict]:
    """Study Instance UID -> {"SR": [instance ids], "OT": [instance ids]} of everything in Orthanc."""
    studies = {s["ID"]: s["MainDicomTags"]["StudyInstanceUID"] for s in orthanc.client.get("/studies?expand").json()}
    out: dict[str, dict] = {}
    for series in orthanc.client.get("/series?expand").json():
        study = studies.get(series["ParentStudy"])
        modality = series["MainDicomTags"].get("Modality", "")
        entry = out.setdefault(study, {"SR": [], "OT": []})
        entry.setdefault(modality, []).extend(series["Instances"])
    return out


def restart_orthanc(orthanc: Orthanc, folder: Path, down: float) -> float:
    """Stop Orthanc (SIGTERM), stay down `down` s, start it again on the same ports and storage; seconds down."""
    stopped = time.monotonic()
    orthanc.process.send_signal(signal.SIGTERM)
    orthanc.process.wait(timeout=30)
    time.sleep(down)
    orthanc.process = subprocess.Popen(
        [shutil.which("Orthanc"), str(folder / "orthanc.json")], stdout=orthanc.log, stderr=orthanc.log
    )
    while True:
        with contextlib.suppress(httpx.TransportError):
            if orthanc.client.get("/system").status_code == 200:
                return time.monotonic() - stopped
        if orthanc.process.poll() is not None:
            raise SystemExit(f"Orthanc did not restart: see {folder / 'orthanc.log'}")
        time.sleep(0.2)


# --- the journal ---------------------------------------------------------------------------------------------


def journal(spool: Path) -> list[dict]:
    out = []
    file = spool / "journal.jsonl"
    if file.is_file():
        for line in file.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


def spool_busy(spool: Path) -> bool:
    """Whether the spool still holds studies waiting or batches in work."""
    return any((spool / "incoming").iterdir()) or any((spool / "work").iterdir())


def stage_times(events: list[dict], studies: Iterable[str]) -> dict[str, float | None]:
    """Medians over the studies' batches of: queue (complete -> processing), worker (processing -> processed), send
    (processed -> sent), and the worker's busy share of the span from the first processing to the last processed."""
    studies = set(studies)
    by_batch: dict[str, dict[str, float]] = {}
    for e in events:
        if "batch" in e and e.get("study") in studies:
            by_batch.setdefault(e["batch"], {}).setdefault(e["event"], e["time"])

    def med(a: str, b: str) -> float | None:
        values = [t[b] - t[a] for t in by_batch.values() if a in t and b in t]
        return round(statistics.median(values), 3) if values else None

    worker = [t["processed"] - t["processing"] for t in by_batch.values() if "processing" in t and "processed" in t]
    starts = [t["processing"] for t in by_batch.values() if "processing" in t]
    ends = [t["processed"] for t in by_batch.values() if "processed" in t]
    busy = sum(worker) / (max(ends) - min(starts)) if worker and max(ends) > min(starts) else None
    return {
        "batches": len(by_batch),
        "queue_s": med("complete", "processing"),
        "worker_s": med("processing", "processed"),
        "worker_mean_s": round(statistics.mean(worker), 3) if worker else None,
        "worker_max_s": round(max(worker), 3) if worker else None,
        "send_s": med("processed", "sent"),
        "worker_busy_share": round(busy, 3) if busy is not None else None,
    }


# --- the runs ------------------------------------------------------------------------------------------------


class Setup:
    """Orthanc, the node and the films, in a temporary folder (or `--keep`)."""

    def __init__(self, args: argparse.Namespace, extra: list[str]) -> None:
        self.keep = args.keep
        self.folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="pacs-load-"))
        self.folder.mkdir(parents=True, exist_ok=True)
        self.templates = prepare_films(self.folder / "films", args.films, args.film_size, args.compression)
        self.orthanc: Orthanc | None = None
        self.node: Node | None = None
        try:
            self._start(args, extra)
        except BaseException:
            self.close()
            raise

    def _start(self, args: argparse.Namespace, extra: list[str]) -> None:
        self.port = free_port()
        say("starting Orthanc")
        self.orthanc = Orthanc(self.folder, self.port)
        node_args = ["--quiet-seconds", str(args.quiet_seconds), "--retries", str(args.retries), *extra]
        node_args += args.listen_arg
        say(f"starting pneumolab listen {' '.join(node_args)}")
        self.spool = self.folder / "spool"
        self.node = Node(self.spool, self.port, self.orthanc, *node_args)
        self.wait_ready()
        self.warm_up()
        self.sender = Sender(self.port)  # a fresh one: the figures leave the warm-up out

    def warm_up(self, timeout: float = 300) -> None:
        """One study through the whole node, not counted: the worker's first batch imports and initialises what
        the others reuse (it takes many times longer)."""
        started = time.monotonic()
        study, datasets = study_datasets(self.templates, 0, 1)
        if not Sender(self.port).send_with_retries(datasets):
            raise SystemExit("the warm-up film was not acknowledged")
        while not any(e.get("study") == study and e["event"] in ("sent", "failed") for e in journal(self.spool)):
            if time.monotonic() - started > timeout:
                raise SystemExit(f"the warm-up study had no result after {timeout} s")
            time.sleep(0.3)
        self.warm_up_s = round(time.monotonic() - started, 1)
        say(f"warm-up study through in {self.warm_up_s} s")

    def wait_ready(self, timeout: float = 300) -> None:
        """Until the worker has loaded the model (the node logs "worker ready")."""
        log = self.folder / "spool.log"
        deadline = time.monotonic() + timeout
        while "worker ready" not in (log.read_text(errors="replace") if log.is_file() else ""):
            if time.monotonic() > deadline:
                raise SystemExit(f"the node's worker was not ready after {timeout} s: see {log}")
            time.sleep(0.3)

    def start_profile(self, out: str | None) -> None:
        """`py-spy record` of the node and its worker (raw collapsed stacks at 20 Hz) into `out`, if given."""
        self.profiler = None
        if out:
            spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            command = [spy, "record", "--pid", str(self.node.process.pid), "--output", out]
            command += ["--subprocesses", "--rate", "20", "--format", "raw", "--nonblocking"]
            self.profiler = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop_profile(self) -> None:
        if getattr(self, "profiler", None) is not None and self.profiler.poll() is None:
            self.profiler.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.profiler.wait(timeout=30)

    def close(self) -> None:
        self.stop_profile()
        if self.node is not None:
            with contextlib.suppress(Exception):
                self.node.stop()
        if self.orthanc is not None:
            with contextlib.suppress(Exception):
                self.orthanc.stop()
        if not self.keep:
            shutil.rmtree(self.folder, ignore_errors=True)
        else:
            say(f"kept {self.folder}")


def wait_settled(setup: Setup, studies: dict[str, list[str]], timeout: float) -> dict:
    """Wait until every study has a ``sent``, ``done`` or ``failed`` event and the spool is idle, then check the
    counts in Orthanc; returns {"last_sent", "settled_at", "events", "orthanc"}."""
    deadline = time.monotonic() + timeout
    last_report = 0.0
    while True:
        events = journal(setup.spool)
        closed = {e["study"] for e in events if e["event"] in ("sent", "done", "failed")}
        remaining = [s for s in studies if s not in closed]
        if not remaining and not spool_busy(setup.spool):
            break
        if time.monotonic() - last_report > 10:
            say(f"{len(studies) - len(remaining)} / {len(studies)} studies closed in the journal")
            last_report = time.monotonic()
        if time.monotonic() > deadline:
            say(f"timeout: {len(remaining)} studies not closed after {timeout} s")
            break
        time.sleep(0.5)
    settled_at = time.time()
    sent_times = [e["time"] for e in events if e["event"] in ("sent", "done", "failed") and e.get("study") in studies]
    return {
        "last_sent": max(sent_times) if sent_times else None,
        "settled_at": settled_at,
        "events": events,
        "orthanc": orthanc_results(setup.orthanc),
    }


def run_throughput(args: argparse.Namespace) -> dict:
    setup = Setup(args, ["--no-sc"] if args.sr_only else [])
    try:
        watch = MemoryWatch(setup.node)
        studies: dict[str, list[str]] = {}

        def one(i: int) -> None:
            study, datasets = study_datasets(setup.templates, i * args.films_per_study, args.films_per_study)
            acked = setup.sender.send_with_retries(datasets)
            studies[study] = acked

        say(f"sending {args.studies} studies ({args.senders} at a time, rate {args.rate or 'as acknowledged'})")
        setup.start_profile(args.profile)
        started = time.monotonic()
        with ThreadPoolExecutor(args.senders) as pool:
            for i in range(args.studies):
                if args.rate:
                    time.sleep(max(0.0, started + i / args.rate - time.monotonic()))
                pool.submit(one, i)
        send_wall = time.monotonic() - started
        say(f"all sent in {send_wall:.1f} s; waiting for the results")
        settled = wait_settled(setup, studies, args.timeout)
        setup.stop_profile()
        memory = watch.stop()
        return throughput_figures(args, setup, studies, settled, send_wall, memory)
    finally:
        setup.close()


def throughput_figures(args, setup, studies, settled, send_wall, memory) -> dict:
    events, in_orthanc = settled["events"], settled["orthanc"]
    statuses: dict[str, str] = {}
    measured = {sop for sops in studies.values() for sop in sops}
    for e in events:
        if e["event"] == "processed":
            statuses.update({sop: f["status"] for sop, f in e["instances"].items() if sop in measured})
    complete, failed = 0, 0
    failed_studies = {e["study"] for e in events if e["event"] == "failed"}
    for study, sops in studies.items():
        expected_sc = 0 if args.sr_only else sum(statuses.get(s) in ("answered", "refer") for s in sops)
        found = in_orthanc.get(study, {"SR": [], "OT": []})
        if len(found["SR"]) >= 1 and len(found.get("OT", [])) >= expected_sc:
            complete += 1
        elif study in failed_studies:
            failed += 1
    first = setup.sender.first_store
    wall = (settled["last_sent"] - first) if settled["last_sent"] and first else None
    last_ack = {}
    for a in setup.sender.acks:
        last_ack[a["study"]] = max(last_ack.get(a["study"], 0), a["start"] + a["seconds"])
    closed = {e["study"]: e["time"] for e in events if e["event"] in ("sent", "done")}
    end_to_end = [closed[s] - last_ack[s] for s in studies if s in closed and s in last_ack]
    counts: dict[str, int] = {}
    for status in statuses.values():
        counts[status] = counts.get(status, 0) + 1
    result = {
        "mode": "throughput",
        "results": "SR" if args.sr_only else "SR+SC",
        "studies": len(studies),
        "films_per_study": args.films_per_study,
        "complete_in_orthanc": complete,
        "failed": failed,
        "film_statuses": counts,
        "send_wall_s": round(send_wall, 1),
        "wall_s": round(wall, 1) if wall else None,
        "studies_per_minute": round(len(studies) / wall * 60, 1) if wall else None,
        "ack": summary_ms([a["seconds"] for a in setup.sender.acks]),
        "end_to_end_s": {
            "median": round(statistics.median(end_to_end), 1) if end_to_end else None,
            "p99": round(percentile(end_to_end, 99), 1) if end_to_end else None,
        },
        "stages": stage_times(events, studies),
        "warm_up_s": setup.warm_up_s,
        "memory": memory,
    }
    say(
        f"{result['results']}: {result['studies_per_minute']} studies/min ({complete}/{len(studies)} complete in "
        f"Orthanc, wall {result['wall_s']} s); ack median {result['ack']['median_ms']} ms, p99 "
        f"{result['ack']['p99_ms']} ms; stages {result['stages']}"
    )
    return result


def run_ack(args: argparse.Namespace) -> dict:
    setup = Setup(args, [])
    try:
        watch = MemoryWatch(setup.node)
        large = large_film(setup.folder / "films", *args.large_size)
        say(f"backlog: {args.backlog} studies")
        with ThreadPoolExecutor(args.senders) as pool:
            for i in range(args.backlog):
                pool.submit(lambda i=i: setup.sender.send_with_retries(study_datasets(setup.templates, i, 1)[1]))
        backlog_acks = len(setup.sender.acks)
        say(f"backlog acknowledged; sending {args.large} large instances {args.large_interval} s apart")
        window_start = time.time()
        latencies: list[float] = []
        for _ in range(args.large):
            _, (ds,) = study_datasets([large], 0, 1)
            before = len(setup.sender.acks)
            setup.sender.send_with_retries([ds])
            latencies += [a["seconds"] for a in setup.sender.acks[before:]]
            time.sleep(args.large_interval)
        window_end = time.time()
        events = journal(setup.spool)
        busy = [e for e in events if e["event"] == "processed" and window_start <= e["time"] <= window_end]
        backlog_left = sum(1 for e in events if e["event"] == "complete") - sum(
            1 for e in events if e["event"] == "processed"
        )
        memory = watch.stop()
        result = {
            "mode": "ack",
            "large_mib": round(len(large) / 2**20, 1),
            "large": summary_ms(latencies),
            "backlog_films": summary_ms([a["seconds"] for a in setup.sender.acks[:backlog_acks]]),
            "batches_processed_during": len(busy),
            "window_s": round(window_end - window_start, 1),
            "batches_still_queued_at_end": backlog_left,
            "memory": memory,
        }
        say(
            f"{args.large} x {result['large_mib']} MiB: ack median {result['large']['median_ms']} ms, p99 "
            f"{result['large']['p99_ms']} ms (max {result['large']['max_ms']}); worker finished {len(busy)} "
            f"batches meanwhile"
        )
        return result
    finally:
        setup.close()


def sr_sources(orthanc: Orthanc, instance_id: str) -> set[str]:
    """Every SOP Instance UID an SR references (its films)."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(orthanc.file(instance_id)))
    return {str(e.value) for e in ds.iterall() if e.keyword == "ReferencedSOPInstanceUID"}


def run_chaos(args: argparse.Namespace) -> dict:
    setup = Setup(args, [])
    rng = random.Random(args.seed)
    try:
        watch = MemoryWatch(setup.node)
        sent: dict[str, list[str]] = {}  # study -> every SOP sent
        acked: dict[str, list[str]] = {}
        aborted_studies: list[str] = []
        chaos_log: list[dict] = []
        t0 = time.monotonic()
        schedule = args.studies / args.rate

        def one(i: int, abort: bool) -> None:
            study, datasets = study_datasets(setup.templates, i * args.films_per_study, args.films_per_study)
            sent[study] = [str(ds.SOPInstanceUID) for ds in datasets]
            if abort:
                aborted_studies.append(study)
            acked[study] = setup.sender.send_with_retries(datasets, abort_first=abort)

        def chaos() -> None:
            time.sleep(max(0.0, t0 + args.kill_at * schedule - time.monotonic()))
            killed = time.monotonic()
            say("kill -9 of the node")
            setup.node.kill()
            setup.node.start()
            chaos_log.append(
                {
                    "event": "node killed and restarted",
                    "at_s": round(killed - t0, 1),
                    "listening_again_after_s": round(time.monotonic() - killed, 1),
                }
            )
            say(f"node listening again after {time.monotonic() - killed:.1f} s")
            time.sleep(max(0.0, t0 + args.orthanc_restart_at * schedule - time.monotonic()))
            at = time.monotonic() - t0
            say("restarting Orthanc")
            down = restart_orthanc(setup.orthanc, setup.folder, args.orthanc_down)
            chaos_log.append({"event": "Orthanc restarted", "at_s": round(at, 1), "down_s": round(down, 1)})
            say(f"Orthanc back after {down:.1f} s")

        chaos_thread = threading.Thread(target=chaos, daemon=True)
        chaos_thread.start()
        say(f"sending {args.studies} studies of {args.films_per_study} films at {args.rate}/s")
        with ThreadPoolExecutor(args.senders) as pool:
            for i in range(args.studies):
                time.sleep(max(0.0, t0 + i / args.rate - time.monotonic()))
                pool.submit(one, i, rng.random() < args.abort_share)
        send_wall, send_end = time.monotonic() - t0, time.time()
        chaos_thread.join()
        say(f"all sent in {send_wall:.1f} s; waiting for the spool to drain")
        with_film = {s: a for s, a in acked.items() if a}
        settled = wait_settled(setup, with_film, args.timeout)
        memory = watch.stop()
        result = reconcile(setup, sent, with_film, settled)
        result.update(
            {
                "mode": "chaos",
                "studies": args.studies,
                "films_per_study": args.films_per_study,
                "rate": args.rate,
                "aborted_associations": setup.sender.aborted,
                "failed_attempts": setup.sender.attempt_failures,
                "send_wall_s": round(send_wall, 1),
                "chaos": chaos_log,
                "memory": memory,
                "drain_s": round(settled["settled_at"] - send_end, 1),
                "ack": summary_ms([a["seconds"] for a in setup.sender.acks]),
                "stages": stage_times(settled["events"], with_film),
                "warm_up_s": setup.warm_up_s,
            }
        )
        say(f"chaos: {result['verdicts']}; peak RSS {memory['peak_rss_mb']} MB (PSS {memory['peak_pss_mb']} MB)")
        return result
    finally:
        setup.close()


def reconcile(setup: Setup, sent: dict[str, list[str]], acked: dict[str, list[str]], settled: dict) -> dict:
    """Each study with an acknowledged film: ok, failed (journaled with a reason), duplicated (split or not), or
    lost (module doc)."""
    events, in_orthanc = settled["events"], settled["orthanc"]
    failures: dict[str, list[str]] = {}
    for e in events:
        if e["event"] == "failed":
            failures.setdefault(e["study"], []).append(e["reason"])
    statuses: dict[str, str] = {}
    for e in events:
        if e["event"] == "processed":
            for sop, facts in e["instances"].items():
                statuses.setdefault(sop, facts["status"])
    verdicts: dict[str, int] = {"ok": 0, "failed": 0, "duplicated_split": 0, "duplicated_same_film": 0, "lost": 0}
    details: list[dict] = []
    reasons: dict[str, int] = {}
    for study, sops in acked.items():
        found = in_orthanc.get(study, {"SR": [], "OT": []})
        covered = [sr_sources(setup.orthanc, i) & set(sent[study]) for i in found["SR"]]
        union = set().union(*covered) if covered else set()
        sc_count = len(found.get("OT", []))
        if len(covered) == 1 and set(sops) <= union:
            verdict = "ok"
        elif not covered and study in failures:
            verdict = "failed"
            for reason in failures[study]:
                reasons[reason] = reasons.get(reason, 0) + 1
        elif len(covered) > 1:
            overlap = sum(len(c) for c in covered) > len(union)
            verdict = "duplicated_same_film" if overlap else "duplicated_split"
        else:
            verdict = "lost"
        verdicts[verdict] += 1
        if verdict != "ok" or sc_count > len(sent[study]):
            details.append(
                {
                    "study": study,
                    "verdict": verdict,
                    "acknowledged": len(sops),
                    "srs": [len(c) for c in covered],
                    "sc": sc_count,
                    "statuses": [statuses.get(s, "not processed") for s in sops],
                    "failures": failures.get(study, []),
                    "batches": sorted({e["batch"] for e in events if e.get("study") == study and "batch" in e}),
                }
            )
    unacknowledged = [s for s in sent if s not in acked]
    no_processed_event = sum(1 for sops in acked.values() for sop in sops if sop not in statuses)
    return {
        "acknowledged_films_without_processed_event": no_processed_event,
        "acknowledged_studies": len(acked),
        "studies_never_acknowledged": len(unacknowledged),
        "verdicts": verdicts,
        "failure_reasons": reasons,
        "extra_sc": sum(1 for d in details if d["sc"] > d["acknowledged"]),
        "not_ok": details,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("throughput", "ack", "chaos"))
    parser.add_argument("--studies", type=int, default=None, help="studies to send (throughput 60, chaos 200)")
    parser.add_argument("--films-per-study", type=int, default=None, help="throughput 1, chaos 2")
    parser.add_argument("--films", type=int, default=20, help="shared JPEGs converted once and reused")
    parser.add_argument(
        "--film-size",
        type=int,
        nargs=2,
        default=(2500, 2048),
        metavar=("ROWS", "COLUMNS"),
        help="the 224 px shared JPEGs are resized to a DX film's size (0 0: kept at 224)",
    )
    parser.add_argument("--compression", choices=("rle", "jpegls"), default=None, help="default: uncompressed")
    parser.add_argument("--sr-only", action="store_true", help="throughput: the node runs with --no-sc")
    parser.add_argument("--senders", type=int, default=None, help="associations at a time (throughput 1, chaos 4)")
    parser.add_argument("--rate", type=float, default=None, help="studies a second (throughput: 0, as acked)")
    parser.add_argument("--quiet-seconds", type=float, default=5.0, help="the node's --quiet-seconds")
    parser.add_argument("--retries", type=int, default=3, help="the node's --retries")
    parser.add_argument("--listen-arg", action="append", default=[], help="more `pneumolab listen` options")
    parser.add_argument("--backlog", type=int, default=60, help="ack: ordinary studies queued first")
    parser.add_argument("--large", type=int, default=20, help="ack: large instances sent")
    parser.add_argument("--large-size", type=int, nargs=2, default=(3400, 3000), metavar=("ROWS", "COLUMNS"))
    parser.add_argument("--large-interval", type=float, default=0.5, help="ack: seconds between large instances")
    parser.add_argument("--abort-share", type=float, default=0.05, help="chaos: associations aborted")
    parser.add_argument("--kill-at", type=float, default=0.4, help="chaos: kill -9 at this share of the schedule")
    parser.add_argument("--orthanc-restart-at", type=float, default=0.7, help="chaos: share of the schedule")
    parser.add_argument("--orthanc-down", type=float, default=3.0, help="chaos: seconds Orthanc stays down")
    parser.add_argument("--seed", type=int, default=27)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the results")
    parser.add_argument("--keep", default=None, help="work in this folder and keep it (spool, logs)")
    parser.add_argument("--profile", default=None, help="throughput: py-spy raw stacks of the node into this file")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    chaos = args.mode == "chaos"
    args.studies = args.studies or (200 if chaos else 60)
    args.films_per_study = args.films_per_study or (2 if chaos else 1)
    args.senders = args.senders or (4 if chaos else 1)
    args.rate = (2.0 if chaos else 0.0) if args.rate is None else args.rate
    if chaos and not args.rate:
        parser.error("chaos needs a --rate")
    run = {"throughput": run_throughput, "ack": run_ack, "chaos": run_chaos}[args.mode]
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result = {"started": started, "cpus": os.cpu_count(), **run(args)}
    result["arguments"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
