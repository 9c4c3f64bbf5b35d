"""The `edge-export` command line. Thin: each command parses, calls one library function, renders.

Errors the toolkit raises on purpose (EdgeError, QuantizationError) become one line on stderr and
exit code 2; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path

import click

from runtimes.capabilities import INT4_METHODS, KV_CACHE_NAMES, PALETTIZE

from . import __version__
from .cli_options import (GROUP_SIZE_CHOICE, QUANT_CHOICE, bench_protocol_options, export_options, options_from_cli,
                          target_help)
from .errors import EdgeError, missing_extra


def _user_errors() -> tuple[type[BaseException], ...]:
    from quantizers.errors import QuantizationError
    return (EdgeError, QuantizationError)


class EdgeGroup(click.Group):
    """Turns the toolkit's own errors, an option value out of its range, and a package that only an
    extra installs into one clear line and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.BadParameter as e:  # "Invalid value for '--top-p': 0.0 is not in the range 0<x<=1."
            click.echo(f"error: {e.format_message()}", err=True)
            ctx.exit(2)
        except ModuleNotFoundError as e:
            self._refuse(ctx, missing_extra(e) or e)
        except _user_errors() as e:
            self._refuse(ctx, e)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)

    @staticmethod
    def _refuse(ctx: click.Context, error: BaseException) -> None:
        if not isinstance(error, _user_errors()) or (ctx.obj and ctx.obj.get("debug")):
            raise error
        click.echo(f"error: {error}", err=True)
        ctx.exit(2)


@click.group(cls=EdgeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edge-export")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.option("--strict-config", is_flag=True,
              help="Refuse a config.json key edge-export does not know, instead of warning.")
@click.pass_context
def main(ctx: click.Context, debug: bool, strict_config: bool) -> None:
    """Quantize, export, verify and benchmark distilled reasoning models for edge devices."""
    ctx.obj = {"debug": debug}
    if strict_config:
        from runtimes.models import strict_config as strict
        ctx.with_resource(strict())
    # SIGTERM unwinds like Ctrl-C, so a half-written export removes its staging folder
    signal.signal(signal.SIGTERM, _terminate)
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _terminate(signum, frame):
    raise KeyboardInterrupt


def emit_json(data) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


@main.command()
@click.argument("checkpoint")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect(checkpoint: str, as_json: bool) -> None:
    """Describe a checkpoint: architecture, size, dims, KV cost, and export sizes per precision."""
    from .inspect import describe, render_description
    info = describe(checkpoint)
    emit_json(info) if as_json else click.echo(render_description(info))


@main.command()
@click.option("--preset", required=True, help="r1-distill-qwen-1.5b, r1-distill-llama-8b, ... (see `inspect`).")
@click.option("--scale", type=click.Choice(["tiny", "full"]), default="tiny", show_default=True)
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Folder to write.")
@click.option("--seed", default=0, show_default=True)
def fixture(preset: str, scale: str, out: str, seed: int) -> None:
    """Write a random-weight checkpoint of a preset in the real HF layout."""
    from .fixtures import write_fixture
    path = write_fixture(preset, scale, out, seed=seed)
    click.echo(f"wrote {preset} ({scale}) to {path}")


