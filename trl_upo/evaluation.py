"""Evaluate a policy: designer objectives on its generations, preference quality on held-out pairs.

Three measurements, usable alone or together through :func:`evaluate_policy`:

1. :func:`generate_responses`: batched sampling (left padding, prompts tokenised exactly as ``DPOTrainer`` tokenises
   them, so the model sees the context it was trained on).
2. :func:`designer_metrics`: the raw scores of reward heads (the spec dicts ``UPOTrainer`` takes) on the generated
   responses: mean, standard deviation and count per head, with no normalisation.
3. :func:`preference_metrics`: DPO's implicit reward ``beta * (log pi(y|x) - log pi_ref(y|x))`` on held-out pairs:
   the accuracy (chosen reward above rejected reward, ties counting half) and the margins.

``model`` and ``ref_model`` may be loaded models or paths: a full model directory (or Hub id) or a PEFT adapter
directory, whose base model is loaded from the adapter's config.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: How :func:`preference_metrics` computed its accuracy, by reference kind.
METRIC_NAMES = {
    "ref_model": "implicit-reward accuracy (reference: the given ref_model)",
    "adapter_disabled": "implicit-reward accuracy (reference: the policy with its PEFT adapter disabled)",
    "none": "policy log-prob accuracy (no reference: log pi(chosen) > log pi(rejected), not an implicit reward)",
}


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def load_model(model: Any, *, dtype: str | torch.dtype | None = None, device: str | None = None) -> Any:
    """Load a causal LM from a path or Hub id, or return a loaded model unchanged.

    Args:
        model: a loaded ``PreTrainedModel`` / ``PeftModel``, a full model directory or Hub id, or a PEFT adapter
            directory (``adapter_config.json``; its base model is loaded from ``base_model_name_or_path``).
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``, ``"auto"`` or a ``torch.dtype``; None keeps float32.
        device: where to put a model loaded from a path (default: CUDA when available, else CPU).

    Returns:
        The model; one loaded from a path is in eval mode, a loaded model is returned as it is.

    Raises:
        ValueError: a local path that does not exist, or a directory that holds neither a model nor an adapter.
    """
    if not isinstance(model, str):
        return model  # the caller's model keeps its mode; the functions below evaluate in eval mode and restore it
    from transformers import AutoModelForCausalLM

    path = os.path.expanduser(model)
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "adapter_config.json")):
            from peft import PeftConfig, PeftModel

            base_path = PeftConfig.from_pretrained(path).base_model_name_or_path
            if not base_path:
                raise ValueError(
                    f"The PEFT adapter in {path!r} does not name its base model (base_model_name_or_path is empty); "
                    f"load the base model yourself and pass PeftModel.from_pretrained(base, {path!r})."
                )
            base = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
            loaded = PeftModel.from_pretrained(base, path)
        elif os.path.exists(os.path.join(path, "config.json")):
            loaded = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        else:
            raise ValueError(
                f"{path!r} holds neither a model (config.json) nor a PEFT adapter (adapter_config.json). Pass the "
                f"directory that trainer.save_model() wrote."
            )
    elif os.path.exists(path) or not _is_hub_id(model):
        raise ValueError(
            f"Model path {model!r} does not exist. Pass a model directory, an adapter directory or a Hub id."
        )
    else:
        loaded = AutoModelForCausalLM.from_pretrained(model, **kwargs)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if getattr(loaded, "hf_device_map", None) is None:
        loaded = loaded.to(device)
    return loaded.eval()


def _is_hub_id(name: str) -> bool:
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not name.startswith((".", "/", "~"))


def _model_path(model: Any) -> str | None:
    """The directory or Hub id a loaded model (or the base of an adapter) came from."""
    if isinstance(model, str):
        path = os.path.expanduser(model)
        if os.path.isdir(path) and os.path.exists(os.path.join(path, "adapter_config.json")):
            for name in ("tokenizer_config.json", "tokenizer.json"):
                if os.path.exists(os.path.join(path, name)):
                    return path
            with open(os.path.join(path, "adapter_config.json")) as f:
                return json.load(f).get("base_model_name_or_path")
        return model
    peft_config = getattr(model, "peft_config", None)
    if peft_config:
        cfg = next(iter(peft_config.values()))
        if getattr(cfg, "base_model_name_or_path", None):
            return cfg.base_model_name_or_path
    return getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)


def load_tokenizer(model: Any, tokenizer: Any = None) -> Any:
    """Return ``tokenizer`` if given (a tokenizer or a path), else the one saved with ``model`` (or its base).

    Raises:
        ValueError: when no tokenizer is given and none can be found where the model came from.
    """
    from transformers import AutoTokenizer

    if tokenizer is not None and not isinstance(tokenizer, str):
        return tokenizer
    source = tokenizer or _model_path(model)
    if not source:
        raise ValueError(
            "No tokenizer given and the model does not say where it was loaded from; pass tokenizer=... (a tokenizer "
            "or its path)."
        )
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ValueError(f"Could not load a tokenizer from {source!r} ({e}); pass tokenizer=... explicitly.") from e


@contextmanager
def eval_mode(model: Any) -> Iterator[Any]:
    """Put ``model`` in eval mode (no dropout) for the block, then restore its training mode.

    Args:
        model: a ``torch.nn.Module``.

    Yields:
        The model.
    """
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        yield model
    finally:
        if was_training:
            model.train()


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------------
# Tokenisation (the way DPOTrainer tokenises: chat template for message lists, plain call for strings)
# ----------------------------------------------------------------------------------------------------------------


def is_conversational_prompt(prompt: Any) -> bool:
    """Whether ``prompt`` is a message list (``[{"role": ..., "content": ...}, ...]``)."""
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in prompt
    )


def _check_prompt(prompt: Any, i: int) -> None:
    if isinstance(prompt, str):
        return
    if is_conversational_prompt(prompt):
        return
    raise ValueError(
        f"prompts[{i}] must be a string or a list of messages ({{'role': ..., 'content': ...}}), got "
        f"{type(prompt).__name__}: {str(prompt)[:80]!r}."
    )


def _ids(tokenizer: Any, conversation_or_text: Any, *, generation_prompt: bool = False) -> list[int]:
    if isinstance(conversation_or_text, str):
        return list(tokenizer(conversation_or_text)["input_ids"])
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "Conversational prompts (message lists) need a tokenizer with a chat template; this tokenizer has none. "
            "Set tokenizer.chat_template or pass string prompts."
        )
    out = tokenizer.apply_chat_template(
        list(conversation_or_text), tokenize=True, return_dict=True, add_generation_prompt=generation_prompt
    )
    return list(out["input_ids"])


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("The tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token.")
    return int(pad)


def _stack(seqs: Sequence[list[int]], pad_id: int, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if left:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            attn[i, width - len(s) :] = 1
        else:
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            attn[i, : len(s)] = 1
    return ids, attn


# ----------------------------------------------------------------------------------------------------------------
# 1. Generation
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Any],
    *,
    max_new_tokens: int = 64,
    num_samples: int = 1,
    batch_size: int = 16,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    **generation_kwargs: Any,
) -> list[list[str]]:
    """Generate ``num_samples`` responses to every prompt, in batches with left padding.

    String prompts are tokenised with the tokenizer's special tokens, message lists with the chat template and the
    generation prompt, as ``DPOTrainer`` does in training. The pad token falls back to the EOS token.

    Args:
        model: a causal LM (a loaded model or a path, see :func:`load_model`).
        tokenizer: its tokenizer (None: loaded from where the model came from).
        prompts: strings, or message lists for conversational data.
        max_new_tokens: the longest response, in tokens.
        num_samples: responses per prompt (more than 1 needs ``do_sample=True``).
        batch_size: prompts per ``generate`` call.
        do_sample: sample (True) or decode greedily (False).
        temperature: the sampling temperature.
        top_p: nucleus sampling threshold.
        seed: ``torch.manual_seed`` before the first batch, so a run is reproducible.
        **generation_kwargs: passed on to ``model.generate`` (e.g. ``top_k``, ``repetition_penalty``).

    Returns:
        ``responses[i][j]``: the j-th response to ``prompts[i]``, decoded without special tokens; shape
        ``(len(prompts), num_samples)``.

    Raises:
        ValueError: on an empty prompt list, a prompt of the wrong type, or inconsistent settings.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("generate_responses: no prompts given.")
    for name, value in (("max_new_tokens", max_new_tokens), ("num_samples", num_samples), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"generate_responses: {name} must be an integer >= 1, got {value!r}.")
    if num_samples > 1 and not do_sample:
        raise ValueError(
            f"num_samples={num_samples} with do_sample=False would return {num_samples} identical greedy responses; "
            f"set do_sample=True or num_samples=1."
        )
    if do_sample and not temperature > 0:
        raise ValueError(
            f"temperature must be > 0 when sampling, got {temperature!r} (use do_sample=False for greedy)."
        )
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}.")
    for i, p in enumerate(prompts):
        _check_prompt(p, i)
    model = load_model(model)
    tokenizer = load_tokenizer(model, tokenizer)
    pad_id = _pad_id(tokenizer)
    device = _device(model)
    encoded = [_ids(tokenizer, p, generation_prompt=True) for p in prompts]
    sampling = dict(temperature=temperature, top_p=top_p) if do_sample else {}
    torch.manual_seed(seed)
    out: list[list[str]] = []
    with eval_mode(model):
        for start in range(0, len(encoded), batch_size):
            ids, attn = _stack(encoded[start : start + batch_size], pad_id, left=True)
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=attn.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                num_return_sequences=num_samples,
                pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
                **sampling,
                **generation_kwargs,
            )
            texts = tokenizer.batch_decode(gen[:, ids.shape[1] :], skip_special_tokens=True)
            texts = [t.strip() for t in texts]
            out.extend(texts[k : k + num_samples] for k in range(0, len(texts), num_samples))
    return out


