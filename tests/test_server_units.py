"""In-process pieces of the server: AsyncLLMEngine, resolvers (seed 001's S3 example),
plugins. No sockets."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import time
import types

import pytest
import torch

from loraplex import EngineArgs, LoRARequest, SamplingParams
from loraplex.engine.async_engine import AsyncLLMEngine, EngineDeadError
from loraplex.entrypoints.errors import NotFoundError
from loraplex.entrypoints.serving_models import OpenAIServingModels
from loraplex.lora.resolver import LoRAResolver, LoRAResolverRegistry
from loraplex.lora.resolvers import FilesystemResolver

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def engine_args(tiny_models):
    return EngineArgs(model=str(tiny_models["llama"]), dtype="float32", max_model_len=64,
                      cpu_kv_cache_gib=0.02, enable_lora=True, max_loras=2, max_lora_rank=16)


@pytest.fixture
def registry():
    saved = dict(LoRAResolverRegistry.resolvers)
    LoRAResolverRegistry.resolvers.clear()
    yield LoRAResolverRegistry
    LoRAResolverRegistry.resolvers.clear()
    LoRAResolverRegistry.resolvers.update(saved)


async def _final(engine: AsyncLLMEngine, rid: str, lora: LoRARequest | None = None,
                 prompt=(1, 43, 76)):
    final = None
    async for out in engine.generate({"prompt_token_ids": list(prompt)}, GREEDY, rid, lora):
        final = out
    return final


def test_step_failure_fails_requests_and_keeps_serving(engine_args):
    async def main():
        engine = AsyncLLMEngine.from_engine_args(engine_args)
        real_step, calls = engine.engine.step, {"n": 0}

        def flaky_step():
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("boom")
            return real_step()
        engine.engine.step = flaky_step
        with pytest.raises(EngineDeadError, match="boom"):
            await _final(engine, "a")
        assert engine.engine.get_num_unfinished_requests() == 0
        out = await _final(engine, "b")
        assert out.finished and len(out.outputs[0].token_ids) == 6
        await engine.check_health()
        # idle: no busy spin
        n = calls["n"]
        await asyncio.sleep(0.2)
        assert calls["n"] == n
        await engine.shutdown()
    asyncio.run(main())


def test_closing_a_stream_aborts_the_request(engine_args):
    async def main():
        engine = AsyncLLMEngine.from_engine_args(engine_args)
        params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
        gen = engine.generate({"prompt_token_ids": [1, 2, 3]}, params, "x")
        await gen.__anext__()
        await gen.aclose()
        stats = await engine.get_stats()
        assert stats.num_running == stats.num_waiting == 0
        assert engine.engine.get_num_unfinished_requests() == 0
        await engine.shutdown()
    asyncio.run(main())


def test_seed_s3_resolver_example_runs(engine_args, tiny_adapters, tmp_path, monkeypatch,
                                       registry):
    """Seed 001's custom resolver, with only the vllm imports changed (s3fs faked)."""
    bucket = tmp_path / "bucket"
    shutil.copytree(tiny_adapters["llama"]["r4_qv"], bucket / "loras" / "tiny" / "sql")

    class FakeS3:
        async def _get(self, src, dst, recursive=False):
            shutil.copytree(bucket / src.removeprefix("s3://my-bucket/"), dst,
                            dirs_exist_ok=True)
    monkeypatch.setitem(sys.modules, "s3fs", types.SimpleNamespace(S3FileSystem=FakeS3))
    monkeypatch.setenv("LORAPLEX_ALLOW_RUNTIME_LORA_UPDATING", "True")
    monkeypatch.chdir(tmp_path)
    local_root = tmp_path / "local"

    # ---- seed 001, imports changed (and /tmp/loras made a test dir) ----
    import s3fs

    from loraplex.lora.request import LoRARequest as SeedLoRARequest
    from loraplex.lora.resolver import LoRAResolver as SeedResolver
    from loraplex.lora.resolver import LoRAResolverRegistry as SeedRegistry

    class S3LoRAResolver(SeedResolver):
        def __init__(self):
            self.s3 = s3fs.S3FileSystem()

        async def resolve_lora(self, base_model_name, lora_name):
            s3_path = f"s3://my-bucket/loras/{base_model_name}/{lora_name}"
            local_path = f"{local_root}/{lora_name}"
            await self.s3._get(s3_path, local_path, recursive=True)
            return SeedLoRARequest(
                lora_name=lora_name,
                lora_path=local_path,
                lora_int_id=abs(hash(lora_name)),
            )

    s3_resolver = S3LoRAResolver()
    SeedRegistry.register_resolver("s3_resolver", s3_resolver)
    # ---- end of the seed ----

    async def main():
        engine = AsyncLLMEngine.from_engine_args(engine_args)
        models = OpenAIServingModels(engine, ["tiny"], 64, lora_enabled=True)
        lora = await models.resolve("sql")
        assert lora.lora_path == f"{local_root}/sql" and lora.lora_int_id == 1
        assert "sql" in {c.id for c in models.show_available_models().data}
        out = await _final(engine, "r", lora)
        assert out.finished and out.error is None
        with pytest.raises(NotFoundError):
            await models.resolve("not-in-bucket")
        await engine.shutdown()

    class Missing(LoRAResolver):
        async def resolve_lora(self, base_model_name, lora_name):
            return None
    registry.register_resolver("first_misses", Missing())
    # resolvers are asked in registration order
    assert list(registry.get_supported_resolvers()) == ["s3_resolver", "first_misses"]

    def s3_miss_on_unknown(orig):
        async def resolve(base, name):
            if name != "sql":
                raise FileNotFoundError(name)  # a failing plugin is a miss, not a 500
            return await orig(base, name)
        return resolve
    s3_resolver.resolve_lora = s3_miss_on_unknown(s3_resolver.resolve_lora)
    asyncio.run(main())


