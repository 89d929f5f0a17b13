"""vLLM's priority scheduling (--scheduling-policy priority): requests are served by
priority (lower first), then arrival; priority changes the order, never the tokens. Under
fcfs a nonzero priority is refused (ValueError; over HTTP a 400 that fails alone)."""

from __future__ import annotations

import asyncio

import openai
import pytest

from loraplex import EngineArgs
from loraplex.engine.async_engine import AsyncLLMEngine
from loraplex.engine.sequence import Sequence
from tests.engine_utils import GREEDY, make_llm
from tests.server_utils import RemoteServer

NOT_ENABLED = "Got priority 1 but Priority scheduling is not enabled."


def _alone(llm, prompts: list[list[int]]) -> list[list[int]]:
    """Each prompt's greedy tokens, served by itself."""
    return [llm.generate([{"prompt_token_ids": p}], GREEDY, use_tqdm=False)[0]
            .outputs[0].token_ids for p in prompts]


def _run(engine, jobs: list[tuple[list[int], int]], later: list[tuple[list[int], int]] = ()
         ) -> tuple[list[str], dict[str, Sequence]]:
    """Add job i = (prompt, priority) as request str(i), then step to the end, adding the
    `later` jobs after the first step; the finish order and each request's sequence."""
    for i, (prompt, priority) in enumerate([*jobs, *later]):
        if i == len(jobs):
            engine.step()
        engine.add_request(str(i), {"prompt_token_ids": prompt}, GREEDY, priority=priority)
    seqs = {rid: req.seqs[0] for rid, req in engine.requests.items()}
    order = []
    while engine.has_unfinished_requests():
        order += [out.request_id for out in engine.step() if out.finished]
    return order, seqs


def test_one_at_a_time_in_priority_order_with_the_tokens_of_alone(tiny_models, prompts):
    llm = make_llm(tiny_models["llama"], scheduling_policy="priority", max_num_seqs=1)
    jobs = [(prompts[i % len(prompts)], p) for i, p in enumerate([3, 1, 2, 1, 0, -1])]
    order, seqs = _run(llm.llm_engine, jobs)
    assert order == ["5", "4", "1", "3", "2", "0"]  # by priority, ties by arrival
    alone = _alone(llm, [p for p, _ in jobs])
    assert [seqs[str(i)].output_token_ids for i in range(len(jobs))] == alone


def test_preemption_takes_the_lowest_priority_and_keeps_the_tokens(tiny_models, prompts):
    """KV blocks for about two whole sequences. Two low-priority requests run, then two
    high-priority ones join them; when decode runs out of blocks the lowest-priority
    running sequence is preempted each time (never the newest, as under fcfs), so the
    high ones are never preempted and finish first; every output is still its own."""
    llm = make_llm(tiny_models["llama"], scheduling_policy="priority", block_size=4,
                   num_gpu_blocks_override=12, max_model_len=48)
    jobs = [(prompts[1 + i][:10], p) for i, p in enumerate([3, 2, 0, 1])]  # 10 tokens each
    order, seqs = _run(llm.llm_engine, jobs[:2], jobs[2:])
    assert order == ["2", "3", "1", "0"]
    assert seqs["0"].num_preemptions > 0 and seqs["1"].num_preemptions > 0
    assert seqs["2"].num_preemptions == seqs["3"].num_preemptions == 0
    alone = _alone(llm, [p for p, _ in jobs])
    assert [seqs[str(i)].output_token_ids for i in range(len(jobs))] == alone


def test_llm_generate_takes_a_priority_per_prompt(tiny_models, prompts):
    llm = make_llm(tiny_models["llama"], scheduling_policy="priority", max_num_seqs=1)
    batch = [{"prompt_token_ids": p} for p in prompts[:3]]
    outs = llm.generate(batch, GREEDY, use_tqdm=False, priority=[2, 0, 1])
    assert [o.outputs[0].token_ids for o in outs] == _alone(llm, prompts[:3])  # input order
    started = sorted(range(3), key=lambda i: outs[i].metrics["first_scheduled_time"])
    assert started == [1, 2, 0]
    with pytest.raises(ValueError, match="priority has 2 entries for 3 prompts"):
        llm.generate(batch, GREEDY, use_tqdm=False, priority=[0, 1])
    assert not llm.llm_engine.has_unfinished_requests()


