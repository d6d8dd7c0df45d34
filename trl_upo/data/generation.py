"""Text generation for the data builders: batched ``transformers`` generation, or vLLM when installed and asked for.

Every call takes an explicit seed (the builders derive one per batch from the run's seed), so a batch generates the
same text whether it runs in one go or after a resume.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from typing import Any

from ..formats import is_conversational
from ..models import DTYPES, check_model_path, load_model, load_tokenizer

BACKENDS = ("transformers", "vllm")


@dataclass
class GenerationSettings:
    """How responses are generated.

    Attributes:
        model: local directory or Hugging Face Hub id of a causal language model (its tokenizer is loaded from the
            same place).
        backend: ``"transformers"`` (batched ``model.generate``) or ``"vllm"`` (needs the ``vllm`` package and a GPU).
        max_new_tokens: maximum tokens per response.
        do_sample: sample (True) or decode greedily (False). Several candidates per prompt need sampling.
        temperature: sampling temperature (> 0).
        top_p: nucleus-sampling mass in (0, 1].
        dtype: ``"auto"``, ``"float32"``, ``"float16"`` or ``"bfloat16"``; None loads in float32 (transformers) or
            the model's dtype (vLLM).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; None: the first GPU when there is one, else the CPU.
        revision: the Hub revision (branch, tag or commit) of the model.
        stop: strings that end a response: the text is cut before the first one (e.g. ``["\n\nHuman:"]`` for a base
            model prompted with the default critique templates, which would otherwise write the next turn).
    """

    model: str
    backend: str = "transformers"
    max_new_tokens: int = 256
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    dtype: str | None = None
    device: str | None = None
    revision: str | None = None
    stop: list[str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a local path or a Hugging Face Hub model id, got {self.model!r}.")
        check_model_path(self.model, "GenerationSettings.model (--model)")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {self.backend!r}.")
        if self.backend == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ValueError(
                "backend='vllm' needs the vllm package, which is not installed: `pip install vllm` (on a machine "
                "with a supported GPU), or use backend='transformers'."
            )
        if self.backend == "vllm" and self.device is not None:
            raise ValueError(
                "device is not used by the vllm backend: vLLM places the model on the visible GPUs itself. Choose "
                "them with CUDA_VISIBLE_DEVICES, and leave device unset."
            )
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}.")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}. For greedy decoding set do_sample "
                             f"to false.")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}.")
        if self.stop is not None:
            if isinstance(self.stop, str):
                self.stop = [self.stop]
            if not all(isinstance(x, str) and x for x in self.stop):
                raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}.")
            self.stop = list(self.stop)
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)} or null, got {self.dtype!r}.")

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-serialisable dict."""
        return asdict(self)


def make_generator(settings: GenerationSettings) -> Generator:
    """The generator for ``settings.backend`` (the model loads at the first call, not here)."""
    return VLLMGenerator(settings) if settings.backend == "vllm" else TransformersGenerator(settings)


class Generator:
    """Base class: ``generate(prompts, n, seed)`` returns ``n`` response texts per prompt."""

    def __init__(self, settings: GenerationSettings) -> None:
        self.settings = settings
        self._tokenizer = None

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (loaded on first use)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(
                self.settings.model,
                revision=self.settings.revision,
                padding_side="left",
                pad_token=True,
                hint="Check GenerationSettings.model (--model).",
            )
        return self._tokenizer

    def render(self, prompt: Any) -> str:
        """A prompt as model input text: conversational prompts through the chat template with the generation prompt."""
        if is_conversational(prompt):
            tok = self.tokenizer
            if getattr(tok, "chat_template", None) is None:
                raise ValueError(
                    f"The prompts are conversational (message lists) but the tokenizer of {self.settings.model!r} has "
                    f"no chat template. Use a chat model, or give standard (string) prompts."
                )
            return tok.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
        return prompt

    def generate(self, prompts: list[Any], n: int, seed: int) -> list[list[str]]:
        """Generate ``n`` responses for each prompt.

        Args:
            prompts: strings (standard) or message lists (conversational; rendered with the chat template).
            n: responses per prompt.
            seed: the sampling seed of this call.

        Returns:
            ``len(prompts)`` lists of ``n`` texts. For a standard prompt the text is what follows the prompt in the
            decoded sequence, so it keeps its leading space and ``prompt + text`` reads as the model wrote it.
        """
        raise NotImplementedError

    def release(self) -> None:
        """Free the model."""

    def cut(self, text: str) -> str:
        """``text`` up to the first stop string (the whole text when there is none)."""
        for stop in self.settings.stop or ():
            at = text.find(stop)
            if at >= 0:
                text = text[:at]
        return text


