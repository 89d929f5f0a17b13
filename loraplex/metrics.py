"""Prometheus metrics of the server, named like vLLM's (``vllm:`` -> ``loraplex:``).

Each server owns a CollectorRegistry (two apps in one process never collide).
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
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0)


class Metrics:
    def __init__(self) -> None:
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
        self.lora_info = Gauge("loraplex:lora_requests_info", "Running stats on LoRA requests.",
                               ["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
                               registry=r)
        self.http_errors = Counter("loraplex:http_errors", "Error responses by status code.",
                                   ["status_code"], registry=r)
        self._lora_key: tuple[str, str, str] | None = None

    def update_engine(self, stats) -> None:
        """Copy an EngineStats snapshot into the gauges."""
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        if stats.num_total_blocks:
            self.kv_usage.set(1.0 - stats.num_free_blocks / stats.num_total_blocks)
        self.preemptions.set(getattr(stats, "num_preemptions", 0))
        key = (",".join(stats.running_lora_names), ",".join(stats.waiting_lora_names),
               str(stats.max_loras))
        if key != self._lora_key:  # one live series, like a fresh vLLM label set
            self.lora_info.clear()
            self._lora_key = key
        self.lora_info.labels(*key).set_to_current_time()

    def render(self) -> bytes:
        return generate_latest(self.registry)