@main.command()
@click.option("-o", "--out", default="edge-quickstart", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the quickstart's artifacts and report.")
def quickstart(out: str) -> None:
    """The main job on the real SmolLM2-135M: inspect, then answer a question with the reference."""
    from .quickstart import run_quickstart
    run_quickstart(out, echo=click.echo)


@main.command(epilog=target_help())
@click.argument("checkpoint")
@export_options
def export(checkpoint, out, as_json, **flags):
    """Quantize CHECKPOINT, lower it to a target, verify it, and publish an artifact at OUT."""
    from .export import export as run_export
    options = options_from_cli(flags)
    manifest = run_export(checkpoint, out, options, progress=lambda s: None if as_json else click.echo(s, err=True))
    if as_json:
        emit_json({k: manifest[k] for k in ("target", "variant", "quantization", "verification", "files")
                   if k in manifest})
        return
    mb = sum(f["bytes"] for f in manifest["files"].values()) / 2**20
    line = (f"wrote {out}: {manifest['target']}/{manifest['variant']}, {options.quant} "
            f"{manifest['quantization']['method']}, {mb:,.1f} MiB")
    if "verification" in manifest:
        v = manifest["verification"]
        line += f"; kl_mean {v['kl_mean']:.4f}, top1_agreement {v['top1_agreement']:.3f}"
    click.echo(line)


@main.command(name="build-engine")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.option("--device", "device", help="The device profile it is built for (checks its precisions).")
@click.option("--workspace-gb", type=float, help="TensorRT's builder workspace limit.")
@click.option("--json", "as_json", is_flag=True)
def build_engine(artifact, device, workspace_gb, as_json):
    """Build the TensorRT engine of a --target tensorrt ARTIFACT, on the GPU that will run it.

    Uses TensorRT's Python API (JetPack on a Jetson; pip install tensorrt on a GPU host); the
    manifest records the GPU, the TensorRT version and each layer's precision. Without TensorRT,
    the manifest's engine.trtexec is the same build as a trtexec command line."""
    from .engine import build_engine as run_build
    engine = run_build(artifact, device=device, workspace_gb=workspace_gb,
                       progress=lambda s: None if as_json else click.echo(s, err=True))
    if as_json:
        emit_json(engine)
        return
    layers = engine["layers"]
    click.echo(f"built {artifact}/{engine['file']} for {engine['gpu']['name']} with TensorRT {engine['tensorrt']} in "
               f"{engine['build_seconds']} s; layers by precision: {layers['by_precision']}")
    if "warning" in layers:
        click.echo(f"warning: {layers['warning']}", err=True)


def _sampling_options(f):
    for option in reversed([
        click.option("--backend", help="Override the manifest's backend (e.g. reference)."),
        click.option("--provider", help="Execution provider: cpu, cuda, coreml, qnn, xnnpack, nnapi, ..."),
        click.option("--threads", type=click.IntRange(min=1), help="Intra-op threads."),
        click.option("--max-new-tokens", type=click.IntRange(min=1), default=512, show_default=True),
        click.option("--thinking-budget", type=click.IntRange(min=0),
                     help="Close </think> after this many thinking tokens."),
        click.option("--temperature", type=click.FloatRange(min=0),
                     help="Default: the model's (R1: 0.6). 0 = greedy."),
        click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True),
                     help="Default: the model's (R1: 0.95). Keep the most likely tokens up to this mass, 0 < p <= 1."),
        click.option("--seed", type=click.IntRange(min=0)),
        click.option("--stop", multiple=True, help="End the answer at this string (not returned; repeatable); "
                     "the thinking is never cut.")]):
        f = option(f)
    return f


@main.command()
@click.option("--json", "as_json", is_flag=True)
def targets(as_json):
    """List the targets an export can lower to, what each needs, and whether it runs here."""
    from .options import FLAGS
    from .targets import describe_targets
    rows = describe_targets()
    if as_json:
        emit_json(rows)
        return
    for r in rows:
        here = "runs here" if r["runs_here"] else f"cannot run here: {r['why_not']}"
        honours = ", ".join(FLAGS[o] for o in r["honours"]) or "no options of its own"
        click.echo(f"{r['target']}/{r['variant']}: {r['description']}\n    quant {', '.join(r['quant'])}; KV cache "
                   f"{', '.join(r['kv_cache'])}; honours {honours}; needs {r['needs']}; {here}")


@main.command()
@click.argument("artifact")
@click.argument("prompt")
@_sampling_options
@click.option("--hide-thinking", is_flag=True, help="Print only the answer.")
@click.option("--json", "as_json", is_flag=True)
def run(artifact, prompt, backend, provider, threads, max_new_tokens, thinking_budget, temperature, top_p, seed,
        stop, hide_thinking, as_json):
    """Answer PROMPT with ARTIFACT, streaming (thinking dimmed, answer plain)."""
    import runtimes
    rt = runtimes.load(artifact, backend=backend, provider=provider, threads=threads)
    result = runtimes.Result()
    sampling = dict(max_new_tokens=max_new_tokens, thinking_budget=thinking_budget, temperature=temperature,
                    top_p=top_p, seed=seed, stop=stop)
    for event in rt.stream(prompt, result=result, **sampling):
        if not as_json:
            _render(event, hide_thinking)
    if as_json:
        emit_json(result.to_dict())
        return
    click.echo()
    if result.finish_reason == "context":
        click.echo(f"(stopped: the context of {rt.max_context} tokens is full)", err=True)


