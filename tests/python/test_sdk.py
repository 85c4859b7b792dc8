"""The official OpenAI and Anthropic Python SDKs accept what `sluice sim` serves.

Run with the simulator binary in SLUICE_BIN; it is started as `$SLUICE_BIN sim --port 0 ...`:

    SLUICE_BIN=target/debug/sluice pytest tests/python
    # or, with the simulator crate's own example binary:
    cargo build -p sluice-sim --example sim
    SLUICE_BIN=target/debug/examples/sim pytest tests/python
"""

import math
import os
import queue
import subprocess
import threading

import anthropic
import openai
import pytest

API_KEY = "sk-sim-test"


class Sim:
    """A simulator subprocess and its base URLs."""

    def __init__(self, *flags):
        binary = os.environ.get("SLUICE_BIN")
        if not binary:
            pytest.fail("set SLUICE_BIN to the sluice binary (scripts/test.sh does)")
        cmd = [binary, "sim", "--port", "0", "--api-key", API_KEY, *flags]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        lines = queue.Queue()
        threading.Thread(
            target=lambda: [lines.put(l) for l in self.proc.stdout], daemon=True
        ).start()
        try:
            line = lines.get(timeout=30)
        except queue.Empty:
            self.close()
            raise RuntimeError("the simulator did not print its address")
        prefix = "sluice sim listening on "
        assert line.startswith(prefix), line
        self.openai_url = line[len(prefix):].strip()  # http://127.0.0.1:PORT/v1
        self.root = self.openai_url.removesuffix("/v1")  # the Anthropic SDK adds /v1

    def openai(self, **kw):
        return openai.OpenAI(base_url=self.openai_url, api_key=API_KEY, **kw)

    def anthropic(self, **kw):
        return anthropic.Anthropic(base_url=self.root, api_key=API_KEY, **kw)

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def sim():
    s = Sim("--seed", "1")
    yield s
    s.close()


@pytest.fixture(scope="module")
def tiny_rpm():
    # rpm 1: the bucket holds 1/60 of a request, so only the first request (full
    # bucket) is admitted and the next one waits about a minute.
    s = Sim("--rpm", "1")
    yield s
    s.close()


def test_chat_completion(sim):
    r = sim.openai().chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Say hello"}],
    )
    assert r.object == "chat.completion"
    assert r.model == "gpt-4o-mini"
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    words = choice.message.content.split(" ")
    assert r.usage.completion_tokens == len(words)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_completion_max_tokens(sim):
    r = sim.openai().chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Say hello"}],
        max_completion_tokens=3,
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3


def test_streamed_chat_completion_with_usage(sim):
    stream = sim.openai().chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Stream please"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(
        c.choices[0].delta.content or "" for c in chunks if c.choices
    )
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop"
    last = chunks[-1]
    assert last.choices == []
    assert last.usage.completion_tokens == len(text.split(" "))
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens


def test_embeddings_default_base64_path(sim):
    # The SDK asks for encoding_format=base64 by default and decodes it itself.
    r = sim.openai().embeddings.create(
        model="text-embedding-3-small", input=["hello world", "goodbye"]
    )
    assert len(r.data) == 2
    for item in r.data:
        assert len(item.embedding) == 1536
        assert abs(math.sqrt(sum(x * x for x in item.embedding)) - 1.0) < 1e-4
    assert r.usage.prompt_tokens == r.usage.total_tokens > 0
    # Same input, same vector, float or base64.
    f = sim.openai().embeddings.create(
        model="text-embedding-3-small", input="hello world", encoding_format="float",
        dimensions=1536,
    )
    assert f.data[0].embedding == pytest.approx(r.data[0].embedding, abs=1e-7)
    small = sim.openai().embeddings.create(
        model="text-embedding-3-small", input="x", dimensions=64
    )
    assert len(small.data[0].embedding) == 64


def test_anthropic_message(sim):
    m = sim.anthropic().messages.create(
        model="claude-haiku-4-5",
        max_tokens=1024,
        system="Be brief.",
        messages=[{"role": "user", "content": "Hello"}],
    )
    assert m.type == "message"
    assert m.role == "assistant"
    assert m.stop_reason == "end_turn"
    assert m.content[0].type == "text"
    assert m.usage.output_tokens == len(m.content[0].text.split(" "))
    assert m.usage.input_tokens > 0


def test_anthropic_stream(sim):
    with sim.anthropic().messages.stream(
        model="claude-haiku-4-5",
        max_tokens=5,
        messages=[{"role": "user", "content": "Hello"}],
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 5 == len(text.split(" "))


def test_wrong_key_is_authentication_error(sim):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=sim.openai_url, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=sim.root, api_key="wrong", max_retries=0).messages.create(
            model="c", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )


def test_openai_rate_limit_error(tiny_rpm):
    client = tiny_rpm.openai(max_retries=0)
    msgs = [{"role": "user", "content": "one"}]
    client.chat.completions.create(model="gpt-4o-mini", messages=msgs)
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model="gpt-4o-mini", messages=msgs)
    assert e.value.status_code == 429
    assert e.value.code == "rate_limit_exceeded"
    assert int(e.value.response.headers["retry-after"]) >= 1
    assert e.value.response.headers["x-ratelimit-limit-requests"] == "1"


def test_anthropic_rate_limit_error(tiny_rpm):
    client = tiny_rpm.anthropic(max_retries=0)
    with pytest.raises(anthropic.RateLimitError) as e:
        # The OpenAI test above already took this bucket's only request.
        client.messages.create(
            model="claude-haiku-4-5",
            max_tokens=10,
            messages=[{"role": "user", "content": "two"}],
        )
    assert e.value.status_code == 429
    assert e.value.body["error"]["type"] == "rate_limit_error"
    assert e.value.response.headers["anthropic-ratelimit-requests-limit"] == "1"


def test_insufficient_quota_is_distinguishable():
    s = Sim("--fault", "quota=1")
    try:
        with pytest.raises(openai.RateLimitError) as e:
            s.openai(max_retries=0).chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
            )
        assert e.value.code == "insufficient_quota"
        with pytest.raises(anthropic.BadRequestError) as e:
            s.anthropic(max_retries=0).messages.create(
                model="c", max_tokens=5, messages=[{"role": "user", "content": "x"}]
            )
        assert "credit balance" in e.value.message
    finally:
        s.close()