def test_registry_api(registry):
    class R(LoRAResolver):
        async def resolve_lora(self, base_model_name, lora_name):
            return None
    r = R()
    registry.register_resolver("r", r)
    assert registry.get_resolver("r") is r and "r" in registry.get_supported_resolvers()
    with pytest.raises(KeyError, match="not registered"):
        registry.get_resolver("nope")
    with pytest.raises(TypeError):
        registry.register_resolver("bad", object())


def test_filesystem_resolver_stays_inside_its_dir(tmp_path, tiny_adapters):
    """A name is one entry of the dir (which may be a symlink the operator put there, as
    vLLM's resolver allows); nothing else is reachable."""
    shutil.copytree(tiny_adapters["llama"]["r4_qv"], tmp_path / "cache" / "ok")
    shutil.copytree(tiny_adapters["llama"]["r4_qv"], tmp_path / "outside")
    (tmp_path / "cache" / "linked").symlink_to(tmp_path / "outside", target_is_directory=True)
    (tmp_path / "cache" / "sub").mkdir()
    shutil.copytree(tiny_adapters["llama"]["r4_qv"], tmp_path / "cache" / "sub" / "deep")
    res = FilesystemResolver(str(tmp_path / "cache"))

    async def main():
        hit = await res.resolve_lora("base", "ok")
        assert hit is not None and hit.lora_path == str(tmp_path / "cache" / "ok")
        linked = await res.resolve_lora("base", "linked")
        assert linked is not None and linked.lora_path == str(tmp_path / "cache" / "linked")
        for name in ("../outside", "missing", "ok/..", "/etc", "sub/deep", "..", ".", "",
                     "sub", "x" * 300):  # the last: too long for the filesystem (ENAMETOOLONG)
            assert await res.resolve_lora("base", name) is None, name
    asyncio.run(main())


