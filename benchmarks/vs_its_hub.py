"""Particle filtering in its_hub (the paper authors' library) against itscale: same model, reward, problems, budget.

    .venv/bin/python benchmarks/vs_its_hub.py [--problems 4] [--budgets 4,8] [--model qwen2.5-coder-0.5b]
        [--max-tokens 512] [--threads 2] [--its-hub-python .cache/its-hub-venv/bin/python] [--fresh]

its_hub lives in its own venv, made once (this script installs nothing):

    python3 -m venv .cache/its-hub-venv && .cache/its-hub-venv/bin/pip install 'its-hub[lm]==1.2.0'

On the first `--problems` GSM8K test problems, at each budget (particles), temperature 0.8,
at most `--max-tokens` generated tokens per particle (256 per step), at most 40 steps, the
step delimiter "\\n\\n", the system prompt of itscale's searches, one seed per problem, it runs:

1. `its_hub`: its_hub's `ParticleFiltering` (run by `benchmarks/its_hub_driver.py` in its
   venv, one process per problem) against a llama-cpp-python server this script starts
   (`python -m llama_cpp.server`, 127.0.0.1, a free port). its_hub continues a partial answer
   with `continue_final_message` and caps length with `max_completion_tokens`, both ignored
   by that server, so a shim in front of it renders such chats with the model's template
   (`itscale.lm.chat`) with the last assistant turn left open and forwards them to
   `/v1/completions` (`max_completion_tokens` becoming `max_tokens`), converting the answer
   back to a chat completion; other requests pass through with the same renaming. The reward
   is a process reward model written for its_hub (in the driver) asking the question
   itscale's `remote-judge` asks (`PREFIX_QUESTION`: the search scores the whole answer so
   far), P(Yes) / (P(Yes) + P(No)) from one token's top log-probabilities, on the same server.
   its_hub has no per-particle token cap: the driver adds one (see its docstring).
2. `itscale-openai`: itscale's particle filter (paper mode) through its OpenAI backend
   (`OpenAIModel`, completions mode, the template from the GGUF file) against the same
   server, with the `remote-judge` reward on it.
3. `itscale-embedded`: itscale's particle filter on the embedded engine with the embedded
   `llm-judge` reward (same question, P(Yes) read from the full next-token distribution on
   a fork of the particle's KV cache). The server is stopped first.

All server traffic of 1 and 2 goes through the proxy (the shim, a pass-through for itscale),
which records per request the server's usage (prompt and completion tokens) and how many
prompt tokens the server actually evaluated: llama-cpp-python keeps one sequence and reuses
its longest common prefix with the previous prompt, and prints "N prefix-match hit,
remaining M prompt tokens to eval" (verbose, on by default) into its log, which the proxy
reads after each request. The proxy sends one request at a time (the server serves them one
at a time anyway), so each log line belongs to one request. For the embedded engine the
evaluated tokens are its own accounting: `Usage.prompt_tokens` (the prompt once, plus any
prefix it had to re-evaluate) + `Usage.reward_tokens` (the judge's question, evaluated on
forks). "Generated" is the generator's tokens (not the judge's one token per request).

What differs between the systems beyond the search itself, and stays: the server runs with
its default `logits_all=True` (llama-cpp-python refuses log-probabilities without it, and
both judges need them), which makes its prompt evaluation dearer; the server's sampler
applies its defaults to what a request leaves out (top_k 40, min_p 0.05, repeat_penalty 1.1
for both server systems; top_p 0.95 for its_hub, which sends none, where itscale sends 1.0),
while the embedded engine samples from the plain tempered distribution; its_hub's judge
text joins steps with the delimiter and so lacks the trailing "\\n\\n" itscale's has.

Columns: wall seconds per problem; requests per problem (generation + judge); prompt tokens
sent and prompt tokens evaluated per generated token; generated tokens per wall second;
accuracy (itscale's grader, `itscale.answers`, for all three); wall time relative to its_hub
at the same budget; the proxy's own seconds per problem (time inside the proxy, excluding
the upstream request and the wait for the server; included in the wall time).

Results are cached per (system, budget, problem) as JSON under .cache/benchmarks/vs-its-hub/
(a directory per model and settings), written atomically: an interrupted run resumes where
it stopped; `--fresh` redoes them. The server's log and the proxy's per-request records of
the last run are left in .cache/benchmarks/vs-its-hub/logs/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import re
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "gsm8k_test.jsonl"
CACHE = REPO / ".cache" / "benchmarks" / "vs-its-hub"
DRIVER = Path(__file__).resolve().with_name("its_hub_driver.py")
ITS_HUB_PYTHON = REPO / ".cache" / "its-hub-venv" / "bin" / "python"
ITS_HUB_SETUP = "python3 -m venv .cache/its-hub-venv && .cache/its-hub-venv/bin/pip install 'its-hub[lm]==1.2.0'"
ITS_HUB_VERSION = "1.2.0"
SYSTEMS = ("its_hub", "itscale-openai", "itscale-embedded")
SERVER_SYSTEMS = ("its_hub", "itscale-openai")
DELIMITER = "\n\n"

CHILDREN: list[subprocess.Popen] = []  # killed on exit, whatever happens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ the shim and counting proxy

_PREFIX_HIT = re.compile(r"Llama\.generate: (\d+) prefix-match hit, remaining (\d+) prompt tokens to eval")
_FULLY_CACHED = "Llama.generate: full prompt already cached"
_SAMPLING_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "stop", "seed", "n", "presence_penalty", "frequency_penalty",
    "repeat_penalty",
)  # fmt: skip


def evaluated_from_log(text: str, prompt_tokens: int) -> tuple[int, str]:
    """Prompt tokens the server evaluated for one request, from what it logged meanwhile:
    "N prefix-match hit, remaining M prompt tokens to eval" (M), "full prompt already cached"
    (0), else nothing was reused (the first request, no common prefix, or a prefix it could
    not keep): all of them."""
    hits = _PREFIX_HIT.findall(text)
    if hits:
        return sum(int(remaining) for _, remaining in hits), "prefix-hit"
    if _FULLY_CACHED in text:
        return 0, "cached"
    return prompt_tokens, "no-reuse"


def is_continuation(body: dict) -> bool:
    """A chat request asking to continue its last (assistant) message, as vLLM allows."""
    messages = body.get("messages") or []
    extra = body.get("extra_body") if isinstance(body.get("extra_body"), dict) else {}
    wanted = body.get("continue_final_message") or extra.get("continue_final_message")
    return bool(wanted) and bool(messages) and messages[-1].get("role") == "assistant"


def _content(value: Any) -> str:
    if isinstance(value, list):  # multi-part content: its text parts
        return "".join(p.get("text", "") for p in value if isinstance(p, dict) and p.get("type") == "text")
    return value if isinstance(value, str) else ""


def token_limit(body: dict) -> int | None:
    for key in ("max_tokens", "max_completion_tokens"):
        if body.get(key) is not None:
            return body[key]
    return None  # no limit: the chat endpoint's default (the completions endpoint's is 16)


def continuation_payload(body: dict, template: Any) -> dict:
    """The `/v1/completions` request for a chat continuing its last assistant turn: the
    chat before it rendered with the generation prompt, then that turn's text, left open."""
    from itscale.types import Message

    messages = body["messages"]
    chat = [Message(m["role"], _content(m.get("content"))) for m in messages[:-1]]
    prompt = template.render(chat, add_generation_prompt=True) + _content(messages[-1].get("content"))
    payload = {"model": body.get("model"), "prompt": prompt, "max_tokens": token_limit(body)}
    payload.update({k: body[k] for k in _SAMPLING_FIELDS if body.get(k) is not None})
    return payload