def test_fcfs_refuses_a_nonzero_priority(tiny_models, prompts):
    llm = make_llm(tiny_models["llama"])
    batch = [{"prompt_token_ids": p} for p in prompts[:2]]
    with pytest.raises(ValueError, match=NOT_ENABLED):
        llm.generate(batch, GREEDY, use_tqdm=False, priority=[0, 1])
    with pytest.raises(ValueError, match=NOT_ENABLED):
        llm.llm_engine.add_request("x", batch[0], GREEDY, priority=1)
    assert not llm.llm_engine.has_unfinished_requests()  # nothing was queued
    outs = llm.generate(batch, GREEDY, use_tqdm=False, priority=[0, 0])
    assert [o.outputs[0].token_ids for o in outs] == _alone(llm, prompts[:2])


def test_async_generate_passes_the_priority_on(tiny_models):
    async def main():
        engine = AsyncLLMEngine.from_engine_args(EngineArgs(
            model=str(tiny_models["llama"]), dtype="float32", max_model_len=64,
            cpu_kv_cache_gib=0.02))
        prompt = {"prompt_token_ids": [1, 43, 76]}
        with pytest.raises(ValueError, match=NOT_ENABLED):
            async for _ in engine.generate(prompt, GREEDY, "a", priority=1):
                pass
        outs = [out async for out in engine.generate(prompt, GREEDY, "b", priority=0)]
        assert outs[-1].finished
        await engine.shutdown()
    asyncio.run(main())


# ---- over HTTP -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_models):
    args = ["--scheduling-policy", "priority", "--max-num-seqs", "1", "--dtype", "float32",
            "--max-model-len", "256", "--served-model-name", "tiny"]
    with RemoteServer(tiny_models["llama"], args) as srv:
        yield srv


def test_server_serves_by_priority(server):
    """One sequence at a time: while a long request runs, completions and chats queue
    with priorities; they are served lowest value first, whatever the route."""
    done: list[str] = []

    async def ask(client, name: str, priority: int, chat: bool) -> None:
        kw = dict(model="tiny", max_tokens=4, temperature=0,
                  extra_body={"priority": priority, "ignore_eos": True})
        if chat:
            r = await client.chat.completions.create(
                messages=[{"role": "user", "content": name}], **kw)
        else:
            r = await client.completions.create(prompt=name, **kw)
        assert r.usage.completion_tokens == 4
        done.append(name)

    async def main():
        client = server.get_async_client()
        blocker = await client.completions.create(
            model="tiny", prompt="Hold the only slot", max_tokens=200, temperature=0,
            stream=True, extra_body={"ignore_eos": True})
        chunks = aiter(blocker)
        await anext(chunks)  # it runs: everything below waits for it
        await asyncio.gather(ask(client, "p3", 3, False), ask(client, "p1", 1, True),
                             ask(client, "p2", 2, False), ask(client, "p0", 0, True),
                             ask(client, "m1", -1, False), consume(chunks))

    async def consume(chunks) -> None:
        async for _ in chunks:
            pass
        done.append("blocker")

    asyncio.run(main())
    assert done == ["blocker", "m1", "p0", "p1", "p2", "p3"]


def test_server_accepts_priority_on_both_routes(server):
    client = server.get_client()
    r = client.completions.create(model="tiny", prompt="Hi", max_tokens=3, temperature=0,
                                  extra_body={"priority": 5})
    assert r.choices[0].finish_reason in ("length", "stop")
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user",
                                                                "content": "Hi"}],
                                       max_tokens=3, extra_body={"priority": -2})
    assert r.choices[0].message.content is not None
    r = client.responses.create(model="tiny", input="Hi", max_output_tokens=3,
                                extra_body={"priority": 1})
    assert r.status in ("completed", "incomplete")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="Hi", max_tokens=3,
                                  extra_body={"priority": "high"})
