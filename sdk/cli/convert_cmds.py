"""``edgeship convert ...``: workstation-side conversions (quantize; distill, run and prune are added here too).

Each command is a thin shell: flags in, one library call from
``edgeship.converters`` (imported inside the body so ``edgeship --help``
never loads torch), errors out as one line.
"""
from __future__ import annotations

import click

from ._common import EdgeshipGroup

__all__ = ["convert"]


@click.group(cls=EdgeshipGroup)
def convert() -> None:
    """Convert models on the workstation: quantize to int8, distill, prune, run recipes."""


def _json_arg(value: str | None, flag: str):
    """JSON given inline or as a path to a .json file."""
    import json
    from pathlib import Path

    from ..errors import ConfigError

    if value is None:
        return None
    text = Path(value).read_text(encoding="utf-8") if value.endswith(".json") and Path(value).is_file() else value
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{flag}: not valid JSON ({exc.msg} at char {exc.pos}); give JSON text or a .json file") \
            from exc


@convert.command("export")
@click.argument("model")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), default=None,
              help="State dict (.pt) for a torch MODEL given as path/to/file.py:Class.")
@click.option("--input", "inputs", multiple=True,
              help="Input spec name:dtype[dims], repeatable, in forward() order; N on axis 0 = any batch "
                   "(e.g. --input ids:int64[N,64]). Needed for a torch MODEL.")
