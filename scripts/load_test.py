"""Load test of `python -m kvjax.serve`: N concurrent clients send M requests each, at Poisson
arrival times, through the official openai client (streaming), once per compression variant.

    python scripts/load_test.py --clients 32 --requests-per-client 4 --req-per-sec 8 \\
        --variants none,ccm:5,snapkv:0.5 --json load.json --png load.png
    python scripts/load_test.py --url http://127.0.0.1:8000 --model kvjax-default     # a running server

Without --url it starts the server itself on a free loopback port, in its own process (`--serve`
holds its flags, e.g. --serve "--demo llama --max-num-seqs 8"), and stops it with SIGINT at the
end (its graceful shutdown). Each variant sends the same prompts (spans of the held-out text) with
its own `kv_compression`, after an untimed warm-up of one request per client. Reported per
variant: requests completed, errors by HTTP status, lost (neither an answer nor an error: must be
0), output tokens/s, TTFT and TPOT p50 / p99 (client side, from the streamed chunks), KV pages in
use (peak and mean of /metrics, polled every 0.1 s) and the KV bytes compression saved. The run
is bounded: each variant stops waiting after --timeout-s, and what has not finished counts as lost.
"""

import argparse
import asyncio
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

from bench_common import environment, pyplot, save, write_outputs  # makes a checkout importable

import httpx
import numpy as np
import openai

from kvjax import defaults


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running server (default: start one with --serve's flags)")
    p.add_argument("--serve", default="", help="flags for python -m kvjax.serve when the script starts it")
    p.add_argument("--model", help="model id to request (default: the server's only model)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--req-per-sec", type=float, default=8.0, help="Poisson arrival rate over all clients")
    p.add_argument("--prompt-words", type=int, default=120, help="words of held-out text per prompt")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--variants", default="none,ccm,snapkv:0.5",
                   help="comma list: none, ccm or ccm:CF, or a press NAME:RATIO")
    p.add_argument("--timeout-s", type=float, default=600.0, help="per variant")
    p.add_argument("--startup-s", type=float, default=600.0, help="how long to wait for a started server")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    p.add_argument("--png")
    args = p.parse_args(argv)
    if args.clients < 1 or args.requests_per_client < 1 or args.req_per_sec < 0:
        p.error("--clients and --requests-per-client must be >= 1 and --req-per-sec >= 0")
    return args


def compression(variant: str) -> dict:
    """'none' | 'ccm' | 'ccm:5' | 'snapkv:0.5' -> the request's kv_compression."""
    name, _, value = variant.partition(":")
    if name == "none":
        return {"method": "none"}
    if name == "ccm":
        return {"method": "ccm", **({"compression_factor": int(value)} if value else {})}
    return {"method": name, **({"ratio": float(value)} if value else {})}


def prompts(count: int, words: int, seed: int) -> list[str]:
    text = defaults.HELD_OUT_TEXT.read_text().split()
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(text) - words, count)
    return ["Continue this passage: " + " ".join(text[s:s + words]) for s in starts]


class Server:
    """`python -m kvjax.serve` in a child process on a free loopback port."""

    def __init__(self, flags: str, startup_s: float):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen([sys.executable, "-m", "kvjax.serve", *shlex.split(flags), "--port", str(port),
                                         "--log-level", "warning"])
        deadline = time.monotonic() + startup_s
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"error: the server exited with code {self.process.returncode} (see above)")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"error: the server did not answer /health within {startup_s} s")
            time.sleep(0.5)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


async def poll_pages(url: str, samples: list, stop: asyncio.Event):
    async with httpx.AsyncClient() as http:
        while not stop.is_set():
            samples.append(metric((await http.get(f"{url}/metrics")).text, "kvjax_kv_pages_used"))
            await asyncio.sleep(0.1)


async def one_request(client, model, prompt, args, kv, start_at, t0, semaphore):
    """Send one streaming chat request at its arrival time; its timings, or its error."""
    await asyncio.sleep(max(0.0, t0 + start_at - time.perf_counter()))
    async with semaphore:  # one of --clients connections
        sent, first, last, usage, reason = time.perf_counter(), None, None, None, None
        try:
            stream = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}], max_tokens=args.max_tokens,
                temperature=0, stream=True, extra_body={"kv_compression": kv})
            async for chunk in stream:
                now = time.perf_counter()
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or now
                    last = now
                if chunk.choices and chunk.choices[0].finish_reason:
                    reason = chunk.choices[0].finish_reason
                if chunk.usage is not None:
                    usage = chunk.usage
        except openai.APIStatusError as e:
            return {"error": e.status_code}
        except openai.APIError as e:
            return {"error": type(e).__name__}
        if reason is None or usage is None:
            return {"lost": True}
        n = usage.completion_tokens
        return {"ttft": (first or time.perf_counter()) - sent, "tokens": n, "finish_reason": reason,
                "tpot": (last - first) / (n - 1) if first and n > 1 else None, "done": time.perf_counter()}