def test_plugins_filtered_by_env(tmp_path, monkeypatch, registry):
    from loraplex import plugins
    monkeypatch.setattr(plugins, "_loaded", set())
    monkeypatch.setenv("LORAPLEX_PLUGINS", "lora_filesystem_resolver")
    monkeypatch.setenv("LORAPLEX_LORA_RESOLVER_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("LORAPLEX_LORA_RESOLVER_HF_REPO_LIST", "org/repo")
    assert plugins.load_general_plugins() == ["lora_filesystem_resolver"]
    assert set(registry.get_supported_resolvers()) == {"lora_filesystem_resolver"}
    assert plugins.load_general_plugins() == []  # each plugin runs once
    monkeypatch.setattr(plugins, "_loaded", set())
    monkeypatch.setenv("LORAPLEX_LORA_RESOLVER_CACHE_DIR", str(tmp_path / "missing"))
    with pytest.raises(plugins.PluginError, match="lora_filesystem_resolver"):
        plugins.load_general_plugins()


def _variant(src, dst, config=None, files=None):
    shutil.copytree(src, dst)
    if config:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        cfg.update(config)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    for name, write in (files or {}).items():
        write(dst / name)
    return dst


def test_long_context_refused_and_added_tokens_counted_from_headers(tiny_adapters, tmp_path):
    """Long-context LoRA without its rope factor is refused by name. Tokens an adapter adds
    are counted at registration from the files' headers alone, and an adapter that adds
    more than lora_extra_vocab_size, or whose tokenizer adds ids its weights have no rows
    for, is refused then and at full load (tests/test_added_tokens.py serves them)."""
    from safetensors.torch import save_file

    from loraplex.lora.adapter import TargetShapes, check_adapter_config, load_adapter
    from loraplex.lora.errors import LoRAError

    src = tiny_adapters["llama"]["r4_qv"]
    shapes = {f"model.layers.{i}.self_attn.{p}": (64, out) for i in range(2)
              for p, out in (("q_proj", 64), ("v_proj", 32))}  # the tiny llama's
    emb = {"input_embeddings": torch.zeros(3, 64), "output_embeddings": torch.zeros(3, 64)}

    def targets(extra):
        return TargetShapes(shapes=shapes, suffixes=("q_proj", "v_proj"), vocab_size=512,
                            extra_vocab_size=extra, max_position=512)

    def added(ids):
        return lambda p: p.write_text(json.dumps({f"<t{i}>": i for i in ids}))
    new_emb = _variant(src, tmp_path / "new_emb", files={
        "new_embeddings.safetensors": lambda p: save_file(emb, str(p))})
    refused = {
        "long": (_variant(src, tmp_path / "long", {"context_length": 16384}),
                 "context_length=16384 is 32 x the base's 512 positions; start the engine "
                 "with --long-lora-scaling-factors including 32"),
        "new_emb": (new_emb, "has 3 extra embeddings (tokens added past the base vocabulary "
                             "of 512), but lora_extra_vocab_size=2; restart with "
                             "--lora-extra-vocab-size 3"),
        "added": (_variant(src, tmp_path / "added", files={"added_tokens.json": added([512, 513])}),
                  "its tokenizer adds 2 token(s) past the base vocabulary of 512"),
    }
    for name, (path, reason) in refused.items():
        req = LoRARequest(name, 1, str(path))
        for check, args in ((check_adapter_config, ()), (load_adapter, (torch.float32,))):
            with pytest.raises(LoRAError) as e:
                check(req, targets(2), 16, *args)
            assert reason in str(e.value) and name in str(e.value)
    assert check_adapter_config(LoRARequest("n", 1, str(new_emb)), targets(3), 16) == 3
    # ids inside the base vocabulary (Llama 3's special tokens, say) are not extra
    ok = _variant(src, tmp_path / "in_vocab", files={"added_tokens.json": added([3, 511])})
    assert check_adapter_config(LoRARequest("in_vocab", 1, str(ok)), targets(0), 16) == 0
    assert load_adapter(LoRARequest("in_vocab", 1, str(ok)), targets(0), 16,
                        torch.float32).modules


def _serving(engine_args):
    from loraplex.entrypoints.serving_completion import OpenAIServingCompletion

    engine = AsyncLLMEngine.from_engine_args(engine_args)
    models = OpenAIServingModels(engine, ["tiny"], 64, lora_enabled=True)
    return engine, models, OpenAIServingCompletion(engine, models, engine.get_tokenizer())


async def _registered(engine: AsyncLLMEngine) -> set[int]:
    """Every id the engine holds, including removals deferred for requests in flight."""
    return await engine.run(lambda: set(engine.engine.lora_manager.registered))


def test_a_request_racing_an_unload_or_reload_never_revives_the_old_adapter(
        engine_args, tiny_adapters):
    """The request looked the name up just before the unload / in-place reload and reaches
    the engine just after: it must not register the old id again (it did: a stale copy of
    the engine's ids sent it back through add_lora, and the old weights stayed forever)."""
    from loraplex.entrypoints.protocol import CompletionRequest

    ad = tiny_adapters["llama"]

    async def main():
        engine, models, serving = _serving(engine_args)
        await models.load_lora_adapter("dyn", str(ad["r4_qv"]))
        stale = await models.resolve("dyn")
        await models.unload_lora_adapter("dyn")
        with pytest.raises(NotFoundError):
            await serving.start_requests("r1", [(None, [1, 43, 76])], [GREEDY], "dyn", stale)
        assert await _registered(engine) == set()

        await models.load_lora_adapter("dyn", str(ad["r4_qv"]))
        stale = await models.resolve("dyn")
        await models.load_lora_adapter("dyn", str(ad["r8_all"]), load_inplace=True)
        new = models.lora_requests["dyn"]
        queued = await serving.start_requests("r2", [(None, [1, 43, 76])], [GREEDY], "dyn",
                                              stale)
        outs = [o async for o in queued.streams[0]]
        want = await _final(engine, "ref", new)
        assert outs[-1].outputs[0].token_ids == want.outputs[0].token_ids  # the new weights
        assert await _registered(engine) == {new.lora_int_id}

        # and under load: multi-prompt requests (several engine adds each) while the name
        # is reloaded, unloaded and loaded again; every request succeeds or is a 404
        async def client(i):
            req = CompletionRequest(model="dyn", prompt=[[1, 43, 76], [5, 6], [7, 8, 9]],
                                    max_tokens=3, temperature=0)
            try:
                r = await serving.create_completion(req)
            except NotFoundError:
                return "gone"
            assert len(r.choices) == 3
            return "ok"

        async def churn():
            for k in range(6):
                path = str(ad["r8_all"] if k % 2 else ad["r4_qv"])
                await models.load_lora_adapter("dyn", path, load_inplace=True)
                await asyncio.sleep(0)
                await models.unload_lora_adapter("dyn")
                await models.load_lora_adapter("dyn", path)
        results = await asyncio.gather(churn(), *(client(i) for i in range(16)))
        assert set(results[1:]) <= {"ok", "gone"}  # how many of each depends on timing
        assert await client(16) == "ok"  # the name is loaded again at the end
        listed = {r.lora_int_id for r in models.lora_requests.values()}
        assert await engine.list_loras() == listed == await _registered(engine)
        await engine.shutdown()
    asyncio.run(main())


def test_lora_requests_info_names_running_and_waiting_adapters(engine_args, tiny_adapters):
    """The gauge the Gateway API Inference Extension routes on, from real engine steps:
    at most max_loras=2 adapters run, the others wait, names comma-joined."""
    from prometheus_client.parser import text_string_to_metric_families

    from loraplex.engine.llm_engine import LLMEngine
    from loraplex.metrics import Metrics

    engine, metrics = LLMEngine.from_engine_args(engine_args), Metrics()
    ad = tiny_adapters["llama"]
    for i, name in enumerate(["r4_qv", "r8_all", "r16_rslora"], 1):
        engine.add_request(f"r{i}", [1, 43, 76], GREEDY, LoRARequest(name, i, str(ad[name])))
    engine.add_request("base", [1, 43, 76], GREEDY)

    def info():
        metrics.update_engine(engine.get_stats())
        fams = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
        (sample,) = fams["loraplex:lora_requests_info"].samples
        assert sample.value > 0  # the time of the update, as vLLM's
        return sample.labels
    engine.step()  # adapters' weights load on other threads; step until some are in
    labels = info()
    deadline = time.monotonic() + 60
    while not labels["running_lora_adapters"] and time.monotonic() < deadline:
        time.sleep(0.01)
        engine.step()
        labels = info()
    running = labels["running_lora_adapters"].split(",")
    waiting = [n for n in labels["waiting_lora_adapters"].split(",") if n]
    assert 1 <= len(running) <= 2 and labels["max_lora"] == "2"  # never past max_loras
    assert sorted(running + waiting) == ["r16_rslora", "r4_qv", "r8_all"], labels
    assert running == sorted(running) and waiting == sorted(waiting)  # comma-joined names
    while engine.has_unfinished_requests():
        engine.step()
    assert info() == {"running_lora_adapters": "", "waiting_lora_adapters": "",
                      "max_lora": "2"}


def test_hf_hub_resolver_serves_a_sub_folder(tmp_path, tiny_adapters, monkeypatch):
    """org/repo/sub from an allowed repo (here an offline hub cache); other repos, missing
    sub-folders and '..' are misses."""
    import huggingface_hub.constants as hub

    from loraplex.lora.resolvers import HfHubResolver

    revision = "0" * 40
    repo = tmp_path / "models--org--loras"
    shutil.copytree(tiny_adapters["llama"]["r4_qv"], repo / "snapshots" / revision / "sql")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    resolver = HfHubResolver(["org/loras"])

    async def main():
        hit = await resolver.resolve_lora("base", "org/loras/sql")
        assert hit.lora_name == "org/loras/sql"
        assert hit.lora_path == str(repo / "snapshots" / revision / "sql")
        for miss in ("org/loras/nope", "org/other/sql", "org/loras/../loras/sql"):
            assert await resolver.resolve_lora("base", miss) is None, miss
    asyncio.run(main())


def test_adapter_files_are_read_off_the_engine_thread(engine_args, tiny_adapters,
                                                      monkeypatch, registry):
    """Runtime loads, resolver loads and first use all read and validate the adapter on
    an adapter-loader thread: the step loop never waits for a disk, and the torch ops of
    a read run single-threaded, not in an OpenMP team beside the step loop's
    (worker/cpu_threads.py)."""
    import threading

    from loraplex.lora.resolvers import FilesystemResolver

    ad = tiny_adapters["llama"]
    monkeypatch.setenv("LORAPLEX_ALLOW_RUNTIME_LORA_UPDATING", "True")
    registry.register_resolver("fs", FilesystemResolver(str(ad["r4_qv"].parent)))

    async def main():
        engine = AsyncLLMEngine.from_engine_args(engine_args)
        models = OpenAIServingModels(engine, ["tiny"], 64, lora_enabled=True)
        engine_thread = await engine.run(threading.get_ident)
        readers = []
        real = engine.engine.prepare_lora

        def prepare(req):
            readers.append((threading.get_ident(), threading.current_thread().name))
            return real(req)
        monkeypatch.setattr(engine.engine, "prepare_lora", prepare)
        await models.load_lora_adapter("a", str(ad["r8_all"]))
        await models.resolve("r16_rslora")
        await _final(engine, "x", LoRARequest("direct", 99, str(ad["r4_qv"])))
        assert len(readers) == 3 and engine_thread not in {ident for ident, _ in readers}
        assert all(name.startswith("loraplex-lora") for _, name in readers), readers
        await engine.shutdown()
    asyncio.run(main())


def _series(metrics) -> dict[str, set[str]]:
    """metric family -> the model_name labels it has series for"""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(metrics.render().decode()):
        if fam.name.endswith("_created"):  # prometheus_client's, unless disabled (the server)
            continue
        for s in fam.samples:
            if "model_name" in s.labels:
                out.setdefault(fam.name, set()).add(s.labels["model_name"])
    return out


@pytest.mark.parametrize("per_adapter", [False, True])
def test_latency_metrics_labels_and_unloaded_adapters(per_adapter):
    """Counters are per model a request named; latency histograms per served model unless
    per_adapter_latency; an unloaded adapter's series go (thousands of adapters must not
    leave thousands of histograms behind)."""
    from loraplex.metrics import Metrics

    metrics = Metrics("base", per_adapter_latency=per_adapter)
    for model in ("base", "a1", "a2"):
        metrics.observe_token(model, 0.1, first=True)
        metrics.observe_token(model, 0.01, first=False)
        metrics.observe_finished(model, "length", 5, 2, 0.2)
    metrics.observe_finished("a1", "abort", 5, 0, 0.05)
    latency = {"base", "a1", "a2"} if per_adapter else {"base"}
    series = _series(metrics)
    for fam in ("loraplex:request_success", "loraplex:prompt_tokens",
                "loraplex:generation_tokens"):
        assert series[fam] == {"base", "a1", "a2"}, fam
    for fam in ("loraplex:time_to_first_token_seconds", "loraplex:time_per_output_token_seconds",
                "loraplex:e2e_request_latency_seconds"):
        assert series[fam] == latency, fam

    metrics.forget_model("a1")
    metrics.forget_model("never-seen")  # nothing to drop: no error
    series = _series(metrics)
    assert all("a1" not in models for models in series.values()), series
    assert series["loraplex:request_success"] == {"base", "a2"}
    assert series["loraplex:e2e_request_latency_seconds"] == latency - {"a1"}


def test_unknown_model_404_names_a_bounded_list(engine_args, tiny_adapters):
    """With more adapters than the message lists, a 404 names the first ones and says how
    many more there are, instead of every name a server with thousands would hold."""
    from loraplex.entrypoints.serving_models import NAMES_IN_NOT_FOUND

    path = str(tiny_adapters["llama"]["r4_qv"])

    async def main():
        engine, models, _ = _serving(engine_args)
        await models.load_lora_adapter("a0", path)
        with pytest.raises(NotFoundError) as few:
            await models.resolve("typo")
        assert str(few.value).endswith("Available models: tiny, a0"), str(few.value)
        for i in range(1, NAMES_IN_NOT_FOUND + 5):
            await models.load_lora_adapter(f"a{i}", path)
        with pytest.raises(NotFoundError) as many:
            await models.resolve("typo")
        message = str(many.value)
        # "tiny" and a0..a18 are listed; a19..a24 are not
        assert f"a{NAMES_IN_NOT_FOUND - 3}, a{NAMES_IN_NOT_FOUND - 2} and 6 more" in message
        assert f"a{NAMES_IN_NOT_FOUND - 1}" not in message
        await engine.shutdown()
    asyncio.run(main())


@pytest.mark.parametrize("reload", [False, True], ids=["unload", "unload_then_reload"])
def test_an_unloaded_adapters_metrics_go_with_its_last_request(engine_args, tiny_adapters,
                                                               reload):
    """Unloaded while a request for it is in flight: the series are dropped when that
    request finishes (dropping them at once let the finishing request bring them back for
    good); loaded again meanwhile, they stay."""
    import threading

    from loraplex.metrics import Metrics

    path = str(tiny_adapters["llama"]["r4_qv"])

    async def main():
        metrics = Metrics("tiny", per_adapter_latency=True)
        engine = AsyncLLMEngine.from_engine_args(engine_args, metrics=metrics)
        models = OpenAIServingModels(engine, ["tiny"], 64, lora_enabled=True)
        await models.load_lora_adapter("dyn", path)
        if reload:  # steps do nothing until the reload's weights are read; then its
            # registration is queued on the engine thread before the request can finish
            # (else the request may finish first, and drop the series). A step that does
            # nothing leaves the engine thread to the reload's jobs.
            read = threading.Event()
            prepare, step = engine.prepare_lora, engine.engine.step

            async def prepare_then_signal(req):
                out = await prepare(req)
                read.set()
                return out

            def step_once_read():
                if read.is_set():
                    return step()
                time.sleep(0.001)
                return []
            engine.prepare_lora, engine.engine.step = prepare_then_signal, step_once_read
        # hold the engine thread, so the request is queued, then the unload (and the
        # reload), in that order, before any step can finish the request
        gate = threading.Event()
        held = asyncio.ensure_future(engine.run(gate.wait))
        await asyncio.sleep(0.05)
        add = asyncio.ensure_future(engine.add_request(
            "r1", {"prompt_token_ids": [1, 43, 76]}, GREEDY, models.lora_requests["dyn"]))
        await asyncio.sleep(0.05)
        changes = [models.unload_lora_adapter("dyn")]
        if reload:
            changes.append(models.load_lora_adapter("dyn", path))
        change = asyncio.ensure_future(asyncio.gather(*changes))
        await asyncio.sleep(0.05)
        gate.set()
        stream = await add
        await asyncio.gather(held, change)
        outs = [o async for o in stream]
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 6
        served = {fam: models for fam, models in _series(metrics).items() if "dyn" in models}
        if reload:
            assert set(served) == {
                "loraplex:request_success", "loraplex:prompt_tokens",
                "loraplex:generation_tokens", "loraplex:time_to_first_token_seconds",
                "loraplex:time_per_output_token_seconds",
                "loraplex:e2e_request_latency_seconds"}, served
        else:
            assert not served, served
        await engine.shutdown()
    asyncio.run(main())


def test_a_metrics_failure_never_stops_the_loop(engine_args, caplog):
    """Metrics bookkeeping runs in the loop that dispatches every output: if it raises,
    the requests still finish, later ones run, and the failure is logged."""
    from loraplex.metrics import Metrics

    class BrokenMetrics(Metrics):
        def observe_finished(self, *args) -> None:
            raise RuntimeError("broken exporter")

    async def main():
        engine = AsyncLLMEngine.from_engine_args(engine_args, metrics=BrokenMetrics("tiny"))
        first = await asyncio.wait_for(_final(engine, "r1"), 60)  # a dead loop: a hang
        second = await asyncio.wait_for(_final(engine, "r2"), 60)
        assert first.finished and second.finished and engine.is_running
        assert first.outputs[0].token_ids == second.outputs[0].token_ids
        await engine.shutdown()
    asyncio.run(main())
    assert "metrics bookkeeping failed (observe_finished)" in caplog.text