def passthrough_payload(body: dict) -> dict:
    payload = dict(body)
    limit = payload.pop("max_completion_tokens", None)
    if payload.get("max_tokens") is None and limit is not None:
        payload["max_tokens"] = limit
    return payload


def chat_response(data: dict) -> dict:
    """A `/v1/completions` answer as a chat completion."""
    choices = [
        {
            "index": c.get("index", i),
            "message": {"role": "assistant", "content": c.get("text", "")},
            "logprobs": None,
            "finish_reason": c.get("finish_reason"),
        }
        for i, c in enumerate(data.get("choices") or [])
    ]
    return {
        "id": "chat" + str(data.get("id", "")),
        "object": "chat.completion",
        "created": data.get("created", int(time.time())),
        "model": data.get("model"),
        "choices": choices,
        "usage": data.get("usage"),
    }


def proxy_main(argv: list[str]) -> None:
    """The proxy in its own process (`vs_its_hub.py --proxy ...`): the shim for its_hub, a
    pass-through for everything else, counting every completion request."""
    parser = argparse.ArgumentParser(prog="vs_its_hub.py --proxy", description="the shim and counting proxy")
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--records", type=Path, required=True)
    parser.add_argument("--server-log", type=Path, required=True)
    parser.add_argument("--chat-template", required=True)
    args = parser.parse_args(argv)

    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from itscale.lm.chat import template_from_model

    template = template_from_model(args.chat_template)
    records = args.records.open("a", buffering=1)
    state: dict[str, Any] = {"log_offset": 0, "client": None}
    lock = asyncio.Lock()
    numbers = itertools.count()

    def read_log() -> str:
        with args.server_log.open("rb") as f:
            f.seek(state["log_offset"])
            data = f.read()
        state["log_offset"] += len(data)
        return data.decode("utf-8", "replace")

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def handle(request: Request) -> Response:
        entered = time.perf_counter()
        client: httpx.AsyncClient = state["client"]
        path = "/" + request.path_params["path"]
        raw = await request.body()
        if request.method != "POST" or path not in ("/v1/completions", "/v1/chat/completions"):
            passed = await client.request(
                request.method, args.upstream + path, content=raw or None, headers={"content-type": "application/json"}
            )
            return Response(passed.content, passed.status_code, media_type=passed.headers.get("content-type"))
        body = json.loads(raw)
        converted = path == "/v1/chat/completions" and is_continuation(body)
        if converted and (body.get("logprobs") or body.get("tools")):
            message = "the shim converts continue_final_message requests without logprobs or tools only"
            return JSONResponse({"error": {"message": message}}, status_code=400)
        target = "/v1/completions" if converted else path
        payload = continuation_payload(body, template) if converted else passthrough_payload(body)
        kind = "judge" if payload.get("max_tokens") == 1 and payload.get("logprobs") else "gen"
        queued = time.perf_counter()
        async with lock:
            started = time.perf_counter()
            read_log()  # whatever the server printed between requests
            posted = time.perf_counter()
            upstream = await client.post(args.upstream + target, json=payload)
            finished = time.perf_counter()
            log_text = read_log()
        record = {"i": next(numbers), "path": path, "target": target, "kind": kind, "converted": converted}
        record.update(status=upstream.status_code, prompt_tokens=0, completion_tokens=0, evaluated=0, source=None)
        content = upstream.content
        if upstream.status_code == 200:
            data = upstream.json()
            usage = data.get("usage") or {}
            record.update(
                prompt_tokens=usage.get("prompt_tokens", 0), completion_tokens=usage.get("completion_tokens", 0)
            )
            record["evaluated"], record["source"] = evaluated_from_log(log_text, record["prompt_tokens"])
            if converted:
                content = json.dumps(chat_response(data)).encode()
        response = Response(content, upstream.status_code, media_type="application/json")
        upstream_seconds, wait_seconds = finished - posted, started - queued
        record.update(
            upstream_seconds=upstream_seconds,
            wait_seconds=wait_seconds,
            proxy_seconds=time.perf_counter() - entered - upstream_seconds - wait_seconds,
        )
        records.write(json.dumps(record) + "\n")
        return response

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        state["client"] = httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=256))
        yield
        await state["client"].aclose()

    app = Starlette(
        routes=[Route("/proxy/health", health), Route("/{path:path}", handle, methods=["GET", "POST"])],
        lifespan=lifespan,
    )
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