# ----------------------------------------------------------------------------------------------------------------
# 2. Designer metrics
# ----------------------------------------------------------------------------------------------------------------


def _as_completion(prompt: Any, response: str) -> Any:
    """A response in the prompt's format: an assistant message list for conversational prompts."""
    return [{"role": "assistant", "content": response}] if is_conversational_prompt(prompt) else response


def text_head_specs(heads: Sequence[dict] | str | None) -> list:
    """Parse head specs and check that every head scores response text, before any model is loaded.

    Args:
        heads: head spec dicts (or a JSON string of a list of them), as ``UPOConfig.reward_heads`` takes them.

    Returns:
        The parsed :class:`~trl_upo.heads.HeadSpec` list.

    Raises:
        ValueError: on an invalid spec (unknown head or key, with a suggestion), or a head that reads dataset columns
            instead of text (``column``): generated responses have no such columns.
    """
    from .heads import parse_head_specs, resolve_head_class

    specs = parse_head_specs(heads)
    for spec in specs:
        if not getattr(resolve_head_class(spec.type), "needs_text", True):
            raise ValueError(
                f"Reward head {spec.name!r} ({spec.type}) reads dataset columns, not response text, so it cannot score "
                f"generated responses. Evaluate with heads that score text (length, lexicon, readability, function, "
                f"classifier, reward_model, similarity)."
            )
    return specs