def _render(event, hide_thinking: bool) -> None:
    if event.kind == "answer":
        click.echo(event.text, nl=False)
    elif not hide_thinking:
        click.echo(click.style(event.text, dim=True), nl=False)


@main.command()
@click.argument("artifact")
@_sampling_options
@click.option("--hide-thinking", is_flag=True)
def chat(artifact, backend, provider, threads, max_new_tokens, thinking_budget, temperature, top_p, seed,
         stop, hide_thinking):
    """Talk with ARTIFACT over several turns (Ctrl-D or /exit to leave)."""
    import runtimes
    rt = runtimes.load(artifact, backend=backend, provider=provider, threads=threads)
    history = []
    sampling = dict(max_new_tokens=max_new_tokens, thinking_budget=thinking_budget, temperature=temperature,
                    top_p=top_p, seed=seed, stop=stop)
    while True:
        try:
            text = input("> ")
        except EOFError:
            click.echo()
            return
        if text.strip() in ("/exit", "/quit"):
            return
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        result = runtimes.Result()
        for event in rt.stream(history, result=result, **sampling):
            _render(event, hide_thinking)
        click.echo()
        # earlier turns keep only their answer, as R1's template does with thinking
        history.append({"role": "assistant", "content": result.answer.strip()})


@main.command()
@click.argument("artifact")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; another than loopback needs --api-key (or --insecure).")
@click.option("--port", default=8000, show_default=True)
@click.option("--api-key", envvar="EDGE_EXPORT_API_KEY", help="Requests must send Authorization: Bearer KEY "
              "(default: $EDGE_EXPORT_API_KEY).")
@click.option("--insecure", is_flag=True, help="Allow a non-loopback --host without an API key.")
@click.option("--max-queue", default=16, show_default=True,
              help="Requests admitted at once (the one generating and those waiting); past it, 429 with Retry-After.")
@click.option("--request-timeout", default=600.0, show_default=True,
              help="Seconds from arrival to the last token; past it 504 (a stream ends with an error event).")
@click.option("--max-body-bytes", default=1 << 20, show_default=True, help="Larger request bodies get 413.")
@click.option("--model-name", help="The model id in /v1/models and responses (default: the artifact's folder name).")
@click.option("--reasoning-budget", "reasoning_budgets", multiple=True, metavar="LEVEL=TOKENS",
              help="Thinking tokens for reasoning_effort LEVEL (low=256, medium=1024, high=4096 by default; "
                   "TOKENS may be none). Repeatable.")
@click.option("--backend", help="Override the manifest's backend (e.g. reference).")
@click.option("--provider", help="Execution provider: cpu, cuda, coreml, qnn, ...")
@click.option("--threads", type=int, help="Intra-op threads.")
def serve(artifact, host, port, api_key, insecure, max_queue, request_timeout, max_body_bytes, model_name,
          reasoning_budgets, backend, provider, threads):
    """Serve ARTIFACT by OpenAI's chat-completions protocol (thinking in reasoning_content).

    Endpoints: POST /v1/chat/completions (streamed or not), GET /v1/models, /health, /metrics
    (Prometheus), /openapi.json. Needs pip install 'edge-export[serve]'."""
    from runtimes.server import ServeConfig, parse_budgets, serve as run_server
    config = ServeConfig(host=host, port=port, api_key=api_key, insecure=insecure, max_queue=max_queue,
                         request_timeout_s=request_timeout, max_body_bytes=max_body_bytes, model_name=model_name,
                         reasoning_budgets=parse_budgets(reasoning_budgets))
    config.check_bind()
    run_server(artifact, config=config, backend=backend, provider=provider, threads=threads)


