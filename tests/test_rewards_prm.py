"""Process reward models: the Hugging Face PRM in both formats, on a tiny random Qwen2 model
built here (no hub), and the remote PRM against a local server that implements vLLM's
pooling API with the same model."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from itscale.errors import BackendError
from itscale.lm.chat import CHATML
from itscale.rewards.base import ScoreRequest
from itscale.rewards.registry import make_reward
from itscale.types import Prompt

try:
    import torch
    import transformers
except ImportError:  # the remote-PRM tests below need neither
    torch = transformers = None

needs_torch = pytest.mark.skipif(
    torch is None, reason="the hf extra is not installed (pip install torch==2.13.0 transformers)"
)

PROMPT = Prompt.of("Natalia sold 48 clips in April and half as many in May. How many in total?")
STEPS = (
    "In May she sold 48 / 2 = 24 clips.\n\n",
    "In total 48 + 24 = 72 clips.\n\n",
    "The answer is \\boxed{72}.",
)
CORPUS = [
    "Natalia sold 48 clips in April and half as many clips in May. How many clips did she sell?",
    "In May she sold 48 / 2 = 24 clips. In total 48 + 24 = 72. The answer is \\boxed{72}.",
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "system user assistant Step 1: add the numbers + - * / = ки",
]


def tiny_tokenizer(directory, separator: str):
    """A byte-level BPE tokenizer trained on a few sentences, with the separator added as
    a special token (as Qwen2.5-Math-PRM's `<extra_0>` is)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.add_special_tokens({"additional_special_tokens": [separator]})
    fast.chat_template = CHATML
    fast.save_pretrained(directory)
    return fast


def tiny_config(tokenizer, **extra):
    return transformers.Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


@pytest.fixture(scope="module")
def qwen_prm_dir(tmp_path_factory):
    if torch is None:
        pytest.skip("the hf extra is not installed")
    """A random Qwen2 model with a two-class token head, saved like a PRM checkpoint."""
    directory = tmp_path_factory.mktemp("tiny-qwen-prm")
    tokenizer = tiny_tokenizer(directory, "<extra_0>")
    torch.manual_seed(0)
    model = transformers.Qwen2ForTokenClassification(tiny_config(tokenizer, num_labels=2))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def shepherd_prm_dir(tmp_path_factory):
    if torch is None:
        pytest.skip("the hf extra is not installed")
    """A random Qwen2 causal LM with the Math-Shepherd step tag in its vocabulary."""
    directory = tmp_path_factory.mktemp("tiny-shepherd-prm")
    tokenizer = tiny_tokenizer(directory, "ки")
    torch.manual_seed(1)
    transformers.Qwen2ForCausalLM(tiny_config(tokenizer)).save_pretrained(directory)
    return directory


def reference_scores(directory, text: str, separator: str, shepherd: bool = False) -> list[float]:
    """The score at every separator, computed directly, one text at a time, no padding."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    loader = transformers.AutoModelForCausalLM if shepherd else transformers.AutoModelForTokenClassification
    model = loader.from_pretrained(directory).eval()
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0]
    tag = tokenizer.encode(separator, add_special_tokens=False)[-1]
    positions = (ids[0] == tag).nonzero().flatten().tolist()
    if shepherd:
        plus, minus = tokenizer.encode("+")[-1], tokenizer.encode("-")[-1]
        return [torch.softmax(logits[p, [plus, minus]], -1)[0].item() for p in positions]
    return [torch.softmax(logits[p], -1)[1].item() for p in positions]


def requests():
    """Particles of different lengths (so batches are padded), every prefix of the first."""
    return [
        ScoreRequest(PROMPT, STEPS),
        ScoreRequest(PROMPT, STEPS[:1]),
        ScoreRequest(PROMPT, ("48 / 2 = 25\n\n", "48 + 25 = 73\n\n")),
        ScoreRequest.for_prefix(PROMPT, STEPS),
        ScoreRequest(PROMPT, ("So the total is 72.",)),
    ]


# ------------------------------------------------------------------ Hugging Face PRM


@needs_torch
async def test_qwen_format_scores_each_separator_like_the_model_does(qwen_prm_dir):
    prm = make_reward(f'hf-prm(model="{qwen_prm_dir}", batch_size=2)')
    batch = requests()
    scores = await prm.score(batch)
    assert scores.tokens > 0
    for request, value in zip(batch, scores.values, strict=True):
        text = prm.text(request.prompt, request.steps)
        assert text.count("<extra_0>") == len(request.steps)
        expected = reference_scores(qwen_prm_dir, text, "<extra_0>")
        assert len(expected) == len(request.steps)
        assert value == pytest.approx(expected[-1], abs=1e-5)
    # the earlier steps of the longest particle were scored by the same forward pass
    full = reference_scores(qwen_prm_dir, prm.text(PROMPT, STEPS), "<extra_0>")
    again = await prm.score([ScoreRequest(PROMPT, STEPS[:2])])
    assert again.tokens == 0  # from the cache
    assert again.values[0] == pytest.approx(full[1], abs=1e-5)


@needs_torch
async def test_batching_and_padding_do_not_change_scores(qwen_prm_dir):
    from itscale.rewards.prm import HFProcessRewardModel

    batched = await HFProcessRewardModel(qwen_prm_dir, batch_size=5).score(requests())
    one_by_one = await HFProcessRewardModel(qwen_prm_dir, batch_size=1).score(requests())
    assert batched.values == pytest.approx(one_by_one.values, abs=1e-5)
    assert len(set(batched.values)) > 1  # a random model still tells the texts apart


@needs_torch
async def test_math_shepherd_format(shepherd_prm_dir):
    from itscale.rewards.prm import HFProcessRewardModel

    prm = HFProcessRewardModel(shepherd_prm_dir, format="math-shepherd", separator=" ки", batch_size=3)
    batch = requests()
    scores = await prm.score(batch)
    for request, value in zip(batch, scores.values, strict=True):
        text = prm.text(request.prompt, request.steps)
        assert text.startswith(PROMPT.problem + " ")
        expected = reference_scores(shepherd_prm_dir, text, " ки", shepherd=True)
        assert len(expected) == len(request.steps)
        assert value == pytest.approx(expected[-1], abs=1e-5)


@needs_torch
def test_unknown_format_is_a_clear_error(qwen_prm_dir):
    from itscale.errors import UsageError

    with pytest.raises(UsageError, match="unknown PRM format 'orm'"):
        make_reward(f'hf-prm(model="{qwen_prm_dir}", format=orm)')
    with pytest.raises(UsageError, match="hf-prm needs a model"):
        make_reward("hf-prm")


def test_importing_itscale_does_not_import_torch():
    code = "import sys, itscale, itscale.rewards.registry, itscale.rewards.prm; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ------------------------------------------------------------------ remote PRM (vLLM pooling API)


class _PoolingServer(BaseHTTPRequestHandler):
    """vLLM's documented pooling API for a PRM (STEP pooler on `<extra_0>`, one row of two
    class probabilities per separator): POST /pooling {"model", "input": [...]}. `rows`
    computes them for one text: with the tiny model, or (no torch needed) a known function
    of each step's text."""

    rows = staticmethod(lambda text: ([], 0))
    drop_last_row = False
    requests_seen: list

    def do_GET(self):
        if self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": "tiny-prm", "object": "model"}]})
        else:
            self._send(404, {"error": {"message": "not found"}})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/pooling":
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        self.requests_seen.append(body)
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data, prompt_tokens = [], 0
        for index, text in enumerate(inputs):
            rows, tokens = self.rows(text)
            prompt_tokens += tokens
            if self.drop_last_row:
                rows = rows[:-1]
            data.append({"index": index, "object": "pooling", "data": rows})
        usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
        self._send(200, {"id": "pool-1", "object": "list", "model": body["model"], "data": data, "usage": usage})

    def _send(self, status, payload):
        raw = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args):
        pass


