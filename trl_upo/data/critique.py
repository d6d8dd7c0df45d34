"""Self-critique revisions (Constitutional AI): a model answers a prompt, critiques its answer under a principle,
and rewrites it; the revision is the chosen response and the original answer the rejected one.

The default principle is the example of the seed article (harmful, unethical, racist, sexist, toxic, dangerous or
illegal content). Templates are ``str.format`` strings whose placeholders are checked before anything is generated.
"""

from __future__ import annotations

import difflib
import logging
import random
import string
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ..formats import (
    DataError,
    as_completion,
    check_prompt_column,
    completion_text,
    is_conversational,
    mapping_list,
    prompt_text,
)
from .builder import check_column, check_output, run_builder, run_fingerprint
from .generation import Generator, GenerationSettings, batch_seed, make_generator
from .io import OutputSettings

logger = logging.getLogger(__name__)


@dataclass
class Principle:
    """One constitutional principle: how to ask for a critique, and how to ask for the revision.

    Attributes:
        name: stored in the output's ``principle`` column.
        critique_request: fills ``{critique_request}`` in the critique template.
        revision_request: fills ``{revision_request}`` in the revision template.
    """

    name: str
    critique_request: str
    revision_request: str

    def __post_init__(self) -> None:
        for key in ("name", "critique_request", "revision_request"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"A principle's {key!r} must be a non-empty string, got {value!r}.")


DEFAULT_PRINCIPLES = [
    Principle(
        name="harmless",
        critique_request=(
            "Identify specific ways in which the assistant's last response is harmful, unethical, racist, sexist, "
            "toxic, dangerous, or illegal."
        ),
        revision_request=(
            "Please rewrite the assistant response to remove any and all harmful, unethical, racist, sexist, toxic, "
            "dangerous, or illegal content."
        ),
    )
]

DEFAULT_CRITIQUE_TEMPLATE = (
    "Human: {prompt}\n\nAssistant: {response}\n\nCritiqueRequest: {critique_request}\n\nCritique:"
)
DEFAULT_REVISION_TEMPLATE = (
    "Human: {prompt}\n\nAssistant: {response}\n\nCritiqueRequest: {critique_request}\n\nCritique: {critique}\n\n"
    "RevisionRequest: {revision_request}\n\nRevision:"
)

#: template -> (placeholders it must contain, placeholders it may contain)
TEMPLATE_FIELDS = {
    "critique_template": ({"prompt", "response", "critique_request"}, set()),
    "revision_template": ({"prompt", "response", "critique", "revision_request"}, {"critique_request"}),
}
SELECTIONS = ("random", "all")
#: The columns a critique run writes (``revisions`` only with more than one round).
OUTPUT_COLUMNS = ("prompt", "chosen", "rejected", "critique", "principle", "revisions")


def check_template(name: str, template: str) -> None:
    """Check that ``template`` has every placeholder it needs and no unknown one.

    Raises:
        ValueError: naming the missing or unknown placeholders (with a did-you-mean), or a malformed template.
    """
    required, optional = TEMPLATE_FIELDS[name]
    if not isinstance(template, str) or not template.strip():
        raise ValueError(f"{name} must be a non-empty string, got {template!r}.")
    try:
        found = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ValueError(
            f"{name} is not a valid format string ({e}); write a literal brace as '{{{{' or '}}}}'."
        ) from e
    bad = [f for f in found if not f.isidentifier()]
    if bad:
        raise ValueError(f"{name} has placeholders {bad} that are not plain names; write literal braces as '{{{{'.")
    unknown = sorted(found - required - optional)
    if unknown:
        hints = []
        for f in unknown:
            close = difflib.get_close_matches(f, sorted(required | optional), n=1)
            hints.append(f"{{{f}}}" + (f" (did you mean {{{close[0]}}}?)" if close else ""))
        raise ValueError(
            f"{name} has unknown placeholder(s) {', '.join(hints)}. It may use {sorted(required | optional)}."
        )
    missing = sorted(required - found)
    if missing:
        raise ValueError(
            f"{name} is missing placeholder(s) {['{' + m + '}' for m in missing]}: without them the model never sees "
            f"that text. It needs all of {sorted('{' + r + '}' for r in required)}."
        )


def _parse_principles(value: Any) -> list[Principle]:
    example = '\'[{"name": ..., "critique_request": ..., "revision_request": ...}]\''
    value = mapping_list(value, "principles", example, (dict, Principle))
    if value is None:
        return list(DEFAULT_PRINCIPLES)
    if not value:
        raise ValueError(f"principles must be a non-empty list, got {value!r}.")
    keys = ("name", "critique_request", "revision_request")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, Principle):
            out.append(item)
            continue
        if not isinstance(item, dict):
            raise ValueError(f"principles[{i}] must be a mapping with keys {list(keys)}, got {item!r}.")
        unknown = sorted(set(item) - set(keys))
        if unknown:
            hints = [
                f"{k!r}" + (f" (did you mean {c[0]!r}?)" if (c := difflib.get_close_matches(k, keys, n=1)) else "")
                for k in unknown
            ]
            raise ValueError(f"principles[{i}] has unknown key(s) {', '.join(hints)}. Valid keys: {list(keys)}.")
        missing = [k for k in keys if k not in item]
        if missing:
            raise ValueError(f"principles[{i}] is missing {missing}. Each principle needs {list(keys)}.")
        out.append(Principle(**item))
    names = [p.name for p in out]
    if len(set(names)) != len(names):
        raise ValueError(f"Principle names must be unique, got {names}.")
    return out


