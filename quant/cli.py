"""`qcpu convert` and `qcpu quantize`: the quantization tool's commands on the `qcpu` Typer app."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

err = Console(stderr=True, highlight=False)

QUANTIZE_TYPES = "Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K Q4_K_M Q5_K_M (also Q3_K_S/M/L Q4_K_S Q5_K_S F16 BF16 F32)"


def _progress_bar(plan_hint: str):
    """A Rich progress factory for requantize/convert: one bar over all input bytes, the current tensor
    named beside it."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    state = {}

    def start(plan):
        total = sum(p[1] for p in plan)
        bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn(),
                       TimeRemainingColumn(), TextColumn("{task.fields[tensor]}"), console=err, transient=True)
        bar.start()
        task = bar.add_task(plan_hint, total=total, tensor="")
        state["bar"] = bar
        types = {p[0]: p for p in plan}

        def tick(name, n):
            _, _, old, new = types[name]
            label = f"{name} {old.name}" + (f" -> {new.name}" if new != old else "")
            bar.update(task, advance=n, tensor=label)

        return tick

    def stop():
        if "bar" in state:
            state["bar"].stop()

    return start, stop


def register(app) -> None:
    """Add the quantization commands to the `qcpu` Typer app."""
    from qcpu.cli import _set_threads  # the one --threads rule for every command

    @app.command()
    def quantize(
        src: Path = typer.Argument(..., metavar="IN.gguf", help="Model to requantize (any type qcpu reads)."),
        out: Path = typer.Argument(..., metavar="OUT.gguf", help="File to write."),
        qtype: str = typer.Argument(..., metavar="TYPE", help=f"One of {QUANTIZE_TYPES}."),
        force: bool = typer.Option(False, "--force", "-f", help="Overwrite OUT if it exists."),
        pure: bool = typer.Option(False, "--pure", help="Every quantizable weight in TYPE's base type (no "
                                  "Q6_K output / attn_v / ffn_down mix), like llama-quantize --pure."),
        allow_requantize: bool = typer.Option(False, "--allow-requantize", help="Also change the type of tensors "
                                              "that are already quantized (loses quality; refused by default, as "
                                              "llama-quantize does)."),
        threads: Optional[int] = typer.Option(None, "--threads", "-t", help="CPU threads (default: all cores)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
    ):
        """Requantize a GGUF model, as llama-quantize does (same tensor types, same bytes).

        Q3_K, Q4_K and Q5_K mean the _M mixes, as in llama-quantize. Norms and biases keep their type.

        As llama-quantize: NaN/Inf in the data is refused; quantized tensors change type only with --allow-requantize."""
        from quant.requantize import requantize

        _set_threads(threads)
        start, stop = _progress_bar(f"quantizing to {qtype.upper()}")
        t0 = time.perf_counter()
        try:
            summary = requantize(src, out, qtype, force=force, pure=pure, progress=None if quiet else start,
                                 allow_requantize=allow_requantize)
        finally:
            stop()
        if not quiet:
            counts = {}
            for t in summary["types"].values():
                counts[t] = counts.get(t, 0) + 1
            mix = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
            err.print(f"wrote {out} ({summary['output_bytes'] / 2**20:.1f} MiB of tensors, "
                      f"{summary['file_type']}: {mix}) in {time.perf_counter() - t0:.1f} s", soft_wrap=True)

    @app.command()
    def convert(
        hf_dir: Path = typer.Argument(..., metavar="HF_DIR", help="Hugging Face checkpoint directory (Qwen2ForCausalLM)."),
        out: Path = typer.Argument(..., metavar="OUT.gguf", help="File to write."),
        qtype: str = typer.Option("f16", "--type", "--outtype", help="f16 | bf16 | f32 | q8_0 (as convert_hf_to_gguf.py) "
                                  "or any `qcpu quantize` TYPE (q4_0, q4_k_m, ...: as llama-quantize)."),
        force: bool = typer.Option(False, "--force", "-f", help="Overwrite OUT if it exists."),
        threads: Optional[int] = typer.Option(None, "--threads", "-t", help="CPU threads (default: all cores)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
    ):
        """Convert a Hugging Face Qwen2-family checkpoint (safetensors) to GGUF, as llama.cpp's converter does."""
        from quant.convert import convert as run

        _set_threads(threads)
        start, stop = _progress_bar(f"converting to {qtype.upper()}")
        t0 = time.perf_counter()
        try:
            summary = run(hf_dir, out, qtype, force=force, progress=None if quiet else start)
        finally:
            stop()
        if not quiet:
            err.print(f"wrote {out} ({summary['output_bytes'] / 2**20:.1f} MiB of tensors, {summary['tensors']} "
                      f"tensors, {summary['file_type']}, vocab {summary['vocab']}) in {time.perf_counter() - t0:.1f} s",
                      soft_wrap=True)