@main.command(name="eval")
@click.argument("candidate")
@click.option("--reference", required=True, help="The original checkpoint (folder, .gguf or smollm2-135m).")
@click.option("--quant", type=QUANT_CHOICE, default="int4", show_default=True)
@click.option("--method", type=click.Choice([*INT4_METHODS, PALETTIZE]), help="Default: keep for a GGUF, else rtn.")
@click.option("--head", type=click.Choice(["int8", "int4", "float"]), default="int8", show_default=True)
@click.option("--group-size", type=GROUP_SIZE_CHOICE, default="32", show_default=True)
@click.option("--asymmetric", is_flag=True)
@click.option("--clip-search", is_flag=True, help="int4: shrink each group's range where that lowers its error.")
@click.option("--calibration", type=click.Path(dir_okay=False))
@click.option("--prompts", type=click.Path(dir_okay=False), help="JSONL prompts replacing the built-in set.")
@click.option("--no-ppl", is_flag=True, help="Skip perplexity on the held-out text.")
@click.option("--questions", is_flag=True, help="Also count same answers on 40 short chat questions.")
@click.option("--threads", type=int)
@click.option("--json", "as_json", is_flag=True)
def eval_(candidate, reference, quant, method, head, group_size, asymmetric, clip_search, calibration, prompts,
          no_ppl, questions, threads, as_json):
    """How closely CANDIDATE (an artifact, or a checkpoint with --quant applied) answers like --reference."""
    from .evaluate import evaluate
    from .export import ExportOptions
    options = ExportOptions(quant=quant, method=method, head=head, group_size=int(group_size),
                            symmetric=not asymmetric, clip_search=clip_search, calibration=calibration,
                            threads=threads)
    figures = evaluate(candidate, reference, options, prompts=prompts, ppl=not no_ppl, questions=questions)
    if as_json:
        emit_json(figures)
        return
    for key in ("kl_mean", "top1_agreement", "greedy_match_tokens", "ppl", "ppl_reference"):
        if figures.get(key) is not None:
            click.echo(f"{key:22s} {figures[key]}")
    if "same_answers" in figures:
        click.echo(f"{'same_answers':22s} {figures['same_answers']['same']}/{figures['same_answers']['of']}")


@main.command()
@click.argument("artifact")
@click.option("--device", "device_specs", multiple=True, default=("host",), show_default=True,
              help="host; ssh://[user@]host[:port][/folder] (a Linux board, through your ssh config); "
                   "adb://SERIAL (an Android device, with --runner); http://HOST:PORT[/v1] (an OpenAI-compatible "
              "server running the same model, e.g. edge-export serve or llama.cpp's; ARTIFACT may then be the "
              "checkpoint, for its tokenizer); estimate:PROFILE for a roofline estimate "
                   "(profiles: `edge-export devices`). Repeat it to benchmark several devices at once, each in its "
                   "own thread (host runs alone after the others): runs on one machine share its cores and disturb "
                   "each other's timings, so a device may be listed once. @FILE reads devices from a file, one "
                   "a line (# starts a comment).")
@bench_protocol_options
@click.option("--backend")
@click.option("--runner", type=click.Path(dir_okay=False, exists=True),
              help="adb:// only: the benchmark binary to push and run (onnxruntime-genai's model_benchmark).")
@click.option("--model", help="http:// only: the server's model name (default: the first in its /v1/models).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the result object; with several --device, a list of them (a failed device: "
                   "{device, error}).")
@click.pass_context
def bench(ctx, artifact, device_specs, prompt_tokens, new_tokens, runs, warmup, threads, backend, long_context, runner,
          timeout, model, as_json):
    """Time ARTIFACT by the shared protocol (prompt, greedy tokens, warm-up, medians).

    With several --device, every device gets its own line (or JSON entry) and the exit code is 2
    if any of them failed; the others' results are kept."""
    import devices
    options = dict(prompt_tokens=prompt_tokens, new_tokens=new_tokens, runs=runs, warmup=warmup, threads=threads,
                   backend=backend, long_context=long_context or None, runner=runner, timeout=timeout, model=model)
    device_specs = _expand_device_files(device_specs)
    if any(spec.startswith(("http://", "https://")) for spec in device_specs):
        from .checkpoint import checkpoint_tokenizer
        options["tokenizer"] = checkpoint_tokenizer(artifact)
    if len(device_specs) == 1:
        result = devices.bench(artifact, device_specs[0], **options)
        emit_json(result) if as_json else click.echo(_result_line(result))
        return
    entries = devices.bench_devices(artifact, list(device_specs), **options)
    if as_json:
        emit_json(entries)
    else:
        for entry in entries:
            if "error" in entry:
                click.echo(f"{entry['device']}: error: {entry['error']}", err=True)
            else:
                click.echo(_result_line(entry))
    if any("error" in entry for entry in entries):
        ctx.exit(2)


def _expand_device_files(specs) -> list[str]:
    """``@FILE`` stands for the devices listed in FILE, one a line; blank lines and # comments skipped."""
    out = []
    for spec in specs:
        if not spec.startswith("@"):
            out.append(spec)
            continue
        path = Path(spec[1:])
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise click.BadParameter(f"devices file {path}: {e.strerror if isinstance(e, OSError) else e}",
                                     param_hint="--device") from None
        listed = [line.split("#", 1)[0].strip() for line in lines]
        listed = [d for d in listed if d]
        if not listed:
            raise click.BadParameter(f"devices file {path} lists no device", param_hint="--device")
        out += listed
    return out


