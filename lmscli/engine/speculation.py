"""Speculative decoding beside the scheduler: which generating sequences guess their next
tokens this step, how many, and from what (the n-gram ``Drafter`` over the model's recent
text, or the draft model attached to the backend). The scheduler puts the guesses in the
batch and verifies them; this module never decodes for the model.
"""

from __future__ import annotations

from lmscli.engine.backend import Backend
from lmscli.engine.drafting import Drafter, DraftPool, StepPlan
from lmscli.engine.slots import Sequence
from lmscli.engine.types import DraftModel, LoadOptions

MODEL_DRAFT_MAX = 16  # a draft model's guesses a step, unless the load says otherwise


class Speculation:
    """One model instance's guessing: the pool its sequences draft from, the draft model."""

    def __init__(self, backend: Backend, options: LoadOptions) -> None:
        self.backend = backend
        self.options = options
        self.pool = DraftPool()  # the n-gram drafts' contexts, shared by the sequences
        self.draft_model: DraftModel | None = None  # the one attached, drafting on request

    def use(self, draft: DraftModel | None, context_length: int, n_seq: int) -> None:
        """Attach ``draft`` (or keep the one attached); raises ``DraftModelError`` when it
        can't draft for this model."""
        if draft is None or draft == self.draft_model:
            return
        self.backend.attach_draft(draft, context_length, n_seq)
        self.draft_model = draft

    def guess(self, generating: list[Sequence], rooms: list[int]) -> None:
        """Set each sequence's ``draft``: at most its room, and only as far as a guess
        raises the tokens the whole batch writes per unit of time."""
        plan = StepPlan(self.backend.step_cost, len(generating), len(generating))
        modelled = self._model_drafts([(s, room) for s, room in zip(generating, rooms, strict=True)
                                       if room > 0 and self._with_model(s)])
        for seq, room in zip(generating, rooms, strict=True):
            seq.draft = modelled[seq] if seq in modelled else self._ngram_draft(seq, room, plan)
            plan.add(len(seq.draft), seq.drafter.gain if seq.draft and seq.drafter else 0.0)

    def _ngram_draft(self, seq: Sequence, room: int, plan: StepPlan) -> list[int]:
        mode = seq.prediction.request.speculative or self.options.speculative
        if mode != "ngram" or room < 1:
            return []
        if seq.drafter is None:
            most, least = self._lengths(seq)
            seq.drafter = Drafter(seq.slot.tokens, self.pool, most=most, least=least)
        return seq.drafter.draft(seq.last_token, room, plan)

    def _with_model(self, seq: Sequence) -> bool:
        request = seq.prediction.request
        wanted = request.draft_model or self.options.draft_model
        return wanted is not None and request.speculative != "off" and \
            self.draft_model == wanted

    def _model_drafts(self, wants: list[tuple[Sequence, int]]) -> dict[Sequence, list[int]]:
        """The draft model's guesses for the sequences that draft with it, in one go."""
        if not wants or self.draft_model is None:
            return {}
        lengths = [self._lengths(s) for s, _ in wants]
        drafts = self.backend.draft_tokens([
            (s.slot.id, [*s.slot.tokens, s.last_token], min(room, most or MODEL_DRAFT_MAX))
            for (s, room), (most, _) in zip(wants, lengths, strict=True)])
        out = {}
        for (seq, _), (_, least), draft in zip(wants, lengths, drafts, strict=True):
            seq.draft_model = self.draft_model.model_key
            out[seq] = draft if len(draft) >= max(1, least) else []
        return out

    def _lengths(self, seq: Sequence) -> tuple[int | None, int]:
        """The most and the fewest tokens ``seq`` drafts at once: its request's, else the
        load's."""
        request = seq.prediction.request
        most = request.draft_max if request.draft_max is not None else self.options.draft_max
        least = request.draft_min if request.draft_min is not None else self.options.draft_min
        return most, least