@dataclass
class CritiqueConfig:
    """Settings of a critique run.

    Attributes:
        generation: the model that answers, critiques and revises (a :class:`GenerationSettings` or a dict of its
            fields).
        prompt_column: the column holding prompts (strings, or message lists for conversational data).
        response_column: critique existing answers from this column instead of generating them.
        principles: a list of :class:`Principle` or of mappings with ``name``, ``critique_request`` and
            ``revision_request`` (or a JSON string of one); default :data:`DEFAULT_PRINCIPLES`.
        principle_selection: ``"random"`` (one principle per prompt, drawn with the seed) or ``"all"`` (one pair per
            prompt and principle).
        critique_template: placeholders ``{prompt}``, ``{response}``, ``{critique_request}``.
        revision_template: placeholders ``{prompt}``, ``{response}``, ``{critique}``, ``{revision_request}``, and
            optionally ``{critique_request}``.
        num_revisions: critique-and-revise rounds (>= 1): each round critiques the previous round's revision. With
            ``principle_selection="random"`` every round draws its own principle; with ``"all"`` each chain keeps
            its principle. More than one round adds a ``revisions`` column: every round's principle, critique and
            revision.
        batch_size: prompts per batch (and per shard: an interruption loses at most one batch).
        seed: the run's seed; each batch and stage samples with a seed derived from it.

    With conversational prompts, a filled template is sent as one user message through the model's chat template,
    and ``{prompt}`` is the prompt's text (``role: content`` lines when it has several messages).
    """

    generation: GenerationSettings | dict | None = None
    prompt_column: str = "prompt"
    response_column: str | None = None
    principles: Any = None
    principle_selection: str = "random"
    critique_template: str = DEFAULT_CRITIQUE_TEMPLATE
    revision_template: str = DEFAULT_REVISION_TEMPLATE
    num_revisions: int = 1
    batch_size: int = 8
    seed: int = 0
    principle_list: list[Principle] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_template("critique_template", self.critique_template)
        check_template("revision_template", self.revision_template)
        self.principle_list = _parse_principles(self.principles)
        if self.principle_selection not in SELECTIONS:
            raise ValueError(
                f"principle_selection must be one of {list(SELECTIONS)}, got {self.principle_selection!r}."
            )
        if isinstance(self.generation, dict):
            self.generation = GenerationSettings(**self.generation)
        if self.generation is None:
            raise ValueError("critique needs a model to critique and revise with: generation={'model': ...} (--model).")
        if not isinstance(self.num_revisions, int) or isinstance(self.num_revisions, bool) or self.num_revisions < 1:
            raise ValueError(f"num_revisions must be an integer >= 1, got {self.num_revisions!r}.")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}.")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}.")

    def principles_for(self, row_index: int) -> list[list[Principle]]:
        """The principle chains applied to the prompt of row ``row_index``: one chain per pair, one principle per
        round (a function of the seed and the row only)."""
        if self.principle_selection == "all":
            return [[p] * self.num_revisions for p in self.principle_list]
        rng = random.Random(f"{self.seed}:{row_index}")
        return [[rng.choice(self.principle_list) for _ in range(self.num_revisions)]]


def build_critique_pairs(
    dataset: Any,
    config: CritiqueConfig,
    output: OutputSettings | None = None,
    *,
    on_batch: Callable[[int], None] | None = None,
) -> Any:
    """Build critique-and-revision pairs: ``chosen`` = revision, ``rejected`` = original answer.

    Args:
        dataset: a ``datasets.Dataset`` with a prompt column (and the answers, with ``response_column``).
        config: the run's settings (templates and principles are already checked).
        output: where to write the pairs and the resumable shards; None keeps shards in a temporary directory.
        on_batch: called with each batch's index once it is stored.

    Returns:
        A ``Dataset`` with ``prompt``, ``chosen``, ``rejected``, ``critique``, ``principle`` (the last round's),
        ``revisions`` (every round, when ``num_revisions > 1``) and the other input columns.
    """
    conversational = check_prompt_column(dataset, config.prompt_column)
    if config.response_column is not None:
        check_column(dataset, config.response_column, "response")
        for i, value in enumerate(dataset[config.response_column]):
            if not (isinstance(value, str) or is_conversational(value)):
                raise DataError(
                    f"Row {i}: {config.response_column!r} must hold a string or a list of messages, got {value!r}."
                )
    passthrough = check_output(
        dataset,
        output,
        consumed={config.prompt_column, config.response_column},
        produced=OUTPUT_COLUMNS,
        hint="; existing answers go in response_column",
    )
    generator = make_generator(config.generation)
    unchanged: list[int] = []  # per batch of this run: revisions identical to their original answer

    def process(rows: list[dict[str, Any]], b: int, start: int) -> list[dict[str, Any]]:
        out = _critique_batch(config, generator, rows, b, start, conversational, passthrough)
        unchanged.append(sum(_same_text(r["chosen"], r["rejected"]) for r in out))
        return out

    def summary() -> None:
        if sum(unchanged):
            logger.warning(
                "%d revision(s) built in this run are identical to the original answer: those pairs carry no "
                "preference signal (they are kept; chosen == rejected marks them).",
                sum(unchanged),
            )

    return run_builder(
        dataset,
        output,
        fingerprint=_fingerprint(dataset, config),
        batch_size=config.batch_size,
        process=process,
        desc="Critique and revision",
        on_batch=on_batch,
        release=[generator],
        summary=summary,
    )


