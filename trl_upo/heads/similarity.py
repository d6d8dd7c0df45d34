"""``similarity``: rewards responses that are close in meaning to exemplar responses, by the cosine similarity of
sentence embeddings (`sentence-transformers <https://www.sbert.net>`_, the ``similarity`` extra)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from ..models import check_model_path, default_device
from ._hf import LazyModelMixin, check_trust_remote_code, needs_remote_code, remote_code_message
from ..formats import completion_text
from .protocol import RewardHead
from .registry import register_head
from .schema import Param

AGGREGATES = ("max", "mean")
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


@register_head("similarity")
class SimilarityHead(LazyModelMixin, RewardHead):
    """Score = max (or mean) over the exemplars e of cos(embed(response), embed(e)), in [-1, 1].

    Parameters: the annotated ``__init__`` signature (the schema; see ``docs/heads/similarity.md``).
    """

    _lazy_attrs = ("_model", "_exemplar_emb")

    def __init__(
        self,
        exemplars: Annotated[list[str] | str, Param("example responses (a single string is one exemplar)")],
        model: Annotated[str, Param("a sentence-transformers model: local directory or Hub id")] = DEFAULT_MODEL,
        aggregate: Annotated[
            str, Param("`max` (close to any exemplar) or `mean` (close to all, on average)", choices=AGGREGATES)
        ] = "max",
        batch_size: Annotated[int, Param("texts per forward pass", speed_only=True, minimum=1)] = 64,
        device: Annotated[
            str | None,
            Param("`cpu`, `cuda`, ...", speed_only=True,
                  default_doc="the current CUDA device if any (each rank's own GPU), else CPU"),
        ] = None,
        trust_remote_code: Annotated[
            bool, Param("run the model's own code (an `auto_map` in its config) to load it: read that code first "
                        "(docs/trust.md)", permission=True)
        ] = False,
    ) -> None:
        items = [exemplars] if isinstance(exemplars, str) else exemplars
        if not isinstance(items, (list, tuple)) or not items:
            raise ValueError(
                "similarity head: exemplars must be a non-empty list of example responses, e.g. "
                "{'exemplars': ['Sure! Here is a short answer: ...']}."
            )
        if not all(isinstance(e, str) and e.strip() for e in items):
            raise ValueError(f"similarity head: every exemplar must be a non-empty string, got {items!r}.")
        if aggregate not in AGGREGATES:
            raise ValueError(f"similarity head: aggregate must be one of {list(AGGREGATES)}, got {aggregate!r}.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"similarity head: batch_size must be an integer >= 1, got {batch_size!r}.")
        if not isinstance(model, str) or not model:
            raise ValueError(f"similarity head: model must be a local path or a Hub model id, got {model!r}.")
        check_model_path(model, "similarity head")
        self.exemplars, self.model_name, self.aggregate = list(items), model, aggregate
        self.batch_size, self.device = batch_size, device
        self.trust_remote_code = check_trust_remote_code(trust_remote_code, "similarity")
        self._model = None
        self._exemplar_emb = None

    def load(self):
        """Load (once) the sentence-embedding model and embed the exemplars."""
        if self._model is None:
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError:
                raise ImportError(
                    "The similarity head needs sentence-transformers: pip install 'trl-upo[similarity]'."
                ) from None
            try:
                self._model = SentenceTransformer(self.model_name, device=self.device or default_device(),
                                                  trust_remote_code=self.trust_remote_code)
            except (OSError, ValueError) as e:
                if needs_remote_code(e, self.trust_remote_code):
                    raise ValueError(remote_code_message("similarity", self.model_name)) from e
                raise ValueError(
                    f"similarity head: cannot load {self.model_name!r} as a sentence-transformers model: {e}. "
                    f"params.model must be a local directory or a Hub id."
                ) from e
            self._exemplar_emb = self._embed(self.exemplars)
        return self._model

    def _embed(self, texts: list[str]):
        # Unit vectors (sentence-transformers divides by max(norm, 1e-12)), so a dot product is the cosine and an
        # all-zero embedding gives similarity 0 rather than NaN.
        emb = self._model.encode(
            texts,
            batch_size=self.batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return emb.float().cpu()

    def score(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        *,
        role: str,
        columns: dict[str, list[Any]],
        tokenizer: Any = None,
    ) -> list[float]:
        if not completions:
            return []
        self.load()
        sims = self._embed([completion_text(c) for c in completions]) @ self._exemplar_emb.T  # (N, E)
        values = sims.max(dim=1).values if self.aggregate == "max" else sims.mean(dim=1)
        return values.double().tolist()