def _result_line(result: dict) -> str:
    if result.get("estimated"):
        decode, ttft = result.get("decode_tok_s_range") or ["?", "?"], result.get("ttft_ms_range") or ["?", "?"]
        return (f"{result['device']} (estimate, not measured): TTFT {result['ttft_ms']:.1f} ms "
                f"(range {ttft[0]}-{ttft[1]}), decode {result['decode_tok_s']:.1f} tok/s (range {decode[0]}-{decode[1]}), "
                f"memory {result['peak_rss_mb']:.0f} MB of a {result['budget_mb']:.0f} MB budget (engine "
                f"{result['method']['engine']}; calibrated on published points, devices/CALIBRATION.md)")
    return _measured_line(result)


def _measured_line(result: dict) -> str:
    """One line of measured figures; a figure the device's runner did not report is left out."""
    parts = []
    if "ttft_ms" in result:
        prefill = f" ({result['prefill_tok_s']:.0f} tok/s prefill)" if "prefill_tok_s" in result else ""
        parts.append(f"TTFT {result['ttft_ms']:.1f} ms{prefill}")
    if "decode_tok_s" in result:
        parts.append(f"decode {result['decode_tok_s']:.1f} tok/s")
    if "peak_rss_mb" in result:
        parts.append(f"peak RSS {result['peak_rss_mb']:.0f} MB")
    if "model_bytes" in result:
        parts.append(f"model {result['model_bytes'] / 2**20:.1f} MiB")
    runs = f" ({result['runs']} runs, medians)" if "runs" in result else ""
    line = f"{result['device']}: {', '.join(parts)}{runs}"
    if "transfer" in result:
        t = result["transfer"]
        line += (f"; copied {len(t['copied'])} files ({t['copied_bytes'] / 2**20:.1f} MiB), "
                 f"{len(t['skipped'])} already on the device")
    return line


@main.command(name="devices")
@click.option("--json", "as_json", is_flag=True, help="Every figure with its source.")
def devices_(as_json: bool) -> None:
    """Device profiles (spec sheets with sources) for `plan` and `bench --device estimate:NAME`."""
    from devices.profiles import list_profiles, render_profiles
    profiles = list_profiles()
    emit_json([p.to_dict() for p in profiles]) if as_json else click.echo(render_profiles(profiles))


@main.command()
@click.argument("checkpoint")
@click.option("--device", "device", required=True, help="A profile from `edge-export devices` (e.g. jetson-orin-nano-8gb).")
@click.option("--context", default=8192, show_default=True, help="Tokens of context the KV cache must hold.")
@click.option("--trace-tokens", type=int, default=None,
              help="Length of the reasoning trace to time [default: 4000, or what fits --context after the prompt].")
@click.option("--kv-cache", type=click.Choice(list(KV_CACHE_NAMES)),
              help="KV-cache precision to plan for; each target holds it where it carries it, else its own "
                   "(default: each target's own, as export does).")
@click.option("--answer-latency", help="A time (30s, 2m, 500ms): report the longest thinking trace each option "
                                       "finishes within it, the thinking_budget to set on that device.")
@click.option("--json", "as_json", is_flag=True)
def plan(checkpoint, device, context, trace_tokens, kv_cache, answer_latency, as_json):
    """Which quantization and target to export for a device: engine, sizes, fit and estimated speed.

    CHECKPOINT is a preset (r1-distill-qwen-7b or preset:r1-distill-qwen-7b), a config.json, a folder
    holding one (weights optional), or a .gguf: no weights are needed to plan.
    """
    from .plan import plan as make_plan, render_plan
    result = make_plan(checkpoint, device, context=context, trace_tokens=trace_tokens, kv_cache=kv_cache,
                       answer_latency=answer_latency)
    emit_json(result) if as_json else click.echo(render_plan(result))


@main.command()
@click.argument("results", nargs=-1, required=True)
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="report.html or report.md")
def report(results, out):
    """A report of bench results (`bench --json` output): table and charts; estimates marked."""
    from .report import write_report
    click.echo(f"wrote {write_report(list(results), out)}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