@contextmanager
def serving(rows):
    handler = type("Handler", (_PoolingServer,), {"rows": staticmethod(rows), "requests_seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def known_rows(text: str) -> tuple[list[list[float]], int]:
    """P(good) of each step: (its length in characters mod 10) / 10 + 0.05."""
    rows = []
    for step in text.split("<extra_0>")[:-1]:
        good = (len(step.rsplit(">", 1)[-1]) % 10) / 10 + 0.05
        rows.append([1 - good, good])
    return rows, len(text.split())


@pytest.fixture
def pooling_server():
    with serving(known_rows) as running:
        yield running


@pytest.fixture
def model_pooling_server(qwen_prm_dir):
    """The pooling API computed with the tiny model, as vLLM would serve it."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(qwen_prm_dir)
    model = transformers.AutoModelForTokenClassification.from_pretrained(qwen_prm_dir).eval()
    separator = tokenizer.convert_tokens_to_ids("<extra_0>")

    def rows(text: str) -> tuple[list[list[float]], int]:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            probabilities = torch.softmax(model(input_ids=ids).logits[0], -1)
        return probabilities[ids[0] == separator].tolist(), ids.shape[1]

    with serving(rows) as running:
        yield running


async def test_remote_prm_reads_the_positive_class_of_each_step_and_batches(pooling_server):
    from itscale.rewards.remote_prm import prm_text

    url, handler = pooling_server
    remote = make_reward(f'remote-prm(url="{url}", max_batch=2)')
    try:
        batch = requests()
        scores = await remote.score(batch)
        for request, value in zip(batch, scores.values, strict=True):
            text = prm_text(remote.template, request.prompt, request.steps, remote.separator, remote.system)
            assert value == pytest.approx(known_rows(text)[0][-1][1])
        assert scores.tokens > 0
        assert [len(r["input"]) for r in handler.requests_seen] == [2, 2, 1]  # in chunks of max_batch
        assert all(r["model"] == "tiny-prm" for r in handler.requests_seen)  # learned from /v1/models
        cached = await remote.score([ScoreRequest(PROMPT, STEPS[:2])])  # scored on the side
        assert cached.tokens == 0 and len(handler.requests_seen) == 3
    finally:
        await remote.close()
    assert remote.server._client is None  # the client it opened is closed


@needs_torch
async def test_remote_prm_matches_the_local_model_over_http(model_pooling_server, qwen_prm_dir):
    from itscale.rewards.prm import HFProcessRewardModel

    url, handler = model_pooling_server
    remote = make_reward(f'remote-prm(url="{url}", max_batch=2)')
    try:
        batch = requests()
        scores = await remote.score(batch)
    finally:
        await remote.close()
    local = await HFProcessRewardModel(qwen_prm_dir).score(batch)
    assert scores.values == pytest.approx(local.values, abs=1e-5)
    assert scores.tokens > 0
    assert [len(r["input"]) for r in handler.requests_seen] == [2, 2, 1]  # batched, in chunks of max_batch
    assert all(r["model"] == "tiny-prm" for r in handler.requests_seen)  # learned from /v1/models
    cached = await remote.score([ScoreRequest(PROMPT, STEPS[:2])])  # scored on the side
    assert cached.tokens == 0 and len(handler.requests_seen) == 3


async def test_remote_prm_rejects_answers_that_do_not_fit_the_steps(pooling_server):
    url, handler = pooling_server
    handler.drop_last_row = True
    remote = make_reward(f'remote-prm(url="{url}")')
    try:
        with pytest.raises(BackendError, match="returned 2 step scores for 3 steps: serve the PRM with the STEP"):
            await remote.score([ScoreRequest(PROMPT, STEPS)])
    finally:
        await remote.close()


@needs_torch
def test_a_prm_model_is_loaded_once_per_process(qwen_prm_dir):
    """An evaluation makes a fresh reward per run (fresh score caches); the model behind it
    is loaded once."""
    from itscale.rewards.prm import HFProcessRewardModel

    first, second = HFProcessRewardModel(qwen_prm_dir), HFProcessRewardModel(qwen_prm_dir)
    assert first.model is second.model and first._cache is not second._cache


@needs_torch
def test_remote_code_runs_only_when_asked_for(qwen_prm_dir, tmp_path):
    """A checkpoint that names its own architecture (as Qwen2.5-Math-PRM does) needs its
    shipped Python: that is opt-in."""
    import shutil

    from itscale.errors import UsageError

    directory = tmp_path / "custom"
    shutil.copytree(qwen_prm_dir, directory)
    config = json.loads((directory / "config.json").read_text())
    config["architectures"] = ["Qwen2ForProcessRewardModel"]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match="trust_remote_code=true"):
        make_reward(f'hf-prm(model="{directory}")')
