"""`lt-jax serve` (`lt_jax.server`) driven by the real `openai` client on 127.0.0.1: completions, chat, streaming and
echo logprobs equal what the model gives alone (`Model.generate`, `Model.token_nll`), bad requests get OpenAI's
error shape, a disconnected stream frees its row, and nothing recompiles once a bucket is warm. One server (the
tiny chat model, in a thread of this process) serves the module; the load test (slow) runs one in a subprocess."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest

import lt_jax

NAME = "tiny"
PLAN = dict(sink=4, window=32)  # "first" over 100+ token prompts: its lazy layers see less than full ones
# ~90 tokens: every prompt here lies in one prefill bucket (65..128 tokens), so few shapes compile
TEXT = ("The sea was calm that morning, and the boats went out early to fish beyond the harbour wall. The old "
        "keeper watched them from the lighthouse, counting sails against the grey line of the horizon, and "
        "wrote each one in his book before the tide turned and the gulls came back to the rocks below.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model(tiny_chat):
    return lt_jax.load(tiny_chat)


@pytest.fixture(scope="module")
def server(model):
    """(base url, the served plan) of a server in a thread of this process (compiled functions shared)."""
    import uvicorn
    from lt_jax.server import build_app
    plan = model.plan("first", **PLAN)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(build_app(model, plan, max_batch=3, chunk=4, name=NAME), host="127.0.0.1",
                                       port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not uv.started and time.time() < deadline:
        time.sleep(0.02)
    assert uv.started
    yield f"http://127.0.0.1:{port}", plan
    uv.should_exit = True
    thread.join(60)
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0, timeout=300)


def ids_prompt(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 49152, n).tolist()


def raw(server, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(server[0] + path, data=body, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_greedy_completions_equal_generate(model, server, client):
    """Prompts of ids and of text, served at once (rows share a batch), under the server's plan and a request's
    lt_plan: every completion's ids equal `Model.generate` of its prompt alone, its text their decoding."""
    plan = server[1]
    cases = [(ids_prompt(1, 125), 12, None), (ids_prompt(2, 90), 5, None), (TEXT, 9, None),
             (ids_prompt(3, 110), 12, "full"), (ids_prompt(4, 70), 7, "full")]

    def ask(case):
        prompt, n, spec = case
        return client.completions.create(model=NAME, prompt=prompt, max_tokens=n, temperature=0,
                                         extra_body={"lt_plan": spec} if spec else None)
    with ThreadPoolExecutor(len(cases)) as pool:
        responses = list(pool.map(ask, cases))
    differs = False
    for (prompt, n, spec), r in zip(cases, responses):
        want = model.plan(spec) if spec else plan
        (alone,) = model.generate([prompt] if isinstance(prompt, str) else [prompt], want, max_new_tokens=n)
        choice = r.choices[0]
        assert choice.lt_token_ids == alone["ids"] and choice.text == model.decode(alone["ids"])
        assert r.lt_lazy_layers == choice.lt_lazy_layers == list(want.lazy_layers)
        assert choice.finish_reason == "length" and r.usage.completion_tokens == n
        assert r.usage.prompt_tokens == len(model.prompt_rows(prompt)[0])
        if spec is None and not isinstance(prompt, str):
            differs |= alone["ids"] != model.generate([prompt], "full", max_new_tokens=n)[0]["ids"]
    assert differs, "the served plan must change some answer, or this test could not tell plans apart"


def test_sampled_completion_equals_generate(model, server, client):
    """temperature, top_p and seed: the row samples what `generate` samples alone with that seed."""
    prompt = ids_prompt(5, 70)
    for seed in (0, 11):
        r = client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0.9, top_p=0.9,
                                      seed=seed)
        (alone,) = model.generate([prompt], server[1], max_new_tokens=10, temperature=0.9, top_p=0.9, seed=seed)
        assert r.choices[0].lt_token_ids == alone["ids"]


def test_streaming_equals_the_whole_response(model, server, client):
    """Server-sent chunks join into the non-streamed text; the last carries finish_reason and the lazy layers,
    then a usage chunk (include_usage)."""
    prompt = ids_prompt(6, 120)
    whole = client.completions.create(model=NAME, prompt=prompt, max_tokens=11, temperature=0)
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=11, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) >= 3  # 11 tokens in chunks of 4
    assert "".join(texts) == whole.choices[0].text
    assert [t for c in chunks if c.choices for t in c.choices[0].lt_token_ids] == whole.choices[0].lt_token_ids
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert finals[0].lt_lazy_layers == list(server[1].lazy_layers)
    assert chunks[-1].usage.completion_tokens == 11 and chunks[-1].usage.prompt_tokens == 120


