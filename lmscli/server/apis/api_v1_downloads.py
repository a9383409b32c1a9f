"""``POST /api/v1/models/download`` and ``GET /api/v1/models/download/status/{job_id}``:
``lms get`` as a background job whose progress can be polled.

The download runs ``catalog.get_model`` on a worker thread. What is settled at once (a name
that can't be a model, a model that is already here) is answered at once; the rest returns a
job in ``downloading`` that later turns ``completed`` or ``failed``.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmscli import catalog
from lmscli.errors import LMSError, ModelNotFoundError, UserInputError
from lmscli.server.apis.parsing import read_json
from lmscli.server.errors import APIError, shorten
from lmscli.server.state import app_state

QUICK_S = 0.5  # how long the request waits for a download that may settle at once
MAX_ACTIVE = 2  # downloads at a time: each can saturate the network and the disk
MAX_JOBS = 200  # finished jobs kept for their status, oldest dropped first


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass
class Job:
    id: str
    target: str
    status: str = "downloading"  # downloading | completed | failed | already_downloaded
    total: int | None = None
    done: int = 0
    started: float = field(default_factory=time.time)
    completed: float | None = None
    error: str | None = None
    model_key: str | None = None

    def progress(self, done: int, total: int) -> None:
        """From the download thread."""
        self.done, self.total = done, total

    def rate(self) -> float:
        end = self.completed or time.time()
        return self.done / (end - self.started) if end > self.started else 0.0

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"job_id": self.id, "status": self.status,
                               "total_size_bytes": self.total, "started_at": iso(self.started)}
        if self.completed is not None:
            out["completed_at"] = iso(self.completed)
        if self.model_key:
            out["model"] = self.model_key
        if self.error:
            out["error"] = self.error
        return out

    def status_body(self) -> dict[str, Any]:
        rate = self.rate()
        eta = None
        if self.status == "downloading" and rate > 0 and self.total:
            eta = iso(time.time() + (self.total - self.done) / rate)
        return self.body() | {"downloaded_bytes": self.done, "bytes_per_second": round(rate),
                              "estimated_completion": eta}


class Downloads:
    def __init__(self) -> None:
        self.jobs: OrderedDict[str, Job] = OrderedDict()

    def active(self, target: str | None = None) -> list[Job]:
        return [j for j in self.jobs.values() if j.status == "downloading"
                and (target is None or j.target == target)]

    async def start(self, target: str) -> Job:
        same = self.active(target)
        if same:
            return same[0]
        if len(self.active()) >= MAX_ACTIVE:
            raise APIError(503, f"{MAX_ACTIVE} downloads are already running; try again when "
                           "one has finished.", type_="server_error", code="too_many_downloads",
                           headers={"Retry-After": "5"})
        job = Job("job_" + secrets.token_hex(8), target)
        self._keep(job)
        task = asyncio.ensure_future(asyncio.to_thread(self._run, job))
        await asyncio.wait({task}, timeout=QUICK_S)
        if task.done() and job.status == "failed" and isinstance(task.result(), LMSError):
            self.jobs.pop(job.id, None)
            raise _refusal(task.result())
        return job

    def _keep(self, job: Job) -> None:
        self.jobs[job.id] = job
        while len(self.jobs) > MAX_JOBS:
            oldest = next(iter(self.jobs))
            if self.jobs[oldest].status == "downloading":
                break
            self.jobs.popitem(last=False)

    @staticmethod
    def _run(job: Job) -> LMSError | None:
        """On a worker thread; returns the error a quick caller should see."""
        try:
            got = catalog.get_model(job.target, on_progress=job.progress)
        except LMSError as exc:
            job.status, job.error, job.completed = "failed", exc.message, time.time()
            return exc
        except Exception as exc:  # the job reports it; the server carries on
            job.status, job.error, job.completed = "failed", f"{type(exc).__name__}: {exc}", \
                time.time()
            return None
        job.model_key = got.model.model_key
        job.total = job.total or got.model.size_bytes
        job.done = job.total
        job.status = "already_downloaded" if got.already_present else "completed"
        job.completed = time.time()
        return None


def _refusal(exc: LMSError) -> APIError:
    if isinstance(exc, ModelNotFoundError):
        return APIError(404, exc.message, param="model", code="model_not_found")
    if isinstance(exc, UserInputError):
        return APIError(400, exc.message, param="model")
    return APIError(502, exc.message, type_="server_error", code="download_failed")


def downloads(request: Request) -> Downloads:
    return app_state(request).part("api_v1_downloads", Downloads)


async def download(request: Request) -> Response:
    body = await read_json(request)
    model = body.text("model", required=True, nonempty=True, max_chars=1000)
    quantization = body.text("quantization", max_chars=100)
    target = f"{model}@{quantization}" if quantization else model
    job = await downloads(request).start(target)  # type: ignore[arg-type]
    return JSONResponse(job.body())


async def download_status(request: Request) -> Response:
    job_id = request.path_params["job_id"]
    job = downloads(request).jobs.get(job_id)
    if job is None:
        raise APIError(404, f'No download job has the id "{shorten(job_id)}".',
                       param="job_id", code="job_not_found")
    return JSONResponse(job.status_body())