def designer_metrics(
    prompts: Sequence[Any],
    responses: Sequence[Sequence[str]],
    heads: Sequence[dict] | str | None,
    *,
    tokenizer: Any = None,
    return_scores: bool = False,
) -> dict:
    """Raw reward-head scores of generated responses (no normalisation), per head.

    Args:
        prompts: the prompts, as given to :func:`generate_responses`.
        responses: ``responses[i]`` lists the responses to ``prompts[i]``.
        heads: head spec dicts as ``UPOConfig.reward_heads`` takes them (or a JSON string of a list of them).
        tokenizer: passed to the heads (the ``length`` head with ``unit="tokens"`` and the ``function`` head use it).
        return_scores: also return every score, under ``"scores"`` in each head's entry.

    Returns:
        ``{head_name: {"mean", "std", "n", "higher_is_better", "type"}}``: ``std`` is the population standard
        deviation over all responses; ``higher_is_better`` is copied from the spec (a cost head says False: its raw
        score is reported as the head returns it, so lower is better then).

    Raises:
        ValueError: on mismatched lengths, a head that reads dataset columns instead of text (``column``), or a
            non-finite score (naming the head and the response).
    """
    from .heads import build_head

    specs = text_head_specs(heads)
    if len(prompts) != len(responses):
        raise ValueError(f"designer_metrics: {len(prompts)} prompts but {len(responses)} response lists.")
    flat_prompts = [p for p, rs in zip(prompts, responses, strict=True) for _ in rs]
    flat = [_as_completion(p, r) for p, rs in zip(prompts, responses, strict=True) for r in rs]
    out: dict[str, dict] = {}
    for spec in specs:
        head = build_head(spec)
        try:
            scores = [float(s) for s in head.score(flat_prompts, flat, role="chosen", columns={}, tokenizer=tokenizer)]
        finally:
            head.release()
        if len(scores) != len(flat):
            raise ValueError(f"Reward head {spec.name!r} returned {len(scores)} scores for {len(flat)} responses.")
        bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
        if bad:
            raise ValueError(
                f"Reward head {spec.name!r} returned a non-finite score ({scores[bad[0]]}) for response "
                f"{flat[bad[0]]!r} ({len(bad)} of {len(scores)} responses); fix the head or the responses."
            )
        t = torch.tensor(scores, dtype=torch.float64)
        entry = {
            "mean": float(t.mean()) if len(scores) else float("nan"),
            "std": float(t.std(unbiased=False)) if len(scores) else float("nan"),
            "n": len(scores),
            "higher_is_better": spec.higher_is_better,
            "type": spec.type,
        }
        if return_scores:
            entry["scores"] = scores
        out[spec.name] = entry
    return out