def _critique_batch(
    config: CritiqueConfig,
    generator: Generator,
    rows: list[dict[str, Any]],
    b: int,
    start: int,
    conversational: bool,
    passthrough: list[str],
) -> list[dict[str, Any]]:
    """The output rows of one batch: answer (or read the answers), then critique and revise, round after round."""
    prompts = [r[config.prompt_column] for r in rows]
    if config.response_column is not None:
        answers = [completion_text(r[config.response_column]) for r in rows]
    else:
        answers = [t[0] for t in generator.generate(prompts, 1, batch_seed(config.seed, b, "answer"))]
    jobs = [(i, chain) for i in range(len(rows)) for chain in config.principles_for(start + i)]
    history = _revise(config, generator, [prompts[i] for i, _ in jobs], [answers[i] for i, _ in jobs],
                      [chain for _, chain in jobs], b, conversational)
    out = []
    for (i, _), rounds in zip(jobs, history, strict=True):
        original = rows[i][config.response_column] if config.response_column is not None else answers[i]
        if conversational and isinstance(original, str):
            original = as_completion(original, True)
        revision = rounds[-1]["revision"]
        chosen = as_completion(revision.strip(), True) if conversational else _like(original, revision)
        row = {
            "prompt": prompts[i],
            "chosen": chosen,
            "rejected": original,
            "critique": rounds[-1]["critique"],
            "principle": rounds[-1]["principle"],
        }
        if config.num_revisions > 1:
            row["revisions"] = [{**h, "revision": h["revision"].strip()} for h in rounds]
        row.update({c: rows[i][c] for c in passthrough})
        out.append(row)
    return out


def _revise(
    config: CritiqueConfig,
    generator: Generator,
    prompts: list[Any],
    answers: list[str],
    chains: list[list[Principle]],
    b: int,
    conversational: bool,
) -> list[list[dict[str, str]]]:
    """Every job's rounds (``{principle, critique, revision}``): each round critiques the previous round's text under
    its principle and revises it; each stage is one ``generate`` call with batch ``b``'s seed for that stage."""

    def ask(texts: list[str]) -> list[Any]:
        # A filled template is plain text for a standard model input, one user message for a chat model.
        return [[{"role": "user", "content": t}] for t in texts] if conversational else texts

    current = [a.strip() for a in answers]
    history: list[list[dict[str, str]]] = [[] for _ in chains]
    for r in range(config.num_revisions):
        suffix = "" if r == 0 else str(r)  # round 0 keeps the stage names of a one-round run
        fields = [
            {"prompt": prompt_text(p), "response": current[k], "critique_request": chain[r].critique_request}
            for k, (p, chain) in enumerate(zip(prompts, chains, strict=True))
        ]
        critique_inputs = ask([config.critique_template.format(**f) for f in fields])
        seed = batch_seed(config.seed, b, "critique" + suffix)
        critiques = [t[0].strip() for t in generator.generate(critique_inputs, 1, seed)]
        revision_inputs = ask(
            [
                config.revision_template.format(**f, critique=c, revision_request=chain[r].revision_request)
                for f, c, chain in zip(fields, critiques, chains, strict=True)
            ]
        )
        seed = batch_seed(config.seed, b, "revision" + suffix)
        revisions = [t[0] for t in generator.generate(revision_inputs, 1, seed)]
        for k, (critique, revision) in enumerate(zip(critiques, revisions, strict=True)):
            history[k].append({"principle": chains[k][r].name, "critique": critique, "revision": revision})
        current = [t.strip() for t in revisions]
    return history


def _same_text(a: Any, b: Any) -> bool:
    """Whether two responses (strings or message lists) have the same text, surrounding whitespace aside."""
    return completion_text(a).strip() == completion_text(b).strip()


def _like(original: Any, revision: str) -> str:
    """A standard-format revision, separated from the prompt the way the original answer is (a leading space)."""
    text = revision.strip()
    if isinstance(original, str) and original[:1].isspace():
        return original[: len(original) - len(original.lstrip())] + text
    return text


def _fingerprint(dataset: Any, config: CritiqueConfig) -> str:
    settings = {k: v for k, v in asdict(config).items() if k not in ("generation", "principles", "principle_list")}
    settings["generation"] = config.generation.to_dict()
    settings["principles"] = [asdict(p) for p in config.principle_list]
    return run_fingerprint("critique", settings, dataset)