def test_stop_strings_cut_the_text(model, server, client):
    """A stop string ends the row: the text is cut before it (streamed or not), finish_reason "stop"."""
    free = client.completions.create(model=NAME, prompt=TEXT, max_tokens=16, temperature=0).choices[0]
    stop = free.text[len(free.text) // 2:][:3]
    assert stop.strip(), free.text
    cut = free.text[:free.text.find(stop)]
    r = client.completions.create(model=NAME, prompt=TEXT, max_tokens=16, temperature=0, stop=[stop, "@@@@"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    assert r.choices[0].lt_token_ids == free.lt_token_ids[:len(r.choices[0].lt_token_ids)]
    streamed = list(client.completions.create(model=NAME, prompt=TEXT, max_tokens=16, temperature=0, stop=stop,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut
    assert streamed[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("spec", [None, "full", "lighttransfer"])
def test_echo_logprobs_equal_token_nll(model, server, client, spec):
    """echo=true, max_tokens=0, logprobs=1 (lm-eval's local-completions): the prompt tokens' logprobs are
    -Model.token_nll under the plan within 1e-5, the first null; with generated tokens, a greedy token is the top
    logprob."""
    ids = ids_prompt(7, 100)
    extra = {"lt_plan": spec} if spec else None
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=0, echo=True, logprobs=1, extra_body=extra)
    lp = r.choices[0].logprobs
    plan, _ = model.select([ids], spec or server[1])
    assert r.lt_lazy_layers == list(plan.lazy_layers)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    np.testing.assert_allclose(lp.token_logprobs[1:], -model.token_nll(ids, plan)[0], rtol=0, atol=1e-5)
    assert all(max(top.values()) >= t - 1e-6 for t, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]))
    assert r.choices[0].text == model.decode(ids) and r.usage.completion_tokens == 0
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=4, echo=True, logprobs=2, temperature=0,
                                  extra_body={"lt_plan": "full"})
    lp, new = r.choices[0].logprobs, r.choices[0].lt_token_ids
    assert len(lp.token_logprobs) == len(ids) + 4
    nll = model.token_nll(ids + new, "full")[0]
    np.testing.assert_allclose(lp.token_logprobs[1:], -nll, rtol=0, atol=1e-5)
    for t, top in zip(lp.token_logprobs[-4:], lp.top_logprobs[-4:]):
        assert len(top) <= 2 and abs(max(top.values()) - t) < 1e-5


def test_chat_equals_generate_on_the_template(model, server, client):
    """Messages go through the chat template with the generation prompt; streamed deltas join into the same
    content."""
    messages = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": TEXT}]
    ids = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    (alone,) = model.generate([ids], server[1], max_new_tokens=10)
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == model.decode(alone["ids"])
    assert r.usage.prompt_tokens == len(ids) and r.lt_lazy_layers == list(server[1].lazy_layers)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_models_and_health(server):
    status, body = raw(server, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == [NAME]
    status, body = raw(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["compiles"] > 0


BAD = [  # (path, body, status, words in the message, param)
    ("/v1/completions", b"{not json", 400, "not valid JSON", None),
    ("/v1/completions", b"[1, 2]", 422, "must be a JSON object", None),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "'gpt-4' does not exist", "model"),
    ("/v1/completions", {"model": NAME}, 400, "prompt is required", "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": [1] * 2049}, 400, "more than the model's context of 2048",
     "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": [1] * 2000, "max_tokens": 100}, 400,
     "max_tokens=100 plus the prompt's 2000 tokens exceed", "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": "5"}, 400, "max_tokens='5'", "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "temperature": -1}, 400, "temperature=-1", "temperature"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "n": 2}, 400, "n=2", "n"),
    ("/v1/completions", {"model": NAME, "prompt": [1, 49152]}, 400, "outside 0..49151", "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": {"a": 1}}, 400, "prompt must be", "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "lt_plan": "nonsense"}, 400, "lt_plan 'nonsense'",
     "lt_plan"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "stream": "yes"}, 400, "stream='yes'", "stream"),
    ("/v1/chat/completions", {"model": NAME, "messages": "hi"}, 400, "messages must be", "messages"),
    ("/v1/nowhere", {}, 404, "Not Found", None),
]


@pytest.mark.parametrize("path, body, status, words, param", BAD, ids=[f"{b[2]}-{b[3][:24]}" for b in BAD])
def test_bad_requests_get_openai_errors(server, path, body, status, words, param):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, reply = raw(server, "POST", path, data)
    assert got == status and set(reply) == {"error"}
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"} and words in error["message"]
    assert error["param"] == param


def test_client_errors_through_openai(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="other", prompt="x")
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=NAME, prompt=[1] * 2000, max_tokens=100)


def health(server) -> dict:
    return raw(server, "GET", "/health")[1]