# ----------------------------------------------------------------------------------------------------------------
# 3. Preference metrics
# ----------------------------------------------------------------------------------------------------------------


def _pair_rows(pairs: Any) -> list[dict]:
    """Pairs as a list of dicts with prompt/chosen/rejected (an implicit prompt is extracted as DPOTrainer does)."""
    if hasattr(pairs, "column_names"):
        cols = set(pairs.column_names)
        rows = pairs.to_list() if hasattr(pairs, "to_list") else list(pairs)
    else:
        rows = [dict(r) for r in pairs]
        cols = set(rows[0]) if rows else set()
    if not rows:
        raise ValueError("preference_metrics: no pairs given.")
    missing = [c for c in ("chosen", "rejected") if c not in cols]
    if missing:
        raise ValueError(
            f"preference_metrics needs pairs with 'chosen' and 'rejected' (and 'prompt', or a prompt shared by both); "
            f"missing {missing}. Columns: {sorted(cols)}."
        )
    if "prompt" not in cols:
        from trl.data_utils import extract_prompt

        rows = [extract_prompt(r) for r in rows]
    return rows


def _tokenize_pair(tokenizer: Any, row: dict) -> tuple[list[int], list[int], list[int]]:
    """prompt ids, prompt+chosen ids, prompt+rejected ids; EOS appended to string completions (as in training)."""
    prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    if isinstance(prompt, str) != isinstance(chosen, str) or isinstance(chosen, str) != isinstance(rejected, str):
        raise ValueError(
            "A pair mixes string and conversational fields; give prompt, chosen and rejected all as strings or all as "
            "message lists."
        )
    if isinstance(prompt, str):
        eos = tokenizer.eos_token or ""
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
        return _ids(tokenizer, prompt), _ids(tokenizer, prompt + chosen), _ids(tokenizer, prompt + rejected)
    prompt, chosen, rejected = list(prompt), list(chosen), list(rejected)
    return (
        _ids(tokenizer, prompt, generation_prompt=True),
        _ids(tokenizer, prompt + chosen),
        _ids(tokenizer, prompt + rejected),
    )


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@torch.no_grad()
def completion_logps(model: Any, sequences: Sequence[list[int]], starts: Sequence[int], pad_id: int,
                     batch_size: int = 16) -> torch.Tensor:
    """Summed log-probability of ``sequences[i][starts[i]:]`` given the tokens before it.

    Args:
        model: a causal LM.
        sequences: token ids of prompt + completion.
        starts: the index of each completion's first token.
        pad_id: the id used for right padding (masked out).
        batch_size: sequences per forward pass.

    Returns:
        ``(len(sequences),)`` float64 tensor.
    """
    device = _device(model)
    with eval_mode(model):
        out = [_batch_logps(model, sequences[b : b + batch_size], starts[b : b + batch_size], pad_id, device)
               for b in range(0, len(sequences), batch_size)]
    return torch.cat(out)