@click.option("--output", "outputs", multiple=True, help="Output names, repeatable (default: output, output_1...).")
@click.option("--target", type=click.Choice(["onnx", "tflite", "both"]), default="onnx", show_default=True)
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="The .edgepkg to write.")
@click.option("--example", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A real sample (.npy, or .npz with one array per input): checks, warm-up, TFLite shapes.")
@click.option("--tflite-batch", type=int, default=1, show_default=True,
              help="The TFLite file's fixed batch (the runtime splits larger batches).")
@click.option("--name", default=None, help="Package name (default: from the model).")
@click.option("--version", "version", default="1.0.0", show_default=True, help="Package version.")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Text file with one class label per line.")
@click.option("--preprocess", default=None, help="Manifest preprocess as JSON text or a .json file.")
@click.option("--key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Ed25519 private key to sign the package with.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
def export_cmd(model, weights, inputs, outputs, target, out, example, tflite_batch, name, version, labels,
               preprocess, key, quiet) -> None:
    """Export MODEL (path/to/file.py:Class + --weights, or an .onnx file) to a float ONNX/TFLite package.

    Each exported file is compared with its source (torch or onnxruntime) on
    a sample; when it disagrees, the command fails naming the output (and,
    for ONNX to TFLite, the first diverging layer) and writes no package.
    """
    from edgeship.converters.export import export_model

    result = export_model(model, inputs=list(inputs) or None, outputs=list(outputs) or None, weights=weights,
                          target=target, out=out, name=name, version=version, labels=labels,
                          preprocess=_json_arg(preprocess, "--preprocess"), signing_key=key, example=example,
                          tflite_batch=tflite_batch, quiet=quiet)
    click.echo(result.summary())


def _names(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _iou_options(metric: str | None, threshold: float | None, channel: str | None) -> dict | None:
    from ..errors import ConfigError

    if metric != "iou":
        if threshold is not None or channel is not None:
            raise ConfigError("--iou-threshold/--iou-channel only apply with --metric iou")
        return None
    opts: dict = {}
    if threshold is not None:
        opts["threshold"] = threshold
    if channel is not None:
        if channel != "all" and not channel.lstrip("-").isdigit():
            raise ConfigError(f"--iou-channel: give a channel number or 'all' (got {channel!r})")
        opts["channel"] = None if channel == "all" else int(channel)
    return opts


@convert.command("quantize")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--calib", required=True, type=click.Path(exists=True),
              help="Calibration data: .npy, .npz (one array per input, optional 'labels') or an image folder.")
@click.option("--eval", "eval_", required=True, type=click.Path(exists=True),
              help="Held-out data the accuracy gate is measured on (same formats as --calib).")
@click.option("--max-drop", type=float, default=1.0, show_default=True,
              help="Largest accepted metric drop vs fp32, in points (e.g. 1.0 = one top-1 percentage point).")
@click.option("--metric", type=click.Choice(["top1", "agreement", "mse", "cosine", "iou", "seq_exact",
                                            "step_agreement"]), default=None,
              help="Metric to gate on (default: top1 with labels, agreement without, cosine for non-classifiers); "
                   "iou for dense detector maps, step_agreement / seq_exact for (N, T, classes) sequences.")
@click.option("--iou-threshold", type=float, default=None,
              help="iou: threshold applied to both maps (default 0.0, a logit's p=0.5).")
@click.option("--iou-channel", default=None,
              help="iou: channel (axis 1) of the map, e.g. 0 for objectness; 'all' for every channel (default 0).")
@click.option("--method", type=click.Choice(["auto", "static", "dynamic"]), default="auto", show_default=True)
@click.option("--engine", "engines", multiple=True, type=click.Choice(["onnxruntime", "nncf"]),
              help="Quantization engine(s) whose candidates compete (repeatable; default: onnxruntime, and NNCF "
                   "when installed).")
@click.option("--activation-type", "activation_types", multiple=True, type=click.Choice(["uint8", "int8"]),
              help="Activation type(s) of the onnxruntime static candidates (repeatable; default: uint8, and "
                   "int8 only when nothing meets the budget).")
@click.option("--weight-type", type=click.Choice(["int8", "uint8"]), default="int8", show_default=True)
@click.option("--per-channel/--no-per-channel", default=None,
              help="Per-channel or per-tensor weight scales for the onnxruntime static candidates (default: "
                   "both compete for uint8 MinMax; per-tensor is onnxruntime's own default).")
@click.option("--calibration-method", "calibrations", multiple=True,
              type=click.Choice(["minmax", "percentile", "entropy"]),
              help="Calibration(s) to try (repeatable; default: minmax, then percentile and entropy only when "
                   "nothing meets the budget).")
@click.option("--exclude-nodes", default=None, help="Node names to keep in float, separated by commas.")
@click.option("--op-types", default=None, help="Only quantize these op types, e.g. Conv,MatMul (comma-separated).")
@click.option("--samples", type=int, default=None, help="Calibration samples to use (default: all of --calib).")
@click.option("--model-type", type=click.Choice(["transformer", "default"]), default=None,
              help="NNCF model type (default: transformer when the graph has attention).")
@click.option("--node-errors", "analyze", is_flag=True,
              help="Add the chosen model's per-node error table to the report (a few samples, streamed).")
@click.option("--target-bench", "target_bench", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="'edgeship bench --variant ID --json' output(s) of the fp32 and int8 variants measured on the "
                   "target device: that device decides fp32 vs int8 (repeatable).")
@click.option("--fp32-variant/--no-fp32-variant", "both_precisions", default=True, show_default=True,
              help="Also ship the other precision as a package variant (fp32 beside int8, int8 beside fp32).")
@click.option("--target", type=click.Choice(["onnx", "tflite", "both"]), default="onnx", show_default=True)
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="The .edgepkg to write.")
@click.option("--allow-fp32", is_flag=True, help="Ship fp32 (exit 0) when no int8 candidate meets the budget.")
@click.option("--key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Ed25519 private key to sign the package with.")
@click.option("--batch", type=int, default=32, show_default=True, help="Batch size for eval and batch latency.")
@click.option("--name", default=None, help="Package name (default: from the model).")
@click.option("--version", "version", default=None, help="Package version (default: 1.0.0 or the package's).")
@click.option("--preprocess", default=None,
              help="Manifest preprocess as JSON text or a .json file (decodes image folders; default: the package's).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def quantize_cmd(model, calib, eval_, max_drop, metric, iou_threshold, iou_channel, method, engines,
                 activation_types, weight_type, per_channel, calibrations, exclude_nodes, op_types, samples,
                 model_type, analyze, target_bench, both_precisions, target, out, allow_fp32, key, batch, name,
                 version, preprocess, quiet) -> None:
    """Quantize MODEL (.onnx, float .tflite or .edgepkg) to int8, gated on accuracy and measured speed.

    Exits non-zero, writing no package, when no int8 candidate stays within
    --max-drop (unless --allow-fp32).
    """
    from edgeship.converters import quantize

    result = quantize(model, calib, eval_, max_drop=max_drop, metric=metric, method=method, target=target, out=out,
                      allow_fp32=allow_fp32, batch=batch, signing_key=key, name=name, version=version, quiet=quiet,
                      preprocess=_json_arg(preprocess, "--preprocess"),
                      metric_options=_iou_options(metric, iou_threshold, iou_channel),
                      engines=engines or None, activation_types=activation_types or None,
                      weight_type=weight_type, per_channel=per_channel, calibrations=calibrations or None,
                      exclude_nodes=_names(exclude_nodes), op_types=_names(op_types) or None, samples=samples,
                      model_type=model_type, analyze=analyze, target_bench=list(target_bench) or None,
                      both_precisions=both_precisions)
    click.echo(result.summary())


@convert.command("distill")
@click.option("--teacher", required=True,
              help="Teacher: an .onnx file, or path/to/file.py:Factory with --teacher-weights.")
@click.option("--teacher-weights", type=click.Path(exists=True, dir_okay=False), default=None,
              help="State dict (.pt) for a torch teacher given as file.py:Factory.")
@click.option("--student", required=True, help="Student factory: path/to/file.py:Factory (returns a torch module).")
@click.option("--data", required=True, type=click.Path(exists=True),
              help="Training data: .npz (inputs + optional 'labels'), .npy or an image folder.")
@click.option("--val", type=click.Path(exists=True), default=None,
              help="Held-out data for the metric and early stopping.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for student.pt, learning_curve.png and the teacher-logit cache.")
@click.option("--alpha", type=float, default=0.7, show_default=True,
              help="Weight of the soft-target loss; 1.0 = pure soft targets (no labels needed).")
@click.option("--temperature", "-T", type=float, default=4.0, show_default=True)
@click.option("--epochs", type=int, default=30, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--early-stopping", type=int, default=10, show_default=True,
              help="Patience in epochs without a better held-out metric (0 = off).")
@click.option("--hint-layer", default=None,
              help="Feature (hint) loss on this module name; 'teacher_layer,student_layer' when they differ.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Teacher-logit cache (default: OUT/cache).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def distill_cmd(teacher, teacher_weights, student, data, val, out_dir, alpha, temperature, epochs, lr, batch_size,
                seed, early_stopping, hint_layer, cache_dir, quiet) -> None:
    """Distill TEACHER into a small STUDENT; writes OUT/student.pt and a learning curve."""
    from edgeship.converters.distillation import distill_files

    result = distill_files(teacher, student, data, teacher_weights=teacher_weights, val=val, out_dir=out_dir,
                           alpha=alpha, temperature=temperature, epochs=epochs, lr=lr, batch_size=batch_size,
                           seed=seed, early_stopping=early_stopping or None, hint_layer=hint_layer,
                           cache_dir=cache_dir, quiet=quiet)
    click.echo(result.summary())
    click.echo(f"student: {result.checkpoint}\nlearning curve: {result.curve_png}")


@convert.command("run")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Print which steps would run and which are reused; run nothing.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def run_cmd(recipe, dry_run, quiet) -> None:
    """Run a conversion RECIPE (TOML): distill, export, quantize, evaluate, package and sign.

    Each step's output is cached by its inputs' hashes, so a re-run only
    redoes the steps whose inputs changed.
    """
    from edgeship.converters.recipe import run_recipe

    click.echo(run_recipe(recipe, dry_run=dry_run, quiet=quiet).summary())


@convert.command("prune")
@click.option("--model", "model", required=True,
              help="The model: path/to/file.py:Factory (an nn.Sequential) with --weights.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), default=None,
              help="State dict or distill/prune checkpoint (.pt) for the model.")
@click.option("--data", required=True, type=click.Path(exists=True),
              help="Fine-tuning data: .npz (input + 'labels'), .npy or an image folder.")
@click.option("--eval", "eval_", type=click.Path(exists=True), default=None,
              help="Held-out data for the accuracy gate (default: --data).")
@click.option("--ratio", type=float, default=None, help="Fraction of the channels to remove in each prunable layer.")
@click.option("--target-params", type=float, default=None, help="Fraction of the parameters to remove (0..1).")
@click.option("--target-latency", type=float, default=None,
              help="Fraction of the batch-1 latency to remove (0..1), measured with onnxruntime.")
@click.option("--distill/--no-distill", default=True, show_default=True,
              help="Fine-tune with distillation from the unpruned model.")
@click.option("--finetune-epochs", type=int, default=10, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--max-drop", type=float, default=1.0, show_default=True,
              help="Largest accepted metric drop vs the unpruned model, in points.")
@click.option("--metric", type=click.Choice(["top1", "agreement", "mse", "cosine"]), default=None)
@click.option("--sweep", default="", help="Extra ratios for the trade-off plot, e.g. 0.25,0.5,0.75.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for pruned.pt, pruned.onnx, prune_tradeoff.png and prune.report.md.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def prune_cmd(model, weights, data, eval_, ratio, target_params, target_latency, distill, finetune_epochs, lr,
              max_drop, metric, sweep, out_dir, quiet) -> None:
    """Prune whole channels by magnitude, fine-tune, and gate on accuracy (exits non-zero over --max-drop)."""
    from edgeship.converters import prune
    from edgeship.converters.checkpoints import load_student
    from edgeship.errors import ConfigError

    try:
        ratios = [float(r) for r in sweep.split(",") if r.strip()]
    except ValueError as exc:
        raise ConfigError(f"--sweep: give ratios separated by commas, e.g. 0.25,0.5 (got {sweep!r})") from exc
    result = prune(load_student(model, weights), data, ratio=ratio, target_params=target_params,
                   target_latency=target_latency, teacher=True if distill else None, eval=eval_,
                   finetune_epochs=finetune_epochs, lr=lr, max_drop=max_drop, metric=metric, sweep=ratios,
                   out=out_dir, quiet=quiet)
    click.echo(result.summary())