def test_disconnect_frees_the_row(model, server, client):
    """A client that closes its stream after the first chunk cancels its request (its row is freed: the engine
    empties with the request cancelled, not finished), and the server serves the next request."""
    cancelled = health(server)["cancelled"]
    stream = client.completions.create(model=NAME, prompt=ids_prompt(8, 120), max_tokens=60, temperature=0,
                                       stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.time() + 120
    while health(server)["active"] and time.time() < deadline:
        time.sleep(0.05)
    assert health(server)["active"] == 0 and health(server)["cancelled"] == cancelled + 1
    r = client.completions.create(model=NAME, prompt=ids_prompt(9, 125), max_tokens=12, temperature=0)
    assert r.choices[0].finish_reason == "length" and len(r.choices[0].lt_token_ids) == 12


def test_nothing_recompiles_within_a_bucket(server, client):
    """Requests of lengths, budgets, seeds and sampling settings already seen in their buckets compile nothing."""
    def batch(seed):
        client.completions.create(model=NAME, prompt=ids_prompt(seed, 100 + seed % 5), max_tokens=12 - seed % 3,
                                  temperature=0)
        client.completions.create(model=NAME, prompt=ids_prompt(seed, 70 + seed % 9), max_tokens=5, temperature=0.7,
                                  top_p=0.8, seed=seed)
        client.completions.create(model=NAME, prompt=ids_prompt(seed, 100 + seed % 7), max_tokens=0, echo=True,
                                  logprobs=1)
    batch(20)
    before = health(server)["compiles"]
    for seed in (21, 22):
        batch(seed)
    assert health(server)["compiles"] == before


# ---- load: a server in its own process -------------------------------------------------------------------------

SERVE = """
import sys, lt_jax
from lt_jax.server import serve
model = lt_jax.load(sys.argv[1])
sys.exit(serve(model, port=int(sys.argv[2]), plan=model.plan("first", sink=4, window=32), max_batch=4, chunk=4,
               name="tiny", log_level="warning"))
"""


@pytest.fixture
def subprocess_server(tiny_chat):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVE, str(tiny_chat), str(port)], env=os.environ,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = (f"http://127.0.0.1:{port}", None)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if raw(url, "GET", "/health")[0] == 200:
                break
        except OSError:
            time.sleep(0.2)
    yield proc, url
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_load_and_sigterm(model, subprocess_server):
    """16 concurrent clients, 96 requests of two length buckets, budgets 1..24, greedy and sampled, a third
    streamed, 4 streams abandoned after their first chunk: every completed response equals the lone `generate`,
    each request is answered once, the compile count stays at its warm-up value, and SIGTERM during a request
    lets it finish, then exits 0."""
    proc, url = subprocess_server
    client = openai.OpenAI(base_url=url[0] + "/v1", api_key="none", max_retries=0, timeout=600)
    plan = model.plan("first", **PLAN)
    rng = np.random.default_rng(0)
    jobs = []
    for i in range(96):
        n = int(rng.integers(5, 65) if i % 2 else rng.integers(65, 129))
        sampled = i % 5 == 0
        jobs.append(dict(i=i, prompt=rng.integers(0, 49152, n).tolist(), max_tokens=int(rng.integers(1, 25)),
                         temperature=0.8 if sampled else 0.0, seed=i, stream=i % 3 == 0, drop=i in (3, 30, 51, 81)))
        if jobs[-1]["drop"]:
            jobs[-1].update(stream=True, max_tokens=60)

    def ask(job):
        kw = dict(model=NAME, prompt=job["prompt"], max_tokens=job["max_tokens"], temperature=job["temperature"],
                  seed=job["seed"])
        if not job["stream"]:
            c = client.completions.create(**kw).choices[0]
            return job["i"], c.lt_token_ids, c.finish_reason
        stream = client.completions.create(**kw, stream=True)
        ids, finish = [], None
        for chunk in stream:
            ids += chunk.choices[0].lt_token_ids or []
            finish = chunk.choices[0].finish_reason or finish
            if job["drop"]:
                stream.close()
                return job["i"], None, "dropped"
        return job["i"], ids, finish

    for warm in (jobs[0], jobs[1], jobs[5]):  # both buckets, greedy and sampled
        ask(warm)
    warm_compiles = raw(url, "GET", "/health")[1]["compiles"]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, jobs))
    health_after = raw(url, "GET", "/health")[1]
    assert sorted(a[0] for a in answers) == list(range(96))
    for i, ids, finish in answers:
        job = jobs[i]
        if job["drop"]:
            continue
        (alone,) = model.generate([job["prompt"]], plan, max_new_tokens=job["max_tokens"],
                                  temperature=job["temperature"], seed=job["seed"])
        assert ids == alone["ids"], f"request {i}"
        assert finish == ("length" if len(ids) == job["max_tokens"] and ids[-1] not in model.config.eos_token_ids
                          else "stop")
    assert health_after["compiles"] == warm_compiles
    deadline = time.time() + 60
    while raw(url, "GET", "/health")[1]["active"] and time.time() < deadline:
        time.sleep(0.05)
    assert raw(url, "GET", "/health")[1]["cancelled"] == 4

    # SIGTERM while a stream is running: it finishes whole, then the server exits 0
    stream = client.completions.create(model=NAME, prompt=jobs[0]["prompt"], max_tokens=60, temperature=0,
                                       stream=True)
    first = next(iter(stream))
    proc.send_signal(15)
    ids = list(first.choices[0].lt_token_ids or [])
    for chunk in stream:
        ids += chunk.choices[0].lt_token_ids or []
    (alone,) = model.generate([jobs[0]["prompt"]], plan, max_new_tokens=60)
    assert ids == alone["ids"]
    assert proc.wait(timeout=120) == 0, proc.stdout.read()[-3000:]