def _batch_logps(model: Any, seqs: Sequence[list[int]], starts: Sequence[int], pad_id: int,
                 device: torch.device) -> torch.Tensor:
    ids, attn = _stack(seqs, pad_id, left=False)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, (s, st) in enumerate(zip(seqs, starts, strict=True)):
        mask[i, st : len(s)] = True
    logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits[:, :-1].float()
    target = ids[:, 1:].to(device)
    token_logps = logits.gather(-1, target[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (token_logps * mask[:, 1:].to(device)).sum(-1).double().cpu()


def _is_peft(model: Any) -> bool:
    return hasattr(model, "disable_adapter") and bool(getattr(model, "peft_config", None))


def preference_metrics(
    model: Any,
    tokenizer: Any,
    pairs: Any,
    *,
    ref_model: Any = None,
    beta: float = 0.1,
    batch_size: int = 16,
    return_margins: bool = False,
) -> dict:
    """Implicit-reward accuracy and margins of a policy on held-out preference pairs.

    The implicit reward of DPO is ``r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x))`` (completion tokens summed,
    EOS included for string data, tokenised as ``DPOTrainer`` does). Accuracy is the share of pairs with
    ``r(x, y_w) > r(x, y_l)``, ties counting half (so a policy equal to its reference scores 0.5, not 0).

    The reference is ``ref_model`` when given; else, for a PEFT model, the same model with its adapter disabled (as
    in training); else there is none, and the metric is the policy log-prob accuracy
    (``log pi(y_w|x) > log pi(y_l|x)``), which the result names in ``"metric"`` and a warning repeats.

    Args:
        model: the policy (loaded, or a path, see :func:`load_model`).
        tokenizer: its tokenizer (None: loaded from where the model came from).
        pairs: a ``datasets.Dataset`` or a list of dicts with ``prompt``, ``chosen``, ``rejected`` (strings, or
            message lists for conversational data; without ``prompt``, the shared prefix is the prompt).
        ref_model: the reference model (loaded or a path), or None.
        beta: DPO's beta (scales rewards and margins, not the accuracy).
        batch_size: sequences per forward pass.
        return_margins: also return every pair's margin ``r(x, y_w) - r(x, y_l)`` under ``"margins"``.

    Returns:
        ``{"accuracy", "margin_mean", "margin_std", "n", "ties", "chosen_reward_mean", "rejected_reward_mean",
        "policy_logp_accuracy", "reference", "metric", "beta"}``; ``reference`` is ``"ref_model"``,
        ``"adapter_disabled"`` or ``"none"``.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}.")
    rows = _pair_rows(pairs)
    model = load_model(model)
    tokenizer = load_tokenizer(model, tokenizer)
    pad_id = _pad_id(tokenizer)
    seqs, starts = [], []
    for row in rows:
        p, pc, pr = _tokenize_pair(tokenizer, row)
        start = min(_common_prefix(p, pc), _common_prefix(p, pr))
        seqs += [pc, pr]
        starts += [start, start]
    policy = completion_logps(model, seqs, starts, pad_id, batch_size)
    if ref_model is not None:
        kind = "ref_model"
        ref = completion_logps(load_model(ref_model), seqs, starts, pad_id, batch_size)
    elif _is_peft(model):
        kind = "adapter_disabled"
        with model.disable_adapter():
            ref = completion_logps(model, seqs, starts, pad_id, batch_size)
    else:
        kind = "none"
        ref = torch.zeros_like(policy)
        logger.warning(
            "preference_metrics: no ref_model and the policy is not a PEFT model, so there is no reference: "
            "reporting the policy log-prob accuracy (log pi(chosen) > log pi(rejected)), not DPO's implicit-reward "
            "accuracy. Pass ref_model=... (e.g. the SFT model) for the implicit reward."
        )
    rewards = beta * (policy - ref)
    chosen, rejected = rewards[0::2], rewards[1::2]
    margins = chosen - rejected
    logp_margin = policy[0::2] - policy[1::2]

    def acc(m: torch.Tensor) -> float:
        return float(((m > 0).double() + 0.5 * (m == 0).double()).mean())

    result = {
        "accuracy": acc(margins),
        "margin_mean": float(margins.mean()),
        "margin_std": float(margins.std(unbiased=False)),
        "n": len(rows),
        "ties": int((margins == 0).sum()),
        "chosen_reward_mean": float(chosen.mean()),
        "rejected_reward_mean": float(rejected.mean()),
        "policy_logp_accuracy": acc(logp_margin),
        "reference": kind,
        "metric": METRIC_NAMES[kind],
        "beta": beta,
    }
    if return_margins:
        result["margins"] = margins.tolist()
    return result


# ----------------------------------------------------------------------------------------------------------------
# All together
# ----------------------------------------------------------------------------------------------------------------


def evaluate_policy(
    model: Any,
    tokenizer: Any = None,
    *,
    prompts: Iterable[Any],
    heads: Sequence[dict] | str | None = None,
    pairs: Any = None,
    ref_model: Any = None,
    beta: float = 0.1,
    max_new_tokens: int = 64,
    num_samples: int = 1,
    batch_size: int = 16,
    seed: int = 0,
    num_examples: int = 5,
    return_responses: bool = False,
    **generation_kwargs: Any,
) -> dict:
    """Generate responses to ``prompts``, score them with ``heads`` and measure preferences on ``pairs``.

    Args:
        model: the policy: a loaded model, a model directory / Hub id, or a PEFT adapter directory.
        tokenizer: its tokenizer (None: loaded from the model's directory, or the adapter's base).
        prompts: held-out prompts (strings or message lists).
        heads: reward-head spec dicts (as ``UPOConfig.reward_heads``); None: no designer metrics.
        pairs: held-out preference pairs (Dataset or list of dicts); None: no preference metrics.
        ref_model: the reference for the implicit reward (see :func:`preference_metrics`).
        beta: DPO's beta for the implicit reward.
        max_new_tokens: see :func:`generate_responses`.
        num_samples: responses per prompt.
        batch_size: prompts per ``generate`` call and sequences per scoring forward.
        seed: the generation seed.
        num_examples: how many (prompt, response) examples to include under ``"samples"``.
        return_responses: include every response under ``"responses"``.
        **generation_kwargs: ``do_sample``, ``temperature``, ``top_p`` and anything ``model.generate`` takes.

    Returns:
        ``{"designer": {...}, "preference": {...}, "generation": {settings}, "samples": [...]}``.
    """
    text_head_specs(heads)  # a typo in a head, or a head that cannot score text, fails here, before generation
    prompts = list(prompts)
    model = load_model(model)
    tokenizer = load_tokenizer(model, tokenizer)
    settings = {
        "max_new_tokens": max_new_tokens,
        "num_samples": num_samples,
        "batch_size": batch_size,
        "seed": seed,
        "do_sample": generation_kwargs.pop("do_sample", True),
        "temperature": generation_kwargs.pop("temperature", 1.0),
        "top_p": generation_kwargs.pop("top_p", 1.0),
        **generation_kwargs,
        "num_prompts": len(prompts),
    }
    gen_args = {k: v for k, v in settings.items() if k != "num_prompts"}
    responses = generate_responses(model, tokenizer, prompts, **gen_args)
    result: dict[str, Any] = {
        "designer": designer_metrics(prompts, responses, heads, tokenizer=tokenizer) if heads else {},
        "preference": (
            preference_metrics(model, tokenizer, pairs, ref_model=ref_model, beta=beta, batch_size=batch_size)
            if pairs is not None
            else {}
        ),
        "generation": settings,
        "samples": [
            {"prompt": p, "response": rs[0]} for p, rs in list(zip(prompts, responses, strict=True))[:num_examples]
        ],
    }
    if return_responses:
        result["responses"] = responses
    return result


def require_matplotlib() -> Any:
    """Import ``matplotlib.pyplot`` with the non-interactive Agg backend, or explain how to install it.

    Raises:
        ImportError: when matplotlib is missing, naming the ``eval`` extra that provides it.
    """
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "Plots need matplotlib, which is not installed: pip install 'trl-upo[eval]' (or pip install matplotlib)."
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
