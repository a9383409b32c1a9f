"""The contract between the scheduler and an inference library: everything the step loop of
``base.ModelInstance`` asks of llama.cpp (``llama.LlamaBackend``), and what the fake engine
(``fake.FakeBackend``) answers in its place for fast tests.

A backend owns the weights, the KV cache and the samplers; it knows nothing of requests,
slots or queues. Every call comes from the instance's own thread. Sequence ids are slot ids;
positions in a sequence's KV are the slot's token indexes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lmscli.engine.drafting import StepCost
from lmscli.engine.promptcache import State
from lmscli.engine.slots import Batch
from lmscli.engine.types import DraftModel, LoadOptions, PredictionRequest

ProgressFn = Callable[[float], bool | None]


class GrammarError(ValueError):
    """The backend rejected a request's grammar."""


class PredictionFailure(Exception):
    """A prediction that fails for a reason the user should read as it is."""


class DraftModelError(ValueError):
    """A draft model that cannot draft for this model (unreadable, another vocabulary)."""


@dataclass
class ModelSpec:
    """What the engine needs to know about a model file."""

    path: str
    model_key: str
    architecture: str | None = None
    max_context_length: int | None = None
    chat_template: str | None = None
    is_embedding: bool = False


class Backend:
    """One loaded model in an inference library. The defaults are what a backend without the
    feature does (no KV editing, no saved states, no draft models)."""

    name = "base"
    version = "0"  # a saved state is restored only by the version that saved it
    kv_type = "f16"
    n_batch = 512  # most tokens one decode takes

    def __init__(self, spec: ModelSpec, options: LoadOptions) -> None:
        self.spec = spec
        self.options = options
        # what a decode costs by its tokens: drafting guesses only as far as this pays
        self.step_cost = StepCost()

    # -- loading ---------------------------------------------------------------------------

    def load(self, context_length: int, n_seq: int, on_progress: ProgressFn | None) -> int:
        """Load the weights and a KV cache for ``n_seq`` sequences; returns the context
        length the library gave (it may round the one asked for)."""
        raise NotImplementedError

    def unload(self) -> None:
        pass

    def attach_draft(self, draft: DraftModel, context_length: int, n_seq: int) -> None:
        """Load ``draft`` to guess for this model, replacing the one attached; raises
        ``DraftModelError`` when it can't."""
        raise DraftModelError(f"The {self.name} engine has no draft models.")

    def draft_tokens(self, wants: list[tuple[int, list[int], int]]) -> list[list[int]]:
        """For each (sequence id, its tokens, most): the draft model's guesses to follow."""
        raise NotImplementedError

    # -- tokens ----------------------------------------------------------------------------

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        raise NotImplementedError

    def wants_bos(self, prompt: str) -> bool:
        """Whether a prompt gets the model's BOS token (it wants one and has none)."""
        return False

    def piece(self, token: int) -> bytes:
        raise NotImplementedError

    def is_eog(self, token: int) -> bool:
        raise NotImplementedError

    @property
    def bos_token(self) -> str:
        return ""

    @property
    def eos_token(self) -> str:
        return ""

    # -- sampling --------------------------------------------------------------------------

    def check_grammar(self, grammar: str) -> str | None:
        """Why the library would reject this GBNF grammar, or None when it accepts it (any
        thread: it reads only the vocabulary)."""
        return None

    def new_sampler(self, request: PredictionRequest) -> Any:
        """Per-sequence sampling state; raises ``GrammarError`` for a rejected grammar."""
        raise NotImplementedError

    def free_sampler(self, sampler: Any) -> None:
        pass

    def sample(self, sampler: Any, index: int) -> int:
        """The next token from the logits of the last decode's ``index``-th batch entry."""
        raise NotImplementedError

    # -- the KV cache ----------------------------------------------------------------------

    def decode(self, batch: Batch) -> int:
        """Decode the batch: 0 done, 1 no room in the KV cache (nothing changed), anything
        else an error."""
        raise NotImplementedError

    def seq_rm(self, seq_id: int, start: int) -> bool:
        """Drop positions ``start`` and after from a sequence's KV; False if impossible."""
        return True

    def seq_cp(self, src: int, dst: int, count: int) -> None:
        """Share the first ``count`` positions of ``src`` with ``dst``."""

    def save_state(self, seq_id: int) -> State | None:
        """A copy of the sequence's KV state, for the prompt cache; None: not supported."""
        return None

    def restore_state(self, seq_id: int, data: State) -> bool:
        """Load a state from ``save_state`` into an empty sequence; False when refused."""
        return False

    # -- embeddings ------------------------------------------------------------------------

    def embed_texts(self, texts: list[str], first: int = 0) -> list[list[float]]:
        """One unit vector per text; ``first`` is the first text's index, for errors (a
        ValueError for an input the model can't take)."""
        raise NotImplementedError
