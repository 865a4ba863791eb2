"""`GET /metrics`: the scheduler's counters and gauges as Prometheus text (exposition format 0.0.4)."""

from __future__ import annotations

MEDIA_TYPE = "text/plain; version=0.0.4"


def prometheus_text(scheduler) -> str:
    """Prometheus text exposition of `scheduler`'s metrics (runtime/scheduler.py `Metrics`)."""
    s, m = scheduler, scheduler.metrics
    lines = []

    def metric(name, kind, help_, samples):
        lines.append(f"# HELP kimi_jax_{name} {help_}")
        lines.append(f"# TYPE kimi_jax_{name} {kind}")
        for labels, value in samples:
            lines.append(f"kimi_jax_{name}{labels} {value}")

    metric("requests_total", "counter", "Finished generation requests by finish reason.",
           [(f'{{finish_reason="{k}"}}', v) for k, v in sorted(m.requests.items())] or [("", 0)])
    metric("prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", m.prompt_tokens)])
    metric("generation_tokens_total", "counter", "Tokens generated.", [("", m.generation_tokens)])
    metric("queue_depth", "gauge", "Requests waiting for a decode slot.", [("", s.queue_depth)])
    metric("active_slots", "gauge", "Decode slots in use.", [("", s.active)])
    metric("max_batch", "gauge", "Decode slots.", [("", s.max_batch)])
    metric("decode_calls_total", "counter", "Compiled decode calls.", [("", m.decode_calls)])
    metric("decode_steps_total", "counter", "Decode steps run.", [("", m.decode_steps)])
    metric("batch_occupancy_slot_steps_total", "counter",
           "Sum over decode steps of the slots in use (÷ decode_steps_total = mean occupancy).",
           [("", m.occupied_slot_steps)])
    metric("batch_occupancy_max", "gauge", "Most slots in use by one decode call.", [("", m.max_occupancy)])
    metric("prefill_calls_total", "counter", "Prefill calls.", [("", m.prefill_calls)])
    metric("compilations_total", "counter", "Model programs built since start (compiled, or loaded from the persistent "
           "compile cache): one per new shape bucket.", [("", s.compilations)])
    metric("warm_up_compilations", "gauge", "Of those, built before the server took requests: every program its "
           "configuration can call (runtime/programs.py).", [("", m.warm_up_compilations)])
    metric("warm_up_seconds", "gauge", "Seconds the model thread spent building them.",
           [("", round(m.warm_up_seconds, 3))])
    metric("prefill_tokens_total", "counter", "Tokens computed by prefill calls (chunks of long prompts included, "
           "prefix-cache hits not).", [("", m.prefill_tokens)])
    metric("busy_seconds_total", "counter", "Model-thread seconds in prefill and decode.",
           [("", round(m.busy_seconds, 6))])
    rate = m.generation_tokens / m.busy_seconds if m.busy_seconds else 0.0
    metric("tokens_per_second", "gauge", "Generated tokens per busy second, since start.", [("", round(rate, 3))])
    metric("last_decode_tokens_per_second", "gauge", "Tokens per second of the last decode call.",
           [("", round(m.last_tokens_per_s, 3))])
    metric("constrained_tokens_total", "counter", "Tokens sampled under a grammar's mask (structured outputs, "
           "forced tool calls).", [("", m.masked_tokens)])
    metric("grammar_mask_seconds_total", "counter", "Model-thread seconds computing grammar masks.",
           [("", round(m.mask_seconds, 6))])
    buckets = [(f'_bucket{{le="{edge}"}}', count)  # observe_ttft already counts cumulatively
               for edge, count in zip(m.TTFT_BUCKETS, m.ttft_buckets)]
    buckets.append(('_bucket{le="+Inf"}', m.ttft_count))
    metric("time_to_first_token_seconds", "histogram", "Seconds from submission to the first token.",
           buckets + [("_sum", round(m.ttft_sum, 6)), ("_count", m.ttft_count)])
    pages = s.pages
    metric("kv_pages_used", "gauge", "KV-cache pages held by running sequences.", [("", pages.used)])
    metric("kv_pages_free", "gauge", "KV-cache pages free or holding an unheld cached prefix (evictable).",
           [("", pages.available)])
    metric("kv_pages_cached", "gauge", "Of the free pages, those keeping a prefix for reuse.", [("", pages.cached)])
    metric("kv_pages", "gauge", "KV-cache pages in the pool.", [("", pages.num_pages)])
    metric("prefix_cache_queried_tokens_total", "counter", "Tokens of the sequences prefilled, looked up in the "
           "prefix cache.", [("", m.prefix_queried_tokens)])
    metric("prefix_cache_hit_tokens_total", "counter", "Of those, tokens found in cached pages (not prefilled again).",
           [("", m.prefix_hit_tokens)])
    hit_rate = m.prefix_hit_tokens / m.prefix_queried_tokens if m.prefix_queried_tokens else 0.0
    metric("prefix_cache_hit_rate", "gauge", "prefix_cache_hit_tokens_total ÷ prefix_cache_queried_tokens_total.",
           [("", round(hit_rate, 6))])
    metric("prefix_cache_evictions_total", "counter", "Cached prefix pages evicted to make room.",
           [("", pages.evictions)])
    metric("preemptions_total", "counter", "Running sequences preempted for lack of pages (and recomputed later).",
           [("", m.preemptions)])
    followers = s.lockstep.processes()
    if followers:  # a multi-host server: what each other process last reported (runtime/lockstep.py)
        metric("processes", "gauge", "Processes running the model (this one serves HTTP).",
               [("", s.lockstep.num_processes)])
        metric("process_iterations", "gauge", "Scheduler iterations each process has run.",
               [('{process="0"}', s.iterations)] + [(f'{{process="{p}"}}', step + 1)
                                                       for p, (step, _) in sorted(followers.items())])
        metric("lockstep_publish_seconds_total", "counter",
               "Seconds process 0 spent publishing each iteration's events to the other processes.",
               [("", round(s.lockstep.publish_seconds, 6))])
        metric("process_active_slots", "gauge", "Decode slots in use on each process (the same when in step).",
               [('{process="0"}', s.active)] + [(f'{{process="{p}"}}', active)
                                                    for p, (_, active) in sorted(followers.items())])
    return "\n".join(lines) + "\n"