class TransformersGenerator(Generator):
    """Batched ``AutoModelForCausalLM.generate`` with left padding."""

    def __init__(self, settings: GenerationSettings) -> None:
        super().__init__(settings)
        self._model = None

    @property
    def model(self) -> Any:
        """The causal language model, in eval mode on ``settings.device`` (loaded on first use)."""
        if self._model is None:
            s = self.settings
            try:
                self._model = load_model(s.model, dtype=s.dtype, device=s.device, revision=s.revision)
            except (OSError, ValueError) as e:
                raise ValueError(f"Cannot load {s.model!r} as a causal language model: {e}") from e
        return self._model

    def generate(self, prompts: list[Any], n: int, seed: int) -> list[list[str]]:  # noqa: D102 (documented on base)
        import torch

        tok, model = self.tokenizer, self.model
        conversational = [is_conversational(p) for p in prompts]
        texts = [self.render(p) for p in prompts]
        # A chat template writes its own special tokens; a plain prompt gets the tokenizer's usual ones.
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=not any(conversational))
        enc = {k: v.to(model.device) for k, v in enc.items()}
        gen_kwargs: dict[str, Any] = dict(
            max_new_tokens=self.settings.max_new_tokens,
            do_sample=self.settings.do_sample,
            num_return_sequences=n,
            pad_token_id=tok.pad_token_id,
        )
        if self.settings.do_sample:
            gen_kwargs.update(temperature=float(self.settings.temperature), top_p=float(self.settings.top_p))
        else:
            gen_kwargs.update(temperature=None, top_p=None, top_k=None)
        torch.manual_seed(seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)
        with torch.no_grad():
            out = model.generate(**enc, **gen_kwargs)
        width = enc["input_ids"].shape[1]
        results: list[list[str]] = []
        for i in range(len(prompts)):
            mask = enc["attention_mask"][i].bool()
            prompt_ids = enc["input_ids"][i][mask].tolist()
            row = []
            for j in range(n):
                new_ids = out[i * n + j, width:].tolist()
                row.append(self.cut(self._decode(prompt_ids, new_ids, conversational[i])))
            results.append(row)
        return results

    def _decode(self, prompt_ids: list[int], new_ids: list[int], conversational: bool) -> str:
        tok = self.tokenizer
        if tok.eos_token_id is not None and tok.eos_token_id in new_ids:
            new_ids = new_ids[: new_ids.index(tok.eos_token_id)]
        if conversational:
            return tok.decode(new_ids, skip_special_tokens=True).strip()
        # Decoding the continuation alone loses the space between prompt and response with many tokenizers; the
        # response is the decoded sequence minus the decoded prompt.
        head = tok.decode(prompt_ids, skip_special_tokens=True)
        full = tok.decode(prompt_ids + new_ids, skip_special_tokens=True)
        return full[len(head) :] if full.startswith(head) else tok.decode(new_ids, skip_special_tokens=True)

    def release(self) -> None:  # noqa: D102
        self._model = None


class VLLMGenerator(Generator):
    """Generation with vLLM's offline ``LLM`` engine (GPU). Prompts are rendered to text the same way as for
    transformers; one ``SamplingParams`` with ``n`` and the call's seed."""

    def __init__(self, settings: GenerationSettings) -> None:
        super().__init__(settings)
        self._llm = None

    @property
    def llm(self) -> Any:
        """The ``vllm.LLM`` engine (created on first use)."""
        if self._llm is None:
            from vllm import LLM

            kwargs: dict[str, Any] = {"model": self.settings.model}
            if self.settings.revision:
                kwargs["revision"] = self.settings.revision
            if self.settings.dtype:
                kwargs["dtype"] = self.settings.dtype
            self._llm = LLM(**kwargs)
        return self._llm

    def generate(self, prompts: list[Any], n: int, seed: int) -> list[list[str]]:  # noqa: D102
        from vllm import SamplingParams

        params = SamplingParams(
            n=n,
            max_tokens=self.settings.max_new_tokens,
            temperature=float(self.settings.temperature) if self.settings.do_sample else 0.0,
            top_p=float(self.settings.top_p) if self.settings.do_sample else 1.0,
            seed=seed,
            stop=self.settings.stop,
        )
        texts = [self.render(p) for p in prompts]
        outputs = self.llm.generate(texts, params, use_tqdm=False)
        results = []
        for prompt, request in zip(prompts, outputs, strict=True):
            conv = is_conversational(prompt)
            results.append([self.cut(o.text).strip() if conv else self.cut(o.text) for o in request.outputs])
        return results

    def release(self) -> None:  # noqa: D102
        self._llm = None


def batch_seed(seed: int, batch_index: int, stage: str = "") -> int:
    """The sampling seed of one batch (and stage) of a run: a function of the run's seed and the batch only, so a
    resumed run samples exactly what an uninterrupted one would."""
    import hashlib

    return int(hashlib.sha256(f"{seed}:{batch_index}:{stage}".encode()).hexdigest()[:8], 16)