async def run_variant(url, model, texts, arrivals, args, variant):
    kv = compression(variant)
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=args.timeout_s)
    semaphore = asyncio.Semaphore(args.clients)
    warm = [one_request(client, model, t, args, kv, 0.0, time.perf_counter(), semaphore) for t in texts[:args.clients]]
    warmup = await asyncio.gather(*warm)  # untimed: compiles the batch shapes
    if any("error" in r for r in warmup):
        raise SystemExit(f"error: variant {variant}: the warm-up requests failed: {warmup[0]}")
    async with httpx.AsyncClient() as http:
        saved_before = metric((await http.get(f"{url}/metrics")).text, "kvjax_kv_bytes_saved_total")
    samples, stop = [], asyncio.Event()
    poller = asyncio.create_task(poll_pages(url, samples, stop))
    t0 = time.perf_counter()
    tasks = [asyncio.create_task(one_request(client, model, t, args, kv, a, t0, semaphore))
             for t, a in zip(texts, arrivals)]
    done, pending = await asyncio.wait(tasks, timeout=args.timeout_s)
    for task in pending:
        task.cancel()
    stop.set()
    await poller
    results = [t.result() for t in done]
    await client.close()
    async with httpx.AsyncClient() as http:
        saved = metric((await http.get(f"{url}/metrics")).text, "kvjax_kv_bytes_saved_total") - saved_before
    ok = [r for r in results if "ttft" in r]
    errors: dict = {}
    for r in results:
        if "error" in r:
            errors[str(r["error"])] = errors.get(str(r["error"]), 0) + 1
    duration = max((r["done"] for r in ok), default=t0) - t0
    pct = lambda xs, q: float(np.percentile(xs, q)) * 1e3 if xs else None  # noqa: E731
    ttft, tpot = [r["ttft"] for r in ok], [r["tpot"] for r in ok if r["tpot"] is not None]
    return {"kv_compression": kv, "requests": len(texts), "completed": len(ok), "errors": errors,
            "lost": len(texts) - len(ok) - sum(errors.values()),
            "output_tokens_per_s": sum(r["tokens"] for r in ok) / duration if duration > 0 else None,
            "duration_s": duration, "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "tpot_p50_ms": pct(tpot, 50), "tpot_p99_ms": pct(tpot, 99),
            "kv_pages_peak": max(samples, default=0.0), "kv_pages_mean": float(np.mean(samples)) if samples else 0.0,
            "kv_bytes_saved": saved,
            "finish_reasons": {k: sum(r["finish_reason"] == k for r in ok) for k in {r["finish_reason"] for r in ok}}}


def run(args, argv) -> dict:
    server = None if args.url else Server(args.serve, args.startup_s)
    url = args.url or server.url
    try:
        info = httpx.get(f"{url}/v1/models").json()["data"]
        model = args.model or info[0]["id"]
        num = args.clients * args.requests_per_client
        texts = prompts(num, args.prompt_words, args.seed)
        rng = np.random.default_rng(args.seed + 1)
        arrivals = np.cumsum(rng.exponential(1 / args.req_per_sec, num)) if args.req_per_sec > 0 else np.zeros(num)
        report = {"settings": {k: v for k, v in vars(args).items() if k not in ("json", "png")}, "model": model,
                  "max_model_len": info[0].get("max_model_len"), "environment": environment(argv), "variants": {}}
        pages = metric(httpx.get(f"{url}/metrics").text, "kvjax_kv_pages_total")
        report["kv_pages_total"] = pages
        for variant in args.variants.split(","):
            result = asyncio.run(run_variant(url, model, texts, arrivals.tolist(), args, variant))
            report["variants"][variant] = result
            print(summary_line(variant, result), file=sys.stderr)
    finally:
        if server is not None:
            report_code = server.stop()
            print(f"server stopped (exit code {report_code})", file=sys.stderr)
    return report


def summary_line(variant, r) -> str:
    fmt = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
    return (f"{variant:>14}: {r['completed']}/{r['requests']} ok, errors {r['errors'] or 0}, lost {r['lost']}, "
            f"{fmt(r['output_tokens_per_s'])} tok/s, TTFT p50/p99 {fmt(r['ttft_p50_ms'])}/{fmt(r['ttft_p99_ms'])} ms, "
            f"TPOT p50/p99 {fmt(r['tpot_p50_ms'])}/{fmt(r['tpot_p99_ms'])} ms, KV pages peak "
            f"{r['kv_pages_peak']:.0f} (mean {r['kv_pages_mean']:.1f})")


def plot(report, path) -> None:
    plt = pyplot()
    if plt is None:
        return
    names = list(report["variants"])
    rows = [report["variants"][n] for n in names]
    panels = [("output tokens/s", "output_tokens_per_s"), ("TTFT p50 / p99 (ms)", ("ttft_p50_ms", "ttft_p99_ms")),
              ("TPOT p50 / p99 (ms)", ("tpot_p50_ms", "tpot_p99_ms")), ("KV pages in use: peak", "kv_pages_peak")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5))
    x = np.arange(len(names))
    for ax, (title, keys) in zip(axes, panels):
        keys = keys if isinstance(keys, tuple) else (keys,)
        width = 0.8 / len(keys)
        for i, key in enumerate(keys):
            ax.bar(x + i * width, [r[key] or 0 for r in rows], width, label=key if len(keys) > 1 else None)
        ax.set_xticks(x + width * (len(keys) - 1) / 2, names, rotation=20)
        ax.set_title(title)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(f"kvjax serve load test: {report['model']}, {report['settings']['clients']} clients")
    save(fig, path)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    report = run(args, argv)
    write_outputs(report, args, plot)
    lost = sum(r["lost"] for r in report["variants"].values())
    if lost:
        print(f"error: {lost} requests got neither an answer nor an error", file=sys.stderr)
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
