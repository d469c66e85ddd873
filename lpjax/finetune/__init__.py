"""`python -m lpjax.finetune`: recover a model's quality under an LP plan by training only its paired layers.

LP changes the function a model computes (docs/design.md section 5). This trains the weights of the layers the plan
pairs -- evaluated as pairs, as the plan runs them -- and freezes everything else bit for bit (no gradient, no
optimizer state). It reports the val perplexity of the sequential model, of the plan before training and of the
plan after, and writes the model to OUT in lpjax's converted format with the source's tokenizer; run it with the
same `--lp`. The loop, data, checkpoints and resumption are `lpjax.train`'s: re-running the command into the same
OUT continues the run.

`--control` trains the same layers for the same steps *without* LP (run sequentially): the fair reference, since
part of any gain may come from the extra training alone rather than from adapting the layers to their pairing.

`--distill` swaps the LM loss for distillation from the sequential model: the teacher is the same checkpoint with no
plan, run frozen in the same compiled step, and the loss is KL(teacher || student) of the next-token distributions
at `--distill-temperature` T (times T^2). The student learns to compute what the model computed before LP, not the
text. `python -m lpjax.finetune.corpus` writes a training text the teacher samples itself. OUT's config.json records
the plan (`lpjax.lp`), so the fine-tune runs under it when no --lp is given, here and after an HF export.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from lpjax import cli
from lpjax.config import with_plan
from lpjax.errors import LPJaxError
from lpjax.plan import LPPlan
from lpjax.sharding import make_mesh
from lpjax.sources import open_source, plan_for
from lpjax.tokenizer import load_tokenizer
from lpjax.training import cli as training_cli
from lpjax.training.corpus import text_provenance
from lpjax.training.data import prepare_data, text_digest
from lpjax.training.loop import fit
from lpjax.training.programs import Programs, cast_tree, data_mesh, single_device_layout
from lpjax.training.rundir import check_run, start_run, write_model
from lpjax.training.settings import Objective
from lpjax.weights import DTYPES, load_params, retarget, source_dtype


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m lpjax.finetune", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", required=True,
                   help="HF Llama directory, converted lpjax directory, GGUF file or smollm2 (dequantised)")
    p.add_argument("--lp", default=None, metavar="START:END[,...]",
                   help="the LP plan whose paired layers are trained, e.g. 4:8 (default: the plan --model was "
                        "fine-tuned for, if it records one)")
    p.add_argument("--control", action="store_true",
                   help="train the plan's layers without LP (sequentially): the reference run for the same steps")
    p.add_argument("--distill", action="store_true",
                   help="loss: KL(teacher || student) of the next-token distributions, the teacher being --model run "
                        "sequentially (frozen, in the same step), instead of cross-entropy on the text")
    p.add_argument("--distill-temperature", type=float, default=1.0, metavar="T",
                   help="softmax temperature of both distributions under --distill; the loss is scaled by T^2 "
                        "(default 1)")
    training_cli.add_training_args(p, steps=200, batch_size=8, lr=3e-4, warmup=20, weight_decay=0.0, seq_len=None)
    p.add_argument("--save-dtype", choices=tuple(DTYPES), default=None,
                   help="dtype of the written model (default: the source's, so frozen weights stay bit-identical)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cli.enable_compile_cache()
    if args.model.startswith("random:"):
        raise LPJaxError(f"--model {args.model}: fine-tuning needs a trained model directory, not random weights")
    texts, val_text = training_cli.read_texts(args)
    source = open_source(args.model)
    config = source.config
    if args.distill_temperature != 1.0 and not args.distill:
        raise LPJaxError("--distill-temperature: only with --distill")
    objective = Objective("distill" if args.distill else "lm", args.distill_temperature)
    objective.check()
    plan = LPPlan.parse(plan_for(source, args.lp), config.n_layers)
    if not plan.pairs:
        raise LPJaxError("nothing to fine-tune: give --lp START:END, the LP plan whose paired layers to train")
    seq_len = args.seq_len or min(256, config.max_seq_len)
    if seq_len > config.max_seq_len:
        raise LPJaxError(f"--seq-len {seq_len}: longer than the model's context of {config.max_seq_len} tokens")
    hp = training_cli.hyper_from_args(args, seq_len)
    cadence = training_cli.cadence_from_args(args)
    out: Path = args.out
    if out.resolve() == Path(args.model).resolve():
        raise LPJaxError("--out must differ from --model")
    save_dtype = args.save_dtype or source_dtype(source)
    setup = {"kind": "finetune", "model": str(Path(args.model).resolve()), "config": config.to_json(),
             "lp": plan.spec(), "control": args.control, "hyper": dataclasses.asdict(hp),
             "loss": dataclasses.asdict(objective),
             "text": text_digest(texts), "val": text_digest([val_text]) if val_text else None}
    texts_used = {"train": text_provenance(args.text, texts),
                  "val": text_provenance([args.val], [val_text])[0] if val_text else None}
    resuming = check_run(out, setup, args.overwrite, args.resume)

    tok = load_tokenizer(source.directory, config.vocab_size, config.eos_token_ids)
    stream, val = prepare_data(tok, texts, val_text, hp, args.val_windows)
    run_plan = LPPlan(config.n_layers) if args.control else plan  # the plan the layers train (and are saved) under
    layout = single_device_layout(config, run_plan)
    mesh = data_mesh(args.devices)
    paired = {i for pair in plan.pairs for i in pair}
    pairs = frozenset(s.name for s in layout.stages if paired.intersection(s.stage.layers))
    programs = Programs(layout, hp, pairs, mesh, args.attention, training_cli.note, objective)
    bar = cli.load_bar() if cli.is_main_process() else None
    params = load_params(source, layout, make_mesh(1), jnp.float32, bar)  # float32 masters
    if not resuming:
        start_run(out, setup, source.directory, {"loss": objective.describe(), "texts": texts_used})
    trainable_count = sum(x.size for k in pairs for x in jax.tree.leaves(params[k]))
    what = f"layers {plan.spec()} without LP (control)" if args.control else f"LP plan {plan.describe()}"
    cli.say(f"[fine-tuning {source.description}: {what}; {trainable_count / 1e6:.2f}M of "
            f"{config.n_params / 1e6:.2f}M params train; {len(stream):,} training tokens; {hp.steps} steps of "
            f"{hp.batch_size} x {hp.seq_len} tokens on {mesh.devices.size} {programs.platform.upper()} device(s), "
            f"{hp.compute_dtype}; {objective.describe()}]", file=sys.stderr)

    before = sequential = None
    label = "sequential (control)" if args.control else f"LP {plan.spec()}"
    if val is not None:
        trainable, frozen = programs.split(params)
        trainable, frozen = programs.put(trainable), programs.put(cast_tree(frozen, programs.compute))
        before = programs.evaluator(val, trainable, frozen)(trainable, frozen)
        del trainable, frozen
        seq_layout = single_device_layout(config, LPPlan(config.n_layers))
        seq_params = programs.put(retarget(params, layout, seq_layout))
        seq = Programs(seq_layout, hp, frozenset(seq_params), mesh, programs.attention, training_cli.note)
        sequential = seq.evaluator(val, seq_params, {})(seq_params, {})
        cli.say(f"val perplexity: sequential {sequential['ppl']:.3f}, {label} before fine-tuning "
                f"{before['ppl']:.3f} (next-token accuracy {sequential['accuracy']:.4f}, {before['accuracy']:.4f})",
                file=sys.stderr)

    res = fit(programs, params, stream, val, out, cadence, training_cli.step_bar(hp, "fine-tuning"), training_cli.note)
    summary = dict(res.summary(hp), lp=plan.spec(), delta=plan.delta, control=args.control,
                   loss=objective.kind, distill_temperature=objective.temperature if objective.distill else None,
                   trainable_params=trainable_count,
                   params=config.n_params, devices=mesh.devices.size, out=str(out),
                   train_loss_first=res.history[0][1] if res.history else None)
    to = sys.stderr if args.json else sys.stdout
    if not res.completed:
        return training_cli.report_stopped(res, hp, out, summary, args.json)
    training = {"kind": "finetune", "lp": run_plan.spec(), "trained_layers": plan.spec(), "control": args.control,
                "loss": dataclasses.asdict(objective), "steps": res.step, "from": str(args.model),
                "texts": texts_used}
    hf_config = with_plan(dict(source.hf_config, torch_dtype=save_dtype, dtype=save_dtype), run_plan.spec(),
                          trained_layers=plan.spec(), loss=objective.kind)
    how = f"layers {plan.spec()} without LP (control)" if args.control else f"for --lp {plan.spec()}"
    write_model(out, layout, res.params, hf_config, save_dtype,
                f"fine-tuned from {Path(args.model).name} {how} ({res.step} steps, {objective.kind} loss)", training)
    line = "fine-tuned " + training_cli.summary_line(res, hp)
    if val is not None:
        after = res.final_val
        summary.update(val_ppl_sequential=sequential["ppl"], val_ppl_before=before["ppl"], val_ppl_after=after["ppl"],
                       val_loss_sequential=sequential["loss"], val_loss_before=before["loss"],
                       val_loss_after=after["loss"], val_accuracy_sequential=sequential["accuracy"],
                       val_accuracy_before=before["accuracy"], val_accuracy_after=after["accuracy"],
                       val_tokens=val.n_tokens)
        line += (f"\nval perplexity: sequential {sequential['ppl']:.3f}; {label} before {before['ppl']:.3f}, "
                 f"after {after['ppl']:.3f} (next-token accuracy {sequential['accuracy']:.4f}; "
                 f"{before['accuracy']:.4f}, {after['accuracy']:.4f})")
    cli.say(line, file=to)
    cli.say(f"wrote {out}: run it with --model {out}" + ("" if args.control else f" (it records --lp {plan.spec()}, "
            "the plan lpjax runs it under when no --lp is given)"), file=to)
    if args.json:
        cli.emit_json(summary)
    return 0