# ------------------------------------------------------------------ the server and the proxy


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process in CHILDREN:
        CHILDREN.remove(process)


def wait_ready(url: str, process: subprocess.Popen, log: Path, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise SystemExit(f"{what} exited with code {process.returncode} before it was ready; its log ends:\n{tail}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{what} did not answer {url} within {timeout:.0f} s (log: {log})")


class Services:
    """The llama-cpp-python server and the proxy in front of it, as child processes."""

    def __init__(self, model_path: Path, threads: int, n_ctx: int, logs: Path):
        self.model_path, self.threads, self.n_ctx, self.logs = model_path, threads, n_ctx, logs
        self.processes: list[subprocess.Popen] = []

    def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        server_log, proxy_log = self.logs / "server.log", self.logs / "proxy.log"
        self.records = self.logs / "requests.jsonl"
        for path in (server_log, proxy_log, self.records):
            path.write_bytes(b"")
        server_port, proxy_port = free_port(), free_port()
        server_url = f"http://127.0.0.1:{server_port}"
        with server_log.open("ab") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "llama_cpp.server", "--model", str(self.model_path), "--host", "127.0.0.1",
                 "--port", str(server_port), "--n_threads", str(self.threads), "--n_threads_batch", str(self.threads),
                 "--n_ctx", str(self.n_ctx)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        self._track(server)
        wait_ready(server_url + "/v1/models", server, server_log, "the llama-cpp-python server")
        self.model_id = httpx.get(server_url + "/v1/models", timeout=10).json()["data"][0]["id"]
        with proxy_log.open("ab") as log:
            proxy = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--proxy", "--upstream", server_url,
                 "--port", str(proxy_port), "--records", str(self.records), "--server-log", str(server_log),
                 "--chat-template", str(self.model_path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        self._track(proxy)
        self.url = f"http://127.0.0.1:{proxy_port}"
        wait_ready(self.url + "/proxy/health", proxy, proxy_log, "the proxy")
        self._offset = 0

    def _track(self, process: subprocess.Popen) -> None:
        self.processes.append(process)
        CHILDREN.append(process)

    def take_records(self) -> list[dict]:
        """The proxy's records written since the last call (each is written before its
        response is sent, so a finished run's are all there)."""
        with self.records.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def stop(self) -> None:
        for process in reversed(self.processes):
            stop_process(process)
        self.processes.clear()


def summarise_requests(records: list[dict]) -> dict[str, Any]:
    gen = [r for r in records if r["kind"] == "gen"]
    judge = [r for r in records if r["kind"] == "judge"]
    sources: dict[str, int] = {}
    for r in records:
        sources[str(r["source"])] = sources.get(str(r["source"]), 0) + 1
    return {
        "requests": len(records),
        "gen_requests": len(gen),
        "judge_requests": len(judge),
        "converted_requests": sum(r["converted"] for r in records),
        "failed_requests": sum(r["status"] != 200 for r in records),
        "prompt_tokens_sent": sum(r["prompt_tokens"] for r in records),
        "prompt_tokens_evaluated": sum(r["evaluated"] for r in records),
        "generated_tokens": sum(r["completion_tokens"] for r in gen),
        "judge_generated_tokens": sum(r["completion_tokens"] for r in judge),
        "proxy_seconds": sum(r["proxy_seconds"] for r in records),
        "upstream_seconds": sum(r["upstream_seconds"] for r in records),
        "evaluated_source": sources,
    }


# ------------------------------------------------------------------ the three systems


@dataclass(frozen=True)
class Job:
    system: str
    budget: int
    index: int  # the problem's position: its seed
    problem: Any  # itscale.eval.datasets.Problem


class Bench:
    def __init__(self, args: argparse.Namespace):
        from itscale.lm.chat import MATH_SYSTEM_PROMPT, template_from_model
        from itscale.lm.models import MODELS, model_path

        self.args = args
        self.model_path = model_path(args.model)
        self.system_prompt = MATH_SYSTEM_PROMPT
        self.template = template_from_model(str(self.model_path))
        slug = args.model if args.model in MODELS else self.model_path.stem
        settings = (
            f"tok{args.max_tokens}-step{args.max_step_tokens}-steps{args.max_steps}-temp{args.temperature:g}"
            f"-th{args.threads}"
        )
        self.root = CACHE / re.sub(r"[^A-Za-z0-9._-]+", "_", f"{slug}-{settings}")
        self.services: Services | None = None
        self.results: dict[tuple[str, int], list[dict]] = {}
        self.failures = 0

    def path(self, job: Job) -> Path:
        return self.root / job.system / f"budget-{job.budget}" / f"{job.problem.id}.json"

    def cached(self, job: Job) -> dict | None:
        path = self.path(job)
        if self.args.fresh or not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError:
            return None

    def save(self, job: Job, record: dict) -> dict:
        from itscale.answers import extract_answer, is_equivalent
        from itscale.files import write_json_atomic

        answer = record.pop("answer", None) or extract_answer(record["text"])
        record = {
            "system": job.system,
            "budget": job.budget,
            "problem": job.problem.id,
            "seed": job.index,
            "reference": job.problem.answer,
            "answer": answer,
            "correct": is_equivalent(answer, job.problem.answer),
            **record,
        }
        write_json_atomic(self.path(job), record)
        self.results.setdefault((job.system, job.budget), []).append(record)
        self.report(job, record)
        return record

    def failed(self, job: Job, error: BaseException) -> None:
        """One problem failed: said, and the others go on (a rerun retries it)."""
        self.failures += 1
        detail = str(error) if isinstance(error, RuntimeError) else traceback.format_exc(limit=6)
        print(f"  {job.system} budget {job.budget} {job.problem.id} FAILED: {detail}", file=sys.stderr, flush=True)

    def settings(self, job: Job) -> dict[str, Any]:
        a = self.args
        return {
            "budget": job.budget,
            "seed": job.index,
            "max_tokens": a.max_tokens,
            "max_step_tokens": a.max_step_tokens,
            "max_steps": a.max_steps,
            "temperature": a.temperature,
        }

    # --------------------------------------------------------------- 1. its_hub

    def run_its_hub(self, job: Job) -> dict:
        from itscale.rewards.judge import PREFIX_QUESTION
        from itscale.types import Prompt

        assert self.services is not None
        prompt = Prompt.of(job.problem.problem, system=self.system_prompt)
        cfg = {
            "url": self.services.url + "/v1",
            "model": self.services.model_id,
            "problem": job.problem.problem,
            "system_prompt": self.system_prompt,
            "delimiter": DELIMITER,
            "judge_prefix": self.template.prompt_text(prompt),
            "judge_suffix": self.template.turn_suffix(PREFIX_QUESTION),
            **self.settings(job),
        }
        self.services.take_records()
        driver = subprocess.Popen(
            [self.args.its_hub_python, str(DRIVER)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        CHILDREN.append(driver)
        try:
            out, err = driver.communicate(json.dumps(cfg))
        finally:
            stop_process(driver)
        requests = summarise_requests(self.services.take_records())
        if driver.returncode != 0 or not out.strip():
            raise RuntimeError(f"its_hub's driver failed (exit {driver.returncode}):\n{err[-3000:]}")
        details = json.loads(out.strip().splitlines()[-1])
        return {
            "text": details.pop("text"),
            "wall_seconds": details.pop("wall_seconds"),
            **requests,
            "its_hub": details,
        }

    # --------------------------------------------------------------- 2. itscale, OpenAI backend

    async def run_itscale_openai(self, jobs: list[Job]) -> None:
        from itscale.api import asolve
        from itscale.lm.openai import OpenAIModel
        from itscale.rewards.remote_judge import RemoteJudge

        assert self.services is not None
        url, model, template = self.services.url, self.services.model_id, str(self.model_path)
        # The judge is `remote-judge(url=...)` on its own client (as make_reward builds it),
        # made here to raise the timeouts: requests wait their turn at the one-at-a-time server.
        lm = OpenAIModel(url, model, chat_template=template, timeout=3600)
        judge_server = OpenAIModel(url, model, chat_template=template, timeout=3600)
        try:
            await lm.start_up()  # reads the chat template now, not inside the first timed run
            await judge_server.start_up()
            for job in jobs:
                reward = RemoteJudge(judge_server)  # a fresh score cache for every run
                self.services.take_records()
                started = time.perf_counter()
                try:
                    result = await asolve(
                        job.problem.problem, "particle-filter", lm=lm, reward=reward, **self.settings(job)
                    )
                except Exception as error:
                    self.failed(job, error)
                    continue
                wall = time.perf_counter() - started
                requests = summarise_requests(self.services.take_records())
                self.save(job, self.itscale_record(result, wall, requests))
        finally:
            await lm.close()
            await judge_server.close()

    # --------------------------------------------------------------- 3. itscale, embedded engine

    async def run_itscale_embedded(self, jobs: list[Job]) -> None:
        from itscale.api import asolve
        from itscale.lm.llamacpp import LlamaCppModel
        from itscale.rewards.registry import make_reward

        engine = LlamaCppModel(self.model_path, n_threads=self.args.threads)
        try:
            for job in jobs:
                reward = make_reward("llm-judge", engine)  # a fresh score cache for every run
                before = dict(engine.stats)
                started = time.perf_counter()
                try:
                    result = await asolve(
                        job.problem.problem, "particle-filter", lm=engine, reward=reward, **self.settings(job)
                    )
                except Exception as error:
                    self.failed(job, error)
                    continue
                wall = time.perf_counter() - started
                stats = {k: engine.stats[k] - before[k] for k in before}
                u = result.usage
                accounting = {
                    "requests": None,
                    "prompt_tokens_sent": None,
                    "prompt_tokens_evaluated": u.prompt_tokens + u.reward_tokens,
                    "generated_tokens": u.completion_tokens,
                    "proxy_seconds": None,
                    "engine_stats": stats,
                }
                self.save(job, self.itscale_record(result, wall, accounting))
        finally:
            await engine.close()

    @staticmethod
    def itscale_record(result: Any, wall: float, accounting: dict) -> dict:
        d = result.diagnostics
        return {
            "text": result.text,
            "answer": result.answer,
            "wall_seconds": wall,
            **accounting,
            "itscale": {
                "usage": result.usage.to_dict(),
                "particles": [{"tokens": p.tokens, "steps": len(p.steps), "end": p.end} for p in result.particles],
                "resampled_steps": d.get("resampled_steps"),
                "warnings": d.get("warnings", []),
                "backend": d.get("backend", {}),
                "reward_notes": d.get("reward_notes"),
            },
        }

    def report(self, job: Job, record: dict) -> None:
        mark = "right" if record["correct"] else "wrong"
        print(f"  {job.system} budget {job.budget} {job.problem.id}: {record['wall_seconds']:.1f} s, "
              f"answer {record['answer']!r} ({mark})", file=sys.stderr, flush=True)  # fmt: skip


# ------------------------------------------------------------------ the table


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def table(records: dict[tuple[str, int], list[dict]], systems: list[str], budgets: list[int]) -> list[str]:
    lines = [
        "| system | budget | problems | wall s/problem | requests/problem | prompt tok sent/gen tok "
        "| prompt tok evaluated/gen tok | gen tok/s | accuracy | wall vs its_hub | proxy s/problem |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    walls: dict[tuple[str, int], float] = {}
    for key, rows in records.items():
        if rows:
            walls[key] = sum(r["wall_seconds"] for r in rows) / len(rows)
    for budget in budgets:
        for system in systems:
            rows = records.get((system, budget)) or []
            if not rows:
                continue
            n = len(rows)
            wall = sum(r["wall_seconds"] for r in rows)
            generated = sum(r["generated_tokens"] for r in rows)
            server = rows[0].get("requests") is not None
            requests = sum(r["requests"] for r in rows) / n if server else None
            sent = _ratio(sum(r["prompt_tokens_sent"] for r in rows), generated) if server else None
            evaluated = _ratio(sum(r["prompt_tokens_evaluated"] for r in rows), generated)
            proxy = sum(r["proxy_seconds"] for r in rows) / n if server else None
            right = sum(bool(r["correct"]) for r in rows)
            versus = _ratio(walls[(system, budget)], walls.get(("its_hub", budget)))
            lines.append(
                f"| {system} | {budget} | {n} | {wall / n:.1f} | {_fmt(requests, '.1f')} | {_fmt(sent, '.1f')} "
                f"| {_fmt(evaluated, '.2f')} | {_fmt(_ratio(generated, wall), '.1f')} | {right}/{n} "
                f"| {_fmt(versus, '.2f', 'x')} | {_fmt(proxy, '.2f')} |"
            )
    return lines


def notes(records: dict[tuple[str, int], list[dict]]) -> list[str]:
    out = []
    for (system, budget), rows in sorted(records.items()):
        if not rows:
            continue
        where = f"{system}, budget {budget}"
        if rows[0].get("proxy_seconds") is not None:
            proxy, wall = sum(r["proxy_seconds"] for r in rows), sum(r["wall_seconds"] for r in rows)
            upstream = sum(r["upstream_seconds"] for r in rows)
            what = "the shim's" if system == "its_hub" else "the counting proxy's"
            out.append(
                f"- {where}: {what} own time {proxy:.2f} s in all ({100 * proxy / wall:.2f}% of the wall time); "
                f"the server was busy {upstream:.0f} s of {wall:.0f} s; "
                f"{sum(r['judge_requests'] for r in rows)} judge and {sum(r['gen_requests'] for r in rows)} "
                f"generation requests, {sum(r['converted_requests'] for r in rows)} converted by the shim"
            )
            failed = sum(r["failed_requests"] for r in rows)
            if failed:
                out.append(f"- {where}: {failed} requests failed")
        if system == "its_hub":
            details = [r["its_hub"] for r in rows]
            out.append(
                f"- {where}: {sum(d['empty_steps'] for d in details)} empty steps generated, "
                f"{sum(d['capped_particles'] for d in details)} particles stopped by the token cap, "
                f"{sum(d['judge_without_yes_no'] for d in details)} judge answers without Yes/No in the top 20, "
                f"finish reasons {_merge(d['finish_reasons'] for d in details)}"
            )
        else:
            warnings = sorted({w for r in rows for w in r["itscale"]["warnings"]})
            for warning in warnings:
                out.append(f"- {where}: itscale warned: {warning}")
            ends = Counter(str(p["end"]) for r in rows for p in r["itscale"]["particles"])
            out.append(f"- {where}: final particles ended by {dict(sorted(ends.items()))}")
    return out


def _merge(counts: Any) -> dict[str, int]:
    total: Counter[str] = Counter()
    for c in counts:
        total.update(c)
    return dict(sorted(total.items()))


# ------------------------------------------------------------------ main


def check_its_hub(python: str) -> None:
    if not Path(python).exists():
        raise SystemExit(f"its_hub's venv is missing ({python} does not exist): create it with:\n    {ITS_HUB_SETUP}")
    probe = subprocess.run(
        [python, "-c", "import aiohttp, its_hub; from its_hub.core.lms.openai_lm import OpenAICompatibleLanguageModel; "
         "print(its_hub.__version__)"],
        capture_output=True, text=True,
    )  # fmt: skip
    if probe.returncode != 0:
        raise SystemExit(
            f"{python} cannot import its_hub with its [lm] extra ({probe.stderr.strip().splitlines()[-1:]}); "
            f"create the venv with:\n    {ITS_HUB_SETUP}"
        )
    version = probe.stdout.strip()
    if version != ITS_HUB_VERSION:
        print(
            f"warning: its_hub {version} is installed; this benchmark was written for {ITS_HUB_VERSION}",
            file=sys.stderr,
        )


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--proxy":
        proxy_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b", help="a named model or a GGUF path")
    parser.add_argument("--problems", type=int, default=4, help="the first N problems of --data")
    parser.add_argument("--budgets", default="4,8")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"some of {', '.join(SYSTEMS)}")
    parser.add_argument("--max-tokens", type=int, default=512, help="generated tokens per particle")
    parser.add_argument("--max-step-tokens", type=int, default=256)
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-ctx", type=int, default=None, help="the server's context (default: max-tokens + 1536)")
    parser.add_argument("--its-hub-python", default=str(ITS_HUB_PYTHON))
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--fresh", action="store_true", help="redo cached results")
    args = parser.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown system(s) {', '.join(sorted(unknown))}: use {', '.join(SYSTEMS)}")

    from itscale.eval.datasets import read_jsonl

    problems = list(read_jsonl(args.data))[: args.problems]
    bench = Bench(args)
    jobs = [Job(s, b, i, p) for s in systems for b in budgets for i, p in enumerate(problems)]
    todo: list[Job] = []
    for job in jobs:
        record = bench.cached(job)
        if record is None:
            todo.append(job)
        else:
            bench.results.setdefault((job.system, job.budget), []).append(record)
    if any(j.system == "its_hub" for j in todo):
        check_its_hub(args.its_hub_python)

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    try:
        if any(j.system in SERVER_SYSTEMS for j in todo):
            n_ctx = args.n_ctx or args.max_tokens + 1536
            bench.services = Services(bench.model_path, args.threads, n_ctx, CACHE / "logs")
            print(f"starting the llama-cpp-python server and the proxy (logs in {CACHE / 'logs'})", file=sys.stderr)
            bench.services.start()
            for job in [j for j in todo if j.system == "its_hub"]:
                try:
                    bench.save(job, bench.run_its_hub(job))
                except Exception as error:
                    bench.failed(job, error)
            openai_jobs = [j for j in todo if j.system == "itscale-openai"]
            if openai_jobs:
                asyncio.run(bench.run_itscale_openai(openai_jobs))
            bench.services.stop()
            bench.services = None
        embedded_jobs = [j for j in todo if j.system == "itscale-embedded"]
        if embedded_jobs:
            asyncio.run(bench.run_itscale_embedded(embedded_jobs))
    finally:
        for child in list(CHILDREN):
            stop_process(child)
    for rows in bench.results.values():
        rows.sort(key=lambda r: r["seed"])

    print(
        f"model {args.model}, particle filtering (the paper's: multinomial resampling every step), "
        f"GSM8K test 0-{len(problems) - 1}, temperature {args.temperature:g}, at most {args.max_tokens} tokens per "
        f"particle ({args.max_step_tokens} per step, {args.max_steps} steps), {args.threads} threads, "
        f"Yes/No judge as the reward\n"
    )
    print("\n".join(table(bench.results, systems, budgets)))
    print()
    print("\n".join(notes(bench.results)))
    if bench.failures:
        raise SystemExit(f"{bench.failures} problem run(s) failed (see above); a rerun retries them")


if __name__ == "__main__":
    main()
