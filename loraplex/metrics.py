"""Prometheus metrics of the server, named like vLLM's (``vllm:`` -> ``loraplex:``).

Each server owns a CollectorRegistry (two apps in one process never collide).
Request and token counters are labelled with the model a request named (an adapter or
the base): one series each per adapter, for per-tenant accounting. The latency
histograms are labelled with the served model name for every request, as in vLLM:
per adapter they would be ~60 series each, and a server with thousands of adapters
would render megabytes per scrape (``benchmarks/metrics_scrape.py``). Opt in with
``per_adapter_latency`` (``--per-adapter-latency-metrics``). An unloaded adapter's
series are dropped (``forget_model``) once its last request in flight is done
(``AsyncLLMEngine.forget_model_metrics``), so the set stays that of the served ones.
``loraplex:lora_requests_info`` has the labels the Gateway API Inference Extension
routes on, exactly as ``vllm:lora_requests_info``: its single series carries the
adapters of the running and waiting queues and ``max_lora``; its value is the time set.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_LOAD_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0)


FINISH_REASONS = ("stop", "length", "abort", "error")


class Metrics:
    def __init__(self, served_model_name: str = "", per_adapter_latency: bool = False) -> None:
        self.served_model_name = served_model_name
        self.per_adapter_latency = per_adapter_latency
        self.registry = r = CollectorRegistry()
        m = ["model_name"]
        self.requests = Counter("loraplex:request_success", "Finished requests by model "
                                "and finish reason (stop, length, abort, error).",
                                m + ["finished_reason"], registry=r)
        self.prompt_tokens = Counter("loraplex:prompt_tokens", "Prompt tokens processed.",
                                     m, registry=r)
        self.generation_tokens = Counter("loraplex:generation_tokens",
                                         "Generated tokens.", m, registry=r)
        self.ttft = Histogram("loraplex:time_to_first_token_seconds",
                              "Time from arrival to the first generated token.", m,
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("loraplex:time_per_output_token_seconds",
                             "Inter-token latency after the first token.", m,
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("loraplex:e2e_request_latency_seconds",
                             "Time from arrival to the last token.", m,
                             buckets=_E2E_BUCKETS, registry=r)
        self.running = Gauge("loraplex:num_requests_running",
                             "Sequences in the running batch.", registry=r)
        self.waiting = Gauge("loraplex:num_requests_waiting",
                             "Sequences waiting to be scheduled.", registry=r)
        self.kv_usage = Gauge("loraplex:kv_cache_usage_perc",
                              "Fraction of KV cache blocks in use.", registry=r)
        self.preemptions = Gauge("loraplex:num_preemptions",
                                 "Preemptions since start.", registry=r)
        self.prefix_queries = Counter("loraplex:prefix_cache_queries", "Prompt tokens looked "
                                      "up in the prefix cache.", registry=r)
        self.prefix_hits = Counter("loraplex:prefix_cache_hits", "Prompt tokens found in the "
                                   "prefix cache (their K/V were not computed again).",
                                   registry=r)
        self._prefix_counts = (0, 0)
        self.lora_info = Gauge("loraplex:lora_requests_info", "Running stats on LoRA requests.",
                               ["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
                               registry=r)
        # adapter tiers (issue: thousands of adapters): where activations found their
        # weights, how long reads took, how many adapters sit in each tier
        self.lora_cache_hits = Counter(
            "loraplex:lora_cache_hits", "Adapter activations served by a tier: device (already "
            "in a slot) or host (copied from host memory).", ["tier"], registry=r)
        self.lora_cache_misses = Counter(
            "loraplex:lora_cache_misses", "Adapter activations a tier could not serve: device "
            "(not in a slot) or host (read from disk/hub first).", ["tier"], registry=r)
        self.lora_load_failures = Counter("loraplex:lora_load_failures",
                                          "Adapter reads that failed.", registry=r)
        self.lora_load_seconds = Histogram(
            "loraplex:lora_load_seconds", "Time to read and validate one adapter (off the step "
            "loop).", buckets=_LOAD_BUCKETS, registry=r)
        self.lora_resident = Gauge(
            "loraplex:lora_adapters", "Adapters per tier: registered, host, device, loading.",
            ["tier"], registry=r)
        self._lora_counts = {"device_hit": 0, "host_hit": 0, "host_miss": 0, "failures": 0}
        # speculative decoding (vLLM's spec_decode counters; only with speculative_config)
        self.spec_drafts = Counter("loraplex:spec_decode_num_drafts", "Verification "
                                   "segments with drafts (one per sequence and step).",
                                   registry=r)
        self.spec_draft_tokens = Counter("loraplex:spec_decode_num_draft_tokens",
                                         "Draft tokens proposed.", registry=r)
        self.spec_accepted_tokens = Counter("loraplex:spec_decode_num_accepted_tokens",
                                            "Draft tokens accepted.", registry=r)
        self.spec_accepted_per_pos = Counter(
            "loraplex:spec_decode_num_accepted_tokens_per_pos", "Draft tokens accepted, by "
            "their position in the draft (0 = the first).", ["position"], registry=r)
        self._spec_counts = (0, 0, 0)
        self._spec_per_pos: list[int] = []
        self.http_errors = Counter("loraplex:http_errors", "Error responses by status code.",
                                   ["status_code"], registry=r)
        self._lora_key: tuple[str, str, str] | None = None

    # ---- requests -------------------------------------------------------------------
    def _latency_label(self, model_name: str) -> str:
        return model_name if self.per_adapter_latency else self.served_model_name

    def observe_token(self, model_name: str, seconds: float, first: bool) -> None:
        """A request got new tokens ``seconds`` after its arrival (first) or its last ones."""
        hist = self.ttft if first else self.itl
        hist.labels(self._latency_label(model_name)).observe(seconds)

    def observe_finished(self, model_name: str, reason: str, prompt_tokens: int,
                         generation_tokens: int, seconds: float) -> None:
        self.requests.labels(model_name, reason).inc()
        self.prompt_tokens.labels(model_name).inc(prompt_tokens)
        self.generation_tokens.labels(model_name).inc(generation_tokens)
        self.e2e.labels(self._latency_label(model_name)).observe(seconds)

    def forget_model(self, model_name: str) -> None:
        """Drop the series of an adapter that was unloaded (and has no request left)."""
        for reason in FINISH_REASONS:
            self.requests.remove(model_name, reason)
        self.prompt_tokens.remove(model_name)
        self.generation_tokens.remove(model_name)
        if self.per_adapter_latency and model_name != self.served_model_name:
            for hist in (self.ttft, self.itl, self.e2e):
                hist.remove(model_name)

    def update_engine(self, stats) -> None:
        """Copy an EngineStats snapshot into the gauges."""
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        if stats.num_total_blocks:
            self.kv_usage.set(1.0 - stats.num_free_blocks / stats.num_total_blocks)
        self.preemptions.set(getattr(stats, "num_preemptions", 0))
        counts = (stats.prefix_cache_queries, stats.prefix_cache_hits)
        self.prefix_queries.inc(counts[0] - self._prefix_counts[0])
        self.prefix_hits.inc(counts[1] - self._prefix_counts[1])
        self._prefix_counts = counts
        key = (",".join(stats.running_lora_names), ",".join(stats.waiting_lora_names),
               str(stats.max_loras))
        # one live series, like a fresh vLLM label set; the old one goes only after the
        # new one is in, so a scrape on another thread never finds none
        self.lora_info.labels(*key).set_to_current_time()
        if key != self._lora_key:
            if self._lora_key is not None:
                self.lora_info.remove(*self._lora_key)
            self._lora_key = key
        self._update_lora_tiers(stats)
        self._update_spec_decode(getattr(stats, "spec_decode", None))

    def _update_spec_decode(self, spec) -> None:
        if spec is None:
            return
        counts = (spec.num_drafts, spec.num_draft_tokens, spec.num_accepted_tokens)
        for counter, new, old in zip((self.spec_drafts, self.spec_draft_tokens,
                                      self.spec_accepted_tokens), counts, self._spec_counts):
            counter.inc(new - old)
        self._spec_counts = counts
        for pos, n in enumerate(spec.accepted_per_position):
            old = self._spec_per_pos[pos] if pos < len(self._spec_per_pos) else 0
            self.spec_accepted_per_pos.labels(str(pos)).inc(n - old)
        self._spec_per_pos = list(spec.accepted_per_position)

    def _update_lora_tiers(self, stats) -> None:
        cache = getattr(stats, "lora_cache", None)
        if cache is None:
            return
        counts = {"device_hit": cache.slot_hits, "host_hit": cache.host_hits,
                  "host_miss": cache.host_misses, "failures": cache.load_failures}
        delta = {k: v - self._lora_counts[k] for k, v in counts.items()}
        self._lora_counts = counts
        self.lora_cache_hits.labels("device").inc(delta["device_hit"])
        self.lora_cache_misses.labels("device").inc(delta["host_hit"] + delta["host_miss"])
        self.lora_cache_hits.labels("host").inc(delta["host_hit"])
        self.lora_cache_misses.labels("host").inc(delta["host_miss"])
        self.lora_load_failures.inc(delta["failures"])
        for seconds in stats.lora_load_seconds:
            self.lora_load_seconds.observe(seconds)
        for tier, n in (("registered", stats.num_registered_loras),
                        ("host", stats.num_host_loras), ("device", stats.num_slot_loras),
                        ("loading", stats.num_loading_loras)):
            self.lora_resident.labels(tier).set(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)
