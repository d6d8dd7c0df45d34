"""The before/after report of ``trl-upo train`` (``report_before_after: true``): each reward head's mean score on
answers sampled for held-out prompts, and the held-out preference accuracy, before and after training, printed as a
table and written to ``output_dir/report.json``.
"""

from __future__ import annotations

import os

from trl_upo.cli.common import UsageError

#: Where the report's numbers go, in ``output_dir``.
REPORT_FILE = "report.json"


def _sharded_parameters(training_args) -> bool:
    """Whether the run shards parameters across processes (FSDP, or DeepSpeed ZeRO-3 as far as it is visible)."""
    env = os.environ
    return bool(
        getattr(training_args, "fsdp", None)
        or env.get("ACCELERATE_USE_FSDP", "").lower() == "true"
        or (
            env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
            and env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
        )
    )


def check_report(script_args, training_args, model_args) -> None:
    """Refuse, before anything loads, a before/after report the run cannot make correctly."""
    if not script_args.report_before_after:
        return
    if _sharded_parameters(training_args):
        raise UsageError(
            "report_before_after generates on the main process only, which sharded parameters (FSDP, DeepSpeed "
            "ZeRO-3) do not allow. Set report_before_after: false and evaluate the saved model with `trl-upo eval`."
        )
    if model_args.load_in_4bit or model_args.load_in_8bit:
        import torch

        if not torch.cuda.is_available():
            raise UsageError(
                "report_before_after with a bitsandbytes-quantized model on CPU: the 'before' report runs the model "
                "in inference mode, after which bitsandbytes' CPU kernel keeps its inference layout and some LoRA "
                "gradients are silently lost (measured with bitsandbytes 0.50). Set report_before_after: false and "
                "evaluate the saved adapter with `trl-upo eval`."
            )


def policy_report(trainer, script_args, model_id: str, report_ds, before: bool) -> dict | None:
    """Designer metrics and held-out preference accuracy of the current policy (main process only).

    Before training, the reference is the policy itself (implicit-reward accuracy 0.5 by definition, every pair a
    tie); after, it is the trainer's reference: the adapter-disabled model under PEFT, the ``ref_model``, or the
    starting model reloaded from ``model_name_or_path``.
    """
    from trl_upo.evaluation import evaluate_policy

    if not trainer.accelerator.is_main_process:
        return None
    model = trainer.accelerator.unwrap_model(trainer.model)
    from trl_upo.scoring import ensure_prompt

    from datasets import Dataset, IterableDataset

    if isinstance(report_ds, IterableDataset):  # a stream: its first rows, not a pass over all of it
        rows = Dataset.from_list(list(report_ds.take(script_args.report_num_prompts)))
    else:
        rows = report_ds.select(range(min(script_args.report_num_prompts, len(report_ds))))
    paired = {"chosen", "rejected"} <= set(rows.column_names)
    if paired:
        rows = ensure_prompt(rows)  # an implicit prompt is extracted as DPOTrainer does
    if before:
        ref = model
    elif getattr(model, "peft_config", None):
        ref = None  # evaluate_policy disables the adapter
    elif trainer.ref_model is not None:
        ref = trainer.accelerator.unwrap_model(trainer.ref_model)
    else:
        ref = model_id
    was_training = model.training
    model.eval()
    try:
        result = evaluate_policy(
            model,
            trainer.processing_class,
            prompts=rows["prompt"],
            heads=report_heads(trainer.args, announce=before),
            pairs=rows if paired else None,  # unpaired (KTO) rows: designer metrics only
            ref_model=ref,
            beta=trainer.args.beta,
            max_new_tokens=script_args.report_max_new_tokens,
            num_samples=script_args.report_num_samples,
            seed=trainer.args.seed,
        )
    finally:
        model.train(was_training)
    return result


def report_heads(training_args, announce: bool = False) -> list[dict]:
    """The reward heads the before/after report can apply to generated text: every head except those that read
    dataset columns (``column``), which have no value for a freshly generated answer.

    Args:
        training_args: The parsed :class:`~trl_upo.UPOConfig`.
        announce: Print which heads are left out of the report, and why (training still uses them).

    Returns:
        The spec dicts of the heads the report uses.
    """
    from trl_upo.heads import build_head

    keep, left_out = [], []
    for spec in training_args.head_specs:
        head = build_head(spec)
        reads = head.required_columns() or ([] if head.needs_text else ["no response text"])
        (left_out if reads else keep).append((spec, reads))
    if announce and left_out:
        names = ", ".join(f"{s.name} (reads {', '.join(c)})" for s, c in left_out)
        print(f"report_before_after: heads that read dataset columns cannot score generated answers and are left "
              f"out of the report (training uses them): {names}.", flush=True)
    return [spec.to_dict() for spec, _ in keep]


def format_report(before: dict, after: dict) -> str:
    """The before/after table: each head's mean score on generated answers, and the held-out preference accuracy
    (implicit reward against the reference, ties count half; and policy log-prob accuracy) when the data has pairs."""
    heads = list(after["designer"])
    paired = bool(after.get("preference"))
    cols = [f"{h} (mean)" for h in heads] + (["pref. accuracy", "log-prob accuracy"] if paired else [])
    width = max(14, *(len(c) for c in cols)) if cols else 14
    gen = after["generation"]
    pairs = f"; preference accuracy on {after['preference'].get('n', 0)} held-out pairs" if paired else ""
    lines = [
        "",
        f"Designer metrics on {gen['num_prompts']} held-out prompts x {gen['num_samples']} sampled answers "
        f"(head scores, higher is better){pairs}:",
        f"{'':<8}" + "".join(f"{c:>{width + 2}}" for c in cols),
    ]
    for name, r in (("before", before), ("after", after)):
        values = [r["designer"][h]["mean"] for h in heads]
        if paired:
            pref = r["preference"]
            values += [pref.get("accuracy", float("nan")), pref.get("policy_logp_accuracy", float("nan"))]
        lines.append(f"{name:<8}" + "".join(f"{v:>{width + 2}.3f}" for v in values))
    for name, r in (("before", before), ("after", after)):
        if r.get("samples"):
            sample = r["samples"][0]
            lines.append(f"{name:<8}sample: {sample['prompt']!r} -> {sample['response'].strip()!r}")
    return "\n".join(lines)
