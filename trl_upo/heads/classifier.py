"""``classifier``: the probability (or logit) of chosen labels under any ``AutoModelForSequenceClassification``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from ..formats import completion_text
from ..models import DTYPES
from ._hf import HFSequenceClassifierHead
from .registry import register_head
from .schema import Param

OUTPUTS = ("probability", "logit")


@register_head("classifier")
class ClassifierHead(HFSequenceClassifierHead):
    """Score = sum over ``labels`` of p(label | response) (``output="probability"``) or of the logits.

    Probabilities are a softmax over the model's labels, or a per-label sigmoid when the model has one label or its
    ``config.problem_type`` is ``"multi_label_classification"``.

    Parameters: the annotated ``__init__`` signature (the schema; see ``docs/heads/classifier.md``).
    """

    _kind = "classifier"

    def __init__(
        self,
        model: Annotated[str, Param("local directory or Hub id; the tokenizer is loaded from the same place")],
        labels: Annotated[
            str | int | list[str | int],
            Param("label name(s) from `config.id2label` (a unique case-insensitive match is accepted) or index(es)"),
        ],
        output: Annotated[str, Param("`probability` or `logit`", choices=OUTPUTS)] = "probability",
        batch_size: Annotated[int, Param("responses per forward pass", speed_only=True, minimum=1)] = 32,
        device: Annotated[str | None, Param("`cpu`, `cuda`, `cuda:1`, ...", speed_only=True, default_doc="the current CUDA device if any (each rank's own GPU), else CPU")] = None,
        max_length: Annotated[
            int | None, Param("truncate inputs to this many tokens (from the right); `null` for no truncation",
                              minimum=2)
        ] = 512,
        include_prompt: Annotated[bool, Param("classify the (prompt, response) pair")] = False,
        dtype: Annotated[
            str | None, Param("`auto`, `float32`, `float16` or `bfloat16`", choices=DTYPES, default_doc="float32")
        ] = None,
        revision: Annotated[str | None, Param("Hub branch, tag or commit")] = None,
        trust_remote_code: Annotated[
            bool, Param("run the model's own code (an `auto_map` in its config) to load it: read that code first "
                        "(docs/trust.md)", permission=True)
        ] = False,
    ) -> None:
        self._init_model(model, batch_size, device, max_length, dtype, revision, trust_remote_code)
        label_list = labels if isinstance(labels, (list, tuple)) else [labels]
        if not label_list or not all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in label_list):
            raise ValueError(
                f"classifier head: labels must be a label name, an index, or a non-empty list of them, got {labels!r}."
            )
        if output not in OUTPUTS:
            raise ValueError(f"classifier head: output must be one of {list(OUTPUTS)}, got {output!r}.")
        if not isinstance(include_prompt, bool):
            raise ValueError(f"classifier head: include_prompt must be true or false, got {include_prompt!r}.")
        self.labels, self.output, self.include_prompt = list(label_list), output, include_prompt
        self._label_ids: list[int] | None = None

    def _on_load(self, model: Any, tokenizer: Any) -> None:
        id2label = {int(i): str(name) for i, name in (model.config.id2label or {}).items()}
        n = model.config.num_labels
        ids = []
        for label in self.labels:
            if isinstance(label, int):
                if not -n <= label < n:
                    raise ValueError(
                        f"classifier head: label index {label} is out of range for {self.model_name!r}, which has "
                        f"{n} label(s): {id2label}. Use an index in 0..{n - 1} or a label name."
                    )
                ids.append(label % n)
                continue
            matches = [i for i, name in id2label.items() if name == label]
            if not matches:  # 'toxic' for 'TOXIC': unambiguous spellings are accepted
                matches = [i for i, name in id2label.items() if name.lower() == label.lower()]
            if len(matches) != 1:
                raise ValueError(
                    f"classifier head: label {label!r} is not one of the labels of {self.model_name!r}: "
                    f"{sorted(id2label.values())} (config.id2label). Set params.labels to one of these names or to "
                    f"an index in 0..{n - 1}."
                )
            ids.append(matches[0])
        if len(set(ids)) != len(ids):
            raise ValueError(f"classifier head: labels {self.labels} name the same label twice (indices {ids}).")
        self._label_ids = ids
        self._sigmoid = n == 1 or getattr(model.config, "problem_type", None) == "multi_label_classification"

    def release(self) -> None:
        super().release()
        self._label_ids = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_label_ids"] = None
        return state

    def score(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        *,
        role: str,
        columns: dict[str, list[Any]],
        tokenizer: Any = None,
    ) -> list[float]:
        import torch

        texts = [completion_text(c) for c in completions]
        if self.include_prompt:
            logits = self.logits(pairs=[(completion_text(p), t) for p, t in zip(prompts, texts, strict=True)])
        else:
            logits = self.logits(texts)
        if self.output == "probability":
            values = torch.sigmoid(logits) if self._sigmoid else torch.softmax(logits, dim=-1)
        else:
            values = logits
        return values[:, self._label_ids].sum(dim=-1).double().tolist()
